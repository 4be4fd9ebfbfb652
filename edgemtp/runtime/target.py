"""The target graph behind a small forward() that appends to a KVCache in place."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnxruntime as ort

from .. import contract as C
from ..errors import EdgemtpError
from .binding import KeptBinding, reads_in_place
from .head_pages import HeadTables
from .heap import release_freed_memory
from .kv_cache import KVCache
from .session import make_session

if TYPE_CHECKING:
    from ..bundle import Bundle


# Positions a prompt's pass takes at a time (prefill). A pass's activations grow with its length (Gemma 3 270M:
# ~45 KB a position beside the KV cache, 1.4 GB for a 32k prompt in one pass): chunks cap them, and were faster
# too. Gemma 3 270M, a 4,000-token prompt, 2 threads (docs/measurements.md, "Session 55"): one pass 411-483
# tokens/s and 2.38 GB peak RSS; 2,048 511-520, 2.22 GB; 512 575-585, 2.08 GB; 256 600-635; 128 492-554. At
# 1,000 tokens, 512 and one pass were alike (706-746); shorter prompts are one pass either way.
PREFILL_CHUNK = 512


class CapacityError(EdgemtpError):
    """The sequence would outgrow the bundle's KV capacity."""


def prefill(target, ids: list[int], cache: KVCache, row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """target.forward over one row's new prompt positions, PREFILL_CHUNK at a time -> the last chunk's
    (logits [1, 1, V], last hidden [1, S, H]): only the prompt's last position's are used."""
    for start in range(0, len(ids), PREFILL_CHUNK):
        logits, hidden = target.forward(np.array([ids[start:start + PREFILL_CHUNK]]), cache, rows=slice(row, row + 1))
    return logits, hidden


class Target:
    """`verify`: loads the bundle's batched verify graph (a "rows" graph over the same weights) the first time
    a pass has several rows x several new positions, which this graph's GroupQueryAttention refuses."""

    def __init__(self, session: ort.InferenceSession, contract: C.TargetContract,
                 verify: Callable[[], "Target"] | None = None):
        self.session, self.contract = session, contract
        self._load_verify, self._verify = verify, None
        self._verify_lock = threading.Lock()  # threads sharing the target load the verify graph once
        self.keeps_passes = reads_in_place(session)  # small passes keep their binding (_Pass) on the CPU only

    # a pass over several rows is one graph run (its several positions too with multi_row_verify): a speculative
    # round spans finished rows to keep the running ones in one pass (StaticTarget runs row by row)
    one_run_for_rows = True

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.contract.kv, batch, self.contract.capacity)

    @property
    def multi_row_verify(self) -> bool:
        """Several rows x several new positions in one pass (a "rows" graph, or a bundle with a verify graph;
        ORT's CPU GroupQueryAttention refuses batch > 1 with more than one new position and a past)."""
        return self.contract.kv_update == "rows" or self._load_verify is not None

    def forward(self, ids: np.ndarray, cache: KVCache, rows: slice | None = None,
                n_logits: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """ids [b, S] for cache rows `rows` -> (logits [b, n_logits, V], last hidden [b, S, H]).

        Appends S positions to each row's cache (lengths grow by S)."""
        logits, hidden = self.forward_outputs(ids, cache, (C.LOGITS, C.LAST_HIDDEN), rows, n_logits)
        return logits, hidden

    def forward_outputs(self, ids: np.ndarray, cache: KVCache, names, rows: slice | None = None,
                        n_logits: int = 1) -> list[np.ndarray]:
        """forward() returning the graph outputs `names` (any intermediate value the graph exposes)."""
        rows = rows or slice(0, cache.batch)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        S = ids.shape[1]
        if S > 1 and ids.shape[0] > 1 and self.contract.kv_update == "in_place" and self._load_verify is not None:
            return self._verify_target().forward_outputs(ids, cache, names, rows, n_logits)
        if S > 1 and ids.shape[0] > 1 and not self.multi_row_verify:  # ONNX Runtime refuses the pass: row by row
            parts = [[np.array(o) for o in self.forward_outputs(ids[i:i + 1], cache, names, slice(r, r + 1), n_logits)]
                     for i, r in enumerate(range(*rows.indices(cache.batch)))]
            return [np.concatenate(outs) for outs in zip(*parts)]
        lengths = cache.lengths[rows].copy()
        if int(lengths.max()) + S > cache.capacity:
            raise CapacityError(f"context of {int(lengths.max()) + S} tokens exceeds the bundle's KV capacity "
                                f"of {cache.capacity} (export with a larger --max-context)")
        feeds = {C.INPUT_IDS: ids, C.POSITION_IDS: lengths[:, None] + np.arange(S, dtype=np.int64),
                 C.SEQLENS_K: (lengths + S - 1).astype(np.int32),
                 C.TOTAL_SEQ_LEN: np.array(int(lengths.max()) + S, np.int32),
                 C.NUM_LOGITS: np.array(n_logits, np.int64)}
        offset = 0
        if self.contract.window_views:  # sliding layers read from an offset on when the pass has one row
            offset = self.contract.window_offset(int(lengths[0])) if len(lengths) == 1 else 0
            if not cache.window_fits(offset, int(lengths[0]) + S):  # past the shadows' room: the whole buffers
                offset = 0
            feeds[C.WINDOW_SEQLENS_K] = (lengths + S - 1 - offset).astype(np.int32)
            feeds[C.WINDOW_TOTAL_SEQ_LEN] = np.array(int(lengths.max()) + S - offset, np.int32)
        cache.before_pass(rows, offset)
        if self.contract.kv_update != "in_place":
            outputs = self._rows_pass(cache, rows, names, feeds, lengths, S)
        elif S <= REUSED_PASS_MAX and self.keeps_passes:
            outputs = self._reused_pass(cache, rows, offset, (n_logits, *names), feeds).run(feeds)
        else:  # a prefill (or any pass off the CPU): bound once, run once
            outputs = _Pass(self, cache.ort_values(rows, offset), offset, tuple(names), feeds).run(feeds)
        cache.after_pass(rows, offset, int(lengths[0]), S)
        cache.lengths[rows] += S
        return outputs

    def _verify_target(self) -> "Target":
        """The verify graph, loaded by the first pass that needs it; threads whose first batched passes come
        together wait for that one load (each loaded its own: with fast_verify, a packed copy of the weights
        apiece, 1.07 GB for Gemma 3 270M)."""
        with self._verify_lock:
            if self._verify is None:
                self._verify = self._load_verify()
        return self._verify

    def _reused_pass(self, cache: KVCache, rows: slice, offset: int, kind: tuple, feeds: dict) -> "_Pass":
        """kind: (n_logits, *output names): with the rows and the inputs' shapes, what fixes the outputs' shapes."""
        key = (id(self), rows.start, rows.stop, kind, feeds[C.INPUT_IDS].shape)
        p = cache.passes.get(key)
        if p is None or p.offset != offset:
            p = cache.passes[key] = _Pass(self, cache.ort_values(rows, offset), offset, kind[1:], feeds)
        return p

    def _rows_pass(self, cache: KVCache, rows: slice, names, feeds: dict, lengths: np.ndarray,
                   S: int) -> list[np.ndarray]:
        """A "rows" graph returns the new positions' KV [b, Nk, S, D], copied into the buffers at each row's length."""
        io = self.session.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for name in names:  # first: get_outputs() lists the outputs in binding order
            io.bind_output(name)
        values = cache.ort_values(rows)
        for layer, (k, v) in values.items():
            io.bind_ortvalue_input(C.past_key(layer), k)
            io.bind_ortvalue_input(C.past_value(layer), v)
            io.bind_output(C.present_key(layer))
            io.bind_output(C.present_value(layer))
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        new = iter(outputs[len(names):])
        for layer in values:
            for buffer in (cache.keys[layer], cache.values[layer]):
                rows_kv = next(new).numpy()
                for i, length in enumerate(lengths):
                    buffer[rows.start + i, :, length:length + S] = rows_kv[i]
        return [o.numpy() for o in outputs[:len(names)]]


# Passes of at most this many new positions per row (decode steps, verify windows) keep their IOBinding in
# the cache; a prefill binds afresh (it runs once, and its outputs are large).
REUSED_PASS_MAX = 16


class _Pass(KeptBinding):
    """A kept binding (runtime/binding.py) for passes of one shape over one cache's rows: the KV buffers bound as
    past and present (in place) from the window view at `offset`."""

    def __init__(self, target: Target, kv: dict, offset: int, names: tuple, feeds: dict):
        past, present = {}, {}
        for layer, (k, v) in kv.items():
            past[C.past_key(layer)], past[C.past_value(layer)] = k, v
            present[C.present_key(layer)], present[C.present_value(layer)] = k, v
        super().__init__(target, target.session, {name: np.array(value) for name, value in feeds.items()}, past,
                         present, names)
        self.offset = offset


def verify_loader(b: Bundle, provider: str, threads: int | None, mtp: bool, fast: bool,
                   huge_pages: bool = False, tables: HeadTables | None = None) -> Callable[[], Target] | None:
    """Loads the bundle's batched verify graph when first needed (batched speculative decoding); unless `fast`,
    without a packed copy of the weights: it then shares the target's memory-mapped data file."""
    if not b.has_graph("verify"):
        return None
    entry = b.graph("verify")

    def load() -> Target:
        b.check_unchanged()  # its weights must be the target's: the files Engine.load checked
        session = make_session(entry.path, provider, threads, spin=not mtp, prepack=fast, huge_pages=huge_pages,
                               initializers=tables and tables.initializers("verify"))
        target = Target(session, C.TargetContract.from_json(entry.contract))
        release_freed_memory()
        return target
    return load
