"""qcow2 images: the I/O layer around the sans-IO metadata core (blkpy.qcow2).

It owns the file descriptors, moves guest data (preadv/pwritev, decompression, backing
reads, copy-on-write composition) and runs the core's write-back plans.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from blkpy.backends.base import CorruptImage, Disk, DiskError, UnsupportedImage
from blkpy.backends.raw import preadv_full, punch_hole
from blkpy.native_table import ExtentMap
from blkpy.qcow2.header import COMPRESSION_ZSTD, MAGIC
from blkpy.qcow2.l2 import Entry, Kind
from blkpy.qcow2.metadata import DEFAULT_CACHE_SIZE, ClusterWrite, Metadata
from blkpy.qcow2.plan import Op, Punch, Resize, Sync, SyncLost, Write
from blkpy.qcow2.restart_log import RestartLog

MAX_BACKING_DEPTH = 64  # QEMU's limit too; a deeper chain is most likely a loop
#: clusters whose host offsets the native ring loop may know at once (a 2 MiB table:
#: 2 GiB of guest data at 64 KiB clusters); when it fills up it starts over
EXTENT_MAP_CLUSTERS = 32768
#: clusters learnt per request served in Python (bounds the cost of one long request)
LEARN_CLUSTERS = 64
#: a successor learns its predecessor's tables (learn_regions) up to half the extent map
LEARN_AHEAD_CLUSTERS = EXTENT_MAP_CLUSTERS // 2
#: most clusters mapped ahead of a sequential allocating writer (allocation_ahead)
AHEAD_CLUSTERS = 16
_ZEROS = bytes(1 << 20)


class FileStorage:
    """plan.Storage over a file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, offset: int, length: int) -> bytes:
        data = bytearray(length)  # past the end of the file reads as zeros
        preadv_full(self.fd, [memoryview(data)], offset)
        return bytes(data)

    def execute(self, plan: list[Op]) -> None:
        for op in plan:
            if isinstance(op, Write):
                if os.pwrite(self.fd, op.data, op.offset) != len(op.data):
                    raise OSError(f"short write at 0x{op.offset:x}")
            elif isinstance(op, Sync):
                try:
                    os.fdatasync(self.fd)
                except OSError as exc:
                    raise SyncLost(exc.errno, f"fdatasync: {exc.strerror}") from exc
            elif isinstance(op, Resize) and os.fstat(self.fd).st_size < op.size:
                os.ftruncate(self.fd, op.size)
            elif isinstance(op, Punch):
                with contextlib.suppress(OSError):  # space saving only: EOPNOTSUPP is fine
                    punch_hole(self.fd, op.offset, op.length)


def _zero(views: Sequence[memoryview]) -> None:
    for v in views:
        for i in range(0, len(v), len(_ZEROS)):
            n = min(len(v) - i, len(_ZEROS))
            v[i:i + n] = _ZEROS[:n]


