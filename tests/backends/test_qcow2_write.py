"""Random write/discard/flush/reopen sequences against a bytearray model; afterwards
``qemu-img check`` must be clean and ``qemu-img compare`` must agree with the model."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_img import as_raw, check_clean, needs_qemu, qemu_img, qemu_io, read_all

from blkpy.backends.qcow2 import Qcow2Disk

pytestmark = needs_qemu
SIZE = 1 << 20


def _base_image(d: str, cs: int, compat: str, ext_l2: bool, refbits: int, backing: str | None,
                content: str) -> tuple[str, bytes | None]:
    """Build the image under test; returns (path, backing contents or None)."""
    opts = f"cluster_size={cs},compat={compat},refcount_bits={refbits}"
    if ext_l2:
        opts += ",extended_l2=on"
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    backing_data = None
    if backing == "raw":
        with open(f"{d}/base.raw", "wb") as f:
            f.write(random.Random(1).randbytes(SIZE // 2 + 512))  # shorter than the overlay
        args += ["-b", "base.raw", "-F", "raw"]
    elif backing == "qcow2":
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", f"{d}/base.qcow2",
                 str(SIZE))
        qemu_io(f"{d}/base.qcow2", "write -P 0x5a 4096 700k")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    path = f"{d}/img.qcow2"
    if content == "compressed":
        with open(f"{d}/src.raw", "wb") as f:
            f.write((bytes(range(256)) * 64 + bytes(16384)) * (SIZE // 32768))
        qemu_img("convert", "-c", "-O", "qcow2", "-o", opts, f"{d}/src.raw", path)
        if backing:  # point the compressed image at the backing file afterwards
            qemu_img("rebase", "-u", "-b", args[-3], "-F", args[-1], path)
    else:
        qemu_img(*args, path, str(SIZE))
        if content in ("data", "snapshot"):
            qemu_io(path, "write -P 0x31 0 100k", f"write -P 0x32 {SIZE - 200 * 1024} 150k",
                    *(["write -z 300k 64k"] if compat == "1.1" else []))
        if content == "snapshot":
            qemu_img("snapshot", "-c", "s1", path)
    if backing:
        with open(f"{d}/base.raw", "rb") if backing == "raw" else open(
                as_raw_path := f"{d}/base-as.raw", "wb") as f:
            if backing == "raw":
                backing_data = f.read()
        if backing == "qcow2":
            backing_data = as_raw(f"{d}/base.qcow2", as_raw_path)
    return path, backing_data


def _discard_model(model: bytearray, off: int, n: int, cs: int, v2: bool,
                   backing: bytes | None) -> None:
    """QEMU's guest discard: whole clusters (and a partial last cluster ending the disk)
    read as zeros; on v2 images with a backing file it does nothing."""
    if v2 and backing is not None:
        return
    first = -(-off // cs) * cs
    end = off + n
    stop = end if end == len(model) else end // cs * cs
    if stop <= first:
        return
    model[first:stop] = bytes(stop - first)


configs = st.fixed_dictionaries({
    "cs": st.sampled_from([512, 4096, 65536]),
    "compat": st.sampled_from(["0.10", "1.1"]),
    "ext_l2": st.booleans(),
    "refbits": st.sampled_from([1, 4, 16, 64]),
    "backing": st.sampled_from([None, "raw", "qcow2"]),
    "content": st.sampled_from(["empty", "data", "compressed", "snapshot"]),
    "cache": st.sampled_from([1, 1 << 20]),
})
op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE // 512 - 1), st.integers(1, 300)),
    st.tuples(st.just("discard"), st.integers(0, SIZE // 512 - 1), st.integers(1, 600)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0)),
)


def _run_sequence(d: str, cfg: dict, ops: list, seed: int) -> None:
    v2 = cfg["compat"] == "0.10"
    ext_l2 = cfg["ext_l2"] and not v2 and cfg["cs"] >= 16384
    refbits = 16 if v2 else cfg["refbits"]
    if cfg["content"] == "snapshot":
        refbits = max(refbits, 4)  # a snapshot shares clusters: refcount 2 must fit
    path, backing = _base_image(d, cfg["cs"], cfg["compat"], ext_l2, refbits, cfg["backing"],
                                cfg["content"])
    model = bytearray(as_raw(path, f"{d}/start.raw"))
    rnd = random.Random(seed)
    disk = Qcow2Disk(path, cache_size=cfg["cache"])
    try:
        for kind, sector, count in ops:
            off = sector * 512
            n = min(count * 512, SIZE - off)
            if kind == "write":
                data = rnd.randbytes(n)
                cut = rnd.randrange(0, n + 1) // 512 * 512  # two segments
                disk.writev(off, [memoryview(data[:cut]), memoryview(data[cut:])])
                model[off:off + n] = data
            elif kind == "discard":
                disk.discard(off, n)
                _discard_model(model, off, n, cfg["cs"], v2, backing)
            elif kind == "flush":
                disk.flush()
            else:
                disk.close()
                disk = Qcow2Disk(path, cache_size=cfg["cache"])
        assert read_all(disk) == model
    finally:
        disk.close()
    check_clean(path)
    with open(f"{d}/model.raw", "wb") as f:
        f.write(model)
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", path, f"{d}/model.raw", check=False)
    assert r.returncode == 0, r.stdout


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cfg=configs, ops=st.lists(op, min_size=1, max_size=30), seed=st.integers(0, 2**16))
def test_random_sequences_match_model_and_pass_qemu_check(tmp_path_factory, cfg, ops, seed):
    _run_sequence(str(tmp_path_factory.mktemp("w")), cfg, ops, seed)


@pytest.mark.soak
@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cfg=configs, ops=st.lists(op, min_size=1, max_size=200), seed=st.integers(0, 2**16))
def test_soak_random_sequences(tmp_path_factory, cfg, ops, seed):
    _run_sequence(str(tmp_path_factory.mktemp("soak")), cfg, ops, seed)


def test_writes_into_compressed_and_shared_clusters_leave_snapshot_intact(tmp_path):
    path, _ = _base_image(str(tmp_path), 4096, "1.1", False, 16, None, "snapshot")
    qemu_img("snapshot", "-a", "s1", path)
    snap_before = as_raw(path, str(tmp_path / "snap.raw"))
    with Qcow2Disk(path) as disk:
        disk.writev(512, [memoryview(b"\xee" * 9000)])
        disk.discard(0, 64 << 10)
    check_clean(path)
    qemu_img("snapshot", "-a", "s1", path)
    assert as_raw(path, str(tmp_path / "snap2.raw")) == snap_before


@pytest.mark.parametrize("ext_l2", [False, True])
def test_partial_write_copies_backing_data(tmp_path, ext_l2):
    d = str(tmp_path)
    path, backing = _base_image(d, 65536, "1.1", ext_l2, 16, "raw", "empty")
    with Qcow2Disk(path) as disk:
        disk.writev(70000 // 512 * 512, [memoryview(b"\x01" * 1024)])
    expected = bytearray(backing[:SIZE] + bytes(SIZE - len(backing)))
    expected[69632:69632 + 1024] = b"\x01" * 1024
    assert as_raw(path, f"{d}/out.raw") == expected
    check_clean(path)


def test_dirty_image_from_lazy_refcounts_is_repaired_on_open(tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", path,
             str(SIZE))
    # qemu-io aborts without closing: the image keeps its dirty bit and stale refcounts
    subprocess.run(["qemu-io", "-c", "write -P 0x42 0 300k", "-c", "abort", path],
                   capture_output=True)
    assert json.loads(qemu_img("info", "--output=json", path).stdout)["dirty-flag"]
    with Qcow2Disk(path) as disk:
        disk.writev(400 << 10, [memoryview(b"\x43" * 4096)])
    check_clean(path)
    data = as_raw(path, str(tmp_path / "out.raw"))
    assert data[:300 << 10] == b"\x42" * (300 << 10)
    assert data[400 << 10:(400 << 10) + 4096] == b"\x43" * 4096


def test_discard_releases_host_space(tmp_path):
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
    with Qcow2Disk(path) as disk:
        disk.writev(0, [memoryview(b"\x01" * SIZE)])
        disk.flush()
        full = os.stat(path).st_blocks
        disk.discard(0, SIZE)
    assert os.stat(path).st_blocks < full // 2
    check_clean(path)
    assert as_raw(path, str(tmp_path / "out.raw")) == bytes(SIZE)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cfg=configs, ranges=st.lists(st.tuples(st.integers(0, SIZE // 512 - 1),
                                              st.integers(1, 600)), min_size=1, max_size=6))
def test_discard_reads_back_like_qemu(tmp_path_factory, cfg, ranges):
    """The same discards through qemu-io (discard=unmap) and blkpy: same guest view."""
    d = str(tmp_path_factory.mktemp("disc"))
    v2 = cfg["compat"] == "0.10"
    ext_l2 = cfg["ext_l2"] and not v2 and cfg["cs"] >= 16384
    refbits = 16 if v2 else max(cfg["refbits"], 4)
    path, _ = _base_image(d, cfg["cs"], cfg["compat"], ext_l2, refbits, cfg["backing"],
                          cfg["content"])
    theirs = f"{d}/theirs.qcow2"
    shutil.copyfile(path, theirs)
    spans = [(s * 512, min(n * 512, SIZE - s * 512)) for s, n in ranges]
    subprocess.run(["qemu-io", "-d", "unmap", *sum((["-c", f"discard {o} {n}"]
                                                     for o, n in spans), []), theirs],
                   check=True, capture_output=True)
    with Qcow2Disk(path) as disk:
        for o, n in spans:
            disk.discard(o, n)
    check_clean(path)
    r = qemu_img("compare", path, theirs, check=False)
    assert r.returncode == 0, r.stdout


def test_refcount_table_growth_passes_qemu_check(tmp_path):
    # 512-byte clusters with 64-bit refcounts: each refcount block covers 32 KiB and the
    # first table cluster 2 MiB, so filling 8 MiB needs new blocks and a bigger table
    path = str(tmp_path / "grow.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", path,
             str(8 << 20))
    data = random.Random(5).randbytes(8 << 20)
    with Qcow2Disk(path, cache_size=16 << 10) as disk:
        for off in range(0, 8 << 20, 96 << 10):
            chunk = data[off:off + (96 << 10)]
            disk.writev(off, [memoryview(chunk)])
    check_clean(path)
    assert as_raw(path, str(tmp_path / "out.raw")) == data


def test_unknown_compatible_and_autoclear_bits(tmp_path):
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
    qemu_io(path, "write -P 0x61 0 64k")
    with open(path, "r+b") as f:
        f.seek(80)
        f.write((1 << 33).to_bytes(8, "big"))  # compatible: unknown, ignored
        f.write((1 << 40).to_bytes(8, "big"))  # autoclear: unknown
    with Qcow2Disk(path, readonly=True) as disk:
        assert read_all(disk)[:65536] == b"\x61" * 65536
    with Qcow2Disk(path) as disk:  # writing: unknown autoclear bits must be cleared first
        disk.writev(0, [memoryview(b"\x62" * 512)])
    with open(path, "rb") as f:
        f.seek(88)
        assert f.read(8) == bytes(8)
    check_clean(path)


def test_queues_on_threads_may_share_one_disk(tmp_path):
    """Multi-queue devices give each queue its own I/O thread over one Disk."""
    import threading

    path = str(tmp_path / "mq.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, str(SIZE))
    model = bytearray(SIZE)
    with Qcow2Disk(path, cache_size=1) as disk:
        def worker(q: int) -> None:
            rnd = random.Random(q)
            for _ in range(300):
                # queue q owns every 4th 1536-byte slot: clusters are shared across queues
                slot = rnd.randrange(q, SIZE // 1536, 4)
                data = rnd.randbytes(1536)
                disk.writev(slot * 1536, [memoryview(data)])
                model[slot * 1536:(slot + 1) * 1536] = data
                if rnd.random() < 0.05:
                    disk.flush()
        threads = [threading.Thread(target=worker, args=(q,)) for q in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert read_all(disk) == model
    check_clean(path)


def test_discard_of_the_partial_last_cluster_like_qemu(tmp_path):
    size = SIZE + 512  # the last cluster is partial
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", ours, str(size))
    qemu_io(ours, f"write -P 9 0 {size}")
    shutil.copyfile(ours, theirs)
    spans = [(SIZE - 65536, 66048), (512, 70000)]
    subprocess.run(["qemu-io", "-d", "unmap", *sum((["-c", f"discard {o} {n}"]
                                                     for o, n in spans), []), theirs],
                   check=True, capture_output=True)
    with Qcow2Disk(ours) as disk:
        for o, n in spans:
            disk.discard(o, n)
    check_clean(ours)
    assert qemu_img("compare", ours, theirs, check=False).returncode == 0


def test_failed_data_write_gives_its_clusters_back(tmp_path, monkeypatch):
    """An allocating write whose data cannot be written fails, leaks nothing (its new
    clusters are freed, as QEMU's allocation abort does) and the disk goes on: the next
    write and flush succeed and qemu-img check finds the image clean."""
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "4M")
    real_pwritev = os.pwritev
    with Qcow2Disk(path) as disk:
        disk.writev(0, [memoryview(b"\x11" * 4096)])
        disk.flush()

        def failing(fd: int, bufs, offset: int) -> int:  # noqa: ANN001
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "pwritev", failing)
        with pytest.raises(OSError):
            disk.writev(1 << 20, [memoryview(b"\x22" * 3 * 4096)])  # three new clusters
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        disk.writev(2 << 20, [memoryview(b"\x33" * 512)])
        disk.flush()
    check_clean(path)
    data = as_raw(path, str(tmp_path / "out.raw"))
    assert data[:4096] == b"\x11" * 4096 and data[2 << 20:(2 << 20) + 512] == b"\x33" * 512
    assert data[1 << 20:(1 << 20) + 3 * 4096] == bytes(3 * 4096)


def test_a_write_back_puts_the_metadata_on_the_image_and_leaves_the_disk_serving(tmp_path):
    """What a hand-over does before its word: the allocations so far are on the image (a
    second, read-only look reads them, qemu-img finds it clean) while the disk stays open
    and writable; the close after has nothing left to write back."""
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, str(SIZE))
    with Qcow2Disk(path) as disk:
        disk.writev(8192, [memoryview(b"\x61" * 8192)])
        assert disk.meta.dirty
        disk.write_back()
        assert not disk.meta.dirty
        with Qcow2Disk(path, readonly=True) as look:
            assert read_all(look)[8192:16384] == b"\x61" * 8192
        check_clean(path)
        disk.writev(65536, [memoryview(b"\x62" * 4096)])  # and it writes on
    assert as_raw(path, str(tmp_path / "out.raw"))[65536:69632] == b"\x62" * 4096
