"""I/O engines: ordering, errors and the non-raw (Disk interface) path."""

import errno

import numpy as np
import pytest

from blkpy import engine as io
from blkpy.backends.base import Disk
from blkpy.backends.raw import RawDisk


class MemoryDisk(Disk):
    """A Disk without a direct fd (like qcow2), recording the order of calls."""

    def __init__(self, size=1 << 20, fail_at=None):
        self.size, self.readonly, self.data = size, False, bytearray(size)
        self.calls, self.fail_at = [], fail_at

    def readv(self, offset, bufs):
        self.calls.append(("read", offset))
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)

    def writev(self, offset, bufs):
        self.calls.append(("write", offset))
        if offset == self.fail_at:
            raise OSError(errno.ENOSPC, "full")
        for b in bufs:
            self.data[offset:offset + len(b)] = bytes(b)
            offset += len(b)

    def flush(self):
        self.calls.append(("flush", 0))

    def close(self):
        pass


def _vector(entries, buf):
    """entries: (kind, offset, length) with data from/to consecutive slices of buf."""
    base = buf.ctypes.data
    iov, first, pos = [], [], 0
    for kind, _off, length in entries:
        first.append(len(iov))
        if kind in (io.READ, io.WRITE):
            iov.append((base + pos, length))
            pos += length
    return io.IoVector(
        kind=np.array([e[0] for e in entries], np.int32),
        offset=np.array([e[1] for e in entries], np.uint64),
        length=np.array([e[2] for e in entries], np.int64),
        iov_first=np.array(first, np.int64),
        iov_count=np.array([1 if e[0] <= io.WRITE else 0 for e in entries], np.int64),
        iov=np.array(iov or [(0, 0)], np.uint64),
        owner=np.arange(len(entries)),
    )


def _run(eng, vec):
    """Submit one vector and wait for it; returns what completed."""
    eng.submit(vec)
    done = []
    while not done:
        done = eng.wait(1.0)
    eng.close()
    return done


@pytest.mark.parametrize("name", sorted(io.ENGINES))
def test_engines_on_a_disk_without_direct_fd(name):
    disk = MemoryDisk(fail_at=8192)
    buf = np.frombuffer(b"\x11" * 4096 + b"\x22" * 4096 + bytes(4096), np.uint8).copy()
    vec = _vector([(io.WRITE, 0, 4096), (io.FLUSH, 0, 0), (io.WRITE, 8192, 4096),
                   (io.DISCARD, 0, 4096), (io.READ, 0, 4096)], buf)
    assert _run(io.make_engine(name, disk), vec) == [vec]
    assert vec.result.tolist() == [0, 0, -errno.ENOSPC, -errno.EOPNOTSUPP, 0]
    assert [c[0] for c in disk.calls] == ["write", "flush", "write", "read"]
    assert bytes(buf[8192:]) == b"\x11" * 4096


@pytest.mark.parametrize("name", sorted(io.ENGINES))
def test_engines_on_a_raw_file_keep_flush_order(name, raw_image):
    disk = RawDisk(raw_image)
    buf = np.zeros(3 * 4096, np.uint8)
    buf[:4096] = 7
    vec = _vector([(io.WRITE, 4096, 4096), (io.FLUSH, 0, 0), (io.READ, 4096, 4096),
                   (io.READ, (4 << 20) - 2048, 2048)], buf)
    assert _run(io.make_engine(name, disk), vec) == [vec]
    disk.close()
    assert vec.result.tolist() == [0, 0, 0, 0]
    assert np.all(buf[4096:8192] == 7)


def test_unknown_engine():
    with pytest.raises(ValueError):
        io.make_engine("nope", MemoryDisk())


def test_cli_engine_names_match_the_engines():
    from blkpy.defaults import ENGINE_NAMES

    assert sorted(ENGINE_NAMES) == sorted([*io.ENGINES, "auto"])


def test_auto_engine_is_uring_for_o_direct_and_sync_on_the_page_cache(tmp_path):
    from blkpy.backends.raw import RawDisk

    path = tmp_path / "d.raw"
    path.write_bytes(bytes(1 << 20))
    buffered = RawDisk(str(path))
    assert isinstance(io.make_engine("auto", buffered), io.SyncEngine)
    buffered.close()
    try:
        direct = RawDisk(str(path), direct=True)
    except Exception:
        pytest.skip("this filesystem refuses O_DIRECT")
    engine = io.make_engine("auto", direct)
    try:
        assert isinstance(engine, io.UringEngine | io.SyncEngine)  # sync where io_uring is off
        assert isinstance(engine, io.UringEngine) or not _uring_available()
    finally:
        engine.close()
        direct.close()


@pytest.mark.parametrize("name", sorted(io.ENGINES))
def test_a_read_cut_short_by_the_end_of_the_file_reads_zeros(name, raw_image):
    disk = RawDisk(raw_image)
    with open(raw_image, "r+b") as f:
        f.write(b"\x11" * 8192)
        f.truncate(4096)  # shrunk under the disk: the second page is past the end
    buf = np.full(8192, 0xEE, np.uint8)
    try:
        eng = io.make_engine(name, disk) if name != "uring" or _uring_available() else None
        if eng is None:
            pytest.skip("io_uring unavailable")
        vec = _vector([(io.READ, 0, 8192)], buf)
        _run(eng, vec)
    finally:
        disk.close()
    assert vec.result.tolist() == [0]
    assert bytes(buf) == b"\x11" * 4096 + bytes(4096)


@pytest.mark.parametrize("name", sorted(io.ENGINES))
def test_a_read_cut_short_by_a_host_error_fails(name, tmp_path):
    """The kernel answers a buffered read whose later page fails with the bytes before it:
    a short read that is an error, not the end of the file (no zeros for the guest)."""
    from blkpy.fuzz.crashes import FaultyStorage, fault_layer_missing

    missing = fault_layer_missing()
    if missing is not None:
        pytest.skip(f"host faults: {missing}")
    if name == "uring" and not _uring_available():
        pytest.skip("io_uring unavailable")
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x11" * (4 * 4096))
    storage = FaultyStorage(str(image), str(tmp_path))
    buf = np.zeros(8192, np.uint8)
    try:
        disk = RawDisk(storage.path)
        try:
            storage.set_faults("ranges", [(2 * 4096, 2 * 4096 + 512)])
            vec = _vector([(io.READ, 4096, 8192)], buf)
            _run(io.make_engine(name, disk), vec)
        finally:
            disk.close()
    finally:
        storage.stop()
    assert vec.result.tolist() == [-errno.EIO]


def _uring_available() -> bool:
    try:
        io.UringEngine(MemoryDisk()).close()
    except OSError:
        return False
    return True
