"""The lifecycle guest's I/O program (domU/lcio.c), compiled with the host's gcc and run on a
regular file: its windows, result files and data check, without booting anything."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "domU" / "lcio.c"
ECHO = Path(__file__).parent / "dom0" / "clock-echo.py"
BLOCKS = 4
#: (stream, block size): both sizes the guest job uses, in the areas of two different streams
STREAMS = [(0, 65536), (1, 4096)]
MIB = 1 << 20


@pytest.fixture(scope="module")
def lcio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on this host")
    exe = tmp_path_factory.mktemp("lcio") / "lcio"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def _direct_ok(path: Path) -> bool:
    """Whether the file system under ``path`` takes O_DIRECT (tmpfs before Linux 6.6 does not)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def _pattern(stream: int, it: int, bs: int) -> bytes:
    """What ``yes "LC s<stream> i<it>" | head -c <bs>`` gives (the guest job's old recipe)."""
    line = f"LC s{stream} i{it}\n".encode()
    return (line * (bs // len(line) + 1))[:bs]


class Guest:
    """The job's side of the protocol: the window file, renamed into place, and results."""

    def __init__(self, exe: Path, d: Path) -> None:
        self.dir = d
        self.disk = d / "disk"
        with open(self.disk, "wb") as f:
            f.truncate(8 * MIB)
        self.window("warmup")
        env = dict(os.environ)
        if not _direct_ok(self.disk):
            env["LCIO_BUFFERED"] = "1"
        self.procs = [subprocess.Popen([str(exe), str(s), str(self.disk), str(bs), str(BLOCKS),
                                        str(d / "lc-window"), str(d)], env=env,
                                       stderr=subprocess.PIPE, text=True)
                      for s, bs in STREAMS]

    def window(self, name: str) -> None:
        tmp = self.dir / "lc-window.tmp"
        tmp.write_text(name + "\n")
        tmp.rename(self.dir / "lc-window")

    def results(self, name: str) -> list[list[int]]:
        """Each stream's 'max_us errs bad n gap_us' for the window, once it is there."""
        out = []
        for s, _ in STREAMS:
            path = self.dir / f"lc-res.{name}.{s}"
            deadline = time.monotonic() + 10
            while not path.exists():
                assert time.monotonic() < deadline, f"stream {s} never closed {name}"
                time.sleep(0.01)
            out.append([int(v) for v in path.read_text().split()])
        return out

    def stop(self) -> list[str]:
        self.window("end")
        errs = [p.communicate(timeout=10)[1] for p in self.procs]
        assert [p.returncode for p in self.procs] == [0] * len(self.procs), errs
        return errs


@pytest.fixture
def guest(lcio: Path, tmp_path: Path) -> Iterator[Guest]:
    g = Guest(lcio, tmp_path)
    yield g
    # a failed test leaves its streams looping: they must not outlive it
    for p in g.procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_each_window_reports_its_requests_and_the_data_checks_out(guest: Guest):
    for old, new in (("warmup", "upgrade"), ("upgrade", "kill")):
        time.sleep(0.2)
        guest.window(new)
        for max_us, errs, bad, n, gap_us in guest.results(old):
            assert n > 0 and errs == 0 and bad == 0
            assert max_us > 0 and gap_us > 0
    time.sleep(0.2)
    assert guest.stop() == ["", ""]
    for _, errs, bad, n, _ in guest.results("kill"):
        assert n > 0 and errs == 0 and bad == 0
    # each stream wrote its own area, in the guest's pattern: block k holds an iteration = k
    data = guest.disk.read_bytes()
    for s, bs in STREAMS:
        base = (1 + 2 * s) * MIB
        for k in range(BLOCKS):
            block = data[base + k * bs: base + (k + 1) * bs]
            it = int(block.split(b"\n", 1)[0].split(b" i")[1])
            assert it % BLOCKS == k and block == _pattern(s, it, bs)


def test_a_block_changed_behind_the_streams_back_is_a_mismatch(guest: Guest):
    time.sleep(0.2)
    # stopped, the streams cannot rewrite what is damaged before the window's check reads it
    for p in guest.procs:
        p.send_signal(signal.SIGSTOP)
    with open(guest.disk, "r+b") as f:
        for s, bs in STREAMS:
            for k in range(BLOCKS):
                f.seek((1 + 2 * s) * MIB + k * bs)
                f.write(b"X" * bs)
        f.flush()
        os.fsync(f.fileno())
    guest.window("kill")
    for p in guest.procs:
        p.send_signal(signal.SIGCONT)
    # a stream stopped between its write and its read may rewrite one block first
    for _, _, bad, _, _ in guest.results("warmup"):
        assert bad >= BLOCKS - 1
    errs = guest.stop()
    assert all("does not hold" in e for e in errs)
    assert all(r[2] == 0 for r in guest.results("kill"))


def test_the_clock_pings_measure_dom0_s_clock_against_the_guest_s(lcio: Path, tmp_path: Path):
    """`lcio clock` against dom0's echo (dom0/clock-echo.py) on one file: both read this
    host's clock, so the offset it finds is nought within the bound it gives."""
    disk = tmp_path / "ctl"
    disk.write_bytes(bytes(MIB))
    env = dict(os.environ)
    if not _direct_ok(disk):
        env["LCIO_BUFFERED"] = "1"
    echo = subprocess.Popen([sys.executable, str(ECHO), str(disk), "8", "30"])
    try:
        out = subprocess.run([str(lcio), "clock", str(disk), "8"], env=env, timeout=60,
                             capture_output=True, text=True)
        assert echo.wait(timeout=30) == 0
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait()
    assert out.returncode == 0, out.stderr
    m = re.fullmatch(r"lcio clock: dom0 is (-?[0-9.]+) ms ahead of the guest, within "
                     r"([0-9.]+) ms \(best of 8 round trips\)\n", out.stderr)
    assert m is not None, out.stderr
    assert abs(float(m[1])) <= float(m[2]) + 0.2


def test_the_clock_pings_say_so_when_nobody_answers(lcio: Path, tmp_path: Path):
    disk = tmp_path / "ctl"
    disk.write_bytes(bytes(MIB))
    env = dict(os.environ, LCIO_BUFFERED="1")
    out = subprocess.run([str(lcio), "clock", str(disk), "1"], env=env, timeout=60,
                         capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (1, "lcio clock: no answer from dom0\n")
