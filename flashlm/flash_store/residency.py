"""Residency: which rows of a flash store (FFN records, output-matrix rows) stay in memory between tokens.

Every policy keeps its rows in one structure, RowCache: a preallocated matrix of `capacity` rows, an id -> slot map,
and rows [0:num_used] live, so compute always sees one dense block and memory never grows after load.
  - pinned: rows inserted with pin=True never leave: the hot prefix a memory budget keeps resident (planner.py
    decides how many; on the GPU, planner.plan_gpu splits that prefix between GPU and pinned host memory);
  - NeuronWindowCache, the sliding window of "LLM in a flash" (Sec. 3.3): the neurons used by the last `window`
    tokens stay; a token reads only the selected neurons not cached; deleting moves the last live rows into the
    holes (O(rows moved), no reallocation);
  - LRURowCache, the sketch head's exact-row cache: when full, a new row replaces the least recently used one in
    place.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from flashlm.flash_store.io_engine import aligned_buffer


class RowCache:
    """capacity rows of row_bytes for ids in [0, n_ids); `step` is the caller's clock (a token counter)."""

    def __init__(self, capacity: int, row_bytes: int, n_ids: int):
        self.capacity, self.row_bytes = capacity, row_bytes
        self.records = aligned_buffer(max(1, capacity) * row_bytes)[:capacity * row_bytes] \
            .reshape(capacity, row_bytes)  # (capacity, row_bytes)
        self.slot_of = np.full(n_ids, -1, np.int64)  # id -> slot, -1 if absent
        self.id_at = np.full(capacity, -1, np.int64)  # slot -> id
        self.last_used = np.zeros(capacity, np.int64)  # the step that last used the slot's row
        self.pinned = np.zeros(capacity, bool)
        self.num_used = 0
        self.hits = self.lookups = 0  # ids asked for, and how many were cached
        self.rows_read = self.rows_moved = 0

    @property
    def nbytes(self) -> int:
        return self.records.nbytes

    @property
    def base_address(self) -> int:
        return self.records.ctypes.data

    def lookup(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Slots of ids (-1 where absent); the present ones are marked used at `step`."""
        slots = self.slot_of[ids]
        present = slots >= 0
        self.last_used[slots[present]] = step
        self.hits += int(present.sum())
        self.lookups += len(ids)
        return slots

    def insert(self, ids: np.ndarray, records: np.ndarray, step: int | np.ndarray, pin: bool = False) -> np.ndarray:
        """Append rows (len(ids), row_bytes) for ids not cached; returns their slots. step: one for all, or each
        row's own (an age to start from)."""
        n = len(ids)
        if self.num_used + n > self.capacity:
            raise MemoryError(f"row cache full ({self.num_used} + {n} > {self.capacity})")
        slots = np.arange(self.num_used, self.num_used + n)
        self.records[slots] = records
        self._assign(slots, ids, step)
        self.pinned[slots] = pin
        self.num_used += n
        return slots

    def _assign(self, slots: np.ndarray, ids: np.ndarray, step: int) -> None:
        old = self.id_at[slots]
        self.slot_of[old[old >= 0]] = -1
        self.id_at[slots], self.slot_of[ids], self.last_used[slots] = ids, slots, step


class NeuronWindowCache(RowCache):
    """The pinned hot prefix plus the neurons used by the last `window` tokens (0: the pinned rows only)."""

    def __init__(self, capacity: int, record_bytes: int, n_neurons: int, window: int = 0):
        super().__init__(capacity, record_bytes, n_neurons)
        self.window = window

    def missing(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Mark the cached ones among `ids` as used at `step`; return the ids that must be read."""
        return ids[self.lookup(ids, step) < 0]

    def room(self) -> int:
        return self.capacity - self.num_used

    def evict(self, step: int) -> int:
        """Before token `step`: delete the rows none of the last `window` tokens (step - window .. step - 1) used
        (pinned ones stay), moving the last live rows into the holes; returns how many were deleted."""
        live = slice(0, self.num_used)
        stale = np.flatnonzero((self.last_used[live] < step - self.window) & ~self.pinned[live])
        for slot in stale[::-1]:  # from the end, so moving the last row never moves a row still to be deleted
            last = self.num_used - 1
            self.slot_of[self.id_at[slot]] = -1
            if slot != last:
                self.records[slot] = self.records[last]
                self.id_at[slot], self.last_used[slot], self.pinned[slot] = \
                    self.id_at[last], self.last_used[last], self.pinned[last]
                self.slot_of[self.id_at[slot]] = slot
                self.rows_moved += 1
            self.id_at[last] = -1
            self.num_used -= 1
        return len(stale)


class LRURowCache(RowCache):
    """Rows read on demand; when full, the least recently used rows are replaced in place."""

    def slots_for(self, ids: np.ndarray, step: int,
                  read: Callable[[np.ndarray, list[np.ndarray]], None]) -> np.ndarray:
        """Slots holding ids' rows; the missing ones are read by read(ids, destination rows), in id order."""
        slots = self.lookup(ids, step)
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            free = min(len(missing), self.capacity - self.num_used)
            victims = np.arange(self.num_used, self.num_used + free)
            self.num_used += free
            self.last_used[victims] = step  # taken: not to be chosen again below
            if free < len(missing):
                victims = np.concatenate([victims, self._least_recent(len(missing) - free, step)])
            order = missing[np.argsort(ids[missing])]  # file order
            victims = victims[:len(order)]
            read(ids[order], [self.records[v] for v in victims])
            self._assign(victims, ids[order], step)
            slots[order] = victims
            self.rows_read += len(missing)
        self.last_used[slots] = step
        return slots

    def _least_recent(self, need: int, step: int) -> np.ndarray:
        """The `need` slots used longest ago, none used at `step` (the caller's rows). The `need` smallest ages
        all lie at or below a threshold that at least `need` ages reach, found on every STRIDE-th age first: no
        temporary the size of the cache (under a budget each such array is a fresh mapping whose pages fault in:
        a 29k-row cache, np.argpartition's index array and a copy of the ages, 116 page faults a token)."""
        ages = self.last_used[:self.num_used]
        stride = max(1, len(ages) // 1024)
        sample = np.sort(ages[::stride])
        j = min(len(sample) - 1, need // stride)
        old = np.flatnonzero(ages <= min(sample[j], step - 1))
        while len(old) < need and j < len(sample) - 1:
            j = min(len(sample) - 1, 2 * j + 1)
            old = np.flatnonzero(ages <= min(sample[j], step - 1))
        if len(old) < need:
            old = np.flatnonzero(ages < step)
        if len(old) < need:
            raise MemoryError(f"row cache full: {need} rows to place, {len(old)} not in use at this step")
        return old[np.argpartition(ages[old], need - 1)[:need]] if len(old) > need else old
