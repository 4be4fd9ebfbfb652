"""Pre-allocated KV cache: one buffer per KV-owning layer plus a length per sequence.

The target graph writes new keys/values into these buffers in place (past and present are bound to
the same memory), so appending costs only the new positions. Rollback after a rejected draft is
`lengths[b] = n`: positions past the length are ignored by attention and overwritten later.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..contract import KVSlot


class KVCache:
    def __init__(self, slots: tuple[KVSlot, ...], batch: int, capacity: int):
        self.slots, self.batch, self.capacity = slots, batch, capacity
        # np.zeros maps lazily: untouched capacity costs address space, not RAM
        self.keys = {s.layer: np.zeros((batch, s.num_heads, capacity, s.head_dim), np.float32) for s in slots}
        self.values = {s.layer: np.zeros_like(self.keys[s.layer]) for s in slots}
        self.lengths = np.zeros(batch, np.int64)
        self._views: dict = {}

    def ort_values(self, rows: slice) -> dict[int, tuple[ort.OrtValue, ort.OrtValue]]:
        """OrtValues over the buffers of sequences `rows` (contiguous: the batch axis is first)."""
        key = (rows.start, rows.stop)
        if key not in self._views:
            self._views[key] = {
                layer: (ort.OrtValue.ortvalue_from_numpy(self.keys[layer][rows]),
                        ort.OrtValue.ortvalue_from_numpy(self.values[layer][rows]))
                for layer in self.keys}
        return self._views[key]

    def room(self, b: int) -> int:
        return self.capacity - int(self.lengths[b])

    def rollback(self, b: int, length: int) -> None:
        if not 0 <= length <= self.lengths[b]:
            raise ValueError(f"cannot roll sequence {b} back from {self.lengths[b]} to {length}")
        self.lengths[b] = length

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys.values(), self.values.values()))
