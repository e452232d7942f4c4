"""LRU cache of metadata tables (L2 tables, refcount blocks), keyed by host offset.

Dirty tables are never dropped: when only dirty tables could be evicted the owner writes
them back first (in crash-safe order), then calls ``shrink`` again."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class TableCache:
    def __init__(self, capacity_bytes: int, table_bytes: int) -> None:
        self.capacity = max(4, capacity_bytes // table_bytes)  # in tables
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self._dirty: set[int] = set()
        # dirty tables changed since the last take_changed (a restart record holds the
        # rest already)
        self._changed: set[int] = set()

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def get(self, offset: int) -> np.ndarray | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    def put(self, offset: int, table: np.ndarray, dirty: bool = False) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        if dirty:
            self._dirty.add(offset)
            self._changed.add(offset)

    def mark_dirty(self, offset: int) -> None:
        assert offset in self._tables
        self._dirty.add(offset)
        self._changed.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (its content no longer matters)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)
        self._changed.discard(offset)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def dirty_tables(self) -> list[tuple[int, np.ndarray]]:
        return [(off, self._tables[off]) for off in sorted(self._dirty)]

    def take_changed(self) -> list[tuple[int, np.ndarray]]:
        """The dirty tables changed since the last call (then none are, until the next
        change)."""
        changed = [(off, self._tables[off]) for off in sorted(self._changed & self._dirty)]
        self._changed.clear()
        return changed

    def mark_all_clean(self) -> None:
        self._dirty.clear()
        self._changed.clear()

    def over_capacity(self) -> bool:
        return len(self._tables) > self.capacity

    def shrink(self) -> bool:
        """Drop least recently used clean tables until within capacity; never the most
        recently used one (the caller is about to use it).

        Returns False if still over capacity (everything left is dirty)."""
        if not self.over_capacity():
            return True
        for off in list(self._tables)[:-1]:
            if len(self._tables) <= self.capacity:
                break
            if off not in self._dirty:
                del self._tables[off]
        return len(self._tables) <= self.capacity

    def clear(self) -> None:
        assert not self._dirty
        self._tables.clear()
