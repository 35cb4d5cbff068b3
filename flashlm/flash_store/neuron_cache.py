"""The windowed neuron cache of "LLM in a flash" (Sec. 3.3), one per FFN layer.

A preallocated matrix of `capacity` bundle records, an id -> slot map and `num_used`: rows [0:num_used] are live.
Neurons used by the last `window` tokens stay; each token inserts only the needed neurons that are not cached, and
deleting moves the last live rows into the holes (O(c*d), no reallocation), so compute always sees one dense block.
Pinned neurons (the hot set, while no sparsity source exists) are never evicted.
"""

from __future__ import annotations

import numpy as np

from flashlm.flash_store.io_engine import aligned_buffer


class NeuronWindowCache:
    def __init__(self, capacity: int, record_bytes: int, n_neurons: int, window: int = 5):
        self.capacity, self.record_bytes, self.window = capacity, record_bytes, window
        self.records = aligned_buffer(max(1, capacity) * record_bytes)[:capacity * record_bytes] \
            .reshape(capacity, record_bytes)  # (capacity, record_bytes)
        self.slot_of = np.full(n_neurons, -1, np.int64)  # neuron id -> slot, -1 if absent
        self.id_at = np.full(capacity, -1, np.int64)  # slot -> neuron id
        self.last_used = np.zeros(capacity, np.int64)  # token step that last needed the slot's neuron
        self.pinned = np.zeros(capacity, bool)
        self.num_used = 0
        self.hits = 0
        self.lookups = 0

    @property
    def base_address(self) -> int:
        return self.records.ctypes.data

    def missing(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Mark the cached ones among `ids` as used at `step`; return the ids that must be read."""
        slots = self.slot_of[ids]
        present = slots >= 0
        self.last_used[slots[present]] = step
        self.hits += int(present.sum())
        self.lookups += len(ids)
        return ids[~present]

    def evict(self, step: int) -> int:
        """Delete neurons unused for `window` tokens (pinned ones stay); returns how many were deleted."""
        live = slice(0, self.num_used)
        stale = np.flatnonzero((self.last_used[live] <= step - self.window) & ~self.pinned[live])
        for slot in stale[::-1]:  # from the end, so moving the last row never moves a row still to be deleted
            last = self.num_used - 1
            self.slot_of[self.id_at[slot]] = -1
            if slot != last:
                self.records[slot] = self.records[last]
                self.id_at[slot], self.last_used[slot], self.pinned[slot] = \
                    self.id_at[last], self.last_used[last], self.pinned[last]
                self.slot_of[self.id_at[slot]] = slot
            self.id_at[last] = -1
            self.num_used -= 1
        return len(stale)

    def insert(self, ids: np.ndarray, records: np.ndarray, step: int, pin: bool = False) -> np.ndarray:
        """Append records (len(ids), record_bytes) for neurons not cached; returns their slots."""
        n = len(ids)
        if self.num_used + n > self.capacity:
            raise MemoryError(f"neuron cache full ({self.num_used} + {n} > {self.capacity})")
        slots = np.arange(self.num_used, self.num_used + n)
        self.records[slots] = records
        self.id_at[slots] = ids
        self.slot_of[ids] = slots
        self.last_used[slots] = step
        self.pinned[slots] = pin
        self.num_used += n
        return slots
