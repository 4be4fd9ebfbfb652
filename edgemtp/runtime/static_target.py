"""A static-shape target graph (NPU export) behind the same interface as `Target`.

The static graph (edgemtp.exporters.static) has batch 1, a fixed input width W (the verify window,
K+1) and a fixed KV capacity C. It reads the whole cache buffers as inputs and returns only the
window's new keys/values, which `StaticTarget` writes into the buffers at the sequence's length: a
copy of W positions per layer, never of the cache. Longer inputs (prefill) run in chunks of W, the
last chunk padded; padded positions are never written to the cache and never returned.

The Engine and the speculative round run unchanged on it: `new_cache`, `forward(ids, cache, rows,
n_logits)` and `.contract` (a `TargetContract`) mean what they mean for `Target`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .. import contract as C
from ..errors import EdgemtpError
from .kv_cache import KVCache
from .target import CapacityError

ATTENTION_BIAS = "attention_bias"  # [1, 1, W, C + W] float: full-attention layers
SLIDING_ATTENTION_BIAS = "attention_bias.sliding"  # the same for sliding-window layers
MASK_VALUE = -65504.0  # additive bias of a hidden key: exp underflows to 0; representable in fp16


@dataclass(frozen=True)
class StaticContract:
    """What a static graph needs beyond a `TargetContract`: its window and mask inputs.

    `biases` maps each additive-mask input name to the sliding window its layers use (None: full)."""

    target: C.TargetContract
    window: int
    biases: dict

    def to_json(self) -> dict:
        """The target contract's fields plus the static ones (TargetContract.from_json still reads it)."""
        return {**self.target.to_json(), "static": True, "batch": 1, "verify_window": self.window,
                "mask_value": MASK_VALUE, "attention_bias": dict(self.biases), "present": "window"}

    @classmethod
    def from_json(cls, d: dict) -> "StaticContract":
        if not d.get("static") or "verify_window" not in d:
            raise EdgemtpError("graph contract is not a static one (no 'verify_window')")
        biases = {str(k): (None if v is None else int(v)) for k, v in d.get("attention_bias", {}).items()}
        return cls(C.TargetContract.from_json(d), int(d["verify_window"]), biases)


def is_static(contract: dict) -> bool:
    return bool(contract.get("static"))


def attention_bias(length: int, window: int, capacity: int, sliding: int | None) -> np.ndarray:
    """Additive mask [1, 1, W, C + W] for queries at positions length + i, i < W.

    Columns [0, C) are cache slots (visible iff slot < length), columns [C, C + W) the window's own
    positions (visible iff j <= i: causal). A sliding layer also hides keys `sliding` or more back."""
    q = length + np.arange(window)[:, None]
    past, new = np.arange(capacity)[None, :], length + np.arange(window)[None, :]
    ok_past, ok_new = np.broadcast_to(past < length, (window, capacity)), new <= q
    if sliding:
        ok_past, ok_new = ok_past & (q - past < sliding), ok_new & (q - new < sliding)
    ok = np.concatenate([ok_past, ok_new], axis=1)
    return np.where(ok, np.float32(0), np.float32(MASK_VALUE))[None, None]


