"""The restart log's format (blkpy.qcow2.restart_log): replaying the log writes exactly
what the last record stood for, however many changes were appended as deltas or
compacted; anything torn or foreign is refused rather than applied to an image."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.qcow2 import restart_log
from blkpy.qcow2.plan import MemoryStorage, Resize, Sync, Write
from blkpy.qcow2.restart_log import RestartLog, changed_writes, decode, encode_record, file_head

ID = (1, 2)
REGION = 64  # bytes of one "table" in these tests
REGIONS = 6


def _record(log: RestartLog, phases) -> None:
    """A record of ``phases`` whole (every region given, changed or not)."""
    log.record(phases, lambda: phases)


def _replay(phases, base: bytes = bytes(REGIONS * REGION)) -> bytes:
    storage = MemoryStorage(base)
    for phase in phases or []:
        storage.execute([*phase, Sync()])
    return bytes(storage.data)


ops = st.one_of(
    st.builds(Write, st.integers(0, 2**63 - 1), st.binary(max_size=300)),
    st.builds(Resize, st.integers(0, 2**63 - 1)),
)
phases = st.lists(st.lists(ops, max_size=5), max_size=4)


@given(phases)
def test_a_record_reads_back_as_written(p):
    expect = [list(ops) for ops in p]
    while expect and not expect[-1]:  # a phase without operations leaves no trace
        expect.pop()
    assert decode(file_head(ID) + encode_record(p)) == (ID, expect)


@given(phases, st.data())
def test_a_torn_or_damaged_record_is_left_out(p, data):
    head = file_head(ID)
    blob = head + encode_record([[Write(0, b"kept")]])
    last = encode_record(p)
    cut = data.draw(st.integers(0, len(last) - 1))
    assert decode(blob + last[:cut]) == (ID, [[Write(0, b"kept")]])  # killed while appending
    pos = data.draw(st.integers(0, len(last) - 1))
    flipped = bytearray(last)
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    assert decode(blob + bytes(flipped)) == (ID, [[Write(0, b"kept")]])


@given(st.binary(max_size=200))
def test_garbage_is_never_a_log(buf):
    assert decode(buf) is None


@given(st.binary(min_size=8 * 20, max_size=8 * 20), st.binary(min_size=8 * 20, max_size=8 * 20),
       st.lists(st.integers(0, 19), max_size=20))
def test_changed_writes_turn_the_old_bytes_into_the_new(old, noise, keep):
    # new: old with some entries replaced by noise
    new = bytearray(old)
    for i in keep:
        new[8 * i:8 * i + 8] = noise[8 * i:8 * i + 8]
    storage = MemoryStorage(b"\xee" * 100 + old)
    writes = changed_writes(100, old, bytes(new))
    storage.execute(writes)
    assert bytes(storage.data[100:]) == bytes(new)
    assert sum(len(w.data) for w in writes) <= 8 * len(set(keep)) * (restart_log._GAP + 1)


# A serve's successive states: each a write-back's four phases over fixed regions (the
# tables) that, once dirty, stay dirty until the log is cleared, plus a growing file size.
states = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(0, REGIONS - 1), st.integers(0, REGION - 1),
                           st.integers(1, 255)), max_size=4),
        st.integers(0, 3),
    ),
    min_size=1, max_size=12)


@contextlib.contextmanager
def _log(path: str, compact_often: bool) -> Iterator[RestartLog]:
    """A log at ``path``; ``compact_often``: rewritten whole at every chance."""
    log = RestartLog(path, ID)
    saved = (restart_log._COMPACT_MIN, restart_log._COMPACT_FACTOR)
    if compact_often:
        restart_log._COMPACT_MIN, restart_log._COMPACT_FACTOR = 0, 1
    try:
        yield log
    finally:
        restart_log._COMPACT_MIN, restart_log._COMPACT_FACTOR = saved
        log.close()


def _evolve(changes):
    """The phases a serve would record after each change."""
    tables: dict[int, bytearray] = {}
    size = 0
    out = []
    for pokes, grow in changes:
        for region, byte, value in pokes:
            tables.setdefault(region, bytearray(REGION))[byte] = value
        size += grow * REGION
        regions = sorted(tables)
        out.append([
            ([Resize(size)] if size else []) + [Write(r * REGION, bytes(tables[r]))
                                                 for r in regions if r % 3 == 0],
            [Write(r * REGION, bytes(tables[r])) for r in regions if r % 3 == 1],
            [Write(r * REGION, bytes(tables[r])) for r in regions if r % 3 == 2],
            [],
        ])
    return out


@settings(max_examples=60)
@given(states, st.booleans(), st.data())
def test_replaying_the_log_writes_what_the_last_record_stood_for(tmp_path_factory, changes,
                                                                 compact_often, data):
    path = str(tmp_path_factory.mktemp("log") / "rec")
    with _log(path, compact_often) as log:
        recorded = _evolve(changes)
        for p in recorded:
            _record(log, p)
        assert _replay(RestartLog(path, ID).latest()) == _replay(recorded[-1])
        # killed while appending one more: the log still stands for the last whole record
        cut = data.draw(st.integers(0, 40))
        with open(path, "ab") as f:
            f.write(encode_record([[Write(0, b"\x99" * 64)]])[:cut])
        assert _replay(RestartLog(path, ID).latest()) == _replay(recorded[-1])


def test_a_change_appends_only_the_entries_it_changed(tmp_path):
    path = str(tmp_path / "rec")
    log = RestartLog(path, ID)
    table = bytearray(65536)
    _record(log, [[], [], [Write(1 << 20, bytes(table))], []])
    first = os.path.getsize(path)
    table[8 * 100:8 * 101] = b"\x80" + bytes(6) + b"\x01"
    _record(log, [[], [], [Write(1 << 20, bytes(table))], []])
    assert os.path.getsize(path) - first < 64  # one entry, not the table
    _record(log, [[], [], [Write(1 << 20, bytes(table))], []])  # nothing new: nothing appended
    assert os.path.getsize(path) - first < 64
    log.close()


def test_a_long_log_is_rewritten_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(restart_log, "_COMPACT_MIN", 4096)
    path = str(tmp_path / "rec")
    log = RestartLog(path, ID)
    table = bytearray(1024)
    for i in range(400):
        table[8 * (i % 128)] = i % 251 + 1
        _record(log, [[Write(0, bytes(table))], [], [], []])
    assert os.path.getsize(path) < 4096 + 2048
    assert _replay(RestartLog(path, ID).latest(), bytes(1024)) == bytes(table)
    log.close()


def test_another_images_log_and_a_cleared_one_are_not_applied(tmp_path):
    path = str(tmp_path / "rec")
    log = RestartLog(path, ID)
    _record(log, [[Write(0, b"one")]])
    assert RestartLog(path, (1, 3)).latest() is None
    assert RestartLog(path, ID).latest() == [[Write(0, b"one")]]
    log.clear()
    assert RestartLog(path, ID).latest() is None and not log.live
    _record(log, [[Write(0, b"two")]])  # a fresh log after a clear
    assert RestartLog(path, ID).latest() == [[Write(0, b"two")]]
    log.close()


def test_a_failed_append_makes_the_next_record_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "rec")
    log = RestartLog(path, ID)
    _record(log, [[Write(0, bytes(64))]])
    real_write = os.write

    def torn(fd, data):
        real_write(fd, data[:5])
        raise OSError("no space")

    monkeypatch.setattr(os, "write", torn)
    with pytest.raises(OSError):
        _record(log, [[Write(0, b"\x01" * 64)]])
    monkeypatch.setattr(os, "write", real_write)
    _record(log, [[Write(0, b"\x02" + bytes(63))]])
    assert _replay(RestartLog(path, ID).latest(), bytes(64)) == b"\x02" + bytes(63)
    log.close()


@settings(max_examples=60)
@given(states, st.booleans())
def test_regions_left_out_as_unchanged_are_still_replayed(tmp_path_factory, changes,
                                                           compact_often):
    """A serve passes only the tables changed since its last record: the log still
    stands for all of them."""
    path = str(tmp_path_factory.mktemp("log") / "rec")
    with _log(path, compact_often) as log:
        recorded = _evolve(changes)
        before: dict[int, bytes] = {}
        for p in recorded:
            changed = [[op for op in phase if not isinstance(op, Write)
                        or before.get(op.offset) != op.data] for phase in p]
            before.update((op.offset, op.data) for phase in p for op in phase
                          if isinstance(op, Write))
            log.record(changed, lambda p=p: p)
        assert _replay(RestartLog(path, ID).latest()) == _replay(recorded[-1])
