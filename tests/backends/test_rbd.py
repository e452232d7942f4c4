"""The rbd backend: target parsing, the librbd declarations, and, against a real one-node
Ceph cluster (tests marked ``ceph``), the guest through `blkpy serve`, read-only
snapshots, flush/discard/zeroes, bad targets, the exclusive lock and migration, with what
the guest wrote checked by Ceph's own `rbd export`."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import mmap
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ceph_cluster import export, rbd_image, remove_image, session_cluster
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.test_nbd import (
    DEVID,
    GUEST,
    _sim_run,
    attached,
    check_served_by_the_loop,
    randrw_reference,
    read_back,
    sim_host,
)
from blkpy import engine as io
from blkpy import ring as blkif
from blkpy.backends import DiskError, librbd, network_format, open_disk
from blkpy.backends.diskqueue import OP_DTYPE, QueueEngine
from blkpy.backends.rbd import RbdDisk, parse_target
from blkpy.engine import IoVector, make_engine
from blkpy.gntdev.native import ffi
from blkpy.hotplug.device import DiskParams, HotplugError, parse_params
from blkpy.sim.ceph import MicroCeph
from blkpy.sim.disk_model import DiskModel
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from blkpy.sim.run import remove_and_check
from blkpy.sim.toolstack import DiskSpec
from blkpy.sim.workloads import run_workload
from blkpy.xenbus import XenbusState

MIB = 1 << 20
OBJECT = 4 * MIB  # rbd's default object size (order 22)
_ = randrw_reference  # a fixture of this module too


# ---- targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "fields"), [
    ("rbd:rbd/img", {"pool": "rbd", "image": "img", "snap": None, "client_id": "admin"}),
    ("rbd:p/ns/img@snap1:conf=/etc/ceph/x.conf:id=xen",
     {"pool": "p", "namespace": "ns", "image": "img", "snap": "snap1",
      "conf": "/etc/ceph/x.conf", "client_id": "xen"}),
    # QEMU's syntax: other options go to librados, "\:" keeps a colon in a value
    (r"rbd:p/img:mon_host=127.0.0.1\:6789:rbd_cache=false",
     {"options": (("mon_host", "127.0.0.1:6789"), ("rbd_cache", "false"))}),
    (r"rbd:p/we\@ird\:na\/me", {"image": "we@ird:na/me"}),
    ("rbd:p/img:lock=exclusive", {"exclusive": True}),
])
def test_targets_parse(target: str, fields: dict[str, object]) -> None:
    parsed = parse_target(target)
    assert {k: getattr(parsed, k) for k in fields} == fields
    assert network_format(target) == "rbd"


@pytest.mark.parametrize("params", ["rbd:p/img:conf=/etc/ceph/x.conf", "aio:rbd:p/img"])
def test_hotplug_takes_an_rbd_target_as_it_is(params: str) -> None:
    """The block-blkpy script (xl's target=rbd:...) checks the syntax and stats no file."""
    assert parse_params(params) == DiskParams("rbd", params.removeprefix("aio:"))
    with pytest.raises(HotplugError, match=r"^bad RBD target 'rbd:img'"):
        parse_params("rbd:img")


@pytest.mark.parametrize("target", [
    "rbd:img", "rbd:/img", "rbd:p/", "rbd:a/b/c/d", "rbd:p/img@", "rbd:p/img@a@b",
    "rbd:p/img:conf", "rbd:p/img:conf=", "rbd:p/img:id=", "rbd:p/img:lock=shared",
    "rbd:p/img:a=1:a=2", "rbd:p/img\\", "rbd:p/img:=x", "rbd:p/i\0mg",
])
def test_malformed_targets_are_one_line_errors(target: str) -> None:
    with pytest.raises(DiskError) as info:
        open_disk(target, "rbd")
    assert str(info.value).startswith("bad RBD target") and "\n" not in str(info.value)


# ---- the binding -------------------------------------------------------------------------

LIBRBD_H = Path("/usr/include/rbd/librbd.h")


def _declared_functions() -> list[tuple[str, str, str]]:
    """(return type, name, parameters) of every function in the binding's cdef."""
    statements = " ".join(librbd.CDEF.split()).split(";")
    found = (re.fullmatch(r"\s*([\w ]+?\**)\s*\b((?:rados|rbd)_\w+)\((.*)\)\s*", st)
             for st in statements)
    return [m.groups() for m in found if m]


def test_declarations_match_librbd_h(tmp_path: Path) -> None:
    """ABI mode trusts the cdef: the C compiler checks every prototype and constant
    against Debian's headers (librbd-dev)."""
    if not LIBRBD_H.exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and librbd-dev (setup.sh installs them)")
    functions = _declared_functions()
    assert len(functions) == librbd.CDEF.count(");")
    checks = [f"_Static_assert(__builtin_types_compatible_p(__typeof__({name}), "
              f"{ret} ({params})), \"{name}\");" for ret, name, params in functions]
    checks += [
        f"_Static_assert(RBD_FEATURE_EXCLUSIVE_LOCK == {librbd.FEATURE_EXCLUSIVE_LOCK}ULL, "
        "\"feature\");",
        "_Static_assert(RBD_LOCK_MODE_EXCLUSIVE == 0, \"lock mode\");",
    ]
    source = tmp_path / "check.c"
    source.write_text("#include <rbd/librbd.h>\n" + "\n".join(checks) + "\n")
    out = subprocess.run(["gcc", "-std=gnu11", "-fsyntax-only", str(source)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_without_librbd_the_target_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    librbd._load.cache_clear()
    monkeypatch.setattr(librbd, "LIBRBD", "libblkpy-test-no-such-library.so.1")
    try:
        with pytest.raises(DiskError) as info:
            open_disk("rbd:rbd/img", "rbd")
    finally:
        librbd._load.cache_clear()
    message = str(info.value)
    assert "cannot load libblkpy-test-no-such-library.so.1" in message and "\n" not in message


# ---- against a real cluster ---------------------------------------------------------------


@pytest.fixture(scope="session")
def ceph() -> Iterator[MicroCeph]:
    with session_cluster() as cluster:
        yield cluster


@pytest.fixture
def image(ceph: MicroCeph) -> Iterator[str]:
    """A new 64 MiB image (POOL/NAME), removed afterwards."""
    name = rbd_image(ceph)
    yield name
    remove_image(ceph, name)


def target(ceph: MicroCeph, spec: str, *options: str) -> str:
    return ":".join([f"rbd:{spec}", f"conf={ceph.conf}", *options])


def _pattern(seed: int, nbytes: int) -> bytes:
    return np.random.default_rng(seed).bytes(nbytes)


class Pages:
    """Page-aligned memory standing in for mapped guest pages, and IoVectors over it."""

    def __init__(self, nbytes: int) -> None:
        self.mem = mmap.mmap(-1, nbytes)
        self.base = int(ffi.cast("uintptr_t", ffi.from_buffer(self.mem)))

    def vector(self, entries: list[tuple[int, int, int, int]]) -> IoVector:
        """(kind, disk offset, length, offset in these pages) per entry, one iovec each."""
        n = len(entries)
        return IoVector(
            kind=np.array([e[0] for e in entries], dtype=np.int32),
            offset=np.array([e[1] for e in entries], dtype=np.uint64),
            length=np.array([e[2] for e in entries], dtype=np.int64),
            iov_first=np.arange(n, dtype=np.uint32), iov_count=np.ones(n, dtype=np.uint32),
            iov=np.array([[self.base + e[3], e[2]] for e in entries], dtype=np.uint64),
            owner=np.arange(n))


def run(engine: io.IoEngine, vec: IoVector) -> np.ndarray:
    engine.submit(vec)
    while engine.in_flight:
        engine.wait(10.0)
    return vec.result


@pytest.mark.ceph
def test_sim_run_randrw_then_rbd_export_matches_the_reference(
        ceph: MicroCeph, image: str, randrw_reference: Path) -> None:
    """`blkpy sim run rbd:POOL/IMG --workload randrw` passes; Ceph's `rbd export` then
    holds exactly what the same workload leaves on a zeroed raw file."""
    out = _sim_run(target(ceph, image))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "result    OK" in out.stdout
    assert export(ceph, image) == randrw_reference.read_bytes()


@pytest.mark.ceph
def test_migration_over_one_image_and_rbd_export_matches_the_guest_model(
        ceph: MicroCeph, image: str) -> None:
    """The guest writes through one serve, which flushes and closes when the disk goes
    (libxl's remove); a second serve opens the image and the guest reads everything back.
    Ceph's own export agrees with the guest's model, byte for byte."""
    host = sim_host()
    try:
        model = DiskModel(64 * MIB, zeroed=True)
        with attached(host, target(ceph, image)) as (frontend, _backend):
            result = run_workload(frontend, "randrw", requests=1500, seed=7, model=model)
            assert result.ok, result.to_text()
            assert result.requests.get("discard") and result.requests.get("flush")
        with attached(host, target(ceph, image)) as (frontend, _backend):
            assert read_back(frontend, model, 64 * MIB) == 0
        assert [b.proc.returncode for b in host.backends] == [0, 0]
    finally:
        host.close()
    assert model.check(0, export(ceph, image)) == 0


@pytest.mark.ceph
def test_flushed_writes_survive_a_killed_serve(ceph: MicroCeph, image: str) -> None:
    """SIGKILL of the serve: what the guest wrote before its flush is in the image (Ceph
    reads it without the dead client's lock); what it wrote after may be lost with
    librbd's cache, a 4 KiB block at a time, never torn into something else. Blocklisting
    the dead client fences it at once (else its watch holds the lock for ~30 s)."""
    chunk = 32 * 4096  # one request of the guest's 32 segments
    flushed, unflushed = _pattern(5, 4 * MIB), _pattern(6, 4 * MIB)
    host = sim_host()
    spec = DiskSpec(GUEST, DEVID, "xvda", target(ceph, image))
    try:
        backend = host.add_disk(spec)
        assert backend is not None
        frontend = Frontend(host.guests[GUEST], host.guest_xenstore(GUEST), DEVID)
        frontend.connect(timeout=30)
        for data, base in ((flushed, 0), (unflushed, 4 * MIB)):
            for off in range(0, len(data), chunk):
                done = frontend.write((base + off) // 512, data[off : off + chunk], timeout=30)
                assert done.status == blkif.BLKIF_RSP_OKAY
            if base == 0:
                assert frontend.flush(timeout=30).status == blkif.BLKIF_RSP_OKAY
        backend.proc.kill()
        backend.proc.wait(30)
    finally:
        host.close()
    watchers = json.loads(ceph.rbd("status", "--format", "json", image))["watchers"]
    assert len(watchers) == 1  # the dead serve's, until its watch times out
    ceph.ceph("osd", "blocklist", "add", watchers[0]["address"])
    assert json.loads(ceph.rbd("status", "--format", "json", image))["watchers"] == []
    on_disk = export(ceph, image)
    assert on_disk[: 4 * MIB] == flushed
    for off in range(0, 4 * MIB, 4096):
        block = on_disk[4 * MIB + off : 4 * MIB + off + 4096]
        assert block in (unflushed[off : off + 4096], bytes(4096)), off


@pytest.mark.ceph
def test_snapshot_is_read_only_whatever_the_mode(ceph: MicroCeph, image: str) -> None:
    """`@SNAP` serves the snapshot's bytes read-only, even on a device attached
    read-write; writes are refused and never reach it."""
    first, second = _pattern(1, MIB), _pattern(2, MIB)
    with RbdDisk(target(ceph, image)) as disk:
        disk.writev(0, [memoryview(first)])
    ceph.rbd("snap", "create", f"{image}@s1")
    with RbdDisk(target(ceph, image)) as disk:
        disk.writev(0, [memoryview(second)])
    snap = target(ceph, f"{image}@s1")

    with RbdDisk(snap) as disk:  # asked for read-write
        assert disk.readonly and not disk.can_discard
        with pytest.raises(PermissionError):
            disk.writev(0, [memoryview(second)])
        pages = Pages(2 * 4096)
        engine = make_engine("auto", disk)
        try:
            res = run(engine, pages.vector([(io.WRITE, 0, 4096, 0), (io.DISCARD, 0, 4096, 0),
                                            (io.FLUSH, 0, 0, 0), (io.READ, 0, 4096, 4096)]))
        finally:
            engine.close()
        assert list(res) == [-30, -30, 0, 0]  # EROFS
        assert pages.mem[4096:8192] == first[:4096]

    host = sim_host()
    try:
        with attached(host, snap) as (frontend, _backend):
            assert frontend.info.readonly
            done = frontend.write(0, second[:4096], timeout=30)
            assert done.status == blkif.BLKIF_RSP_ERROR
            assert bytes(frontend.read(0, 32 * 4096, timeout=30).data) == first[: 32 * 4096]
    finally:
        host.close()
    assert export(ceph, f"{image}@s1")[:MIB] == first
    assert export(ceph, image)[:MIB] == second


@pytest.mark.ceph
def test_flush_discard_and_zeroes(ceph: MicroCeph, image: str) -> None:
    """A discard reads back as zeros to the byte, unaligned edges included, and frees the
    objects it covers whole; flushes are ordered after the writes before them."""
    data = _pattern(3, 9 * MIB)
    start, end = MIB + 512, 2 * OBJECT + 4096  # from inside object 0 into object 2
    pages = Pages(9 * MIB)
    pages.mem[:] = data
    with RbdDisk(target(ceph, image)) as disk:
        engine = make_engine("auto", disk)
        assert isinstance(engine, QueueEngine)
        try:
            writes = [(io.WRITE, off, MIB, off) for off in range(0, 9 * MIB, MIB)]
            assert not run(engine, pages.vector([*writes, (io.FLUSH, 0, 0, 0)])).any()
            assert not run(engine, pages.vector([(io.DISCARD, start, end - start, 0),
                                                 (io.FLUSH, 0, 0, 0)])).any()
            pages.mem[:] = b"\xff" * (9 * MIB)
            reads = [(io.READ, off, MIB, off) for off in range(0, 9 * MIB, MIB)]
            assert not run(engine, pages.vector(reads)).any()
        finally:
            engine.close()
    expected = data[:start] + bytes(end - start) + data[end:]
    assert pages.mem[:] == expected
    assert export(ceph, image)[: 9 * MIB] == expected
    extents = json.loads(ceph.rbd("diff", "--whole-object", "--format", "json", image))
    objects = sorted(e["offset"] // OBJECT for e in extents if e["exists"] == "true")
    assert objects == [0, 2]  # object 1 is gone; 0 and 2 keep their data


@pytest.mark.ceph
def test_reads_writes_and_flushes_are_served_by_the_native_loop(ceph: MicroCeph,
                                                                image: str) -> None:
    host = sim_host()
    try:
        with attached(host, target(ceph, image)) as (frontend, backend):
            check_served_by_the_loop(frontend, backend)
    finally:
        host.close()


# ---- the C queue against whatever a guest can make of an op --------------------------

SLOT = 128 << 10  # each op of a batch has a range of its own: their order is free
SLOTS = 32
OP_SPAN = 80 << 10  # an op's share of the pages (64 KiB + a sector or two of slack)


@st.composite
def hostile_ops(draw: st.DrawFn, size: int) -> list[dict[str, int]]:
    """A batch of ops as a guest could make them reach the queue: any kind, ranges in a
    slot of their own, across the end of the image or far past it, iovecs that add up to
    the length or not."""
    ops = []
    slots = draw(st.lists(st.integers(0, SLOTS - 1), min_size=1, max_size=8, unique=True))
    for slot in slots:
        kind = draw(st.sampled_from([io.READ, io.WRITE, io.FLUSH, io.DISCARD, 4, 7]))
        length = draw(st.integers(0, 128)) * 512
        where = draw(st.sampled_from(["slot", "slot", "slot", "end", "far"]))
        if where == "slot":
            offset = slot * SLOT + draw(st.integers(0, 64)) * 512
        elif where == "end":  # crosses the end by at least a sector
            offset = size - draw(st.integers(0, 64)) * 512
            length = size - offset + draw(st.integers(1, 64)) * 512
        else:
            offset = draw(st.sampled_from([size + 512, 1 << 62, (1 << 64) - 512]))
        pieces = draw(st.integers(1, 4))
        skew = draw(st.sampled_from([0, 0, 0, 512, -512]))
        ops.append({"kind": kind, "offset": offset, "length": length, "pieces": pieces,
                    "skew": skew, "seed": draw(st.integers(0, 1 << 16))})
    return ops


def _verdict(op: dict[str, int], size: int, readonly: bool) -> int:
    """What the queue must answer (0 or -errno), as the model says."""
    kind, offset, length = op["kind"], op["offset"], op["length"]
    if kind not in (io.READ, io.WRITE, io.FLUSH, io.DISCARD):
        return -errno.EINVAL
    if kind != io.READ and readonly:
        return 0 if kind == io.FLUSH else -errno.EROFS
    if kind == io.FLUSH:
        return 0
    if offset > size or length > size - offset:
        return -errno.EINVAL
    if kind != io.DISCARD and length + op["skew"] * (length > 0) != length:
        return -errno.EINVAL
    return 0


@pytest.mark.ceph
def test_the_queue_answers_every_op_once_with_the_models_verdict(ceph: MicroCeph,
                                                                 image: str) -> None:
    """Batches of hostile ops on the image, writable and read-only: every op answered
    exactly once with what the model says (EINVAL, EROFS or success), nothing written
    where the model says not, and what a read returns is what the model holds."""
    # no client cache: what one handle wrote, the other reads
    spec = target(ceph, image, "rbd_cache=false")
    with RbdDisk(spec) as rw, RbdDisk(spec, readonly=True) as ro:
        size = rw.size
        model = bytearray(SLOTS * SLOT)
        pages = Pages(8 * OP_SPAN)
        queues = {False: rw.queue(), True: ro.queue()}

        @settings(max_examples=60, deadline=None)
        @given(ops=hostile_ops(size), readonly=st.booleans())
        def check(ops: list[dict[str, int]], readonly: bool) -> None:
            table = np.zeros(len(ops), dtype=OP_DTYPE)
            iovs = []
            for k, op in enumerate(ops):
                base = k * OP_SPAN
                length = op["length"]
                total = max(length + op["skew"], 0) if length else 0
                cuts = sorted({0, total, *(total * j // op["pieces"] // 512 * 512
                                           for j in range(1, op["pieces"]))})
                iovs += [(pages.base + base + a, b - a) for a, b in itertools.pairwise(cuts)]
                first = len(iovs) - (len(cuts) - 1)
                if op["kind"] == io.WRITE:
                    pages.mem[base : base + total] = np.random.default_rng(op["seed"]).bytes(total)
                elif op["kind"] == io.READ:
                    pages.mem[base : base + total] = b"\xee" * total
                table[k] = (op["kind"], len(cuts) - 1, op["offset"], length, first, k)
            iov = np.array(iovs or [(0, 0)], dtype=np.uint64).reshape(-1, 2)
            table["iov_addr"] = iov.ctypes.data + table["iov_addr"] * 16
            queue = queues[readonly]
            assert queue.submit(table) == 0
            answers: dict[int, int] = {}
            deadline = time.monotonic() + 60
            while len(answers) < len(ops) and time.monotonic() < deadline:
                queue.wait(1.0)
                for ud, res in queue.reap():
                    assert ud not in answers, f"op {ud} answered twice"
                    answers[ud] = res
            assert sorted(answers) == list(range(len(ops)))
            for k, op in enumerate(ops):
                want = _verdict(op, size, readonly)
                assert answers[k] == want, (op, answers[k], want)
                base, offset, length = k * OP_SPAN, op["offset"], op["length"]
                if want or not length or op["kind"] == io.FLUSH:
                    continue
                if op["kind"] == io.WRITE:
                    model[offset : offset + length] = pages.mem[base : base + length]
                elif op["kind"] == io.DISCARD:
                    model[offset : offset + length] = bytes(length)
                else:
                    assert pages.mem[base : base + length] == model[offset : offset + length]
            queue.wait(0)
            assert queue.reap() == []  # nothing more, ever

        try:
            check()
        finally:
            for queue in queues.values():
                queue.close()
        seen = bytearray(len(model))
        rw.readv(0, [memoryview(seen)])
        assert seen == model


@pytest.mark.ceph
def test_two_rings_share_one_image(ceph: MicroCeph, image: str) -> None:
    """Each ring's engine gets its own completions back: each has a queue of its own on
    the image, and collecting one's never touches the other's."""
    data = _pattern(4, 64 * 4096)
    with RbdDisk(target(ceph, image)) as disk:
        disk.writev(0, [memoryview(data)])
        engines = [disk.engine(), disk.engine()]
        pages = [Pages(64 * 4096), Pages(64 * 4096)]
        vectors = [p.vector([(io.READ, k * 4096, 4096, k * 4096) for k in range(64)])
                   for p in pages]
        try:
            for engine, vec in zip(engines, vectors, strict=True):
                engine.submit(vec)
            returned: list[list[IoVector]] = [[], []]
            while any(e.in_flight for e in engines):
                for engine, got in zip(engines, returned, strict=True):
                    got += engine.wait(0.1)
            assert returned == [[vectors[0]], [vectors[1]]]
        finally:
            for engine in engines:
                engine.close()
    for p, vec in zip(pages, vectors, strict=True):
        assert not vec.result.any() and p.mem[:] == data


@contextlib.contextmanager
def unused_port() -> Iterator[int]:
    """A loopback TCP port bound (so nothing else takes it) but never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.ceph
def test_four_queue_guest_and_rbd_export(ceph: MicroCeph, image: str) -> None:
    """Four rings, one image, each ring's loop and engine with queues of their own;
    Ceph's export then matches the guest's model."""
    host = SimHost(serve_args=["--max-queues", "4"])
    host.start()
    guest = host.create_guest(GUEST)
    spec = DiskSpec(GUEST, DEVID, "xvda", target(ceph, image))
    try:
        backend = host.add_disk(spec)
        assert backend is not None
        frontend = Frontend(guest, host.guest_xenstore(GUEST), DEVID, num_queues=4)
        frontend.connect(timeout=30)
        assert len(frontend.rings) == 4
        model = DiskModel(64 * MIB, zeroed=True)
        result = run_workload(frontend, "randrw", requests=2000, seed=11, model=model)
        assert result.ok, result.to_text()
        assert frontend.close(timeout=30) == []
        assert remove_and_check(host, spec, backend) == []
    finally:
        host.close()
    assert model.check(0, export(ceph, image)) == 0


def _serve_failure(host: SimHost, devid: int, bad: str) -> str:
    spec = DiskSpec(GUEST, devid, "xvdb", bad)
    backend = host.add_disk(spec)
    assert backend is not None
    assert backend.wait(120) == 1
    assert host.backend_state(spec) != XenbusState.CONNECTED
    return backend.log()


@pytest.mark.ceph
def test_bad_targets_stop_serve_with_one_line(ceph: MicroCeph, image: str,
                                              tmp_path: Path) -> None:
    """No such pool, image or snapshot, a cluster nobody answers for: `blkpy serve`
    exits 1 with one line that says which."""
    pool = image.split("/")[0]
    unreachable = tmp_path / "nobody.conf"
    cases = {
        target(ceph, "nopool/img"): "rbd: no pool 'nopool' in the Ceph cluster",
        target(ceph, f"{pool}/noimage"): f"rbd: no image '{pool}/noimage'",
        target(ceph, f"{image}@nosnap"): f"rbd: image {image} has no snapshot 'nosnap'",
        target(ceph, image, "no_such_option=1"):
            "rbd: unknown Ceph option 'no_such_option' in the target",
        f"rbd:{image}:conf={unreachable}:client_mount_timeout=2":
            f"rbd: cannot connect to the Ceph cluster (configuration {unreachable}): "
            "Connection timed out",
    }
    host = sim_host()
    try:
        with unused_port() as port:
            unreachable.write_text(f"[global]\nmon host = v2:127.0.0.1:{port}\n"
                                   "auth client required = none\n")
            for devid, (bad, message) in enumerate(cases.items(), start=51728):
                log = _serve_failure(host, devid, bad)
                assert log.strip().splitlines() == [f"Error: {message}"], log
    finally:
        host.close()


@pytest.mark.ceph
def test_exclusive_lock_between_two_writers(ceph: MicroCeph, image: str) -> None:
    """What librbd does with two clients writing one image that has the exclusive-lock
    feature (README): by default the lock moves to whoever writes, so both writes succeed
    (no fencing: the last one wins); with lock=exclusive the first keeps it, a second
    lock=exclusive open fails, and a plain client's writes fail with EROFS."""
    a_bytes, b_bytes = b"A" * 4096, b"B" * 4096
    with RbdDisk(target(ceph, image)) as a, RbdDisk(target(ceph, image)) as b:
        a.writev(0, [memoryview(a_bytes)])
        assert a.is_lock_owner()
        b.writev(0, [memoryview(b_bytes)])
        assert b.is_lock_owner() and not a.is_lock_owner()
        got = bytearray(4096)
        a.readv(0, [memoryview(got)])  # A's cache was dropped with the lock
        assert got == b_bytes
    with RbdDisk(target(ceph, image, "lock=exclusive")) as owner:
        with pytest.raises(DiskError, match=r"is locked by another client \(lock=exclusive\)"):
            RbdDisk(target(ceph, image, "lock=exclusive"))
        with RbdDisk(target(ceph, image)) as other:
            with pytest.raises(OSError) as info:
                other.writev(0, [memoryview(b_bytes)])
            assert info.value.errno == 30  # EROFS
        owner.writev(0, [memoryview(a_bytes)])
        assert owner.is_lock_owner()
    with RbdDisk(target(ceph, image, "lock=exclusive")) as next_owner:  # released on close
        assert next_owner.is_lock_owner()
    assert export(ceph, image)[:4096] == a_bytes


@pytest.mark.ceph
def test_options_go_to_librados_and_a_grown_image_is_seen(ceph: MicroCeph, image: str) -> None:
    """No conf file: mon_host in the target is enough (QEMU's syntax). An image grown by
    the operator shows its new size (serve then tells the guest, as for files)."""
    with RbdDisk(rf"rbd:{image}:mon_host=v2\:127.0.0.1\:{ceph.mon_port}") as disk:
        assert disk.size == 64 * MIB
        ceph.rbd("resize", "--no-progress", "--size", "96M", image)
        for _ in range(100):  # librbd learns it from the image header's watch
            if disk.refresh_size() != 64 * MIB:
                break
            time.sleep(0.1)
        assert disk.size == 96 * MIB


def test_without_any_configuration_the_target_says_so(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if Path("/etc/ceph/ceph.conf").exists():
        pytest.skip("this machine has a /etc/ceph/ceph.conf")
    monkeypatch.delenv("CEPH_CONF", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiskError, match=r"^rbd: no Ceph configuration: the target has no "
                                        r"conf= or mon_host="):
        open_disk("rbd:rbd/img", "rbd")


@pytest.mark.ceph
def test_exclusive_lock_needs_a_writable_device_and_the_feature(ceph: MicroCeph,
                                                               image: str) -> None:
    with pytest.raises(DiskError, match=r"^rbd: lock=exclusive is for a writable device"):
        RbdDisk(target(ceph, image, "lock=exclusive"), readonly=True)
    plain = rbd_image(ceph, "4M", "layering")
    try:
        with pytest.raises(DiskError, match=r"^rbd: lock=exclusive needs the exclusive-lock "
                                            r"feature, which .* does not have$"):
            RbdDisk(target(ceph, plain, "lock=exclusive"))
        with RbdDisk(target(ceph, plain)) as disk:  # without the feature: no lock at all
            disk.writev(0, [memoryview(b"x" * 4096)])
            assert not disk.is_lock_owner()
    finally:
        remove_image(ceph, plain)


def test_sim_run_refuses_a_malformed_rbd_target_in_one_line() -> None:
    """sim run takes an rbd: target as one (no file of that name is looked for) and
    refuses a malformed one before it starts anything."""
    out = subprocess.run([sys.executable, "-m", "blkpy", "sim", "run", "rbd:p"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "bad RBD target 'rbd:p'" in out.stderr
    assert "Traceback" not in out.stderr
