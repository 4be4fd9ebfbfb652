"""Pre-allocated KV cache: one buffer per KV-owning layer plus a length per sequence.

The target graph writes new keys/values into these buffers in place (past and present are bound to
the same memory), so appending costs only the new positions. Rollback after a rejected draft is
`lengths[b] = n`: positions past the length are ignored by attention and overwritten later.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..contract import KVSlot
from ..errors import EdgemtpError


class KVCache:
    def __init__(self, slots: tuple[KVSlot, ...], batch: int, capacity: int):
        self.slots, self.batch, self.capacity = slots, batch, capacity
        # np.zeros maps lazily: untouched capacity costs address space, not RAM
        try:
            self.keys = {s.layer: np.zeros((batch, s.num_heads, capacity, s.head_dim), np.float32) for s in slots}
            self.values = {s.layer: np.zeros_like(self.keys[s.layer]) for s in slots}
        except MemoryError:  # more address space than the machine gives (a capacity the graph leaves symbolic)
            size = sum(2 * 4 * batch * s.num_heads * capacity * s.head_dim for s in slots)
            raise EdgemtpError(f"the KV cache of {batch} row{'s' * (batch != 1)} x {capacity:,} positions needs "
                               f"{size / 1e9:,.1f} GB ({len(slots)} layers), more than this machine can allocate "
                               "(the bundle's KV capacity)") from None
        self.lengths = np.zeros(batch, np.int64)
        self._views: dict = {}
        self._window_views: dict = {}  # rows -> (offset, every layer's views, the sliding ones from it)
        self.passes: dict = {}  # IOBindings over these buffers, kept by Target for small passes and by the drafters

    def ort_values(self, rows: slice, window_offset: int = 0) -> dict[int, tuple[ort.OrtValue, ort.OrtValue]]:
        """OrtValues over the buffers of sequences `rows` (contiguous: the batch axis is first).

        `window_offset` > 0 (one row, one KV head): the sliding-window layers' buffers from that position on,
        still contiguous memory, so a graph writing into them writes into the buffers."""
        key = (rows.start, rows.stop)
        if key not in self._views:
            self._views[key] = {layer: self._view(layer, rows, 0) for layer in self.keys}
        if not window_offset:
            return self._views[key]
        offset, views = self._window_views.get(key, (None, None))
        if offset != window_offset:  # one offset kept per rows: it moves every half window
            views = {**self._views[key],
                     **{s.layer: self._view(s.layer, rows, window_offset) for s in self.slots if s.window}}
            self._window_views[key] = (window_offset, views)
        return views

    def _view(self, layer: int, rows: slice, offset: int) -> tuple[ort.OrtValue, ort.OrtValue]:
        arrays = [buffer[layer][rows, :, offset:] for buffer in (self.keys, self.values)]
        if not all(a.flags.c_contiguous for a in arrays):  # an OrtValue over a copy would not update the cache
            raise ValueError(f"layer {layer}: a view from position {offset} needs one row and one KV head")
        return tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in arrays)

    def room(self, b: int) -> int:
        return self.capacity - int(self.lengths[b])

    def rollback(self, b: int, length: int) -> None:
        if not 0 <= length <= self.lengths[b]:
            raise ValueError(f"cannot roll sequence {b} back from {self.lengths[b]} to {length}")
        self.lengths[b] = length

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys.values(), self.values.values()))
