"""The nbd backend against real servers (nbdkit, qemu-nbd): the simulated guest's
workloads through `blkpy serve`, data checked afterwards with the servers' own tools,
reconnects, read-only exports, flush/trim/zero as the server sees them, TLS, and a
migration between two serves over one export."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nbd_servers import nbdkit, need, qemu_nbd

from blkpy import engine as io
from blkpy import ring as blkif
from blkpy.backends import DiskError, open_disk
from blkpy.backends.nbd import (
    DEFAULT_RECONNECT_DELAY_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    NbdDisk,
    parse_target,
)
from blkpy.engine import IoVector, make_engine
from blkpy.sim.disk_model import DiskModel
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import BackendProcess, SimHost
from blkpy.sim.run import remove_and_check
from blkpy.sim.toolstack import DiskSpec
from blkpy.sim.workloads import run_workload
from blkpy.xenbus import XenbusState

MIB = 1 << 20
GUEST = 1
DEVID = 51712


# ---- targets ----------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "uri", "delay"), [
    ("nbd:unix:/run/n.sock", "nbd+unix:///?socket=/run/n.sock", DEFAULT_RECONNECT_DELAY_S),
    ("nbd:unix:/run/n.sock:exportname=vm 1", "nbd+unix:///vm%201?socket=/run/n.sock",
     DEFAULT_RECONNECT_DELAY_S),
    ("nbd:storage.example:10809:exportname=disk", "nbd://storage.example:10809/disk",
     DEFAULT_RECONNECT_DELAY_S),
    ("nbd:10.0.0.2:10809:reconnect-delay=2.5", "nbd://10.0.0.2:10809/", 2.5),
    ("nbd:unix:/s:tls-psk-file=/etc/k.psk", "nbds+unix:///?socket=/s&tls-psk-file=/etc/k.psk",
     DEFAULT_RECONNECT_DELAY_S),
    ("nbd+unix:///exp?socket=/run/n.sock&reconnect-delay=0",
     "nbd+unix:///exp?socket=/run/n.sock", 0.0),
    ("nbds://alice@host:10810/exp?tls-certificates=/etc/pki",
     "nbds://alice@host:10810/exp?tls-certificates=/etc/pki", DEFAULT_RECONNECT_DELAY_S),
    ("nbd://[::1]:10809/", "nbd://[::1]:10809/", DEFAULT_RECONNECT_DELAY_S),
])
def test_targets_become_libnbd_uris(target: str, uri: str, delay: float) -> None:
    parsed = parse_target(target)
    assert (parsed.uri, parsed.reconnect_delay) == (uri, delay)
    assert parsed.request_timeout == DEFAULT_REQUEST_TIMEOUT_S


def test_request_timeout_option() -> None:
    assert parse_target("nbd:unix:/s:request-timeout=0").request_timeout == 0
    assert parse_target("nbd+unix:///?socket=/s&request-timeout=2.5").request_timeout == 2.5


@pytest.mark.parametrize("target", [
    "nbd:", "nbd:unix:", "nbd:unix:relative.sock", "nbd:host", "nbd:host:port",
    "nbd:host:0", "nbd:host:70000", "nbd:unix:/s:exportname", "nbd:unix:/s:bogus=1",
    "nbd:unix:/s:exportname=a:exportname=b", "nbd:unix:/s:reconnect-delay=soon",
    "nbd:unix:/s:reconnect-delay=-1", "nbd:unix:/s:reconnect-delay=nan",
    "nbd:unix:/s:request-timeout=1h", "nbd+unix:///?socket=/s&request-timeout=7200",
    "nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd+unix:///x?socket=rel",
    "nbd:///x", "nbd://host:99999/", "nbd://host/x?socket=/s", "nbd://host/x?frob=1",
    "nbd://host/x#frag", "nbd://host/x?tls-psk-file=/k", "nbd://host/?socket",
])
def test_malformed_targets_are_one_line_errors(target: str) -> None:
    with pytest.raises(DiskError) as info:
        parse_target(target)
    assert "\n" not in str(info.value)


def test_sim_run_refuses_a_malformed_target_without_a_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "blkpy", "sim", "run", "nbd:host:port"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "port 'port'" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_serve_reports_an_unreachable_server_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DiskError) as info:
        open_disk(f"nbd:unix:{tmp_path}/nobody.sock", "nbd")
    assert "nobody.sock" in str(info.value) and "\n" not in str(info.value)


# ---- the guest through `blkpy serve` ----------------------------------------------------


@contextlib.contextmanager
def attached(host: SimHost, target: str, *, devid: int = DEVID
             ) -> Iterator[tuple[Frontend, BackendProcess]]:
    """Add ``target`` as a disk of guest GUEST (a `blkpy serve` process), connect its
    frontend; afterwards remove the disk and require a clean exit of the serve."""
    spec = DiskSpec(GUEST, devid, "xvda", target)
    backend = host.add_disk(spec)
    assert backend is not None
    frontend = Frontend(host.guests[GUEST], host.guest_xenstore(GUEST), devid,
                        max_indirect_segments=32)
    try:
        assert host.wait_backend_state(spec, XenbusState.INIT_WAIT, timeout=30), backend.log()
        frontend.connect(timeout=30)
        yield frontend, backend
        assert frontend.close(timeout=30) == []
    finally:
        problems = remove_and_check(host, spec, backend)
    assert problems == [], backend.log()[-3000:]


def sim_host() -> SimHost:
    host = SimHost()
    host.start()
    host.create_guest(GUEST)
    return host


def read_back(frontend: Frontend, model: DiskModel, span: int, chunk: int = 32 << 10) -> int:
    """Read [0, span) through the guest and count bytes differing from ``model``."""
    bad = 0
    for off in range(0, span, chunk):
        done = frontend.read(off // 512, chunk, timeout=30)
        assert done.status == blkif.BLKIF_RSP_OKAY
        bad += model.check(off, done.data)
    return bad


def _writes_flush_reads(frontend: Frontend, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = {k * 8: rng.bytes(4096) for k in range(16)}  # sector: one page each
    big = rng.bytes(128 << 10)  # 32 segments: an indirect request
    for sector, data in blocks.items():
        assert frontend.write(sector, data).status == blkif.BLKIF_RSP_OKAY
    assert frontend.write(2048, big).status == blkif.BLKIF_RSP_OKAY
    assert frontend.flush().status == blkif.BLKIF_RSP_OKAY
    for sector, data in [*blocks.items(), (2048, big)]:
        done = frontend.read(sector, len(data))
        assert done.status == blkif.BLKIF_RSP_OKAY and bytes(done.data) == data


def check_served_by_the_loop(frontend: Frontend, backend: BackendProcess) -> None:
    """The guest's reads, writes (direct and indirect) and flushes are the native loop's:
    its counters grow by exactly what the guest sent, so none took the Python path, and
    every byte reads back. (A first round lets Python map the guest's pages: the loop
    serves persistent grants only.)"""
    _writes_flush_reads(frontend, 17)
    before = backend.stats()["loops"][0]
    _writes_flush_reads(frontend, 18)
    after = backend.stats()["loops"][0]
    served = {k: after[k] - before[k] for k in ("rd_req", "wr_req", "f_req", "errors")}
    assert served == {"rd_req": 17, "wr_req": 17, "f_req": 1, "errors": 0}, served


@pytest.fixture(scope="module")
def randrw_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `blkpy sim run --workload randrw` leaves on a zeroed 64 MiB raw file: the
    same seed leaves the same bytes on any backend (the workload never has two
    overlapping requests in flight)."""
    path = tmp_path_factory.mktemp("ref") / "ref.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
    out = subprocess.run([sys.executable, "-m", "blkpy", "sim", "run", str(path),
                          "--format", "raw", "--workload", "randrw", "--requests", "1500"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return path


def _sim_run(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blkpy", "sim", "run", target,
                           "--workload", "randrw", "--requests", "1500"],
                          capture_output=True, text=True, timeout=300)


def test_sim_run_randrw_on_nbdkit_memory(tmp_path: Path, randrw_reference: Path) -> None:
    """Then qemu-img, reading the export itself over NBD, finds the reference's bytes."""
    need("qemu-img")
    with nbdkit(tmp_path, "memory", "64M") as server:
        out = _sim_run(server.target)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "result    OK" in out.stdout
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                              str(randrw_reference), server.uri],
                             capture_output=True, text=True, timeout=120)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_sim_run_randrw_on_qemu_nbd_qcow2(tmp_path: Path, randrw_reference: Path) -> None:
    """qemu-nbd serving a qcow2 image; after it stops, qemu-img compares the image file
    with the reference and checks its metadata."""
    need("qemu-img")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    with qemu_nbd(tmp_path, image, "qcow2") as server:
        out = _sim_run(server.target)
        assert out.returncode == 0, out.stdout + out.stderr
    for cmd in (["qemu-img", "compare", "-F", "qcow2", str(randrw_reference), str(image)],
                ["qemu-img", "check", "-q", str(image)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_server_killed_mid_workload_and_restarted_no_guest_error(tmp_path: Path) -> None:
    """SIGKILL the server while the guest has requests in flight and restart it on the
    same socket: every request completes (retried on the new connection), every read
    matches, and the serve logged the reconnect."""
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(32 * MIB)
    server = nbdkit(tmp_path, "file", str(disk))
    host = sim_host()
    try:
        server.start()
        with attached(host, server.target) as (frontend, backend):
            model = DiskModel(32 * MIB, zeroed=True)
            summary: list[object] = []
            worker = threading.Thread(target=lambda: summary.append(run_workload(
                frontend, "randrw", requests=8000, seed=3, model=model, timeout=60)))
            worker.start()
            time.sleep(0.5)
            assert worker.is_alive(), "the workload ended before the server was killed"
            server.stop(kill=True)
            time.sleep(1.0)
            server.start()
            worker.join(120)
            assert not worker.is_alive()
            result = summary[0]
            assert result.ok, result.to_text()  # type: ignore[attr-defined]
            assert read_back(frontend, model, 32 * MIB) == 0
            deadline = time.monotonic() + 10  # the serve reports on its 2 s timer
            while "reconnect(s)" not in backend.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "1 reconnect(s)" in backend.log(), backend.log()[-2000:]
    finally:
        server.stop()
        host.close()


def test_requests_fail_after_the_reconnect_delay_and_work_again_later(tmp_path: Path) -> None:
    host = sim_host()
    server = nbdkit(tmp_path, "memory", "16M")
    try:
        server.start()
        with attached(host, f"{server.target}:reconnect-delay=0.5") as (frontend, _backend):
            assert frontend.write(0, b"\x5a" * 4096).status == blkif.BLKIF_RSP_OKAY
            server.stop(kill=True)
            assert frontend.read(0, 4096, timeout=30).status == blkif.BLKIF_RSP_ERROR
            server.start()  # a fresh, zeroed RAM disk: only the connection matters here
            deadline = time.monotonic() + 15
            status = blkif.BLKIF_RSP_ERROR
            while status != blkif.BLKIF_RSP_OKAY and time.monotonic() < deadline:
                time.sleep(0.2)
                status = frontend.read(0, 4096, timeout=30).status
            assert status == blkif.BLKIF_RSP_OKAY
    finally:
        server.stop()
        host.close()


@pytest.mark.parametrize("how", ["idle", "read in flight", "server stopped answering"])
def test_sigterm_ends_a_serve_whose_server_is_gone(tmp_path: Path, how: str) -> None:
    """SIGTERM ends the serve within seconds although its server went away: neither a
    guest's request waiting for the connection nor the flush before the disconnect waits
    out reconnect-delay (30 s by default; the serve looked deaf to SIGTERM for that long),
    nor a request a server holds without answering the 60 s request-timeout."""
    host = sim_host()
    argv = ["--filter=delay", "memory", "16M", "rdelay=60"] if "answering" in how \
        else ["memory", "16M"]
    server = nbdkit(tmp_path, *argv)
    try:
        server.start()
        spec = DiskSpec(GUEST, DEVID, "xvda", server.target)
        backend = host.add_disk(spec)
        assert backend is not None
        frontend = Frontend(host.guests[GUEST], host.guest_xenstore(GUEST), DEVID)
        assert host.wait_backend_state(spec, XenbusState.INIT_WAIT, timeout=30)
        frontend.connect(timeout=30)
        assert frontend.write(0, b"\x5a" * 4096).status == blkif.BLKIF_RSP_OKAY
        if "answering" not in how:
            server.stop(kill=True)
        if how != "idle":
            threading.Thread(target=frontend.read, args=(0, 4096), kwargs={"timeout": 90},
                             daemon=True).start()
            time.sleep(0.5)  # the read reaches the serve, which holds it
        start = time.monotonic()
        backend.proc.send_signal(signal.SIGTERM)
        status = backend.wait(15)
        took = time.monotonic() - start
        assert status == 0, backend.log()[-3000:]
        assert took < 8, (took, backend.log()[-3000:])
    finally:
        server.stop()
        host.close()


def test_read_only_export_is_read_only_to_the_guest(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x11" * MIB)
    host = sim_host()
    try:
        with nbdkit(tmp_path, "-r", "file", str(disk)) as server, \
                attached(host, server.target) as (frontend, backend):
            assert frontend.info is not None
            assert frontend.info.info & blkif.VDISK_READONLY
            assert not frontend.info.discard
            assert frontend.write(0, b"\x22" * 4096).status == blkif.BLKIF_RSP_ERROR
            assert bytes(frontend.read(0, 4096).data) == b"\x11" * 4096
            assert "is read-only: so is the device" in backend.log()
    finally:
        host.close()
    assert disk.read_bytes() == b"\x11" * MIB


def test_migration_between_two_serves_over_one_export(tmp_path: Path) -> None:
    """The guest writes through one serve, which flushes and closes when the disk goes;
    a second serve opens the export and the guest reads back everything."""
    host = sim_host()
    try:
        with nbdkit(tmp_path, "memory", "16M") as server:
            model = DiskModel(16 * MIB, zeroed=True)
            with attached(host, server.target) as (frontend, _backend):
                result = run_workload(frontend, "randrw", requests=1500, seed=5, model=model)
                assert result.ok, result.to_text()
            with attached(host, server.target) as (frontend, _backend):
                assert read_back(frontend, model, 16 * MIB) == 0
            assert len(host.backends) == 2
    finally:
        host.close()


def test_reads_writes_and_flushes_are_served_by_the_native_loop(tmp_path: Path) -> None:
    host = sim_host()
    try:
        with nbdkit(tmp_path, "memory", "16M") as server, \
                attached(host, server.target) as (frontend, backend):
            check_served_by_the_loop(frontend, backend)
    finally:
        host.close()


@contextlib.contextmanager
def _attached_to_counting_server(tmp_path: Path) -> Iterator[tuple[Frontend, BackendProcess]]:
    """A guest of the simulated host on a 16 MiB nbdkit memory export whose stats filter
    counts the requests that reach it (``_server_ops`` once this is left)."""
    host = sim_host()
    try:
        with nbdkit(tmp_path, "--filter=stats", "memory", "16M",
                    f"statsfile={tmp_path / 'stats.txt'}") as server, \
                attached(host, server.target) as (frontend, backend):
            yield frontend, backend
    finally:
        host.close()


def _server_ops(tmp_path: Path, op: str) -> int:
    """How many ``op`` requests the counting server saw."""
    stats = tmp_path / "stats.txt"
    return int(_stats_file(stats).get(op, "0").replace(",", ""))


def test_discards_are_served_by_the_native_loop_too(tmp_path: Path) -> None:
    """A guest's discard is the loop's as well (an NBD WRITE_ZEROES, fenced behind the
    writes before it): the range reads back as zeros, the server saw zero requests, and
    the loop's counters took it (before, every discard went back to Python, which first
    waited for everything the loop had in flight)."""
    with _attached_to_counting_server(tmp_path) as (frontend, backend):
        assert frontend.info is not None and frontend.info.discard
        _writes_flush_reads(frontend, 19)  # Python maps the guest's pages first
        before = backend.stats()["loops"][0]
        data = b"\x77" * (64 << 10)
        assert frontend.write(4096, data).status == blkif.BLKIF_RSP_OKAY
        assert frontend.discard(4096 + 16, 64).status == blkif.BLKIF_RSP_OKAY
        back = bytes(frontend.read(4096, len(data)).data)
        assert back == data[:8192] + bytes(32768) + data[40960:]
        after = backend.stats()["loops"][0]
        served = {k: after[k] - before[k] for k in ("ds_req", "wr_req", "rd_req", "errors")}
        assert served == {"ds_req": 1, "wr_req": 1, "rd_req": 1, "errors": 0}, served
    assert _server_ops(tmp_path, "zero") >= 1, (tmp_path / "stats.txt").read_text()


def test_a_hostile_guests_discards_are_refused_and_reach_no_server(tmp_path: Path) -> None:
    """Discards the loop now serves, with a guest's bad fields: a range past the end, a
    count that would wrap, a secure discard the disk does not offer. Each is answered
    with an error, none reaches the server, and the disk's data stays as it was."""
    with _attached_to_counting_server(tmp_path) as (frontend, _backend):
        assert frontend.info is not None and frontend.info.discard
        assert not frontend.info.discard_secure
        end = (16 * MIB) >> 9
        data = b"\x5a" * 4096
        assert frontend.write(end - 8, data).status == blkif.BLKIF_RSP_OKAY
        for sector, count, secure, want in [
            (end - 8, 16, False, blkif.BLKIF_RSP_ERROR),      # past the end
            (end, 8, False, blkif.BLKIF_RSP_ERROR),           # starts at the end
            (8, (1 << 64) - 8, False, blkif.BLKIF_RSP_ERROR),  # wraps
            ((1 << 64) - 8, 16, False, blkif.BLKIF_RSP_ERROR),
            (end - 8, 8, True, blkif.BLKIF_RSP_EOPNOTSUPP),   # secure: not offered
        ]:
            done = frontend.discard(sector, count, secure=secure)
            assert done.status == want, (sector, count, secure, done.status)
        back = frontend.read(end - 8, 4096)
        assert back.status == blkif.BLKIF_RSP_OKAY and bytes(back.data) == data
    stats = (tmp_path / "stats.txt").read_text()
    assert _server_ops(tmp_path, "zero") == 0, stats
    assert _server_ops(tmp_path, "trim") == 0, stats


def test_four_queues_share_one_connection(tmp_path: Path) -> None:
    """A multi-queue guest: each ring's engine has its own completion queue on the disk's
    one connection (flushes then cover every queue's writes, whatever the server's
    multi-conn says)."""
    host = SimHost(serve_args=["--max-queues", "4"])
    host.start()
    guest = host.create_guest(GUEST)
    try:
        with nbdkit(tmp_path, "memory", "32M") as server:
            spec = DiskSpec(GUEST, DEVID, "xvda", server.target)
            backend = host.add_disk(spec)
            assert backend is not None
            frontend = Frontend(guest, host.guest_xenstore(GUEST), DEVID, num_queues=4,
                                max_ring_page_order=1)
            frontend.connect(timeout=30)
            assert len(frontend.rings) == 4
            model = DiskModel(32 * MIB, zeroed=True)
            result = run_workload(frontend, "randrw", requests=3000, seed=9, model=model)
            assert result.ok, result.to_text()
            assert frontend.close(timeout=30) == []
            assert remove_and_check(host, spec, backend) == []
    finally:
        host.close()


# ---- the disk and its engine in process ---------------------------------------------------


def _stats_file(path: Path) -> dict[str, str]:
    """nbdkit's stats filter: ``op: N ops, ...`` lines."""
    out = {}
    for line in path.read_text().splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and rest.strip().split()[:1] and rest.split()[1:2] == ["ops,"]:
            out[name] = rest.split()[0]
    return out


def test_flush_trim_and_zero_reach_the_server(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x33" * (4 * MIB))
    stats = tmp_path / "stats.txt"
    with nbdkit(tmp_path, "--filter=stats", "file", str(disk), f"statsfile={stats}") as server:
        nbd = NbdDisk(server.target)
        assert nbd.can_discard and not nbd.readonly and nbd.size == 4 * MIB
        assert nbd.info().structured_replies == 1
        data = bytearray(b"\x44" * 8192)
        nbd.writev(MIB, [memoryview(data)[:4096], memoryview(data)[4096:]])
        nbd.flush()
        nbd.discard(2 * MIB, 64 << 10)
        nbd.trim(3 * MIB, 64 << 10)
        back = bytearray(8192)
        nbd.readv(MIB, [memoryview(back)])
        assert back == data
        nbd.readv(2 * MIB, [memoryview(back)])
        assert back == bytes(8192)
        nbd.close()
    ops = _stats_file(stats)
    for op in ("write", "flush", "zero", "trim"):
        assert int(ops.get(op, "0").replace(",", "")) >= 1, (op, stats.read_text())
    content = disk.read_bytes()
    assert content[MIB : MIB + 8192] == data
    assert content[2 * MIB : 2 * MIB + (64 << 10)] == bytes(64 << 10)


def _read_vector(buf: np.ndarray, offsets: list[int]) -> IoVector:
    n = len(offsets)
    base = buf.ctypes.data
    return IoVector(
        kind=np.full(n, io.READ, dtype=np.int32), offset=np.array(offsets, dtype=np.uint64),
        length=np.full(n, 4096, dtype=np.int64), iov_first=np.arange(n, dtype=np.uint32),
        iov_count=np.ones(n, dtype=np.uint32),
        iov=np.array([(base + 4096 * k, 4096) for k in range(n)], dtype=np.uint64),
        owner=np.arange(n))


def test_engine_retries_what_a_dropped_connection_had_in_flight(tmp_path: Path) -> None:
    """Reads held by the server are in flight when the connection drops: they come back
    right, on the next connection, into the same pages."""
    # One server thread, each read held 100 ms: nbdkit 1.32 with several threads could
    # abort on an assertion when its client hung up while they were answering (about one
    # run in 25), and this client then waited out its reconnect delay for a dead server.
    with nbdkit(tmp_path, "--threads=1", "--filter=delay", "pattern", "16M",
                "rdelay=100ms") as server:
        nbd = NbdDisk(server.target)
        engine = make_engine("auto", nbd)
        buf = np.zeros(16 * 4096, dtype=np.uint8)
        offsets = [k * 65536 for k in range(16)]
        vec = _read_vector(buf, offsets)
        engine.submit(vec)
        nbd.drop_connection()
        done: list[IoVector] = []
        deadline = time.monotonic() + 30
        while not done and time.monotonic() < deadline:
            done = engine.wait(1.0)
        assert done == [vec] and not vec.result.any()
        # nbdkit's pattern plugin: each 8-byte word is its own big-endian offset
        words = buf.view(">u8").reshape(16, 512)
        expect = np.array(offsets, dtype=np.uint64)[:, None] + np.arange(0, 4096, 8)
        assert (words == expect).all()
        stats = nbd.stats()
        assert stats["reconnects"] == 1 and stats["retried"] >= 1
        engine.close()
        nbd.close()


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def nbdkit_tcp(tmp_path: Path, *args: str) -> Iterator[int]:
    """nbdkit listening on a free loopback TCP port (yielded), stopped by its pid."""
    need("nbdkit")
    port = _free_tcp_port()
    log_path = tmp_path / "nbdkit-tcp.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                                 "-p", str(port), *args], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, log_path.read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "nbdkit did not listen"
            time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_tcp_targets_reach_a_server_on_a_port(tmp_path: Path) -> None:
    """nbd:HOST:PORT[:exportname=X] and nbd://HOST:PORT/X, against nbdkit listening on
    loopback TCP (the other tests use unix sockets)."""
    with nbdkit_tcp(tmp_path, "memory", "4M") as port:
        data = bytearray(os.urandom(8192))
        for k, target in enumerate([f"nbd:127.0.0.1:{port}",
                                    f"nbd:127.0.0.1:{port}:exportname=disk",
                                    f"nbd://127.0.0.1:{port}/disk"]):
            nbd = NbdDisk(target)
            assert nbd.size == 4 * MIB and not nbd.readonly
            nbd.writev(k * 8192, [memoryview(data)])
            nbd.flush()
            back = bytearray(8192)
            nbd.readv(k * 8192, [memoryview(back)])
            assert back == data, target
            nbd.close()


def _tls_round_trip(nbd: NbdDisk, offset: int) -> None:
    """A connection that negotiated TLS writes a block and reads it back, then closes."""
    assert nbd.info().tls == 1
    data = bytearray(os.urandom(4096))
    nbd.writev(offset, [memoryview(data)])
    back = bytearray(4096)
    nbd.readv(offset, [memoryview(back)])
    assert back == data
    nbd.close()


def test_tls_psk(tmp_path: Path) -> None:
    """An export that requires TLS: the nbds+unix URI with the PSK works (and says TLS
    was negotiated); a plain connection is refused in one line."""
    psk = tmp_path / "keys.psk"
    psk.write_text(f"alice:{os.urandom(32).hex()}\n")
    psk.chmod(0o600)
    with nbdkit(tmp_path, "--tls=require", f"--tls-psk={psk}", "memory", "4M") as server:
        _tls_round_trip(NbdDisk(f"nbds+unix://alice@/?socket={server.sock}&tls-psk-file={psk}"),
                        0)
        with pytest.raises(DiskError):
            NbdDisk(server.target)


def _x509(directory: Path, name: str) -> Path:
    """A CA (``name``) and a server certificate for localhost signed by it, in
    ``directory`` under nbdkit's file names; the CA's certificate alone in
    ``directory/client``, as a client's tls-certificates directory."""
    directory.mkdir()
    (directory / "client").mkdir()

    def tool(*args: str, template: str | None = None) -> None:
        if template is not None:
            (directory / "template").write_text(template)
            args = (*args, "--template", str(directory / "template"))
        subprocess.run(["certtool", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca = directory / "ca-key.pem", directory / "ca-cert.pem"
    key, cert = directory / "server-key.pem", directory / "server-cert.pem"
    tool("--generate-privkey", "--outfile", str(ca_key))
    tool("--generate-self-signed", "--load-privkey", str(ca_key), "--outfile", str(ca),
         template=f"cn = {name}\nca\ncert_signing_key\nexpiration_days = 2\n")
    tool("--generate-privkey", "--outfile", str(key))
    tool("--generate-certificate", "--load-ca-certificate", str(ca), "--load-ca-privkey",
         str(ca_key), "--load-privkey", str(key), "--outfile", str(cert),
         template="cn = localhost\ndns_name = localhost\ntls_www_server\n"
                  "encryption_key\nsigning_key\nexpiration_days = 2\n")
    key.chmod(0o600)
    (directory / "client" / "ca-cert.pem").write_bytes(ca.read_bytes())
    return directory


def test_tls_x509_certificates(tmp_path: Path) -> None:
    """An export that requires TLS with X.509 certificates, over TCP (where libnbd
    verifies the server: on a unix socket it does not by default): a client trusting
    the server's CA (tls-certificates=DIR) reads and writes over TLS; one trusting
    another CA is refused in one line."""
    need("certtool")
    server_dir = _x509(tmp_path / "pki", "blkpy test CA")
    other = _x509(tmp_path / "other", "another CA")
    with nbdkit_tcp(tmp_path, "--tls=require", f"--tls-certificates={server_dir}",
                    "memory", "4M") as port:
        _tls_round_trip(
            NbdDisk(f"nbds://localhost:{port}/?tls-certificates={server_dir / 'client'}"), 4096)
        with pytest.raises(DiskError) as info:
            NbdDisk(f"nbds://localhost:{port}/?tls-certificates={other / 'client'}")
        assert "\n" not in str(info.value)


def test_a_flush_waits_for_the_writes_before_it_and_holds_back_what_follows(
        tmp_path: Path) -> None:
    """NBD's flush covers only writes the server has answered, so the engine sends it
    after them (the server holds each write 100 ms), and the read after the flush waits
    for it: the order nbdkit's log filter saw."""
    log = tmp_path / "requests.log"
    with nbdkit(tmp_path, "--filter=log", "--filter=delay", "memory", "16M", "wdelay=100ms",
                f"logfile={log}") as server:
        nbd = NbdDisk(server.target)
        engine = make_engine("auto", nbd)
        buf = np.ones(8192, dtype=np.uint8)
        vec = IoVector(
            kind=np.array([io.WRITE, io.WRITE, io.FLUSH, io.READ], dtype=np.int32),
            offset=np.array([0, 65536, 0, 4096], dtype=np.uint64),
            length=np.array([4096, 4096, 0, 4096], dtype=np.int64),
            iov_first=np.array([0, 1, 0, 0], dtype=np.uint32),
            iov_count=np.array([1, 1, 0, 1], dtype=np.uint32),
            iov=np.array([(buf.ctypes.data, 4096), (buf.ctypes.data + 4096, 4096)],
                         dtype=np.uint64),
            owner=np.arange(4))
        engine.submit(vec)
        deadline = time.monotonic() + 30
        while not engine.wait(1.0) and time.monotonic() < deadline:
            pass
        assert not vec.result.any() and vec.pending == 0
        engine.close()
        nbd.close()
    lines = log.read_text().splitlines()

    def at(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    flush = at("Flush id=3 ...")
    assert at("...Write id=1 return") < flush and at("...Write id=2 return") < flush
    assert at("...Flush id=3 return") < at("Read id=4")


def test_a_server_that_stops_answering_is_dropped_and_the_request_fails(
        tmp_path: Path) -> None:
    """The server holds every read for 30 s: with request-timeout=0.2 the connection is
    dropped, the read retried on a new one, and after its last attempt it fails instead
    of hanging the guest."""
    with nbdkit(tmp_path, "--filter=delay", "memory", "16M", "rdelay=30") as server:
        nbd = NbdDisk(f"{server.target}:request-timeout=0.2:reconnect-delay=5")
        with pytest.raises(OSError):
            nbd.readv(0, [memoryview(bytearray(4096))])
        stats = nbd.stats()
        assert stats["stalls"] >= 1 and stats["reconnects"] >= 1
        nbd.close()
