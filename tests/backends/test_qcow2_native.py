"""qcow2 through the native ring loop: the format teaches the loop where plain data
clusters live (blkpy.native_table.ExtentMap) and must make it forget them before they
move (copy-on-write) or are freed (discard). Checked against a model of the guest's
disk, qemu-img check, and snapshots that must not change."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkpy.ring import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_OKAY,
)
from blkpy.sim.inprocess import InProcessDevice
from tests.qemu_img import as_raw, check_clean, needs_qemu, qemu_img, qemu_io

PAGE = 4096
DISK = 4 << 20
PAGES = DISK // PAGE

pytestmark = needs_qemu


def _image(d, cluster: int, snapshot: bool) -> str:
    path = f"{d}/t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", path, str(DISK))
    if snapshot:  # some data shared with a snapshot: never written in place
        qemu_io(path, "write -P 0x5a 0 1M", "write -P 0x6b 2M 512k")
        qemu_img("snapshot", "-c", "s1", path)
    return path


class Guest:
    """A frontend on the in-process device with a model of what the disk holds."""

    def __init__(self, dev: InProcessDevice, model: bytearray) -> None:
        self.dev = dev
        self.model = model
        self.pages = [dev.data_page() for _ in range(11)]
        self.rid = 0

    def _segs(self, n: int) -> list[tuple[int, int, int]]:
        return [(g, 0, 7) for _f, g in self.pages[:n]]

    def write(self, page: int, n: int, fill: int) -> None:
        for k in range(n):
            self.dev.guest.page(self.pages[k][0])[:] = bytes([(fill + k) & 0xFF]) * PAGE
        self._go(BLKIF_OP_WRITE, page, n)
        for k in range(n):
            off = (page + k) * PAGE
            self.model[off:off + PAGE] = bytes([(fill + k) & 0xFF]) * PAGE

    def read(self, page: int, n: int) -> None:
        self._go(BLKIF_OP_READ, page, n)
        for k in range(n):
            off = (page + k) * PAGE
            assert bytes(self.dev.guest.page(self.pages[k][0])) == self.model[off:off + PAGE]

    def discard(self, page: int, n: int) -> None:
        r = np.zeros(1, dtype=self.dev.abi.discard)
        r["operation"], r["id"] = BLKIF_OP_DISCARD, self._next()
        r["sector_number"], r["nr_sectors"] = page * 8, n * 8
        assert self.dev.status_of(r.view(self.dev.abi.request)) == [BLKIF_RSP_OKAY]
        # qcow2 v3 discards whole clusters inside the range to zeros; partial clusters
        # keep their data (they are zeroed only where a whole cluster is covered)
        cs = self.dev.disk.cluster_size
        lo, hi = page * PAGE, (page + n) * PAGE
        first = -(-lo // cs) * cs
        for c in range(first, hi - cs + 1, cs):
            self.model[c:c + cs] = bytes(cs)

    def flush(self) -> None:
        req = self.dev.request(BLKIF_OP_FLUSH_DISKCACHE, 0, [], rid=self._next())
        assert self.dev.status_of(req) == [BLKIF_RSP_OKAY]

    def _next(self) -> int:
        self.rid += 1
        return self.rid

    def _go(self, op: int, page: int, n: int) -> None:
        req = self.dev.request(op, page * 8, self._segs(n), rid=self._next())
        assert self.dev.status_of(req) == [BLKIF_RSP_OKAY]


OPS = st.lists(
    st.tuples(st.sampled_from(["write", "write", "read", "read", "discard", "flush"]),
              st.integers(0, PAGES - 11), st.integers(1, 11), st.integers(0, 255)),
    min_size=1, max_size=40)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cluster=st.sampled_from([4096, 65536]), snapshot=st.booleans(), ops=OPS)
def test_mixed_native_and_python_requests_match_the_model(tmp_path_factory, cluster, snapshot,
                                                          ops):
    d = tmp_path_factory.mktemp("q")
    path = _image(d, cluster, snapshot)
    model = bytearray(as_raw(path, f"{d}/before.raw"))
    snap_before = model[:] if snapshot else None
    dev = InProcessDevice(path, fmt="qcow2", persistent=True)
    try:
        g = Guest(dev, model)
        for kind, page, n, fill in ops:
            if kind == "write":
                g.write(page, n, fill)
            elif kind == "read":
                g.read(page, n)
            elif kind == "discard":
                g.discard(page, n)
            else:
                g.flush()
        # every page once more: the whole disk reads as the model
        for page in range(0, PAGES, 11):
            g.read(page, min(11, PAGES - page))
    finally:
        dev.close()
    check_clean(path)
    assert as_raw(path, f"{d}/after.raw") == bytes(model)
    if snap_before is not None:
        qemu_img("snapshot", "-a", "s1", path)
        assert as_raw(path, f"{d}/snap.raw") == bytes(snap_before)


def test_rewrites_and_rereads_are_served_natively(tmp_path):
    path = _image(tmp_path, 65536, snapshot=False)
    dev = InProcessDevice(path, fmt="qcow2", persistent=True)
    try:
        g = Guest(dev, bytearray(DISK))
        g.write(16, 4, 1)  # allocating: Python
        loop = dev.vbd.loop
        before = loop.counters()
        g.write(16, 4, 9)  # in place: the loop
        g.read(16, 4)
        after = loop.counters()
        assert after["wr_req"] == before["wr_req"] + 1
        assert after["rd_req"] == before["rd_req"] + 1
        g.discard(16, 16)  # the whole cluster: forgotten, then zeros
        g.read(16, 4)
        assert loop.counters()["rd_req"] == after["rd_req"]  # Python served the read
    finally:
        dev.close()
    check_clean(path)


def test_shared_clusters_are_read_natively_but_never_written_in_place(tmp_path):
    path = _image(tmp_path, 65536, snapshot=True)
    snap = as_raw(path, str(tmp_path / "s.raw"))
    dev = InProcessDevice(path, fmt="qcow2", persistent=True)
    try:
        g = Guest(dev, bytearray(snap))
        g.read(0, 4)  # learnt as read-only: shared with the snapshot
        loop = dev.vbd.loop
        before = loop.counters()
        g.read(0, 4)
        cow_before = loop.counters()["wr_req"]
        g.write(0, 4, 0x77)  # Python copies the shared cluster, then the loop writes
        after = loop.counters()
        assert after["rd_req"] == before["rd_req"] + 1
        assert after["wr_req"] == cow_before + 1
        g.write(0, 4, 0x78)  # now our own cluster: in place
        assert loop.counters()["wr_req"] == after["wr_req"] + 1
        g.read(0, 8)
    finally:
        dev.close()
    check_clean(path)
    qemu_img("snapshot", "-a", "s1", path)
    assert as_raw(path, str(tmp_path / "s2.raw")) == snap


def _served_counts(tmp_path, queues: int) -> list[dict]:
    from blkpy.sim import toolstack
    from blkpy.sim.frontend import Frontend
    from blkpy.sim.host import SimHost
    from blkpy.sim.workloads import run_workload

    tmp_path.mkdir()
    path = _image(tmp_path, 65536, snapshot=False)
    with SimHost() as host:
        guest = host.create_guest(1, memory_pages=8192)
        backend = host.add_disk(toolstack.DiskSpec(1, 51712, "xvda", f"qcow2:{path}"))
        fe = Frontend(guest, host.guest_xenstore(1), 51712, num_queues=queues,
                      max_ring_page_order=1, max_indirect_segments=32)
        fe.connect(timeout=15)
        s = run_workload(fe, "randrw", requests=600, seed=3, zeroed=True)
        assert s.ok, s.to_text() + backend.log()
        loops = backend.stats()["loops"]
        fe.close(timeout=10)
    check_clean(path)
    return loops


def test_two_queues_share_one_extent_map(tmp_path):
    """Each queue's loop serves known clusters while the other queue's Python path
    allocates and discards (forgetting waits for both loops)."""
    loops = _served_counts(tmp_path / "two", 2)
    assert len(loops) == 2 and all(lp["rd_req"] + lp["wr_req"] > 0 for lp in loops)


def test_allocating_writes_are_served_by_the_loop_after_python_maps_the_cluster(tmp_path):
    # An allocating write costs Python one cluster allocation (Qcow2Disk.map_for_write);
    # the loop writes the guest's bytes. Partial-cluster writes keep what the guest read
    # around them: zeros on a fresh image, the backing file's bytes on an overlay.
    base = f"{tmp_path}/base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", base, str(DISK))
    qemu_io(base, "write -P 0x3c 0 4M")
    for backing in (None, base):
        path = f"{tmp_path}/top.qcow2"
        opts = ["-b", backing, "-F", "qcow2"] if backing else []
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", *opts, path,
                 str(DISK))
        model = bytearray(b"\x3c" * DISK if backing else DISK)
        dev = InProcessDevice(path, fmt="qcow2", persistent=True)
        try:
            g = Guest(dev, model)
            g.read(0, 3)  # the grants become persistent: the loop may serve from now on
            before = dev.vbd.loop.counters()["wr_req"]
            for k, page in enumerate(range(1, PAGES, 37)):  # one page in many clusters
                g.write(page, 1 + k % 3, k)
            served = dev.vbd.loop.counters()["wr_req"] - before
            assert served == len(range(1, PAGES, 37))
            for page in range(0, PAGES, 11):
                g.read(page, 11 if page + 11 <= PAGES else PAGES - page)
        finally:
            dev.close()
        check_clean(path)
        assert as_raw(path, f"{tmp_path}/top.raw") == bytes(model)


def test_a_sequential_allocating_writer_is_mapped_ahead(tmp_path):
    # Like a filesystem's speculative preallocation: while a writer allocates cluster
    # after cluster, the clusters after it are mapped (growing window, at most 16)
    # between its requests; a random writer gets nothing ahead.
    from blkpy.backends.qcow2 import AHEAD_CLUSTERS, Qcow2Disk

    path = _image(tmp_path, 65536, snapshot=False)
    disk = Qcow2Disk(path)
    try:
        cs = 65536
        assert disk.allocation_ahead(0, 4096) is None  # the first miss: not yet a run
        assert disk.allocation_ahead(cs, 4096) == (2 * cs, cs)
        assert disk.allocation_ahead(3 * cs, 4096) == (4 * cs, 2 * cs)
        assert disk.allocation_ahead(6 * cs, 4096) == (7 * cs, 4 * cs)
        assert disk.allocation_ahead(40 * cs, 4096) is None  # a jump ends the run
    finally:
        disk.close()
    assert AHEAD_CLUSTERS == 16
    dev = InProcessDevice(path, fmt="qcow2", persistent=True)
    try:
        g = Guest(dev, bytearray(DISK))
        g.read(0, 1)
        for cluster in range(DISK // cs):
            g.write(cluster * 16, 1, cluster)
        g.read(0, 11)
    finally:
        dev.close()
    check_clean(path)
    assert as_raw(path, f"{tmp_path}/x.raw") == bytes(g.model)


def test_a_successor_that_learns_its_predecessor_s_regions_serves_their_first_reads_natively(
        tmp_path):
    """What a takeover's new serve learns before the rings (the old serve's learnt L2
    tables, from its "ready" answer or the file beside the journals): the first reads there
    are the loop's, not Python's as in a process that learnt nothing; anything in the list
    that is not an L1 index is skipped."""
    path = _image(tmp_path, 4096, snapshot=False)  # 4 KiB clusters: 2 MiB per table
    model = bytearray(DISK)
    dev = InProcessDevice(path, fmt="qcow2", persistent=True)
    try:
        g = Guest(dev, model)
        g.write(16, 4, 1)
        g.read(16, 4)
        regions = dev.disk.learnt_regions()
    finally:
        dev.close()
    assert regions == [0]
    for learn in (False, True):
        dev = InProcessDevice(path, fmt="qcow2", persistent=True)
        try:
            if learn:
                assert dev.disk.learn_regions([*regions, -1, True, "0", 1.0, 10**9]) == 1
                assert dev.disk.learnt_regions() == [0]
            g = Guest(dev, model)
            g.write(PAGES - 8, 4, 7)  # the other table, and the guest's pages mapped
            before = dev.vbd.loop.counters()["rd_req"]
            g.read(16, 4)
            assert dev.vbd.loop.counters()["rd_req"] == before + learn
        finally:
            dev.close()
    check_clean(path)
