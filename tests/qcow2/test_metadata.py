"""The metadata core on an in-memory file: allocation, write-back order, crash states."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.qcow2.check import check_image
from blkpy.qcow2.l2 import Kind
from blkpy.qcow2.layout import CreateOptions, new_image
from blkpy.qcow2.metadata import Metadata
from blkpy.qcow2.plan import MemoryStorage, Resize, Sync, SyncLost, Write


def _meta(size=4 << 20, cache_size=1 << 20, **kw):
    storage = MemoryStorage(new_image(CreateOptions(size=size, **kw)))
    return storage, Metadata(storage, len(storage.data), writable=True, cache_size=cache_size)


def _write(storage, meta, offset, length):
    for step in meta.plan_write(offset, length):
        storage.execute([Write(step.host, b"\xaa" * step.length)])
        meta.data_written()
        meta.commit(step)


def _reopen(storage):
    return Metadata(storage, len(storage.data), writable=False)


def test_allocation_maps_guest_to_new_host_cluster():
    storage, meta = _meta(cluster_size=4096)
    _write(storage, meta, 8192 + 100, 50)
    meta.flush()
    [ext] = _reopen(storage).map_read(8192, 4096)
    assert ext.kind is Kind.NORMAL and ext.host % 4096 == 0 and ext.length == 4096
    assert check_image(_reopen(storage)).status == 0


def test_write_back_order_refcounts_then_l2_then_l1():
    storage, meta = _meta(cluster_size=4096)
    h = meta.header
    _write(storage, meta, 0, 4096)
    storage.log.clear()
    meta.flush()
    kinds = []
    for op in storage.log:
        if isinstance(op, Resize):
            continue
        if isinstance(op, Sync):
            kinds.append("sync")
        elif h.l1_table_offset <= op.offset < h.l1_table_offset + 4096:
            kinds.append("l1")
        elif op.offset in meta.alloc.cache:
            kinds.append("refblock")
        else:
            kinds.append("l2")
    assert kinds == ["refblock", "sync", "l2", "sync", "l1", "sync"]


def test_in_place_rewrite_needs_no_metadata():
    storage, meta = _meta(cluster_size=4096)
    _write(storage, meta, 0, 4096)
    meta.flush()
    [step] = meta.plan_write(0, 512)
    assert step.l2_table == 0 and step.length == 512


def test_refcount_table_grows_and_stays_consistent():
    # 512-byte clusters with 64-bit refcounts: one table cluster covers only 2 MiB
    storage, meta = _meta(size=8 << 20, cluster_size=512, refcount_bits=64, cache_size=4096)
    before = meta.alloc.reftable_offset
    for off in range(0, 6 << 20, 64 << 10):
        _write(storage, meta, off, 64 << 10)
    meta.flush()
    assert meta.alloc.reftable_offset != before
    result = check_image(_reopen(storage))
    assert result.status == 0, result.messages[:5]


def test_discard_frees_clusters_after_write_back():
    storage, meta = _meta(cluster_size=4096)
    _write(storage, meta, 0, 16384)
    meta.flush()
    used = meta.alloc.get(meta.entry(0).host // 4096)
    meta.discard(0, 16384)
    assert meta.entry(0).kind is Kind.ZERO and not meta.entry(0).host  # as QEMU: zero flag
    meta.flush()
    assert used == 1 and check_image(_reopen(storage)).status == 0


def _crash_states(base: bytes, log, rng, count):
    """Disk contents after a crash at random points: everything before the last Sync
    reached the disk, any subset of the writes after it did."""
    syncs = [i for i, op in enumerate(log) if isinstance(op, Sync)]
    for _ in range(count):
        cut = rng.randrange(len(log) + 1)
        durable = max([i for i in syncs if i < cut], default=-1)
        state = MemoryStorage(base)
        state.execute(list(log[:durable + 1]))
        state.execute([op for op in log[durable + 1:cut] if rng.random() < 0.5])
        yield state


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([512, 4096, 65536]), st.sampled_from([1, 16, 64]),
       st.lists(st.tuples(st.sampled_from(["w", "d", "f"]), st.integers(0, (2 << 20) - 1),
                          st.integers(1, 96 << 10)), min_size=1, max_size=25),
       st.integers(0, 1000))
def test_any_crash_point_leaves_no_corruption(cluster_size, refcount_bits, ops, seed):
    storage, meta = _meta(size=2 << 20, cluster_size=cluster_size, refcount_bits=refcount_bits,
                          cache_size=2 * cluster_size)
    base = bytes(storage.data)
    for kind, off, n in ops:
        n = min(n, meta.size - off)
        if kind == "w":
            _write(storage, meta, off, n)
        elif kind == "d":
            meta.discard(off, n)
        else:
            meta.flush()
    meta.flush()
    for state in _crash_states(base, storage.log, random.Random(seed), 6):
        result = check_image(Metadata(state, len(state.data), writable=False))
        assert result.corruptions == 0, result.messages[:5]


def test_read_only_metadata_refuses_writes():
    storage, meta = _meta()
    ro = _reopen(storage)
    with pytest.raises(PermissionError):
        ro.plan_write(0, 512)


class _FailingStorage(MemoryStorage):
    """Fails the n-th write (or, with ``syncs``, the n-th sync) it is asked to run, like a
    full or failing disk; later ones succeed again, like a disk whose fault went away."""

    def __init__(self, data: bytes, fail_at: int, syncs: bool = False) -> None:
        super().__init__(data)
        self.left = fail_at
        self.kind = Sync if syncs else Write

    def execute(self, plan):
        for op in plan:
            if isinstance(op, self.kind):
                self.left -= 1
                if self.left == 0:
                    if self.kind is Sync:
                        raise SyncLost(5, "Input/output error")
                    raise OSError(28, "No space left on device")
            super().execute([op])


def _dirty_meta(fail_at: int, syncs: bool = False) -> tuple[_FailingStorage, Metadata]:
    """Metadata with allocations, a discard (deferred frees) and a new L2 table pending."""
    storage = _FailingStorage(new_image(CreateOptions(size=4 << 20, cluster_size=4096)),
                              fail_at=10**9, syncs=syncs)
    meta = Metadata(storage, len(storage.data), writable=True)
    _write(storage, meta, 0, 64 << 10)
    meta.flush()
    meta.discard(0, 8192)
    _write(storage, meta, 1 << 20, 4096)
    _write(storage, meta, 3 << 20, 4096)
    storage.left = fail_at
    return storage, meta


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5])
def test_failed_metadata_write_is_retried_by_the_next_flush(fail_at):
    """A failed write leaves the cache dirty: the next flush writes everything again in
    order, and a transient fault does not stop the disk (it used to refuse every write
    and flush for good)."""
    storage, meta = _dirty_meta(fail_at)
    with pytest.raises(OSError):
        meta.flush()
    assert check_image(_reopen(storage)).corruptions == 0  # the state the crash would see
    meta.flush()
    _write(storage, meta, 2 << 20, 512)
    meta.flush()
    ro = _reopen(storage)
    result = check_image(ro)
    assert (result.corruptions, result.leaks) == (0, 0), result.messages[:5]
    for guest in (1 << 20, 2 << 20, 3 << 20):
        assert ro.entry(guest).kind is Kind.NORMAL
    assert ro.entry(0).kind is not Kind.NORMAL  # the discard reached the disk too


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_failed_sync_stops_writes_and_leaves_no_corruption(fail_at):
    storage, meta = _dirty_meta(fail_at, syncs=True)
    with pytest.raises(SyncLost):
        meta.flush()
    with pytest.raises(OSError):
        meta.flush()  # never claims success after the kernel may have dropped writes
    with pytest.raises(PermissionError):
        meta.plan_write(0, 512)
    assert check_image(_reopen(storage)).corruptions == 0


def test_aborted_allocation_leaks_nothing():
    """Clusters planned for a write whose data never reached the disk are given back."""
    storage, meta = _meta()
    steps = meta.plan_write(1 << 20, 3 * 65536)
    assert any(s.allocated for s in steps)
    meta.abort(steps)
    meta.flush()
    result = check_image(_reopen(storage))
    assert (result.corruptions, result.leaks) == (0, 0), result.messages[:5]


@settings(max_examples=60, deadline=None)
@given(cluster_bits=st.sampled_from([9, 12, 16]),
       writes=st.lists(st.tuples(st.integers(0, (4 << 20) - 1), st.integers(1, 20000)),
                       max_size=12),
       discards=st.lists(st.tuples(st.integers(0, (4 << 20) - 1), st.integers(1, 70000)),
                         max_size=4))
def test_plain_clusters_agrees_with_fast_host(cluster_bits, writes, discards):
    """The ring loop's bulk-learnt extents say what fast_host says, cluster by cluster."""
    size = 4 << 20
    storage, meta = _meta(size=size, cluster_size=1 << cluster_bits)
    for off, n in writes:
        _write(storage, meta, off, min(n, size - off))
    for off, n in discards:
        meta.discard(off, min(n, size - off))
    cs = 1 << cluster_bits
    span = cs * (cs // 8)  # guest bytes one L2 table covers
    for table_start in range(0, size, span):
        found = meta.plain_clusters(table_start)
        for k in range(min(cs // 8, (size - table_start) // cs)):
            start = table_start + k * cs
            read, write = meta.fast_host(start, cs, False), meta.fast_host(start, cs, True)
            if found is None:
                assert read is None
                continue
            first, hosts, own = found
            assert first == table_start >> cluster_bits
            assert (int(hosts[k]) or None) == read
            assert bool(own[k]) == (write is not None)


class _ReadCounting(MemoryStorage):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().read(offset, length)


@pytest.mark.parametrize("cluster_size", [4096, 65536, 1 << 21])
def test_the_header_is_read_with_its_first_cluster_only(cluster_size):
    """A successor opens its image while the guest waits: the header read takes the first
    cluster (where the backing file's name lives), not the largest cluster size."""
    image = new_image(CreateOptions(size=64 << 20, cluster_size=cluster_size,
                                    backing_file="base.img", backing_format="raw"))
    storage = _ReadCounting(image)
    meta = Metadata(storage, len(storage.data), writable=False)
    assert meta.header.backing_file == "base.img"
    assert meta.header.cluster_size == cluster_size
    header_reads = [n for off, n in storage.reads if off == 0]
    assert max(header_reads) == min(len(image), max(cluster_size, 65536))
