"""The restart journal (blkpy.journal), sans-IO: whatever point a serve dies at, a
successor replays exactly the requests that were consumed and never answered."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.journal import JournalError, RingJournal

SIZE, ENTRY = 32, 112


def _slot(i: int) -> np.ndarray:
    return np.full(ENTRY, i & 0xFF, np.uint8).view(np.dtype((np.void, ENTRY)))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 7), min_size=1, max_size=200),
       st.integers(0, 400), st.randoms(use_true_random=False))
def test_recovery_replays_exactly_the_unanswered(tmp_path_factory, start, steps, cut, rnd):
    path = tmp_path_factory.mktemp("j") / "q.journal"
    j = RingJournal(path, SIZE, ENTRY)
    j.start(start)
    req_cons = rsp = start
    in_flight: dict[int, int] = {}  # journal entry -> ring index
    ops = 0
    for step in steps:
        if ops == cut:
            break  # the process dies here: nothing after it reached the file
        if step < 4 and len(in_flight) < SIZE:  # consume a few
            n = min(step + 1, SIZE - len(in_flight))
            entries = j.consumed(req_cons, np.concatenate(
                [_slot(req_cons + k) for k in range(n)]))
            assert not set(entries.tolist()) & set(in_flight)  # never an entry in use
            in_flight.update({int(e): (req_cons + k) & 0xFFFFFFFF
                              for k, e in enumerate(entries)})
            req_cons = (req_cons + n) & 0xFFFFFFFF
        elif in_flight:  # answer some, in any order (completions): an old request may
            keys = list(in_flight)  # wait while the ring's indices move on past a lap
            rnd.shuffle(keys)
            n = min(max(step - 3, 1), len(keys))
            done = np.array(keys[:n], dtype=np.int64)
            j.answering(done, rsp)
            if ops + 1 == cut:  # died after recording positions, before the slots/index
                ops += 1
                break
            rsp = (rsp + n) & 0xFFFFFFFF
            j.answered(done, rsp)
            for k in keys[:n]:
                del in_flight[k]
        ops += 1
    j.close()
    successor = RingJournal(path, SIZE, ENTRY)
    got = successor.recover()
    assert got.req_cons == req_cons and got.rsp_prod_pvt == rsp
    assert sorted(got.replay_entries.tolist()) == sorted(in_flight)
    assert sorted(int(i) for i in got.replay_indices) == sorted(in_flight.values())
    for i, slot in zip(got.replay_indices, got.replay_slots, strict=True):
        assert (slot == (int(i) & 0xFF)).all()  # its own private copy


def test_a_journal_of_another_ring_is_refused(tmp_path):
    j = RingJournal(tmp_path / "q", SIZE, ENTRY)
    j.start(0)
    j.close()
    with pytest.raises(JournalError):
        RingJournal(tmp_path / "q", SIZE, 108).recover()
    with pytest.raises(JournalError):
        RingJournal(tmp_path / "fresh", SIZE, ENTRY).recover()


def test_a_journal_mapped_ahead_sees_its_writers_stores_and_is_never_made_or_resized(
        tmp_path):
    """A successor maps its running predecessor's journal before the hand-over: what the
    predecessor records afterwards is what it recovers; a journal not on file, or of
    another ring's size, is refused and left as it was."""
    with pytest.raises(JournalError):
        RingJournal(tmp_path / "none", SIZE, ENTRY, create=False)
    assert not (tmp_path / "none").exists()
    writer = RingJournal(tmp_path / "q", SIZE, ENTRY)
    writer.start(5)
    size = (tmp_path / "q").stat().st_size
    with pytest.raises(JournalError):
        RingJournal(tmp_path / "q", SIZE * 2, ENTRY, create=False)
    assert (tmp_path / "q").stat().st_size == size
    ahead = RingJournal(tmp_path / "q", SIZE, ENTRY, create=False)
    slots = np.concatenate([_slot(i) for i in range(3)])
    entries = writer.consumed(5, slots)
    writer.answering(entries[:1], 5)
    writer.answered(entries[:1], 6)  # the first answered, two owed
    writer.close()
    got = ahead.recover()
    assert (got.req_cons, got.rsp_prod_pvt) == (8, 6)
    assert got.replay_indices.tolist() == [6, 7]
    ahead.close()


def test_an_old_request_waits_while_the_ring_laps_it(tmp_path):
    # Found by the property test: answers go out in completion order, so request 0 may
    # still be owed while request SIZE (same ring slot) is consumed; entries are not keyed
    # by ring index.
    j = RingJournal(tmp_path / "q", SIZE, ENTRY)
    j.start(0)
    (old,) = j.consumed(0, _slot(0))
    for rsp, i in enumerate(range(1, 2 * SIZE)):
        (e,) = j.consumed(i, _slot(i))
        assert e != old
        j.answering(np.array([e]), rsp)
        j.answered(np.array([e]), rsp + 1)
    j.close()
    got = RingJournal(tmp_path / "q", SIZE, ENTRY).recover()
    assert got.replay_entries.tolist() == [old] and got.replay_indices.tolist() == [0]
