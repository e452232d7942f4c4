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


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 7), min_size=1, max_size=200),
       st.integers(0, 400), st.randoms(use_true_random=False))
def test_recovery_replays_exactly_the_unanswered(tmp_path_factory, start, steps, cut, rnd):
    path = tmp_path_factory.mktemp("j") / "q.journal"
    j = RingJournal(path, SIZE, ENTRY)
    j.start(start)
    req_cons = rsp = start
    in_flight: list[int] = []
    ops = 0
    for step in steps:
        if ops == cut:
            break  # the process dies here: nothing after it reached the file
        if step < 4 and len(in_flight) < SIZE:  # consume a few
            n = min(step + 1, SIZE - len(in_flight))
            j.consumed(req_cons, np.concatenate([_slot(req_cons + k) for k in range(n)]))
            in_flight += [(req_cons + k) & 0xFFFFFFFF for k in range(n)]
            req_cons = (req_cons + n) & 0xFFFFFFFF
        elif in_flight:  # answer some, in any order (completions)
            rnd.shuffle(in_flight)
            n = min(step - 3, len(in_flight))
            done = np.array(in_flight[:n], dtype=np.int64)
            j.answering(done, rsp)
            if ops + 1 == cut:  # died after recording positions, before the slots/index
                ops += 1
                break
            rsp = (rsp + n) & 0xFFFFFFFF
            j.answered(done, rsp)
            del in_flight[:n]
        ops += 1
    j.close()
    successor = RingJournal(path, SIZE, ENTRY)
    got = successor.recover()
    assert got.req_cons == req_cons and got.rsp_prod_pvt == rsp
    assert sorted(int(i) for i in got.replay_indices) == sorted(in_flight)
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