def _slices(bufs: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """Views of bytes [start, start+length) of the concatenation of ``bufs``."""
    out = []
    pos = 0
    end = start + length
    for b in bufs:
        blen = len(b)
        if pos + blen > start and pos < end:
            lo, hi = max(start - pos, 0), min(end - pos, blen)
            out.append(b[lo:hi])
        pos += blen
        if pos >= end:
            break
    return out


def _byte_views(bufs: Sequence[memoryview | bytes | bytearray]) -> list[memoryview]:
    return [memoryview(b).cast("B") for b in bufs]


def _check_backing_path(path: str) -> None:
    """A backing file must be a regular file or a block device: an image naming a FIFO
    or a socket would otherwise hang the open."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DiskError(f"cannot open backing file {path}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise DiskError(f"backing file {path} is neither a regular file nor a block device")


class _RawBacking:
    """A raw backing file, read-only."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open backing file {path}: {exc.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        if self.size == 0:  # block device
            self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        n = preadv_full(self.fd, bufs, offset)
        if n < total:  # past the end of the backing file
            _zero(_slices(bufs, n, total - n))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _probe(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DiskError(f"cannot open backing file {path}: {exc.strerror}") from None
    return "qcow2" if magic == MAGIC.to_bytes(4, "big") else "raw"


class _MappingBatch(threading.local):
    """Per thread (each queue's ring thread maps its own hand-backs): how deep inside
    ``mapping_batch`` it is, and whether an allocation there awaits its restart record."""

    depth = 0
    unrecorded = False


class Qcow2Disk(Disk):
    """A qcow2 image (v2/v3) with its backing chain.

    ``cache_size`` is the byte budget of cached L2 tables (refcount blocks get a quarter
    of it). Requests are serialised by a lock: several queues (each with its own I/O
    thread) may share one disk, and allocations must not interleave."""

    def __init__(self, path: str, readonly: bool = False,
                 cache_size: int = DEFAULT_CACHE_SIZE, _depth: int = 0,
                 restart_log: str | None = None, take_over: bool = False) -> None:
        """``restart_log``: where a writable image keeps the metadata changes not yet
        written back (blkpy.qcow2.restart_log), for a successor if this process dies;
        ``take_over``: this process is that successor, so apply the record first (any
        other open drops a record found there: it belongs to no running guest)."""
        self.path = path
        self.readonly = readonly
        self._lock = threading.Lock()
        self._fd = -1
        self.backing: Qcow2Disk | _RawBacking | None = None
        self._restart_log: RestartLog | None = None
        self._batch = _MappingBatch()
        try:
            self._fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open {path}: {exc.strerror}") from None
        try:
            self._storage = FileStorage(self._fd)
            if restart_log is not None and not readonly and _depth == 0:
                self._take_restart_log(restart_log, take_over)
            file_size = os.fstat(self._fd).st_size
            self.meta = Metadata(self._storage, file_size, writable=not readonly,
                                 cache_size=cache_size)
            h = self.meta.header
            if h.corrupt:
                raise CorruptImage(
                    f"{path}: image is marked corrupt; repair it with 'qemu-img check -r all'")
            if h.compression_type == COMPRESSION_ZSTD:
                _zstd()  # refuse now rather than on the first compressed read
            self.backing = self._open_backing(_depth)
        except BaseException:
            self._close()
            raise
        self.size = h.size
        self.cluster_size = h.cluster_size
        self.can_discard = not readonly
        self.discard_granularity = h.cluster_size
        self._last_compressed: tuple[int, bytes] | None = None
        # Where plain data clusters live, for the native ring loop (the top image only:
        # backing files are read through this object).
        self._extents = ExtentMap(EXTENT_MAP_CLUSTERS, h.cluster_bits) if _depth == 0 else None
        self._learnt_tables: set[int] = set()  # L1 indices whose L2 table was learnt whole
        #: learnt_regions' last answer, and the extent map's (generation, count) then
        self._regions: list[int] = []
        self._regions_key: tuple[int, int] | None = None
        self._miss_end = -1  # where the last write the loop could not place ended
        self._ahead_clusters = 0  # how far ahead of a sequential writer to map
        self._learnt_generation = 0

    def _take_restart_log(self, path: str, take_over: bool) -> None:
        st = os.fstat(self._fd)
        log = RestartLog(path, (st.st_dev, st.st_ino))
        phases = log.latest() if take_over else None
        for phase in phases or []:
            # in the write-back's order, each phase durable before the next
            self._storage.execute([*phase, Sync()])
        log.clear()
        self._restart_log = log

    @contextlib.contextmanager
    def mapping_batch(self) -> Iterator[None]:
        """One restart record for all the allocations of a hand-back (one per request
        cost 250 us each at queue depth 32)."""
        b = self._batch
        b.depth += 1
        try:
            yield
        finally:
            b.depth -= 1
            if not b.depth and b.unrecorded:
                with self._lock:
                    b.unrecorded = False
                    self._record_metadata()

    def _record_metadata(self) -> None:
        """After a metadata change (lock held): keep what only memory holds for a
        successor, or drop the record once a write-back made the image hold it all."""
        log = self._restart_log
        if log is None:
            return
        if self.meta.dirty:
            log.record(self.meta.unsynced_phases(changed_only=True), self.meta.unsynced_phases)
        elif log.live:
            log.clear()

    def native_io(self) -> tuple[int, ExtentMap | None] | None:
        if self._extents is None or self._fd < 0:
            return None
        return self._fd, self._extents

    def _learn(self, offset: int, length: int) -> None:
        """Tell the ring loop where the clusters just served live, so the next requests
        there need no Python: the whole L2 table the first time one is used (one
        vectorised pass), then the request's own clusters (after copy-on-write or a
        discard made the loop forget them). Only whole clusters of plain host data are
        learnt, and only clusters we own alone may be written in place."""
        extents = self._extents
        if extents is None or length <= 0:
            return
        bits, cs, meta = extents.cluster_bits, self.cluster_size, self.meta
        writable = self._writable_in_place()
        table_span = bits + meta.geo.l2_bits
        self._learn_tables(range(offset >> table_span,
                                 ((offset + length - 1) >> table_span) + 1), writable)
        first = offset >> bits
        last = min((offset + length - 1) >> bits, first + LEARN_CLUSTERS - 1)
        for cluster in range(first, last + 1):
            start = cluster << bits
            if start + cs > self.size:
                break  # a partial last cluster: Python keeps it
            host = meta.fast_host(start, cs, write=False)
            if host is not None:
                extents.learn(cluster, host,
                              writable and meta.fast_host(start, cs, write=True) is not None)

    def learnt_regions(self) -> list[int]:
        # every table the loop knows a cluster of (a cluster mapped for a write is learnt
        # alone, not with its table); asked every second, so worked out again only once
        # something was learnt (what was forgotten since costs a successor a read, no more)
        extents = self._extents
        if extents is None:
            return []
        key = (extents.generation, extents.count)
        if key != self._regions_key:
            held = extents.held_keys() >> np.uint64(self.meta.geo.l2_bits)
            self._regions, self._regions_key = np.unique(held).tolist(), key
        return list(self._regions)

    def learn_regions(self, regions: list[object]) -> int:
        if self._extents is None:
            return 0
        meta = self.meta
        tables = max(1, LEARN_AHEAD_CLUSTERS >> meta.geo.l2_bits)
        wanted = sorted({r for r in regions if isinstance(r, int) and not isinstance(r, bool)
                         and 0 <= r < len(meta.l1)})[:tables]
        with self._lock:
            self._learn_tables(wanted, self._writable_in_place())
            return len(self._learnt_tables.intersection(wanted))

    def _writable_in_place(self) -> bool:
        """Whether the loop may write clusters we own alone in place at all."""
        meta = self.meta
        return not self.readonly and meta.writable and not meta.write_failed

    def _learn_tables(self, l1_indices: Iterable[int], writable: bool) -> None:
        """Learn the whole L2 tables of ``l1_indices`` not learnt since the extent map
        last started over (lock held)."""
        extents = self._extents
        assert extents is not None
        if self._learnt_generation != extents.generation:
            self._learnt_tables.clear()
            self._learnt_generation = extents.generation
        span = extents.cluster_bits + self.meta.geo.l2_bits
        for l1_index in l1_indices:
            if l1_index not in self._learnt_tables:
                self._learn_table(l1_index << span, writable)

    def _learn_table(self, guest: int, writable: bool) -> None:
        extents = self._extents
        assert extents is not None
        try:
            found = self.meta.plain_clusters(guest)
        except CorruptImage:
            return  # the request path reports it when it gets there
        if found is not None:
            first, hosts, own = found
            clusters = first + np.arange(len(hosts), dtype=np.uint64)
            whole = ((clusters + np.uint64(1)) << np.uint64(extents.cluster_bits)) <= self.size
            extents.learn_many(clusters[whole], hosts[whole], own[whole] & writable)
        if self._learnt_generation == extents.generation:
            self._learnt_tables.add(guest >> (extents.cluster_bits + self.meta.geo.l2_bits))

    def _forget_all(self) -> None:
        """The image went read-only (corrupt) or a write-back failed: no more in place."""
        if self._extents is not None:
            self._extents.clear()

    # ---- backing chain ------------------------------------------------------------------

    def _open_backing(self, depth: int) -> Qcow2Disk | _RawBacking | None:
        h = self.meta.header
        name = h.backing_file
        if not name:
            return None
        if name.startswith("json:"):
            raise UnsupportedImage(f"{self.path}: backing file specification {name!r} "
                                   "is not supported")
        if depth + 1 >= MAX_BACKING_DEPTH:
            raise CorruptImage(f"{self.path}: backing chain deeper than {MAX_BACKING_DEPTH} "
                               "(a loop?)")
        path = name if os.path.isabs(name) else os.path.join(
            os.path.dirname(os.path.abspath(self.path)), name)
        _check_backing_path(path)
        fmt = h.backing_format or _probe(path)
        if fmt == "raw":
            return _RawBacking(path)
        if fmt == "qcow2":
            return Qcow2Disk(path, readonly=True, _depth=depth + 1)
        raise UnsupportedImage(f"{self.path}: backing format {fmt!r} is not supported")

    def _read_backing(self, offset: int, views: list[memoryview]) -> None:
        total = sum(len(v) for v in views)
        b = self.backing
        inside = 0 if b is None else max(0, min(total, b.size - offset))
        if inside:
            assert b is not None
            b.readv(offset, _slices(views, 0, inside))
        if inside < total:
            _zero(_slices(views, inside, total - inside))

    # ---- reads --------------------------------------------------------------------------

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        with self._lock:
            self._readv(offset, bufs)
            self._learn(offset, sum(len(b) for b in _byte_views(bufs)))

    def _readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = _byte_views(bufs)
        length = sum(len(v) for v in views)
        self.check_range(offset, length)
        runs = self.meta.fast_runs(offset, length, write=False)
        if runs is not None:  # plain data in cached tables: the common case
            pos = 0
            for host, n in runs:
                part = views if len(runs) == 1 else _slices(views, pos, n)
                got = preadv_full(self._fd, part, host)
                if got < n:  # allocated past the end of the file, not written yet
                    _zero(_slices(part, got, n - got))
                pos += n
            return
        try:
            self._read(offset, length, views)
        except CorruptImage:
            self.meta.mark_corrupt()
            self._forget_all()
            raise

    def _read(self, offset: int, length: int, views: list[memoryview]) -> None:
        for ext in self.meta.map_read(offset, length):
            part = _slices(views, ext.guest - offset, ext.length)
            if ext.kind is Kind.NORMAL:
                n = preadv_full(self._fd, part, ext.host)
                if n < ext.length:  # allocated past the end, not written yet
                    _zero(_slices(part, n, ext.length - n))
            elif ext.kind is Kind.ZERO:
                _zero(part)
            elif ext.kind is Kind.UNALLOCATED:
                self._read_backing(ext.guest, part)
            else:
                assert ext.entry is not None
                data = self._decompress(ext.entry)
                inoff = ext.guest % self.cluster_size
                pos = inoff
                for p in part:
                    p[:] = data[pos:pos + len(p)]
                    pos += len(p)

    def _decompress(self, e: Entry) -> bytes:
        if self._last_compressed and self._last_compressed[0] == e.host:
            return self._last_compressed[1]
        # the stream's last sector may lie past the end of the file: never read there
        buf = bytearray(min(e.compressed_len, self.meta.file_end - e.host))
        with memoryview(buf) as view:
            raw = bytes(view[:preadv_full(self._fd, [view], e.host)])
        cs = self.cluster_size
        try:
            if self.meta.header.compression_type == COMPRESSION_ZSTD:
                out = _zstd().ZstdDecompressor().stream_reader(io.BytesIO(raw)).read(cs)
            else:
                out = zlib.decompressobj(-12).decompress(raw, cs)
        except Exception as exc:  # zlib.error, zstd.ZstdError: a bad stream is bad metadata
            raise CorruptImage(f"compressed cluster at 0x{e.host:x} is damaged: {exc}") from None
        if len(out) != cs:
            raise CorruptImage(f"compressed cluster at 0x{e.host:x} is truncated")
        self._last_compressed = (e.host, out)
        return out

    # ---- writes -------------------------------------------------------------------------

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        with self._lock:
            try:
                self._writev(offset, bufs)
            except BaseException:
                self._forget_all()
                raise
            self._learn(offset, sum(len(b) for b in _byte_views(bufs)))

    def map_for_write(self, offset: int, length: int) -> bool:
        """Allocate the whole clusters under [offset, offset + length) with the bytes the
        guest reads there now, commit their L2 entries and teach the ring loop where they
        are, so the loop writes the guest's data itself (an allocating write then costs
        Python one cluster allocation, not a pass through the reference path).

        Crash safety as in ``_write``: a cluster's contents are on disk before its L2 entry
        points at it, so until the loop's write lands the guest still reads what it read
        before. A fresh cluster past the end of the file that reads as zeros needs no
        write at all: the file is only extended over it."""
        if self._extents is None:
            return False
        cs = self.cluster_size
        start = offset & ~(cs - 1)
        end = (offset + length + cs - 1) & ~(cs - 1)
        if length <= 0 or end > self.size or end - start > LEARN_CLUSTERS * cs:
            return False
        with self._lock:
            try:
                self._check_writable()
                if self._allocate(start, end - start):
                    if self._batch.depth:
                        self._batch.unrecorded = True
                    else:
                        self._record_metadata()
            except CorruptImage:
                self.meta.mark_corrupt()
                self._forget_all()
                return False  # the reference path answers with the error
            except OSError:
                self._forget_all()
                return False
        return True

    def allocation_ahead(self, offset: int, length: int) -> tuple[int, int] | None:
        """A writer allocating cluster after cluster (the previous miss ended where this
        one starts) will want the next ones: like a filesystem's speculative preallocation
        for an appending file, map them while the guest reads its answer. They read as
        zeros (or their backing bytes) until written, as before; a writer that stops
        leaves at most AHEAD_CLUSTERS sparse clusters allocated."""
        cs = self.cluster_size
        start = offset & ~(cs - 1)
        end = (offset + length + cs - 1) & ~(cs - 1)
        if start != self._miss_end:
            self._miss_end, self._ahead_clusters = end, 0
            return None
        # The window doubles while the writer keeps on (up to AHEAD_CLUSTERS), so a long
        # run misses once per window, not once per cluster.
        self._ahead_clusters = min(max(1, 2 * self._ahead_clusters), AHEAD_CLUSTERS)
        n = min(self._ahead_clusters * cs, self.size - end)
        self._miss_end = end + max(n, 0)
        return (end, n) if n >= cs else None

    def _allocate(self, start: int, length: int) -> bool:
        """Whether it changed the metadata (clusters already ours need nothing)."""
        meta, extents = self.meta, self._extents
        assert extents is not None
        if meta.fast_runs(start, length, write=True) is not None:
            self._learn(start, length)  # already ours (another queue got here first)
            return False
        extents.forget(start, length)
        steps = meta.plan_write(start, length)
        committed = 0
        try:
            # fresh clusters past the end of the file that read as zeros: the file is
            # extended over all of them at once
            end = max((s.host + s.length for s in steps if s.skip_cow), default=0)
            if end and os.fstat(self._fd).st_size < end:
                os.ftruncate(self._fd, end)
            for step in steps:
                if not step.skip_cow:
                    current = bytearray(step.length)
                    self._read(step.guest, step.length, [memoryview(current)])
                    self._write_run(step.host, [memoryview(current)])
                meta.commit(step)
                committed += 1
        except BaseException:
            meta.abort(steps[committed:])
            raise
        self._last_compressed = None
        # Whole clusters we now own alone: the loop may write them in place.
        bits = extents.cluster_bits
        for step in steps:
            for k in range(step.length >> bits):
                extents.learn((step.guest >> bits) + k, step.host + (k << bits), True)
        return bool(steps)

    def _check_writable(self) -> None:
        if self.meta.write_failed:
            raise OSError(errno.EIO, f"{self.path}: writes stopped after a metadata error")
        if self.readonly or not self.meta.writable:  # opened so, or marked corrupt
            raise PermissionError(f"{self.path} is read-only")

    def _writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._check_writable()
        views = _byte_views(bufs)
        length = sum(len(v) for v in views)
        self.check_range(offset, length)
        runs = self.meta.fast_runs(offset, length, write=True)
        if runs is not None:  # rewrite of data we own: no metadata involved
            pos = 0
            for host, n in runs:
                part = views if len(runs) == 1 else _slices(views, pos, n)
                if os.pwritev(self._fd, part, host) != n:
                    raise OSError(errno.EIO, f"short write at 0x{host:x}")
                pos += n
            self.meta.data_written()
            self._last_compressed = None
            return
        try:
            self._write(offset, length, views)
        except CorruptImage:
            self.meta.mark_corrupt()
            raise
        self._record_metadata()

    def _write(self, offset: int, length: int, views: list[memoryview]) -> None:
        meta = self.meta
        if self._extents is not None:  # clusters may move (copy-on-write): relearn after
            self._extents.forget(offset, length)
        # steps whose host bytes follow each other go out in one pwritev; their L2
        # entries are committed only after it
        run_host, run_data, run_steps, run_len = 0, [], [], 0
        steps = meta.plan_write(offset, length)
        committed = 0

        def write_run() -> None:
            nonlocal committed
            self._write_run(run_host, run_data)
            for step in run_steps:
                meta.commit(step)
                committed += 1

        try:
            for step in steps:
                host, data = self._step_data(step, offset, length, views)
                if run_data and (run_host + run_len != host or len(run_data) + len(data) > 1024):
                    write_run()
                    run_data, run_steps = [], []
                if not run_data:
                    run_host, run_len = host, 0
                run_data += data
                run_steps.append(step)
                run_len += sum(len(d) for d in data)
            if run_data:
                write_run()
        except BaseException:
            meta.abort(steps[committed:])  # their new clusters would leak otherwise
            raise
        self._last_compressed = None

    def _step_data(self, step: ClusterWrite, offset: int, length: int,
                   views: list[memoryview]) -> tuple[int, list[memoryview]]:
        """Host offset and bytes of one planned step: the caller's bytes, widened by
        copy-on-write to what the guest currently reads around them if the step asks."""
        lo = max(step.guest, offset)
        hi = min(step.guest + step.length, offset + length)
        data = _slices(views, lo - offset, hi - lo)
        if step.skip_cow:
            return step.host + lo - step.guest, data
        if step.guest == lo and step.guest + step.length == hi:
            return step.host, data
        region = bytearray(step.length)
        rv = memoryview(region)
        head, tail = lo - step.guest, step.guest + step.length - hi
        if head:
            self._read(step.guest, head, [rv[:head]])
        if tail:
            self._read(hi, tail, [rv[step.length - tail:]])
        pos = head
        for d in data:
            rv[pos:pos + len(d)] = d
            pos += len(d)
        return step.host, [rv]

    def _write_run(self, host: int, data: list[memoryview]) -> None:
        """Guest data of steps whose host bytes follow each other, in one pwritev (their
        L2 entries are committed only after it)."""
        if os.pwritev(self._fd, data, host) != sum(len(d) for d in data):
            raise OSError(errno.EIO, f"short write at 0x{host:x}")
        self.meta.data_written()

    def discard(self, offset: int, length: int) -> None:
        self.check_range(offset, length)
        with self._lock:
            self._check_writable()
            # forgotten (and no loop still using them) before their host clusters are freed
            if self._extents is not None:
                self._extents.forget(offset, length)
            try:
                self.meta.discard(offset, length)
            except CorruptImage:
                self.meta.mark_corrupt()
                self._forget_all()
                raise
            self._last_compressed = None
            self._record_metadata()

    def flush(self) -> None:
        with self._lock:
            if self.meta.write_failed:
                raise OSError(errno.EIO, f"{self.path}: an earlier metadata write failed")
            if not self.readonly:
                self._write_metadata(self.meta.flush)

    def write_back(self) -> None:
        with self._lock:
            if not self.readonly and self.meta.dirty:
                # (in its crash-safe order, each phase synced)
                self._write_metadata(self.meta.writeback)

    def _write_metadata(self, write: Callable[[], None]) -> None:
        """Run a metadata write (lock held): after a failed one the loop writes nothing
        in place any more; either way the restart record follows the image."""
        try:
            write()
        finally:
            if self.meta.write_failed:
                self._forget_all()
        self._record_metadata()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        try:
            if (self._fd >= 0 and not self.readonly and hasattr(self, "meta")
                    and not self.meta.write_failed):
                # Metadata only memory holds goes to the image, in its crash-safe order.
                # No sync beyond that: the guest did not ask for one (a raw image's close
                # has none either), and an upgrade's guest waits for this close.
                self.meta.writeback()
                self._record_metadata()
        finally:
            if self._restart_log is not None:
                self._restart_log.close()
            if self.backing is not None:
                self.backing.close()
                self.backing = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _zstd():  # type: ignore[no-untyped-def]
    try:
        import zstandard
    except ImportError:
        raise UnsupportedImage("zstd-compressed images need the 'zstandard' package") from None
    return zstandard
