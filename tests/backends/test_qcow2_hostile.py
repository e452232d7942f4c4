"""Hostile images: fuzzed headers and tables give a clear error or an I/O error, never a
crash, a hang, or I/O outside the file."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_img import needs_qemu, qemu_img, qemu_io

from blkpy.backends.base import CorruptImage, DiskError
from blkpy.backends.qcow2 import FileStorage, Qcow2Disk
from blkpy.qcow2.check import check_image
from blkpy.qcow2.metadata import Metadata

pytestmark = needs_qemu
SIZE = 1 << 20
ALLOWED = (DiskError, OSError)  # PermissionError (after the corrupt bit) is an OSError
_REAL_IO = {name: getattr(os, name) for name in ("pread", "preadv", "pwrite", "pwritev")}


def _compressed_with_snapshot(d) -> str:
    src = d / "src.raw"
    src.write_bytes((bytes(range(256)) * 16 + bytes(4096)) * (SIZE // 8192))
    path = str(d / "img.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src), path)
    qemu_io(path, "write -P 0x11 0 20k", "write -z 64k 8k")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io(path, "write -P 0x12 8k 8k")
    return path


def _subclusters_over_backing(d) -> str:
    base = d / "base.raw"
    base.write_bytes(b"\x33" * (SIZE // 2))
    path = str(d / "img.qcow2")
    # absolute backing name: the fuzzed copies live in other directories
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16384,extended_l2=on",
             "-b", str(base), "-F", "raw", path, str(SIZE))
    qemu_io(path, "write -P 0x44 1024 3072", "write -z 40000 8192", "write -P 0x45 300k 20k")
    return path


@pytest.fixture(scope="module", params=[_compressed_with_snapshot, _subclusters_over_backing])
def pristine(request, tmp_path_factory):
    """A small image with many kinds of structure, and where its metadata lives."""
    path = request.param(tmp_path_factory.mktemp("hostile"))
    fd = os.open(path, os.O_RDONLY)
    try:
        meta = Metadata(FileStorage(fd), os.fstat(fd).st_size, writable=False)
        h = meta.header
        cs = h.cluster_size
        regions = [(0, 512), (h.l1_table_offset, 8 * h.l1_size),
                   (h.refcount_table_offset, 64), (h.snapshots_offset, 128)]
        regions += [(int(v) & 0x00FFFFFFFFFFFE00, cs) for v in meta.l1 if int(v)]
        regions += [(int(v), 512) for v in meta.alloc.reftable if int(v)]
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return _Pristine(f.read(), regions)


class _Pristine:
    def __init__(self, image: bytes, regions: list[tuple[int, int]]) -> None:
        self.image, self.regions = image, regions

    def __repr__(self) -> str:  # keep hypothesis reports short
        return f"<image of {len(self.image)} bytes>"


class _IoSpy:
    """Asserts every pread/pwrite on the image stays inside it (or inside clusters the
    allocator handed out past its end)."""

    def __init__(self, monkeypatch, path: str) -> None:
        self.path = path
        self.disk: Qcow2Disk | None = None
        for name, real in _REAL_IO.items():  # replace, never stack, across examples
            monkeypatch.setattr(os, name, self._wrap(real, name.startswith("pwrite")))

    def _limit(self, fd: int) -> int:
        size = os.fstat(fd).st_size
        if self.disk is not None and getattr(self.disk, "_fd", None) == fd:
            size = max(size, self.disk.meta.file_end)
        return size

    def _wrap(self, real, is_write: bool):
        def spy(fd, arg, offset):
            length = arg if isinstance(arg, int) else (
                len(arg) if isinstance(arg, bytes | bytearray | memoryview)
                else sum(len(b) for b in arg))
            if os.path.realpath(f"/proc/self/fd/{fd}") == self.path and length:
                limit = self._limit(fd)
                assert offset >= 0
                if is_write:
                    assert offset + length <= limit, f"write past the image at {offset}"
                else:
                    assert offset < limit, f"read past the image at {offset}"
            return real(fd, arg, offset)
        return spy


def _check(path: str) -> None:
    """``image check`` walks every table: it must report, not crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        check_image(Metadata(FileStorage(fd), os.fstat(fd).st_size, writable=False))
    except DiskError as exc:
        assert str(exc) and "\n" not in str(exc)
    finally:
        os.close(fd)


