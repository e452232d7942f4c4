"""The simulated blkfront's xenbus handshake, close and reconnect, against the simulated
xenstored and a toy backend."""

import numpy as np
import pytest
from frontend_fakes import ToyXenbusBackend, toolstack_add

from blkpy.sim import blkfront_negotiation as neg
from blkpy.sim.frontend import Frontend, NegotiationError
from blkpy.sim.guest import SimGuest, create_sim_dir, remove_sim_dir
from blkpy.xenstore.client import XenstoreClient
from blkpy.xenstore.server import start_xenstored, stop_xenstored

DOMID = 7
DEVID = 51712
SECTORS = 2048
CONNECTED = {
    "sectors": str(SECTORS), "info": "0", "sector-size": "512",
    "feature-flush-cache": "1", "feature-persistent": "1",
    "feature-max-indirect-segments": "256", "feature-discard": "1",
}
INIT = {"max-ring-page-order": "4", "multi-queue-max-queues": "1"}


@pytest.fixture
def host(tmp_path):
    sim_dir = create_sim_dir()
    sock = str(tmp_path / "xenstored.sock")
    proc = start_xenstored(sock)
    toolstack = XenstoreClient.connect(sock)
    guest = SimGuest(sim_dir, DOMID, memory_pages=4096, grant_entries=4096)
    guest_xs = XenstoreClient.connect(sock, domid=DOMID)
    backends = []

    def start(init=INIT, connected=CONNECTED, **fe_options):
        toolstack_add(toolstack, DOMID, DEVID)
        be = ToyXenbusBackend(sim_dir, sock, DOMID, DEVID, init, connected, SECTORS * 512)
        backends.append(be)
        return be, Frontend(guest, guest_xs, DEVID, **fe_options)

    yield start
    for be in backends:
        be.stop()
        assert be.errors == []
    guest_xs.close()
    guest.close()
    toolstack.close()
    stop_xenstored(proc)
    remove_sim_dir(sim_dir)


def test_handshake_publishes_ring_and_reads_features(host):
    be, fe = host(abi="x86_32", max_indirect_segments=32)
    info = fe.connect(timeout=10)
    assert fe.state == neg.CONNECTED and fe.backend_state == neg.CONNECTED
    (nodes,) = be.frontend_nodes
    assert nodes["protocol"] == "x86_32-abi"
    assert nodes["feature-persistent"] == "1"
    assert "ring-page-order" not in nodes and nodes["ring-ref"] == str(fe.ring.ring_refs[0])
    assert nodes["event-channel"] == str(fe.ring.event_channel)
    assert (info.sectors, info.persistent, info.max_indirect_segments) == (SECTORS, True, 32)
    assert info.flush_op == neg.BLKIF_OP_FLUSH_DISKCACHE and info.discard
    data = np.arange(20 * 4096, dtype=np.uint32).view(np.uint8)[: 20 * 4096]
    assert fe.write(16, data).status == 0
    assert np.array_equal(fe.read(16, len(data)).data, data)


@pytest.mark.parametrize(
    ("ours", "theirs", "order"), [(2, "4", 2), (4, "1", 1), (3, None, 0), (0, "4", 0)]
)
def test_ring_order_negotiation(host, ours, theirs, order):
    init = {} if theirs is None else {"max-ring-page-order": theirs}
    be, fe = host(init=init, max_ring_page_order=ours)
    fe.connect(timeout=10)
    (nodes,) = be.frontend_nodes
    if order:
        assert nodes["ring-page-order"] == str(order)
        assert [nodes[f"ring-ref{i}"] for i in range(1 << order)] == [
            str(r) for r in fe.ring.ring_refs
        ]
        assert "ring-ref" not in nodes
    else:
        assert "ring-page-order" not in nodes
    assert fe.ring.order == order
    assert fe.write(0, bytes(512)).status == 0


def test_missing_sector_size_is_fatal(host):
    connected = {k: v for k, v in CONNECTED.items() if k != "sector-size"}
    _be, fe = host(connected=connected)
    with pytest.raises(NegotiationError, match="sector-size"):
        fe.connect(timeout=10)
    assert fe.state == neg.CLOSING


def test_close_revokes_grants_and_reconnect_works(host, request):
    be, fe = host(max_ring_page_order=1, persistent=True)
    fe.connect(timeout=10)
    assert fe.write(8, b"\x42" * 4096).status == 0
    ring_refs = list(fe.ring.ring_refs)
    assert fe.close(timeout=10) == []
    assert fe.state == neg.CLOSED and fe.backend_state == neg.CLOSED
    for ref in ring_refs:
        flags, _domid, _frame = fe.guest.grant_entry(ref)
        assert flags == 0
    fe.connect(timeout=10)
    assert len(be.frontend_nodes) == 2
    assert fe.state == neg.CONNECTED
    assert fe.read(8, 4096).data.tobytes() == b"\x42" * 4096
    # Back to one page: the stale multi-page nodes of the first connection are gone.
    fe.max_ring_page_order = 0
    assert fe.close(timeout=10) == []
    fe.connect(timeout=10)
    assert "ring-page-order" not in be.frontend_nodes[-1]


def test_close_reports_a_backend_that_keeps_grants(host):
    be, fe = host(persistent=True)
    fe.connect(timeout=10)
    be.toy.keep_mapped = True
    assert fe.write(0, bytes(4096)).status == 0
    held = list(be.toy.held)
    be.toy.held.clear()  # the toy "forgets" them: they stay mapped past its Closed
    errors = fe.close(timeout=10)
    assert errors and "has not unmapped" in errors[0]
    assert fe.protocol_errors == errors
    for m in held:
        m.unmap()


def test_service_rereads_the_disk_on_a_resize(host):
    be, fe = host()
    fe.connect(timeout=10)
    assert fe.info.sectors == SECTORS
    with XenstoreClient.connect(be.xs.path) as dom0:
        def resize(tx):  # blkback's resize: new sectors, state rewritten in one transaction
            dom0.write(f"{be.path}/sectors", str(2 * SECTORS), tx)
            dom0.write(f"{be.path}/state", "4", tx)

        dom0.run_transaction(resize)
    for _ in range(20):
        fe.service(timeout=0.2)
        if fe.info.sectors == 2 * SECTORS:
            break
    assert fe.info.sectors == 2 * SECTORS and fe.state == neg.CONNECTED
    assert fe.ring.info.sectors == 2 * SECTORS
