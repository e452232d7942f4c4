"""The lookup tables the native loop reads (blkpy.native_table): a persistent-grant table
behaves like a dict and refuses more than its capacity; a table made ahead (``reserve``)
is taken by the next table of its size and behaves like a fresh one."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy import native_table
from blkpy.native_table import EXTENT_READ, ExtentMap, PersistentGrantTable


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 2**48)), max_size=300),
       st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_persistent_grant_table_is_a_dict(entries, probes):
    table = PersistentGrantTable(capacity=400)
    model: dict[int, int] = {}
    for gref, addr in entries:
        if gref in model:
            continue  # the cache maps a grant once
        table.put(gref, addr)
        model[gref] = addr
    keys = list(model) + probes
    got = table.lookup(np.array(keys, dtype=np.uint32)) if keys else np.zeros(0)
    assert [int(x) for x in got] == [model.get(k, 0) for k in keys]
    assert table.grefs() == sorted(model)  # what an upgrade's successor maps ahead
    table.clear()
    assert table.grefs() == []
    assert not table.lookup(np.array(list(model) or [1], dtype=np.uint32)).any()


def test_grant_table_refuses_more_than_its_capacity():
    table = PersistentGrantTable(capacity=2)
    table.put(1, 4096)
    table.put(2, 8192)
    with pytest.raises(OverflowError):
        table.put(3, 12288)
    assert table.full



@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 2**40)), max_size=100,
                unique_by=lambda e: e[0]))
def test_a_table_made_ahead_is_taken_by_the_next_of_its_size_and_starts_empty(entries):
    capacity = 1000
    used = ExtentMap(capacity, 16)  # a table that held entries, then dropped
    used.put_many(np.arange(1, 200, dtype=np.uint64), np.full(199, 4096 | EXTENT_READ,
                                                             dtype=np.uint64))
    del used
    native_table.reserve(capacity)
    assert native_table.reserved(capacity) == 1
    assert native_table.reserved(capacity * 4) == 0  # another size: not this one's
    table = ExtentMap(capacity, 16)
    assert native_table.reserved(capacity) == 0
    assert table.held_keys().size == 0
    keys = np.array([k for k, _ in entries], dtype=np.uint64)
    vals = np.array([v for _, v in entries], dtype=np.uint64)
    table.put_many(keys, vals)
    probes = np.concatenate([keys, np.array([2**41, 2**41 + 1], dtype=np.uint64)])
    assert table.lookup(probes).tolist() == [*vals.tolist(), 0, 0]
    assert sorted(table.held_keys().tolist()) == sorted(keys.tolist())


def test_tables_made_ahead_are_bounded():
    capacity = 3000
    for _ in range(native_table.RESERVE_MAX + 3):
        native_table.reserve(capacity)
    assert native_table.reserved(capacity) == native_table.RESERVE_MAX
    tables = [PersistentGrantTable(capacity) for _ in range(native_table.RESERVE_MAX + 1)]
    assert native_table.reserved(capacity) == 0
    assert all(t.lookup(np.array([5], dtype=np.uint32)).tolist() == [0] for t in tables)
