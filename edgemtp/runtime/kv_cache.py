"""Pre-allocated KV cache: one buffer per KV-owning layer plus a length per sequence.

The target graph writes new keys/values into these buffers in place (past and present are bound to
the same memory), so appending costs only the new positions. Rollback after a rejected draft is
`lengths[b] = n`: positions past the length are ignored by attention and overwritten later.

A one-row pass of a `window_views` graph binds its sliding layers' buffers from an offset on (TargetContract.
window_offset). With one KV head that is a view of the buffer itself; with several it is not contiguous (each
head's rows sit a whole capacity apart), so those layers bind a "shadow" instead: a copy of the row's positions
from the offset on, [1, Nk, room, D], kept beside the buffer. The pass writes its new keys and values into the
shadow, and after_pass copies them into the buffer, which stays whole and current for everything else (batched
passes, the verify graph, an MTP drafter reading the cache). Only where 1.5 windows are at most half the
capacity (shadow_plan): otherwise such a cache binds every pass to the whole buffers (`unviewable`).
"""

from __future__ import annotations

import errno
import math
import mmap
import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from ..contract import KVSlot
from ..errors import EdgemtpError
from .session import cgroup_memory

# Positions a shadow holds past the 1.5 windows a one-row pass can start back (TargetContract.window_offset): the
# new ones of a decode step or a verify window; a longer one-row pass (a chat turn's prompt) binds the whole buffers.
SHADOW_EXTRA = 64


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of zeros whose memory is its own anonymous mapping: its pages become resident only when
    written, and go back to the system when it is collected. np.zeros gives that only while glibc serves it with
    mmap: once a freed large array has raised glibc's mmap threshold (up to 32 MB) and the heap holds freed space
    (loading a bundle leaves ~170 MB), it is carved from that space and calloc writes its zeros, which made every
    new KV cache wholly resident at its first pass (Gemma 3 270M: 144 MB, 4,096 positions, whatever the context)
    and left it freed but resident after the generation (tests/test_resident.py). The price is a page fault per
    4 KB first written (Gemma 3 270M: 9 a position, ~16 us of CPU, 0.04% of an fp32 decode step), against the
    ~6 ms the zeros took a generation: even at ~250 positions."""
    size = math.prod(shape) * 4
    if size == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # Windows: np.zeros, as before
        return np.zeros(shape, np.float32)
    try:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    except OverflowError:  # more than the address space
        raise MemoryError(f"{size} bytes") from None
    except OSError as e:
        if e.errno == errno.ENOMEM:  # as np.zeros says it
            raise MemoryError(str(e)) from None
        return np.zeros(shape, np.float32)  # a system refusing anonymous maps: the heap's memory, as before
    return np.frombuffer(memory, np.float32).reshape(shape)


def physical_memory() -> int:
    """The memory this process may use, in bytes: the machine's RAM, or its container's limit where that is lower
    (a batch within the RAM was killed part-way by a container's); 0 where neither is known."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this system
        ram = 0
    limit = cgroup_memory()
    return min(ram, limit) if ram and limit else ram or limit or 0


def position_bytes(slots: tuple[KVSlot, ...]) -> int:
    """Bytes one position of one row takes in the cache: a key and a value, fp32, in every KV-owning layer."""
    return sum(2 * 4 * s.num_heads * s.head_dim for s in slots)


def check_fits(slots: tuple[KVSlot, ...], capacity: int, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    """Refuse up front a batch whose KV cache, every row run to max_new_tokens, would outgrow the machine's RAM or
    its container's memory limit. Mapping its buffers succeeds for far more (lazy_zeros; Linux checks each mapping
    alone), so such a batch would otherwise be killed by the system part-way (5,000 rows of Gemma 3 270M on a 24 GB
    machine)."""
    have = physical_memory()
    need = position_bytes(slots) * sum(min(n + max_new_tokens, capacity) for n in prompt_lengths)
    if have and need > have:
        rows = len(prompt_lengths)
        # the container's limit named as such: the machine may have far more, and the limit is what to raise
        where = (f"this container's memory limit (cgroup) of {have / 1e9:,.1f} GB" if have == cgroup_memory()
                 else f"this machine's {have / 1e9:,.1f} GB of memory")
        raise EdgemtpError(f"the KV cache of {rows} row{'s' * (rows != 1)} run to max_new_tokens={max_new_tokens} "
                           f"needs {need / 1e9:,.1f} GB, more than {where} (fewer prompts at once, or a lower "
                           "max_new_tokens)")


def shadow_plan(slots: tuple[KVSlot, ...], capacity: int) -> tuple[tuple[KVSlot, ...], int]:
    """(the slots whose one-row passes bind shadows, the positions each shadow holds). Sliding slots with several
    KV heads get them only where 1.5 windows are at most half the capacity: a window that is a larger share of it
    would add most of the buffers' memory again (Phi-3 mini 4k, all 32 layers sliding over 2,047 of 4,096
    positions: 2.5 GB more for one row) to save scoring a small share of the past; those bind the whole buffers."""
    several = tuple(s for s in slots if s.window and s.num_heads > 1)
    widest = max((s.window for s in slots if s.window), default=0)
    if widest + widest // 2 > capacity // 2:
        several = ()
    return several, min(capacity, widest + max(1, widest // 2) + SHADOW_EXTRA)


class KVCache:
    def __init__(self, slots: tuple[KVSlot, ...], batch: int, capacity: int):
        self.slots, self.batch, self.capacity = slots, batch, capacity
        # mapped lazily: untouched capacity costs address space, not RAM (np.zeros_like does not: it writes its
        # zeros, which made every values buffer resident at once; np.zeros not always, see lazy_zeros)
        try:
            self.keys = {s.layer: lazy_zeros((batch, s.num_heads, capacity, s.head_dim)) for s in slots}
            self.values = {s.layer: lazy_zeros((batch, s.num_heads, capacity, s.head_dim)) for s in slots}
        except MemoryError:  # more address space than the machine gives (a capacity the graph leaves symbolic)
            size = batch * capacity * position_bytes(slots)
            raise EdgemtpError(f"the KV cache of {batch} row{'s' * (batch != 1)} x {capacity:,} positions needs "
                               f"{size / 1e9:,.1f} GB ({len(slots)} layers), more than this machine can allocate "
                               "(the bundle's KV capacity)") from None
        self.lengths = np.zeros(batch, np.int64)
        # sliding layers with several KV heads: one-row passes from an offset on bind shadows (module docstring)
        self.shadowed, self.shadow_room = shadow_plan(slots, capacity)
        # several KV heads on a sliding layer and no shadows (shadow_plan): no view from an offset is contiguous there
        self.unviewable = not self.shadowed and any(s.window and s.num_heads > 1 for s in slots)
        self._shadows: dict[int, dict] = {}  # row -> {layer: (keys, values) [1, Nk, room, D]}, made when first used
        self._shadow_from: dict[int, int] = {}  # row -> the offset its shadows hold positions from (absent: stale)
        self._views: dict = {}
        self._window_views: dict = {}  # rows -> (offset, every layer's views, the sliding ones from it)
        self.passes: dict = {}  # IOBindings over these buffers, kept by Target for small passes and by the drafters

    def ort_values(self, rows: slice, window_offset: int = 0) -> dict[int, tuple[ort.OrtValue, ort.OrtValue]]:
        """OrtValues over the buffers of sequences `rows` (contiguous: the batch axis is first).

        `window_offset` > 0 (one row): the sliding-window layers' buffers from that position on, still contiguous
        memory with one KV head, so a graph writing into them writes into the buffers; with several, the row's
        shadows (before_pass fills them, after_pass copies a pass's new rows back)."""
        key = (rows.start, rows.stop)
        if key not in self._views:
            self._views[key] = {layer: self._view(layer, rows, 0) for layer in self.keys}
        if not window_offset:
            return self._views[key]
        offset, views = self._window_views.get(key, (None, None))
        if offset != window_offset:  # one offset kept per rows: it moves every half window
            views = {**self._views[key],
                     **{s.layer: self._view(s.layer, rows, window_offset) for s in self.slots
                        if s.window and s not in self.shadowed},
                     **{layer: tuple(map(ort.OrtValue.ortvalue_from_numpy, kv))
                        for layer, kv in (self._shadow(rows.start) if self.shadowed else {}).items()}}
            self._window_views[key] = (window_offset, views)
        return views

    def _shadow(self, b: int) -> dict:
        if b not in self._shadows:
            # lazy_zeros as the buffers: np.zeros over the heap's freed space wrote them whole, and they stayed
            # resident once the cache was gone (tests/test_resident.py)
            self._shadows[b] = {s.layer: tuple(lazy_zeros((1, s.num_heads, self.shadow_room, s.head_dim))
                                               for _ in range(2)) for s in self.shadowed}
        return self._shadows[b]

    def window_fits(self, offset: int, end: int) -> bool:
        """Whether a one-row pass binding from `offset` and reaching position `end` fits the shadows (if any)."""
        if self.unviewable:
            return False
        return not self.shadowed or end - offset <= self.shadow_room

    def before_pass(self, rows: slice, offset: int) -> None:
        """Fills row `rows.start`'s shadows from `offset` on, unless they hold those positions already."""
        b = rows.start
        if not self.shadowed or not offset or self._shadow_from.get(b) == offset:
            return
        n = int(self.lengths[b]) - offset  # the positions there: the pass adds its own
        # stale while being filled: a Ctrl-C here (KeptCache keeps the cache) must not leave them held at an old offset
        self._shadow_from.pop(b, None)
        for layer, kv in self._shadow(b).items():
            for buffer, shadow in zip((self.keys, self.values), kv):
                shadow[0, :, :n] = buffer[layer][b, :, offset:offset + n]
        self._shadow_from[b] = offset

    def after_pass(self, rows: slice, offset: int, start: int, S: int) -> None:
        """After a pass of S new positions from `start` (one row's length before it): the new rows into the
        buffers (bound from `offset` on, a shadow's); a pass bound to the buffers leaves the rows' shadows stale."""
        if not self.shadowed:
            return
        if not offset:
            for b in range(*rows.indices(self.batch)):
                self._shadow_from.pop(b, None)
            return
        b, at = rows.start, start - offset
        for layer, kv in self._shadow(b).items():
            for buffer, shadow in zip((self.keys, self.values), kv):
                buffer[layer][b, :, start:start + S] = shadow[0, :, at:at + S]

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
        shadows = sum(a.nbytes for row in self._shadows.values() for kv in row.values() for a in kv)
        return shadows + sum(k.nbytes + v.nbytes for k, v in zip(self.keys.values(), self.values.values()))