class StaticTarget:
    """forward() over a static graph; rows of a batch run one after another (the graph has batch 1)."""

    def __init__(self, session: ort.InferenceSession, contract: StaticContract | dict):
        self.session = session
        self.static = contract if isinstance(contract, StaticContract) else StaticContract.from_json(contract)
        self.contract = self.static.target
        self.window = self.static.window
        _check_session(session, self.static)

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.contract.kv, batch, self.contract.capacity)

    def forward(self, ids: np.ndarray, cache: KVCache, rows: slice | None = None,
                n_logits: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """ids [b, S] for cache rows `rows` -> (logits [b, n_logits, V], last hidden [b, S, H]).

        Appends S positions to each row's cache (lengths grow by S), in windows of W."""
        rows = rows or slice(0, cache.batch)
        ids = np.asarray(ids, dtype=np.int64)
        S = ids.shape[1]
        if not 1 <= n_logits <= S:
            raise EdgemtpError(f"n_logits {n_logits} must be within 1..{S}")
        lengths = cache.lengths[rows]
        if int(lengths.max()) + S > cache.capacity:
            raise CapacityError(f"context of {int(lengths.max()) + S} tokens exceeds the bundle's KV capacity "
                                f"of {cache.capacity} (export with a larger --max-context)")
        out = [self._row(ids[i], cache, r, n_logits) for i, r in enumerate(range(*rows.indices(cache.batch)))]
        return np.stack([lo for lo, _ in out]), np.stack([h for _, h in out])

    def _row(self, ids: np.ndarray, cache: KVCache, row: int, n_logits: int) -> tuple[np.ndarray, np.ndarray]:
        """ids [S] of one row -> (logits [n_logits, V] of its last positions, hidden [S, H]), one window at a
        time. Only the windows that hold those last positions keep their logits: a prefill kept all of them
        (1 MB a position at a 262k vocabulary: 4 GB for a 4,000-token prompt, twice over while joining)."""
        first = len(ids) - n_logits  # the first position whose logits are returned
        logits, hidden = [], []
        for c in range(0, len(ids), self.window):
            lo, h = self.step(ids[c:c + self.window], cache, row)
            if c + len(lo) > first:
                logits.append(lo[max(0, first - c):])
            hidden.append(h)
            del lo, h  # not held through the next window's run
        return np.concatenate(logits), np.concatenate(hidden)

    def step(self, ids: np.ndarray, cache: KVCache, row: int) -> tuple[np.ndarray, np.ndarray]:
        """ids [n <= W]: one graph run; writes the n new K/V at the row's length -> ([n, V], [n, H])."""
        n, start = len(ids), int(cache.lengths[row])
        if not 1 <= n <= self.window:
            raise EdgemtpError(f"a static step takes 1..{self.window} ids, got {n}")
        if start + n > cache.capacity:
            raise CapacityError(f"context of {start + n} tokens exceeds the bundle's KV capacity of {cache.capacity}")
        io, feed = self.session.io_binding(), self.feed(ids, start)  # feed stays alive until the run
        for name, value in feed.items():
            io.bind_cpu_input(name, value)
        for layer, (k, v) in cache.ort_values(slice(row, row + 1)).items():
            io.bind_ortvalue_input(C.past_key(layer), k)
            io.bind_ortvalue_input(C.past_value(layer), v)
        names = [C.LOGITS, C.LAST_HIDDEN] + [f(s.layer) for s in self.contract.kv
                                               for f in (C.present_key, C.present_value)]
        for name in names:
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        out = dict(zip(names, (o.numpy() for o in io.get_outputs())))
        for s in self.contract.kv:
            cache.keys[s.layer][row, :, start:start + n] = out[C.present_key(s.layer)][0, :, :n]
            cache.values[s.layer][row, :, start:start + n] = out[C.present_value(s.layer)][0, :, :n]
        cache.lengths[row] += n
        return out[C.LOGITS][0, :n], out[C.LAST_HIDDEN][0, :n]

    def feed(self, ids: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """The non-cache inputs of one window: ids [n <= W] padded (repeating the last id) to W.

        Pad positions are clipped to C - 1 (the RoPE table's last row): they are never attended to."""
        W, cap = self.window, self.contract.capacity
        padded = np.pad(ids, (0, W - len(ids)), mode="edge")[None]
        pos = np.minimum(length + np.arange(W, dtype=np.int64), cap - 1)[None]
        feed = {C.INPUT_IDS: np.ascontiguousarray(padded), C.POSITION_IDS: pos}
        for name, sliding in self.static.biases.items():
            feed[name] = attention_bias(length, W, cap, sliding)
        return feed


def _check_session(session: ort.InferenceSession, s: StaticContract) -> None:
    """The graph's inputs are the ones the contract promises, with its window and capacity, and so are its
    outputs (vocab_size, hidden_size): bundle.load leaves a static graph's to this check, and a manifest's
    vocab_size larger than the graph's let token ids through to fail inside ONNX Runtime's Gather."""
    want = {C.INPUT_IDS: [1, s.window], C.POSITION_IDS: [1, s.window]}
    want.update({name: [1, 1, s.window, s.target.capacity + s.window] for name in s.biases})
    for slot in s.target.kv:
        for name in (C.past_key(slot.layer), C.past_value(slot.layer)):
            want[name] = [1, slot.num_heads, s.target.capacity, slot.head_dim]
    have = {i.name: list(i.shape) for i in session.get_inputs()}
    if have != want:
        missing = sorted(set(want) - set(have))
        wrong = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        extra = sorted(set(have) - set(want))
        raise EdgemtpError(f"static graph does not match its contract (missing inputs {missing}, "
                           f"wrong shapes {wrong}, unexpected inputs {extra})")
    want = {C.LOGITS: [1, s.window, s.target.vocab_size], C.LAST_HIDDEN: [1, s.window, s.target.hidden_size]}
    for slot in s.target.kv:  # StaticTarget.step reads each of these
        for name in (C.present_key(slot.layer), C.present_value(slot.layer)):
            want[name] = [1, slot.num_heads, s.window, slot.head_dim]
    have = {o.name: list(o.shape) for o in session.get_outputs()}
    wrong = sorted(n for n in want if have.get(n) != want[n])
    if wrong:
        raise EdgemtpError(f"static graph does not match its contract (output {wrong[0]} is {have.get(wrong[0])}, "
                           f"the contract implies {want[wrong[0]]})")
