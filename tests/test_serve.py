"""`blkpy serve` as a real subprocess on the simulated host: handshake, reconnect, toolstack
removal, SIGTERM, hostile frontend nodes and operator errors."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from blkpy import heap, ring
from blkpy.backends import open_disk
from blkpy.defaults import EXIT_HANDED_OVER
from blkpy.serve import ServeError, _replace, parse_params
from blkpy.sim.frontend import Frontend, NegotiationError
from blkpy.sim.host import SimHost
from blkpy.sim.toolstack import DiskSpec
from blkpy.xenbus import XenbusState

DEVID = 51712


@pytest.fixture
def host():
    with SimHost() as h:
        yield h


def _attach(host, image, **spec_kw):
    guest = host.create_guest(1)
    spec = DiskSpec(1, DEVID, "xvda", image, **spec_kw)
    backend = host.add_disk(spec)
    fe = Frontend(guest, host.guest_xenstore(1), DEVID, max_ring_page_order=1,
                  max_indirect_segments=64)
    return guest, spec, backend, fe


def _image(tmp_path: Path, fmt: str) -> Path:
    """A 4 MiB image of ``fmt`` (raw: zeros; qcow2: empty)."""
    image = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        image.write_bytes(bytes(4 << 20))
    else:
        subprocess.run([sys.executable, "-m", "blkpy", "image", "create", "-f", "qcow2",
                        str(image), "4M"], check=True, capture_output=True)
    return image


@contextlib.contextmanager
def _successor(host, spec) -> Iterator[object]:
    """A second DeviceServer of the device, beside its running serve (what an upgrade's
    new serve or a standby is before it takes over): its image not opened."""
    from blkpy.serve import DeviceServer, ServeOptions
    from blkpy.sim.platform import SimPlatform
    from blkpy.xenstore.client import XenstoreClient

    platform = SimPlatform(host.sim_dir, host.socket)
    try:
        with XenstoreClient.connect(host.socket) as xs:
            yield DeviceServer(platform, xs, spec.backend_path, ServeOptions(),
                               open_image=False)
    finally:
        platform.close()
        heap.settle()  # if it rehearsed: this process's heap as it was


def _saved_for_successor(host, name: str, regions: list[int]) -> Path:
    """The running serve's file for its successor, once it holds ``regions`` and some
    persistent grants (the serve saves it at its status tick, then only on a change)."""
    state = next(Path(host.sim_dir).rglob("vbd-1-51712/control")).parent / name
    deadline = time.monotonic() + 10
    while not state.exists() or json.loads(state.read_text())["regions"] != regions \
            or not any(json.loads(state.read_text())["grants"]):
        assert time.monotonic() < deadline, state.read_text() if state.exists() else None
        time.sleep(0.05)
    return state


@contextlib.contextmanager
def _control(host, request: bytes) -> Iterator[tuple[socket.socket, object]]:
    """A connection to the device's control socket (as `blkpy ctl` or an upgrade's new
    serve makes one) that sent ``request``: the socket and its replies, line by line."""
    control = next(Path(host.sim_dir).rglob("vbd-1-51712/control"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(control))
        sock.sendall(request)
        with sock.makefile("rb") as replies:
            yield sock, replies


def _balanced(stats):
    p = stats["platform"]
    # map_calls counts attempts (a refused batch is a hypercall too); pages only successes
    return p["pages_mapped"] == p["pages_unmapped"] and p["unmap_calls"] <= p["map_calls"]


def test_connect_io_close_and_reconnect(host, raw_image):
    guest, spec, backend, fe = _attach(host, raw_image)
    info = fe.connect(timeout=10)
    assert info.sectors == (4 << 20) // 512 and info.sector_size == 512
    assert fe.write(16, b"\x5a" * 4096).status == 0
    assert fe.close(timeout=10) == []
    assert host.backend_state(spec) == XenbusState.CLOSED
    assert backend.proc.poll() is None  # online=1: waits for a reconnect
    fe.connect(timeout=10)
    assert bytes(fe.read(16, 4096).data) == b"\x5a" * 4096
    fe.close(timeout=10)
    assert host.remove_disk(spec)
    assert backend.wait(10) == 0
    assert _balanced(backend.stats()), backend.stats()


def test_reconnects_keep_one_counter_entry_per_queue(host, raw_image):
    """Counters of finished connections are summed per queue: a guest that reconnects
    over and over must not grow the serve by a dict per connection (the soak campaign's
    cycles found it)."""
    guest, spec, backend, fe = _attach(host, raw_image)
    for _ in range(3):
        fe.connect(timeout=10)
        assert fe.write(16, b"\x5a" * 4096).status == 0
        assert fe.close(timeout=10) == []
    stats = backend.stats()
    assert len(stats["queues"]) == 1 and len(stats["loops"]) == 1, stats
    queue, loop = stats["queues"][0], stats["loops"][0]
    assert queue["wr_req"] == 3 and queue["max_batch"] == 1, stats
    assert loop["wr_req"] <= 3, stats  # the loop's share of the same three writes


def test_toolstack_removal_while_connected(host, raw_image):
    guest, spec, backend, fe = _attach(host, raw_image)
    fe.connect(timeout=10)
    # libxl: online=0 + Closing; our frontend answers by closing as blkfront does
    xs = host.xs
    xs.write(f"{spec.backend_path}/online", "0")
    xs.write(f"{spec.backend_path}/state", "5")
    fe.close(timeout=10)
    assert host.wait_backend_state(spec, XenbusState.CLOSED, 10)
    assert backend.wait(10) == 0


def test_toolstack_removal_without_frontend_closes_within_libxl_timeout(host, raw_image):
    host.create_guest(1)
    spec = DiskSpec(1, DEVID, "xvda", raw_image)
    backend = host.add_disk(spec)
    assert host.wait_backend_state(spec, XenbusState.INIT_WAIT, 10)
    assert host.remove_disk(spec, timeout=10)
    assert backend.wait(10) == 0


def test_sigterm_closes_device_and_releases_every_grant(host, raw_image):
    guest, spec, backend, fe = _attach(host, raw_image)
    fe.connect(timeout=10)
    fe.write(0, b"x" * 4096)
    backend.proc.send_signal(signal.SIGTERM)
    assert backend.wait(10) == 0
    assert host.backend_state(spec) == XenbusState.CLOSED
    assert _balanced(backend.stats())
    # every ring grant is revocable: nothing of the guest is still mapped
    assert all(guest.end_access(ref) for ref in fe.ring.ring_refs)


def test_frontend_domain_destroyed(host, raw_image):
    guest, spec, backend, fe = _attach(host, raw_image)
    fe.connect(timeout=10)
    host.xs.rm(spec.frontend_path)  # the toolstack deletes the dead guest's device dir
    assert backend.wait(10) == 0


@pytest.mark.parametrize("node,value", [
    ("ring-ref", "not-a-number"),
    ("ring-ref", "99999999999"),
    ("event-channel", "-3"),
    ("event-channel", "4000"),
    ("protocol", "sparc-abi"),
    ("ring-page-order", "9"),
    ("multi-queue-num-queues", "0"),
])
def test_hostile_frontend_nodes_fail_the_connection_cleanly(host, raw_image, node, value):
    guest = host.create_guest(1)
    spec = DiskSpec(1, DEVID, "xvda", raw_image)
    backend = host.add_disk(spec)
    assert host.wait_backend_state(spec, XenbusState.INIT_WAIT, 10)
    fe_path = spec.frontend_path
    gxs = host.guest_xenstore(1)
    ring_frame = guest.alloc_pages(1)[0]
    ref = guest.grant_access(ring_frame, 0)
    port = guest.alloc_unbound_port(0)
    nodes = {"ring-ref": str(ref), "event-channel": str(port.port),
             "protocol": "x86_64-abi", node: value}
    for k, v in nodes.items():
        gxs.write(f"{fe_path}/{k}", v)
    gxs.write(f"{fe_path}/state", "3")
    assert host.wait_backend_state(spec, XenbusState.CLOSING, 10), backend.log()
    err = host.xs.read_str(f"/local/domain/0/error/backend/vbd/1/{DEVID}/error")
    assert err and err.startswith("5 ")
    assert backend.proc.poll() is None  # still alive, waiting for the toolstack
    gxs.write(f"{fe_path}/state", "6")  # the frontend answers Closing as blkfront does
    assert host.wait_backend_state(spec, XenbusState.CLOSED, 10), backend.log()
    assert host.remove_disk(spec)
    assert backend.wait(10) == 0
    assert "Traceback" not in backend.log()


def _publish_ring(host, spec, nodes_of):
    """A frontend that writes the nodes ``nodes_of(refs, ports)`` returns (refs, ports: two
    granted pages, two offered ports) and goes Initialised."""
    guest = host.create_guest(1)
    backend = host.add_disk(spec)
    assert host.wait_backend_state(spec, XenbusState.INIT_WAIT, 10)
    refs = [guest.grant_access(f, 0) for f in guest.alloc_pages(2)]
    ports = [guest.alloc_unbound_port(0).port for _ in range(2)]
    gxs = host.guest_xenstore(1)
    for k, v in nodes_of(refs, ports).items():
        gxs.write(f"{spec.frontend_path}/{k}", v.encode())
    gxs.write(f"{spec.frontend_path}/state", "3")
    return guest, backend, refs


def _refused_cleanly(host, spec, backend, guest, refs):
    assert host.wait_backend_state(spec, XenbusState.CLOSING, 10), backend.log()
    err = host.xs.read_str(f"/local/domain/0/error/backend/vbd/1/{DEVID}/error")
    assert err and err.startswith("5 ")
    assert all(guest.end_access(r) for r in refs)  # nothing of the guest stays mapped
    host.guest_xenstore(1).write(f"{spec.frontend_path}/state", "6")  # as blkfront answers
    assert host.wait_backend_state(spec, XenbusState.CLOSED, 10), backend.log()
    assert host.remove_disk(spec)
    assert backend.wait(10) == 0
    assert "Traceback" not in backend.log()
    return err


ARABIC_INDIC = str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667"
                             "\u0668\u0669")


@pytest.mark.parametrize("spell", [
    lambda n: str(n).translate(ARABIC_INDIC),  # int() reads it as n; scanf would not
    lambda n: "\u00b2",  # str.isdigit() passes it, int() raises
])
def test_non_ascii_digits_are_not_numbers(host, raw_image, spell):
    """Regression (fuzz handshake): the ring-ref "\u0668" mapped grant 8, and "\u00b2" raised a
    ValueError out of the connect code (a traceback, the device stuck in InitWait)."""
    spec = DiskSpec(1, DEVID, "xvda", raw_image)
    guest, backend, refs = _publish_ring(host, spec, lambda refs, ports: {
        "ring-ref": spell(refs[0]), "event-channel": str(ports[0]), "protocol": "x86_64-abi"})
    assert "ring-ref" in _refused_cleanly(host, spec, backend, guest, refs)


@pytest.mark.parametrize("nodes_of", [
    lambda refs, ports: {  # two queues on one ring page
        "multi-queue-num-queues": "2", "queue-0/ring-ref": str(refs[0]),
        "queue-1/ring-ref": str(refs[0]), "queue-0/event-channel": str(ports[0]),
        "queue-1/event-channel": str(ports[1]), "protocol": "x86_64-abi"},
    lambda refs, ports: {  # one page twice in a two-page ring
        "ring-page-order": "1", "ring-ref0": str(refs[1]), "ring-ref1": str(refs[1]),
        "event-channel": str(ports[0]), "protocol": "x86_64-abi"},
])
def test_a_ring_grant_published_twice_is_refused(host, raw_image, nodes_of):
    """Regression (fuzz handshake): the backend mapped the same grant for two queues (or
    two pages of one ring) and connected, two consumers of one set of requests."""
    spec = DiskSpec(1, DEVID, "xvda", raw_image)
    guest, backend, refs = _publish_ring(host, spec, nodes_of)
    assert "twice" in _refused_cleanly(host, spec, backend, guest, refs)


def test_garbage_frontend_state_leaves_the_backend_closed(host, raw_image):
    """Regression (fuzz handshake): a frontend writing garbage to its state node made the
    backend unregister and exit with its state node still saying Connected."""
    guest, spec, backend, fe = _attach(host, raw_image)
    fe.connect(timeout=10)
    host.guest_xenstore(1).write(f"{spec.frontend_path}/state", "garbage")
    assert backend.wait(10) == 0
    assert host.backend_state(spec) == XenbusState.CLOSED
    assert all(guest.end_access(r) for r in fe.ring.ring_refs)


def test_what_the_guest_drives_is_logged_rate_limited(host, raw_image, caplog):
    """Regression (fuzz handshake): every failed connect and every state switch was logged,
    so a frontend cycling Closed -> Initialising -> Initialised with a bad ring flooded the
    host's log (four lines per cycle)."""
    from blkpy.serve import DeviceServer, ServeOptions
    from blkpy.sim.platform import SimPlatform
    from blkpy.xenstore.client import XenstoreClient

    host.create_guest(1)
    spec = DiskSpec(1, DEVID, "xvda", raw_image)
    host.add_disk(spec, start_backend=False)
    platform = SimPlatform(host.sim_dir, host.socket)
    xs = XenstoreClient.connect(host.socket)
    server = DeviceServer(platform, xs, spec.backend_path, ServeOptions())
    gxs = host.guest_xenstore(1)
    gxs.write(f"{spec.frontend_path}/ring-ref", "not-a-number")
    caplog.set_level("INFO", logger="blkpy.serve")
    server.start()
    for _ in range(30):
        for state in ("3", "6", "1"):
            gxs.write(f"{spec.frontend_path}/state", state)
            server.step()
    assert host.backend_state(spec) == XenbusState.INIT_WAIT  # still serving the device
    lines = [r.getMessage() for r in caplog.records if r.name == "blkpy.serve"]
    assert any("cannot connect" in line for line in lines)
    assert len(lines) <= 10  # 30 connects failed, 120 state switches
    server._teardown()
    xs.close()
    platform.close()


