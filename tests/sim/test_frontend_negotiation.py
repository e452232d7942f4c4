"""blkfront's handshake decisions, tested as pure functions."""

import pytest

from blkpy import ring
from blkpy.sim import blkfront_negotiation as neg
from blkpy.sim.blkfront_negotiation import Action

CONNECTED = {"sectors": "2048", "info": "0", "sector-size": "512"}


@pytest.mark.parametrize(
    ("own", "backend", "action"),
    [
        (neg.INITIALISING, neg.INIT_WAIT, Action.TALK),
        # InitWait seen again after we published the ring: never re-grant.
        (neg.INITIALISED, neg.INIT_WAIT, Action.IGNORE),
        (neg.CONNECTED, neg.INIT_WAIT, Action.IGNORE),
        (neg.INITIALISED, neg.CONNECTED, Action.CONNECT),
        (neg.CONNECTED, neg.CONNECTED, Action.CONNECT),  # resize
        (neg.INITIALISING, neg.CONNECTED, Action.IGNORE),
        (neg.CONNECTED, neg.CLOSING, Action.CLOSE),
        (neg.CONNECTED, neg.CLOSED, Action.CLOSE),
        (neg.CLOSED, neg.CLOSED, Action.IGNORE),
        (neg.INITIALISING, neg.INITIALISING, Action.IGNORE),
        (neg.INITIALISING, neg.UNKNOWN, Action.IGNORE),
    ],
)
def test_backend_state_actions(own, backend, action):
    assert neg.on_backend_state(own, backend) is action


@pytest.mark.parametrize(
    ("configured", "nodes", "order"),
    [
        (0, {"max-ring-page-order": "4"}, 0),
        (4, {"max-ring-page-order": "2"}, 2),
        (2, {"max-ring-page-order": "4"}, 2),
        (3, {}, 0),  # backend without multi-page rings
        (3, {"max-ring-page-order": "junk"}, 0),
    ],
)
def test_ring_order_is_the_smaller_max(configured, nodes, order):
    assert neg.choose_ring_order(configured, nodes) == order


def test_ring_order_config_is_checked():
    with pytest.raises(ValueError):
        neg.choose_ring_order(5, {"max-ring-page-order": "5"})


def test_single_page_ring_nodes():
    nodes = neg.ring_nodes(0, [8], 5, "x86_64-abi", persistent=True)
    assert nodes == {
        "ring-ref": "8",
        "event-channel": "5",
        "protocol": "x86_64-abi",
        "feature-persistent": "1",
    }


def test_multi_page_ring_nodes():
    nodes = neg.ring_nodes(2, [10, 11, 12, 13], 7, "x86_32-abi", persistent=False)
    assert "ring-ref" not in nodes
    assert nodes["ring-page-order"] == "2"
    assert [nodes[f"ring-ref{i}"] for i in range(4)] == ["10", "11", "12", "13"]
    assert nodes["feature-persistent"] == "0"


def test_ring_nodes_need_one_ref_per_page():
    with pytest.raises(ValueError):
        neg.ring_nodes(1, [3], 1, "x86_64-abi", persistent=True)


@pytest.mark.parametrize("abi", ["x86_64", "x86_32-abi", "arm"])
def test_protocol_names(abi):
    assert neg.protocol_name(abi).endswith("-abi")


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError):
        neg.protocol_name("sparc")


@pytest.mark.parametrize("missing", ["sectors", "info", "sector-size"])
def test_missing_disk_property_is_fatal(missing):
    nodes = dict(CONNECTED)
    del nodes[missing]
    with pytest.raises(neg.NegotiationError, match=missing):
        neg.parse_backend_connected(nodes, persistent=True, max_indirect_segments=32)


def test_bad_sector_size_is_fatal():
    with pytest.raises(neg.NegotiationError):
        neg.parse_backend_connected(
            {**CONNECTED, "sector-size": "1000"}, persistent=True, max_indirect_segments=32
        )


def test_minimal_backend_offers_nothing_optional():
    info = neg.parse_backend_connected(CONNECTED, persistent=True, max_indirect_segments=32)
    assert (info.sectors, info.sector_size, info.physical_sector_size) == (2048, 512, 512)
    assert info.flush_op is None
    assert not (info.discard or info.persistent or info.readonly)
    assert info.max_indirect_segments == 0
    assert info.max_segments == 11


