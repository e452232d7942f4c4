"""The simulated blkfront against the real `blkpy serve` on a simulated host."""

import numpy as np
import pytest

from blkpy import ring as blkif
from blkpy.sim import blkfront_negotiation as neg
from blkpy.sim import toolstack
from blkpy.sim.disk_model import DiskModel
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from blkpy.sim.workloads import run_workload
from blkpy.xenstore.client import XenstoreClient

DOMID = 4
DEVID = 51712
SIZE = 16 << 20


@pytest.fixture
def make(tmp_path):
    hosts = []

    def start(readonly=False, serve_args=(), **fe_options):
        image = tmp_path / "disk.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        host = SimHost(serve_args=list(serve_args))
        hosts.append(host)
        host.start()
        guest = host.create_guest(DOMID, memory_pages=8192)
        spec = toolstack.DiskSpec(DOMID, DEVID, "xvda", str(image), readonly=readonly)
        backend = host.add_disk(spec)
        fe = Frontend(guest, host.guest_xenstore(DOMID), DEVID, **fe_options)
        try:
            fe.connect(timeout=15)
        except Exception:
            print(backend.log())
            raise
        return fe, backend

    yield start
    for host in hosts:
        host.close()


@pytest.mark.parametrize(
    ("abi", "order", "persistent"),
    [("x86_64-abi", 0, True), ("x86_32-abi", 2, False), ("arm-abi", 1, True)],
)
def test_workloads_against_serve(make, abi, order, persistent):
    fe, backend = make(abi=abi, max_ring_page_order=order, persistent=persistent)
    assert fe.ring.order == order
    model = DiskModel(SIZE, zeroed=True)  # one model across both runs
    for name in ("verify", "randrw"):
        s = run_workload(fe, name, requests=600, seed=order, model=model)
        assert s.ok, s.to_text() + backend.log()
        assert s.indirect_requests > 0
    assert fe.close(timeout=10) == []


def test_readonly_against_serve(make):
    fe, backend = make(readonly=True)
    assert fe.info.readonly
    s = run_workload(fe, "randrw", requests=300, seed=1)
    assert s.ok and s.expected_errors > 0, s.to_text() + backend.log()


def test_reconnect_against_serve(make):
    fe, backend = make(max_ring_page_order=2)
    data = np.frombuffer(np.random.default_rng(1).bytes(64 * 1024), np.uint8)
    assert fe.write(128, data).status == 0
    assert fe.close(timeout=10) == []
    fe.connect(timeout=15)
    assert np.array_equal(fe.read(128, len(data)).data, data)
    assert fe.close(timeout=10) == [], backend.log()


def test_hostile_slots_get_errors_and_the_device_keeps_serving(make):
    fe, backend = make()
    ring = fe.ring
    slots = np.zeros(4, dtype=ring.abi.request)
    slots["id"] = [11, 12, 13, 14]
    slots["operation"] = [blkif.BLKIF_OP_READ, blkif.BLKIF_OP_RESERVED_1, 99, blkif.BLKIF_OP_WRITE]
    slots["nr_segments"] = [0, 0, 0, 12]  # no segments / unknown ops / too many segments
    rsps = ring.submit_raw(slots, timeout=10)
    status = dict(zip(rsps["id"].tolist(), rsps["status"].tolist(), strict=True))
    assert status[11] == blkif.BLKIF_RSP_ERROR and status[14] == blkif.BLKIF_RSP_ERROR
    assert status[12] == status[13] == blkif.BLKIF_RSP_EOPNOTSUPP
    s = run_workload(fe, "randrw", requests=100, seed=5, zeroed=True)
    assert s.ok, s.to_text() + backend.log()


def test_two_queues_and_4k_sectors_against_serve(make):
    fe, backend = make(num_queues=2, max_ring_page_order=1, serve_args=("--sector-size", "4096"))
    assert len(fe.rings) == 2 and fe.rings[0].event_channel != fe.rings[1].event_channel
    assert fe.info.sector_size == 4096
    s = run_workload(fe, "randrw", requests=400, seed=2, zeroed=True)
    assert s.ok, s.to_text() + backend.log()
    assert all(sum(r.stats.requests.values()) > 50 for r in fe.rings)
    assert fe.close(timeout=10) == []


def test_toolstack_removal_closes_the_frontend(make):
    fe, backend = make()
    assert fe.write(0, bytes(4096)).status == 0
    spec = backend.spec
    xs = fe.xs
    # what libxl writes to remove a disk, through a dom0 connection
    with XenstoreClient.connect(xs.path) as toolstack_xs:
        for name, value in toolstack.removal_nodes(neg.CONNECTED).items():
            toolstack_xs.write(f"{spec.backend_path}/{name}", value)
    action = None
    for _ in range(20):
        action = fe.service(timeout=0.5)
        if action is not neg.Action.IGNORE:
            break
    assert action is neg.Action.CLOSE
    assert fe.state == neg.CLOSED and fe.rings == [] and fe.protocol_errors == []
    assert fe.backend_state in (neg.CLOSED, neg.UNKNOWN), backend.log()


def test_impossible_req_prod_makes_the_backend_close(make):
    fe, backend = make()
    ring = fe.ring
    ring.force_req_prod(ring.front.rsp_cons + ring.size + 5)
    action = neg.Action.IGNORE
    for _ in range(20):
        action = fe.service(timeout=0.5)
        if action is not neg.Action.IGNORE:
            break
    assert action is neg.Action.CLOSE, backend.log()
    assert fe.state == neg.CLOSED


@pytest.mark.parametrize("grant_mode", ["map", "copy"])
def test_read_only_write_grants_against_serve(make, grant_mode):
    """Without persistent grants a backend needs only read access to WRITE data."""
    fe, backend = make(persistent=False, readonly_write_grants=True,
                       serve_args=("--grant-mode", grant_mode))
    s = run_workload(fe, "randrw", requests=300, seed=3, zeroed=True)
    assert s.ok, s.to_text() + backend.log()