def test_read_only_disk_is_advertised(host, raw_image):
    guest, spec, backend, fe = _attach(host, raw_image, readonly=True)
    info = fe.connect(timeout=10)
    assert info.info & 0x4 and not info.discard
    assert fe.write(0, b"y" * 512).status == -1


def test_missing_image_is_one_clear_error(host, tmp_path):
    host.create_guest(1)
    spec = DiskSpec(1, DEVID, "xvda", str(tmp_path / "nope.img"))
    host.add_disk(spec, start_backend=False)
    proc = subprocess.run(
        [sys.executable, "-m", "blkpy", "serve", f"backend/vbd/1/{DEVID}", "--platform", "sim",
         "--xenstore", host.socket, "--sim-dir", host.sim_dir],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "nope.img" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_backend_dir_is_one_clear_error(host):
    proc = subprocess.run(
        [sys.executable, "-m", "blkpy", "serve", "backend/vbd/9/51712", "--platform", "sim",
         "--xenstore", host.socket, "--sim-dir", host.sim_dir],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fe_id", ["\u00b2", "\u0661", "-1", "99999999999", ""])
def test_bad_frontend_id_is_one_clear_error(host, raw_image, fe_id):
    """Regression (review with fuzz handshake): a frontend-id of "\u00b2" passed isdigit()
    and raised ValueError out of the constructor instead of the one-line ServeError."""
    from blkpy.serve import DeviceServer, ServeError
    from blkpy.sim.platform import SimPlatform
    from blkpy.xenstore.client import XenstoreClient

    host.create_guest(1)
    spec = DiskSpec(1, DEVID, "xvda", raw_image)
    host.add_disk(spec, start_backend=False)
    host.xs.write(f"{spec.backend_path}/frontend-id", fe_id)
    platform = SimPlatform(host.sim_dir, host.socket)
    with XenstoreClient.connect(host.socket) as xs, pytest.raises(ServeError, match="frontend-id"):
        DeviceServer(platform, xs, spec.backend_path)
    platform.close()


def test_params_format_comes_only_from_the_prefix():
    assert parse_params("qcow2:/images/a.qcow2") == ("qcow2", "/images/a.qcow2")
    assert parse_params("raw:/images/a.img") == ("raw", "/images/a.img")
    assert parse_params("aio:/images/a.img") == ("raw", "/images/a.img")
    assert parse_params("/images/a.qcow2") == ("raw", "/images/a.qcow2")
    assert parse_params("/dir:with:colons") == ("raw", "/dir:with:colons")


def test_guest_written_qcow2_header_does_not_change_the_format(host, raw_image, tmp_path):
    """A guest writing a qcow2 header with a backing file into its raw disk must not make
    blkpy open that backing file: the format comes from the operator only."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"S" * 4096)
    guest, spec, backend, fe = _attach(host, raw_image)
    fe.connect(timeout=10)
    name = str(secret).encode()
    header = bytearray(4096)
    header[0:4] = b"QFI\xfb"
    header[4:8] = (2).to_bytes(4, "big")
    header[8:16] = (512).to_bytes(8, "big")
    header[16:20] = len(name).to_bytes(4, "big")
    header[20:24] = (16).to_bytes(4, "big")
    header[24:32] = (4 << 20).to_bytes(8, "big")
    header[512:512 + len(name)] = name
    assert fe.write(0, bytes(header)).status == 0
    fe.close(timeout=10)
    fe.connect(timeout=10)  # reconnect: the backend must still serve the bytes as raw
    assert bytes(fe.read(0, 4096).data) == bytes(header)
    open_files = {p.resolve() for p in Path(f"/proc/{backend.proc.pid}/fd").iterdir()
                  if p.resolve().is_file()}
    assert secret not in open_files and Path(raw_image) in open_files
    fe.close(timeout=10)
    assert host.remove_disk(spec)
    assert backend.wait(10) == 0
    assert f"raw {raw_image}" in backend.log() and "qcow2 /" not in backend.log()


def test_negotiation_error_when_no_backend(host, raw_image):
    guest = host.create_guest(1)
    spec = DiskSpec(1, DEVID, "xvda", raw_image)
    host.add_disk(spec, start_backend=False)
    fe = Frontend(guest, host.guest_xenstore(1), DEVID)
    with pytest.raises(NegotiationError):
        fe.connect(timeout=0.5)


def test_multi_queue_frontend(host, raw_image):
    """A frontend using two queues (queue-N nodes, one ring and event channel each), as
    Linux blkfront does on a guest with several vCPUs."""
    guest = host.create_guest(1)
    spec = DiskSpec(1, DEVID, "xvda", raw_image)
    backend = host.add_disk(spec)
    assert host.wait_backend_state(spec, XenbusState.INIT_WAIT, 10)
    xs = host.xs
    assert int(xs.read_str(f"{spec.backend_path}/multi-queue-max-queues")) >= 2
    gxs = host.guest_xenstore(1)
    abi = ring.ABIS["x86_64-abi"]
    queues = []
    for q in range(2):
        frames = guest.alloc_pages(2)
        refs = [guest.grant_access(f, 0) for f in frames]
        front = ring.FrontRing(memoryview(guest.memory[frames[0] * 4096:(frames[1] + 1) * 4096]),
                               abi, 2)
        port = guest.alloc_unbound_port(0)
        queues.append((front, port))
        for i, ref in enumerate(refs):
            gxs.write(f"{spec.frontend_path}/queue-{q}/ring-ref{i}", str(ref))
        gxs.write(f"{spec.frontend_path}/queue-{q}/event-channel", str(port.port))
    gxs.write(f"{spec.frontend_path}/multi-queue-num-queues", "2")
    gxs.write(f"{spec.frontend_path}/ring-page-order", "1")
    gxs.write(f"{spec.frontend_path}/protocol", "x86_64-abi")
    gxs.write(f"{spec.frontend_path}/state", "3")
    assert host.wait_backend_state(spec, XenbusState.CONNECTED, 10), backend.log()
    for q, (front, port) in enumerate(queues):
        frame = guest.alloc_pages(1)[0]
        guest.page(frame)[:] = bytes([q + 1]) * 4096
        gref = guest.grant_access(frame, 0)
        req = np.zeros(1, dtype=abi.request)
        req["operation"], req["id"], req["sector_number"], req["nr_segments"] = 1, q, q * 8, 1
        req["seg"][0, 0] = (gref, 0, 7)
        front.put_requests(req)
        if front.push_requests():
            port.notify()
        rsp = np.zeros(0, dtype=abi.response)
        for _ in range(500):
            rsp = front.consume_responses()
            if len(rsp):
                break
            time.sleep(0.01)
        assert rsp["status"].tolist() == [0] and rsp["id"].tolist() == [q]
        assert guest.end_access(gref)
    with open(raw_image, "rb") as f:
        data = f.read(8192)
    assert data == b"\x01" * 4096 + b"\x02" * 4096
    gxs.write(f"{spec.frontend_path}/state", "6")
    assert host.wait_backend_state(spec, XenbusState.CLOSED, 10)
    assert host.remove_disk(spec)
    assert backend.wait(10) == 0


def test_grant_mode_choice():
    from blkpy.serve import choose_grant_mode

    assert choose_grant_mode("auto", persistent=True) == "map"
    assert choose_grant_mode("auto", persistent=False) == "copy"
    assert choose_grant_mode("map", persistent=False) == "map"
    assert choose_grant_mode("copy", persistent=True) == "copy"


def test_grown_image_is_published_to_the_frontend(host, raw_image):
    guest, spec, backend, fe = _attach(host, raw_image)
    info = fe.connect(timeout=10)
    assert info.sectors == 8192
    with open(raw_image, "r+b") as f:
        f.truncate(8 << 20)
    backend.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while fe.info.sectors != 16384 and time.monotonic() < deadline:
        fe.service(timeout=0.5)
    assert fe.info.sectors == 16384
    assert fe.write(16384 - 8, b"z" * 4096).status == 0  # the new tail is usable


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_takeover_is_rehearsed_beside_the_serving_process_without_touching_its_image(
        host, tmp_path, fmt):
    """What an upgrade's new serve and a standby rehearse while the device's serve still
    answers: a ring's attach from a journal, the grant table, a read-only look at the image
    with an engine on it, two reads and a queue's loop and thread, the learning of the regions saved for a successor
    and its extent map made ahead (a qcow2 image's), a thread, the heap faulted in. All of it runs although the serve holds the image's
    lock; the image's bytes stay as they were, and the serve serves on."""
    from blkpy.serve import SUCCESSOR_FILE

    image = _image(tmp_path, fmt)
    guest, spec, backend, fe = _attach(host, f"{fmt}:{image}")
    fe.connect(timeout=10)
    assert fe.write(8, b"\x5a" * 4096).status == 0
    assert fe.flush().status == 0
    _saved_for_successor(host, SUCCESSOR_FILE, regions=[0] if fmt == "qcow2" else [])
    before = image.read_bytes()
    with _successor(host, spec) as successor:
        assert successor.rehearse_takeover() == [
            "ring", "grants", "image", "queue",
            *(["regions", "extents"] if fmt == "qcow2" else []),
            "thread", "heap"]
    assert image.read_bytes() == before
    assert fe.write(16, b"\x6b" * 4096).status == 0
    assert bytes(fe.read(8, 4096).data) == b"\x5a" * 4096
    assert backend.proc.poll() is None


@pytest.mark.parametrize("saved", [
    None, "not json", "[[3, 4]]", '{"grants": [1, 2], "regions": "x"}',
    '{"grants": [["x", -1, 4294967296, 1.5, null, [7]]], "regions": [-1, true, 1e9, "0"]}',
    '{"grants": [[99999]], "regions": [99999999]}'])
def test_a_successor_takes_only_sane_saved_state(host, tmp_path, saved):
    """The file beside the journals is read by a dead serve's successor: what the serve
    saved (None) is mapped and learnt; anything in it that is not a gref the guest grants
    maps nothing, anything that is not a region of the image learns nothing, and nothing
    raises."""
    from blkpy.serve import SUCCESSOR_FILE

    image = _image(tmp_path, "qcow2")
    guest, spec, backend, fe = _attach(host, f"qcow2:{image}")
    fe.connect(timeout=10)
    assert fe.write(8, b"\x11" * 8192).status == 0
    assert fe.flush().status == 0  # the metadata on disk, for the successor's look
    state = _saved_for_successor(host, SUCCESSOR_FILE, regions=[0])
    if saved is not None:
        state.write_text(saved)
    with _successor(host, spec) as successor:
        successor.disk = open_disk(str(image), "qcow2", readonly=True)  # a look
        successor._disk_open = True
        successor.take_saved_state()
        mapped = sum(p.persistent_grants for p in successor._pages_ahead.values())
        assert (mapped >= 2) == (saved is None) and (mapped == 0) == (saved is not None)
        assert successor.disk.learnt_regions() == ([0] if saved is None else [])
        successor._unmap_premapped()
        successor.disk.close()
    assert fe.write(8, b"\x22" * 4096).status == 0


def test_an_upgrade_hands_over_only_in_its_turn_on_the_host(host, tmp_path):
    """While another device's hand-over holds the host's turn (blkpy.turn), an upgrade's
    new serve waits for it ready, and the old serve answers the guest meanwhile; once
    the turn is let go it hands over, lets the turn go as soon as its rings are served
    (before the old serve has exited), and says how long it waited."""
    from blkpy.serve import HANDOVER_TURN_FILE
    from blkpy.turn import HostTurn

    image = _image(tmp_path, "raw")
    guest, spec, old, fe = _attach(host, f"raw:{image}")
    fe.connect(timeout=10)
    lock = Path(host.sim_dir) / "run" / HANDOVER_TURN_FILE
    other = HostTurn(lock)
    assert other.take() is not None
    new = host.start_backend(spec, ["--replace", str(old.proc.pid)])
    deadline = time.monotonic() + 30
    fds = Path(f"/proc/{new.proc.pid}/fd")
    # until the new serve has the turn's file open: it is asking for the turn
    while not any(os.path.realpath(fd) == str(lock) for fd in _fds(fds)):
        assert time.monotonic() < deadline and new.proc.poll() is None, new.log_path.read_text()
        time.sleep(0.02)
    time.sleep(0.3)
    assert old.proc.poll() is None  # still the device's serve
    assert fe.write(8, b"\x33" * 4096).status == 0
    other.release()
    while "took the device over" not in new.log_path.read_text():
        assert time.monotonic() < deadline and new.proc.poll() is None, new.log_path.read_text()
        time.sleep(0.02)
    after = HostTurn(lock)
    assert after.take(timeout=0.5) is not None
    assert old.proc.poll() is None  # (it exits a second after the takeover)
    after.release()
    assert old.wait(20) == EXIT_HANDED_OVER
    pattern = r"waited (\d+) ms for another device's hand-over on this host"
    while not (waited := re.search(pattern, new.log_path.read_text())):
        assert time.monotonic() < deadline and new.proc.poll() is None, new.log_path.read_text()
        time.sleep(0.05)
    assert int(waited[1]) >= 250, new.log_path.read_text()
    assert bytes(fe.read(8, 4096).data) == b"\x33" * 4096
    assert fe.close(timeout=10) == []
    assert host.remove_disk(spec)
    assert new.wait(10) == 0


def _fds(fd_dir: Path) -> list[str]:
    try:
        return [str(p) for p in fd_dir.iterdir()]
    except OSError:
        return []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_an_upgrade_takes_the_rings_over_from_a_serve_that_released_them(host, tmp_path, fmt):
    """`serve --replace PID` (what `blkpy hotplug restart` starts) maps the rings while the
    old serve still answers, asks it through its control socket to release the device,
    and serves on once it has: the old one exits after, handed over; every request is
    answered, and no ring grant stays mapped twice (the guest can revoke them all once
    the successor disconnects)."""
    image = _image(tmp_path, fmt)
    guest, spec, old, fe = _attach(host, f"{fmt}:{image}")
    fe.connect(timeout=10)
    assert fe.write(8, b"\x11" * 4096).status == 0
    new = host.start_backend(spec, ["--replace", str(old.proc.pid), "--log-level", "debug"])
    assert old.wait(20) == EXIT_HANDED_OVER
    deadline = time.monotonic() + 20
    # (an upgrade logs where its time went once its first requests are served)
    while "queue 0 attached" not in new.log_path.read_text():
        assert time.monotonic() < deadline and new.proc.poll() is None, new.log_path.read_text()
        time.sleep(0.05)
    assert "took the device over" in new.log_path.read_text()
    assert re.search(rf"serve pid {old.proc.pid} handed over in \d+ ms \(released\)",
                     new.log_path.read_text())
    # its ring and the old serve's journal (read after the word) were mapped before it
    assert ("1 ring(s) and 1 journal(s) mapped ahead, 1 ring thread(s) started ahead"
            in new.log_path.read_text())
    # and its ring is served on the thread started ahead
    assert re.search(r"queue 0 attached: .*, thread woken \d+ ms", new.log_path.read_text())
    # the old serve's persistent grants were mapped before the word
    assert re.search(r"[1-9]\d* persistent grants mapped before the rings",
                     new.log_path.read_text())
    # and a qcow2 image's regions the old serve had learnt, learnt before the rings
    learnt = re.search(r"[1-9]\d* region\(s\) of the image learnt", new.log_path.read_text())
    assert (learnt is not None) == (fmt == "qcow2")
    assert bytes(fe.read(8, 4096).data) == b"\x11" * 4096
    assert fe.write(16, b"\x22" * 8192).status == 0
    assert host.backend_state(spec) == XenbusState.CONNECTED
    # the window the guest's requests waited through, on dom0's clock, once it settled
    pattern = (rf"hand-over window (\d+) ms \((\d\d:\d\d:\d\d\.\d{{3}}) to "
               rf"(\d\d:\d\d:\d\d\.\d{{3}}) UTC\): no request taken from serve pid "
               rf"{old.proc.pid} ")
    while not (window := re.search(pattern, new.log_path.read_text())):
        assert time.monotonic() < deadline, new.log_path.read_text()
        time.sleep(0.05)
    # (and from when to when on the wall clock, the same length to the millisecond)
    start, end = (sum(float(x) * u for x, u in zip(t.split(":"), (3600, 60, 1), strict=True))
                  for t in window.group(2, 3))
    assert abs((end - start) % 86400 * 1000 - int(window[1])) <= 2
    refs = list(fe.ring.ring_refs)
    assert not any(guest.end_access(ref) for ref in refs)  # (the successor has them)
    assert fe.close(timeout=10) == []
    assert all(guest.end_access(ref) for ref in refs)
    assert host.remove_disk(spec)
    assert new.wait(10) == 0
    assert _balanced(new.stats()), new.stats()


_OLD_SERVE = """
import json, os, signal, socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
signal.signal(signal.SIGUSR2, lambda *_: os._exit(75))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.makefile("rb").readline()
    conn.sendall(json.dumps({"ok": False, "error": "unknown command 'handover'"}).encode() + b"\\n")
    conn.close()
"""


def test_a_serve_without_the_handover_command_is_replaced_after_its_exit(tmp_path):
    """A serve of an older blkpy answers "unknown command" on its control socket: its
    successor falls back to SIGUSR2 and waits for its exit."""
    control = tmp_path / "control"
    proc = subprocess.Popen([sys.executable, "-c", _OLD_SERVE, str(control)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert _replace(proc.pid, control, timeout=10) == "exited"
        assert proc.wait(5) == EXIT_HANDED_OVER
    finally:
        proc.kill()
        proc.wait()


def test_a_serve_without_a_control_socket_is_replaced_after_its_exit(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c",
                             "import os, signal, time\n"
                             "signal.signal(signal.SIGUSR2, lambda *_: os._exit(75))\n"
                             "print('ready', flush=True)\n"
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert _replace(proc.pid, tmp_path / "no-such-socket", timeout=10) == "exited"
        assert proc.wait(5) == EXIT_HANDED_OVER
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_serve_asked_to_get_ready_serves_on_if_the_word_never_comes(host, tmp_path, fmt):
    """The first step of a hand-over only gets the old serve ready (a qcow2 image's
    metadata is written back then, so the close at the word has little left): an
    upgrade's new serve that goes away before its word (killed, failed to load) leaves the
    device served."""
    image = _image(tmp_path, fmt)
    guest, spec, backend, fe = _attach(host, f"{fmt}:{image}")
    fe.connect(timeout=10)
    assert fe.write(8, b"\x11" * 8192).status == 0  # two persistent grants
    with _control(host, b'{"command": "handover"}\n') as (_, replies):
        ready = json.loads(replies.readline())
        assert ready["ok"] is True and ready["pid"] == backend.proc.pid
        # what its queue keeps mapped, for the new serve to map before the word
        (grefs,) = ready["grants"]
        assert len(grefs) >= 2 and all(isinstance(g, int) and g > 0 for g in grefs)
        # the image holds what the guest wrote, metadata and all, for a look from outside
        with open_disk(str(image), fmt, readonly=True) as look:
            buf = bytearray(8192)
            look.readv(8 * 512, [memoryview(buf)])
        assert bytes(buf) == b"\x11" * 8192
    assert fe.write(8, b"\x33" * 4096).status == 0  # still served, by the same process
    assert bytes(fe.read(8, 4096).data) == b"\x33" * 4096
    assert backend.proc.poll() is None
    assert host.backend_state(spec) == XenbusState.CONNECTED




@pytest.mark.parametrize("end", ["hang up", "SIGTERM"])
def test_a_serve_that_released_its_device_exits_once_its_successor_hangs_up(
        host, raw_image, end):
    """After "released" the old serve waits for its successor's attach before it exits
    (its exit's unmapping would take the CPU from that attach): it exits, handed over,
    once the successor closes the connection. Meanwhile the device is not its own: a
    control command is refused, and SIGTERM ends it without a word to xenstore (the
    successor's device stays Connected)."""
    guest, spec, backend, fe = _attach(host, raw_image)
    fe.connect(timeout=10)
    assert fe.write(8, b"\x11" * 4096).status == 0
    with _control(host, b'{"command": "handover"}\n') as (sock, replies):
        assert json.loads(replies.readline())["ok"] is True
        sock.sendall(b"g")
        assert json.loads(replies.readline())["released"] is True
        with pytest.raises(subprocess.TimeoutExpired):
            backend.proc.wait(1.0)  # held while we (the successor) attach
        with _control(host, b'{"command": "pause"}\n') as (_, other):
            refused = json.loads(other.readline())
        assert refused == {"ok": False, "error": "the device is handed over to another serve"}
        if end == "SIGTERM":
            backend.proc.send_signal(signal.SIGTERM)
            assert backend.wait(10) == EXIT_HANDED_OVER
    assert backend.wait(10) == EXIT_HANDED_OVER
    assert host.backend_state(spec) == XenbusState.CONNECTED


_TAKEN_SERVE = """
import json, os, socket, sys, time
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
conn.makefile("rb").readline()
conn.sendall(json.dumps({"ok": True, "pid": os.getpid()}).encode() + b"\\n")
conn.recv(1)
conn.sendall(json.dumps({"ok": False, "error": "handed over already", "taken": True}).encode()
             + b"\\n")
time.sleep(30)
"""


def test_a_serve_that_handed_its_device_to_another_new_serve_is_not_taken_over(tmp_path):
    """Two upgrades of one device at once: the new serve the old one did not hand the
    device to stops with one clear error, instead of taking the device over too."""
    control = tmp_path / "control"
    proc = subprocess.Popen([sys.executable, "-c", _TAKEN_SERVE, str(control)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(ServeError, match="handed its device over to another serve"):
            _replace(proc.pid, control, timeout=10)
        assert proc.poll() is None  # not signalled either
    finally:
        proc.kill()
        proc.wait()
