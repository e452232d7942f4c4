"""`blkpy fuzz handshake`: its judge, its power to see a broken backend, and the short
campaign CI runs (which must find nothing)."""

import pytest

from blkpy.fuzz import handshake
from blkpy.fuzz.handshake import Offered, judge
from blkpy.sim.host import SimHost

OFFERED = Offered(frozenset({10, 11, 12, 13}), frozenset({3, 4}))


def _one_queue(**extra):
    return {"ring-ref": "10", "event-channel": "3", "protocol": "x86_64-abi", **extra}


def _two_queues(**extra):
    return {"multi-queue-num-queues": "2", "ring-page-order": "1",
            "queue-0/ring-ref0": "10", "queue-0/ring-ref1": "11", "queue-0/event-channel": "3",
            "queue-1/ring-ref0": "12", "queue-1/ring-ref1": "13", "queue-1/event-channel": "4",
            **extra}


def test_judge_accepts_what_blkfront_writes():
    v = judge(_one_queue(), OFFERED)
    assert v.connect is True and v.abi == "x86_64-abi" and v.queues == (((10,), 3),)
    v = judge(_two_queues(), OFFERED)
    assert v.connect is True and v.abi == "x86_32-abi"  # no protocol node: the default
    assert v.queues == (((10, 11), 3), ((12, 13), 4))
    # an explicit order 0 with ring-ref0 and a single queue counted as "1" are fine too
    assert judge({"ring-page-order": "0", "ring-ref0": "10", "event-channel": "3",
                  "multi-queue-num-queues": "1"}, OFFERED).queues == (((10,), 3),)


@pytest.mark.parametrize("nodes", [
    _one_queue(**{"ring-ref": "-10"}),
    _one_queue(**{"ring-ref": "4294967306"}),
    _one_queue(**{"ring-ref": "\u0661\u0660"}),
    _one_queue(**{"ring-ref": "0xa"}),
    _one_queue(**{"ring-ref": "99"}),  # not a grant of ours
    _one_queue(**{"event-channel": "5"}),  # not an offered port
    _one_queue(**{"protocol": "sparc-abi"}),
    {"event-channel": "3"},
    _one_queue(**{"ring-page-order": "5"}),
    _one_queue(**{"ring-page-order": "1"}),  # ring-ref0/ring-ref1 missing
    _one_queue(**{"multi-queue-num-queues": "2"}),  # queue-N nodes missing
    _two_queues(**{"multi-queue-num-queues": "0"}),
    _two_queues(**{"multi-queue-num-queues": "5"}),
    _two_queues(**{"queue-1/ring-ref1": "10"}),  # one page in two queues
    _two_queues(**{"queue-0/ring-ref1": "10"}),  # one page twice in a ring
    _two_queues(**{"queue-1/event-channel": "3"}),
])
def test_judge_refuses_malformed_frontends(nodes):
    assert judge(nodes, OFFERED).connect is False


@pytest.mark.parametrize("value", [" 10", "10\n", "+10"])
def test_judge_leaves_scanf_spellings_open_but_pins_the_value(value):
    v = judge(_one_queue(**{"ring-ref": value}), OFFERED)
    assert v.connect is None and v.refs == {10}


def _cases_of_kind(kind, count, seed=1):
    """Indexes of the first ``count`` in-process cases of ``kind`` for ``seed``."""
    indexes = (i for i in range(10_000)
               if handshake.runs_in_process(i) and handshake.case_kind(seed, i) == kind)
    return [next(indexes) for _ in range(count)]


def _run_cases(indexes, seed=1):
    with SimHost(handshake.SERVE_ARGS) as host, handshake._captured_logs() as records:
        world = handshake.World(host)
        try:
            return [handshake.run_case(world, seed, i, False, records) for i in indexes]
        finally:
            world.domain.release()
            world.gxs.close()


def test_campaign_sees_a_backend_that_never_unmaps(monkeypatch):
    """The campaign's leak checks work: a backend whose disconnect forgets its rings is
    reported on every valid handshake."""
    from blkpy.serve import DeviceServer

    monkeypatch.setattr(DeviceServer, "_disconnect", lambda self: None)
    cases = _run_cases(_cases_of_kind("valid", 2))
    for case in cases:
        assert any(p.startswith("leak") or "still mapped" in p for p in case.problems), \
            case.problems


def test_campaign_sees_a_backend_that_accepts_a_bad_ring(monkeypatch):
    """...and its judge: a backend that maps whatever single ref it is given, garbage
    included, is caught connecting with bad values."""
    from blkpy.serve import DeviceServer

    original = DeviceServer._ring_refs

    def lenient(prefix, order, raw):
        try:
            return original(prefix, order, raw)
        except Exception:
            return [8]  # the first grant a fresh guest hands out: some ring page

    monkeypatch.setattr(DeviceServer, "_ring_refs", staticmethod(lenient))
    cases = _run_cases(_cases_of_kind("malformed", 12))
    assert any("Connected" in p for case in cases for p in case.problems)


def test_same_seed_same_cases():
    a = _run_cases(range(3), seed=7)
    b = _run_cases(range(3), seed=7)
    assert [c.describe() for c in a] == [c.describe() for c in b]
    assert all(not c.problems for c in a + b)


def test_short_campaign_finds_nothing():
    """The CI version: 100 handshakes (two through a `blkpy serve` process)."""
    result = handshake.run(seed=1, scale=1, progress=lambda msg: None)
    assert result.count == 100 and result.figures["in serve processes"] == 2
    assert [f.line() for f in result.findings] == []


def test_tripwire_acts_between_two_reads():
    """The race and mid-connect vanish cases depend on it: the action runs right after the
    n-th read, before the next one, and only once."""
    with SimHost() as host:
        host.xs.write("/t/a", "1")
        wire = handshake.Tripwire(host.xs)
        wire.arm(2, lambda: host.xs.write("/t/a", "2"))
        assert [wire.read_str("/t/a") for _ in range(4)] == ["1", "1", "2", "2"]
        assert not wire.fire()  # already ran