def test_flush_cache_wins_over_barrier():
    both = {**CONNECTED, "feature-flush-cache": "1", "feature-barrier": "1"}
    info = neg.parse_backend_connected(both, persistent=True, max_indirect_segments=0)
    assert info.flush_op == neg.BLKIF_OP_FLUSH_DISKCACHE
    barrier_only = {**CONNECTED, "feature-barrier": "1"}
    info = neg.parse_backend_connected(barrier_only, persistent=True, max_indirect_segments=0)
    assert info.flush_op == neg.BLKIF_OP_WRITE_BARRIER


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [(32, "256", 32), (256, "64", 64), (32, "11", 0), (11, "256", 0), (32, None, 0)],
)
def test_indirect_segments_are_the_smaller_max_above_eleven(ours, theirs, expected):
    nodes = dict(CONNECTED)
    if theirs is not None:
        nodes["feature-max-indirect-segments"] = theirs
    info = neg.parse_backend_connected(nodes, persistent=True, max_indirect_segments=ours)
    assert info.max_indirect_segments == expected


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"), [(True, "1", True), (False, "1", False), (True, "0", False)]
)
def test_persistent_needs_both_sides(ours, theirs, expected):
    nodes = {**CONNECTED, "feature-persistent": theirs}
    info = neg.parse_backend_connected(nodes, persistent=ours, max_indirect_segments=0)
    assert info.persistent is expected


def test_discard_properties():
    nodes = {
        **CONNECTED,
        "physical-sector-size": "4096",
        "feature-discard": "1",
        "discard-alignment": "512",
        "discard-secure": "1",
    }
    info = neg.parse_backend_connected(nodes, persistent=False, max_indirect_segments=0)
    assert info.discard and info.discard_secure
    # no granularity node: blkfront uses the physical sector size
    assert (info.discard_granularity, info.discard_alignment) == (4096, 512)
    nodes["feature-discard"] = "0"
    info = neg.parse_backend_connected(nodes, persistent=False, max_indirect_segments=0)
    assert not info.discard and not info.discard_secure


def test_readonly_bit():
    nodes = {**CONNECTED, "info": str(ring.VDISK_READONLY | ring.VDISK_REMOVABLE)}
    info = neg.parse_backend_connected(nodes, persistent=True, max_indirect_segments=0)
    assert info.readonly and info.size == 2048 * 512


@pytest.mark.parametrize(
    ("ours", "nodes", "queues"),
    [(1, {"multi-queue-max-queues": "4"}, 1), (4, {"multi-queue-max-queues": "2"}, 2),
     (4, {}, 1), (2, {"multi-queue-max-queues": "0"}, 1)],
)
def test_queue_count_is_the_smaller_max(ours, nodes, queues):
    assert neg.choose_queues(ours, nodes) == queues


def test_multi_queue_nodes_go_under_queue_dirs():
    nodes = neg.queue_nodes(1, [([3, 4], 10), ([5, 6], 11)], "x86_64-abi", persistent=True)
    assert nodes == {
        "ring-page-order": "1",
        "multi-queue-num-queues": "2",
        "queue-0/ring-ref0": "3", "queue-0/ring-ref1": "4", "queue-0/event-channel": "10",
        "queue-1/ring-ref0": "5", "queue-1/ring-ref1": "6", "queue-1/event-channel": "11",
        "protocol": "x86_64-abi",
        "feature-persistent": "1",
    }
    single = neg.queue_nodes(0, [([3], 10)], "x86_64-abi", persistent=True)
    assert single == neg.ring_nodes(0, [3], 10, "x86_64-abi", persistent=True)


@pytest.mark.parametrize(
    ("key", "ring"),
    [("ring-ref", True), ("ring-ref12", True), ("queue-3", True), ("ring-page-order", True),
     ("multi-queue-num-queues", True), ("event-channel", True), ("state", False),
     ("protocol", False), ("backend", False), ("feature-persistent", False)],
)
def test_ring_node_names(key, ring):
    assert neg.is_ring_node(key) is ring
