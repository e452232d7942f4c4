"""`blkpy hotplug daemon` against a simulated xenstored: which devices get a serve, and that
serves are reaped, stopped when their device vanishes, and stopped with the daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import BLKPY, add_disk

HERE = Path(__file__).resolve().parent


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


class Daemon:
    def __init__(self, xenstored: str, tmp_path: Path, fake: bool = True) -> None:
        self.out = tmp_path / "serves"
        self.out.mkdir()
        self.log = tmp_path / "daemon.log"
        cmd = [*BLKPY, "hotplug", "daemon", "--xenstore", xenstored, "--orphan-grace", "0.5",
               "--log-dir", str(tmp_path)]
        if fake:
            cmd += ["--serve-command", f"{sys.executable} {HERE / 'fake_serve.py'}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stderr=log,
                                         env={**os.environ, "FAKE_SERVE_DIR": str(self.out)})
        wait_for(lambda: "watching" in self.log.read_text(), what="the daemon to start")

    def started(self) -> dict[int, list[str]]:
        return {int(p.name.split("-")[1]): p.read_text().split("\n")
                for p in self.out.glob("started-*")}

    def terminated(self, pid: int) -> bool:
        return (self.out / f"terminated-{pid}").exists()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def daemon(xenstored, tmp_path):
    d = Daemon(xenstored, tmp_path)
    yield d
    d.stop()


def test_serves_only_blkpy_devices(daemon, xs, raw_image, xenstored):
    add_disk(xs, raw_image, domid=3, devid=51712, script="/etc/xen/scripts/block")
    add_disk(xs, raw_image, domid=3, devid=51728, script="/etc/xen/scripts/block-blkpy")
    add_disk(xs, raw_image, domid=4, devid=51712, script="block-blkpy-debug")
    started = wait_for(lambda: len(daemon.started()) == 2 and daemon.started(),
                       what="two serves")
    argvs = sorted(a for a in started.values())
    assert [a[0] for a in argvs] == ["backend/vbd/3/51728", "backend/vbd/4/51712"]
    assert argvs[0][1:] == ["--platform", "linux", "--xenstore", xenstored]
    time.sleep(0.5)  # more xenstore traffic must not start anything twice
    xs.write("/local/domain/0/backend/vbd/3/51728/state", "2")
    time.sleep(0.5)
    assert len(daemon.started()) == 2


def test_reaps_a_serve_that_exits_and_does_not_restart_it(daemon, xs, raw_image):
    rel = add_disk(xs, raw_image)
    (pid,) = wait_for(lambda: daemon.started(), what="a serve")
    (daemon.out / f"exit-{pid}").write_text("")
    wait_for(lambda: f"serve pid {pid} ended (exit status 0)" in daemon.log.read_text(),
             what="the daemon to reap the serve")
    xs.write(f"/local/domain/0/{rel}/state", "6")
    time.sleep(0.5)
    assert list(daemon.started()) == [pid]


def test_terminates_a_serve_whose_device_vanished(daemon, xs, raw_image):
    rel = add_disk(xs, raw_image)
    (pid,) = wait_for(lambda: daemon.started(), what="a serve")
    xs.rm(f"/local/domain/0/{rel}")
    wait_for(lambda: daemon.terminated(pid), what="SIGTERM to the orphaned serve")
    # the same device created again gets a new serve
    add_disk(xs, raw_image)
    wait_for(lambda: len(daemon.started()) == 2, what="a serve for the re-created device")


def test_sigterm_stops_every_serve(daemon, xs, raw_image):
    add_disk(xs, raw_image, devid=51712)
    add_disk(xs, raw_image, devid=51728)
    pids = wait_for(lambda: len(daemon.started()) == 2 and daemon.started(), what="serves")
    assert daemon.stop() == 0
    assert all(daemon.terminated(pid) for pid in pids)
    assert "stopped" in daemon.log.read_text()


def test_forked_serve_runs_the_serve_command(xenstored, xs, tmp_path):
    """Without --serve-command the daemon forks `blkpy serve` itself; here (no Xen devices,
    image missing) that serve fails with serve's one-line error in the device's log."""
    d = Daemon(xenstored, tmp_path, fake=False)
    try:
        add_disk(xs, str(tmp_path / "missing.raw"), domid=7, devid=51712)
        log = tmp_path / "serve-7-51712.log"
        wait_for(lambda: "ended (exit status 1)" in d.log.read_text(), what="serve to fail")
        text = log.read_text()
        assert text.startswith("Error: ") and text.count("\n") == 1, text
    finally:
        assert d.stop() == 0


def test_a_second_daemon_on_the_same_xenstore_is_refused(daemon, xenstored):
    """Two watchers would start two serves for every device (seen in the lab)."""
    res = subprocess.run([*BLKPY, "hotplug", "daemon", "--xenstore", xenstored],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert f"another blkpy hotplug daemon (pid {daemon.proc.pid}) already watches" in res.stderr


def test_daemon_without_xenstored_fails_cleanly(tmp_path):
    res = subprocess.run([*BLKPY, "hotplug", "daemon", "--xenstore", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("Error: cannot connect to xenstored")


_CHILD = """
import sys, time
from blkpy.hotplug.watcher import set_cmdline
assert not set_cmdline(["x" * 1000000])  # more than any command line: refused, untouched
ok = set_cmdline(["blkpy", "serve", "backend/vbd/3/51712"])
open(sys.argv[1], "w").write("0" if ok else "1")
time.sleep(5)
"""


def test_a_forked_serve_is_recognised_by_its_command_line(tmp_path):
    """Forked serves rewrite their command line, so `remove` (and ps/pgrep) can tell them.
    The new command line must fit in the process's original one (the daemon's, here a
    child whose own command line leaves room, independent of how pytest was started)."""
    from blkpy.hotplug.device import is_serve_of

    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(ready), "x" * 64])
    try:
        wait_for(ready.exists, what="the child")
        wait_for(lambda: ready.read_text() != "", what="the child's verdict")
        assert ready.read_text() == "0"
        assert is_serve_of(child.pid, "backend/vbd/3/51712")
        assert is_serve_of(child.pid, "/local/domain/0/backend/vbd/3/51712")
        assert not is_serve_of(child.pid, "backend/vbd/3/51728")
    finally:
        child.kill()
        child.wait()