def _exercise(path: str, spy: _IoSpy, rnd: random.Random, writable: bool) -> None:
    _check(path)
    try:
        disk = Qcow2Disk(path, readonly=not writable, cache_size=8192)
    except ALLOWED as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    spy.disk = disk
    try:
        for off in range(0, disk.size, 64 << 10):
            try:
                buf = bytearray(min(64 << 10, disk.size - off))
                disk.readv(off, [memoryview(buf)])
            except ALLOWED:
                pass
        if writable and disk.size:
            for _ in range(8):
                off = rnd.randrange(0, disk.size // 512) * 512
                n = min(disk.size - off, 512 * rnd.randint(1, 40))
                try:
                    if rnd.random() < 0.3:
                        disk.discard(off, n)
                    else:
                        disk.writev(off, [memoryview(bytes([rnd.randrange(256)]) * n)])
                    if rnd.random() < 0.3:
                        disk.flush()
                except ALLOWED:
                    pass
    finally:
        with contextlib.suppress(ALLOWED):
            disk.close()
        spy.disk = None


def _timeout(signum, frame):
    raise TimeoutError("hang on a hostile image")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), writable=st.booleans(), seed=st.integers(0, 1 << 16))
def test_fuzzed_metadata_never_escapes_the_file(pristine, tmp_path, monkeypatch, data,
                                                 writable, seed):
    image, regions = pristine.image, pristine.regions
    blob = bytearray(image)
    for _ in range(data.draw(st.integers(1, 4))):
        start, length = data.draw(st.sampled_from(regions))
        pos = start + data.draw(st.integers(0, max(0, length - 8)))
        if data.draw(st.booleans()):
            blob[pos] = data.draw(st.integers(0, 255))
        else:
            value = data.draw(st.one_of(st.integers(0, (1 << 64) - 1),
                                        st.sampled_from([0, 1, 0x200, len(blob), 1 << 62,
                                                         1 << 63 | 0x1000, (1 << 64) - 1])))
            struct.pack_into(">Q", blob, pos, value)
    path = str(tmp_path / f"fuzz{seed}.qcow2")
    with open(path, "wb") as f:
        f.write(blob)
    spy = _IoSpy(monkeypatch, os.path.realpath(path))
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(30)
    try:
        _exercise(path, spy, random.Random(seed), writable)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        os.unlink(path)


def test_backing_loop_is_refused(tmp_path):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", a, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    with pytest.raises(CorruptImage, match="backing chain"):
        Qcow2Disk(b, readonly=True)


def test_missing_backing_file_is_one_clear_error(tmp_path):
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    os.unlink(base)
    with pytest.raises(DiskError, match="backing file"):
        Qcow2Disk(top, readonly=True)


def test_corrupt_bit_is_refused_and_set_on_detected_corruption(tmp_path):
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    qemu_io(path, "write -P 1 0 4k")
    fd = os.open(path, os.O_RDONLY)
    meta = Metadata(FileStorage(fd), os.fstat(fd).st_size, writable=False)
    l2_offset = int(meta.l1[0]) & 0x00FFFFFFFFFFFE00
    os.close(fd)
    with open(path, "r+b") as f:  # point guest cluster 0 far past the end of the file
        f.seek(l2_offset)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    with Qcow2Disk(path) as disk, pytest.raises(CorruptImage, match="outside"):
        disk.readv(0, [memoryview(bytearray(512))])
    with pytest.raises(CorruptImage, match="marked corrupt"):
        Qcow2Disk(path)
    assert '"corrupt": true' in qemu_img("info", "--output=json", path).stdout


def test_backing_file_that_is_a_fifo_is_refused(tmp_path):
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", fifo, "-F", "raw", top, "1M")
    with pytest.raises(DiskError, match="neither a regular file"):
        Qcow2Disk(top, readonly=True)


def test_writes_before_detected_corruption_are_kept(tmp_path):
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "4M")
    qemu_io(path, "write -P 1 2M 4k")
    fd = os.open(path, os.O_RDONLY)
    meta = Metadata(FileStorage(fd), os.fstat(fd).st_size, writable=False)
    l2_offset = int(meta.l1[1]) & 0x00FFFFFFFFFFFE00  # the table mapping 2M..4M
    os.close(fd)
    with open(path, "r+b") as f:  # a misaligned data cluster at guest 2M
        f.seek(l2_offset)
        f.write(struct.pack(">Q", (1 << 63) | 0x10200))
    with Qcow2Disk(path) as disk:
        disk.writev(0, [memoryview(b"\x77" * 8192)])  # acknowledged, not yet flushed
        with pytest.raises(CorruptImage):
            disk.readv(2 << 20, [memoryview(bytearray(512))])
        disk.flush()  # earlier writes were written back when the corruption was found
        with pytest.raises(PermissionError):
            disk.writev(0, [memoryview(b"\x78" * 512)])
    assert '"corrupt": true' in qemu_img("info", "--output=json", path).stdout
    r = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x77 0 8k", path],
                       capture_output=True, text=True)
    assert "Pattern verification failed" not in r.stdout and "read 8192/8192" in r.stdout
