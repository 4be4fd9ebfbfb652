"""The I/O contract of a target graph: one object serves the exporter and the runtime.

Names follow the ecosystem (optimum / onnxruntime-genai). The KV cache is a set of pre-allocated
buffers `[batch, kv_heads, capacity, head_dim]`, one key and one value buffer per KV-owning layer.
A decode step never copies the cache. Two ways to update it (`TargetContract.kv_update`):

- "in_place" (every target graph): GroupQueryAttention with past and present bound to the same memory.
- "rows" (the batched verify graph of Gemma 3 / Llama / Qwen2 bundles): the graph reads the buffers
  (inputs `past_key_values.*`) and returns only the new positions' keys/values (`present.*`, [batch,
  kv_heads, new positions, head_dim]), which the runtime writes into the buffers at each sequence's
  length. Standard ops, so several rows x several new positions per pass, which ONNX Runtime's CPU
  GroupQueryAttention refuses.

No tensor is ever found by substring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
SEQLENS_K = "seqlens_k"  # [batch] int32: tokens in the cache after this step, minus one
TOTAL_SEQ_LEN = "total_sequence_length"  # scalar int32: max over the batch of seqlens_k + 1
NUM_LOGITS = "num_logits"  # scalar int64: logits only for the last n positions
# Graphs with `window_views`: the sliding layers' GroupQueryAttention reads its buffers from an offset on
# (see TargetContract.window_offset), and these are seqlens_k / total_sequence_length counted from there.
WINDOW_SEQLENS_K = "window_seqlens_k"
WINDOW_TOTAL_SEQ_LEN = "window_total_sequence_length"
LOGITS = "logits"
LAST_HIDDEN = "last_hidden_state"
# which state last_hidden_state is; a drafter contract names the one it was made for ("hidden")
HIDDEN_KIND = "post_final_norm"
# the MTP drafter graph's own (drafter/export.py builds it, runtime/drafter_session.py runs it)
DRAFT_IDS = "draft_ids"
NEXT_HIDDEN = "next_hidden_state"
CONTEXT_IDS = "context_ids"  # [N, W] recent token ids, -1 where there is none (a short history)
CANDIDATE_IDS, CANDIDATE_LOGITS = "candidate_ids", "candidate_logits"  # a clustered head's shortlist
# suffix of the name under which one-row passes read a transposed head table with GEMV (exporters/gemv_head.py)
GEMV_ALIAS = ".gemv"


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


@dataclass(frozen=True)
class KVSlot:
    """The cache of one KV-owning layer. `window` is the sliding window (None: full attention)."""

    layer: int
    num_heads: int
    head_dim: int
    window: int | None = None


@dataclass(frozen=True)
class TargetContract:
    vocab_size: int
    hidden_size: int
    capacity: int  # KV positions per sequence the buffers hold
    kv: tuple[KVSlot, ...]
    # For an MTP drafter: the KV-owning layer it reads per attention type, e.g.
    # {"sliding_attention": 13, "full_attention": 14} (DESIGN.md §2).
    drafter_kv: dict
    kv_update: str = "in_place"  # or "rows": see the module docstring
    window_views: bool = False  # sliding layers read their buffers from window_offset() on (WINDOW_* inputs)

    @property
    def sliding_window(self) -> int | None:
        """The widest sliding window: a view that starts where the widest window does holds every sliding
        layer's window (the narrowest would cut the wider layers' oldest positions, if a model ever mixed them)."""
        windows = {s.window for s in self.kv if s.window}
        return max(windows) if windows else None

    def window_offset(self, length: int) -> int:
        """Where a one-row pass's sliding layers start reading their buffers, for a row of `length` committed
        tokens. ONNX Runtime's CPU GroupQueryAttention scores every past position, in the window or not, so
        it is handed a view that starts at most 1.5 windows back; the start moves in half-window steps, so
        one view serves many steps. Positions before it are outside every new query's window."""
        w = self.sliding_window
        if not self.window_views or not w:
            return 0
        step = max(1, w // 2)
        return max(0, (length - w) // step * step)

    def to_json(self) -> dict:
        d = asdict(self)
        d["kv"] = [asdict(s) for s in self.kv]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TargetContract":
        return cls(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                   capacity=int(d["capacity"]), kv=tuple(KVSlot(**s) for s in d["kv"]),
                   drafter_kv={k: int(v) for k, v in d.get("drafter_kv", {}).items()},
                   kv_update=str(d.get("kv_update", "in_place")), window_views=bool(d.get("window_views", False)))


def graph_mismatch(contract: TargetContract, inputs: dict, outputs: dict | None = None,
                   windows: dict | None = None) -> str:
    """What in `contract` disagrees with the graph's inputs (name -> shape, symbolic dims as str) and, given,
    its outputs and the sliding windows its attention uses (past key input -> window, None for global), or ''
    if nothing: a manifest edited after export would otherwise fail inside ONNX Runtime's run (or, for
    vocab_size, be read as the user's token ids being out of range; for a window, hand a sliding layer a
    view of the cache shorter than the window it attends over, and decode wrong without a word)."""
    want = {}
    for s in contract.kv:
        want[past_key(s.layer)] = want[past_value(s.layer)] = s
    have = {n for n in inputs if n.startswith("past_key_values.")}
    for name in sorted(set(want) - have):
        return f"its kv names {name}, which the graph does not have"
    for name in sorted(have - set(want)):
        return f"the graph's input {name} is missing from its kv"
    for name, s in want.items():
        shape = list(inputs[name])
        # every buffer holds `capacity` positions; only a window view (window_views) is shorter
        length = None if s.window is not None and contract.window_views else contract.capacity
        expected = [None, s.num_heads, length, s.head_dim]
        if len(shape) != 4 or any(isinstance(h, int) and w is not None and h != w for h, w in zip(shape, expected)):
            implied = [w if w is not None else "batch" if i == 0 else "any" for i, w in enumerate(expected)]
            return f"{name} is {shape} in the graph, the contract implies {implied}"
    for name, window in sorted((windows or {}).items()):
        if name in want and want[name].window != window:
            return (f"kv layer {want[name].layer}'s window is {want[name].window}, but the graph's attention over "
                    f"{name} has {'no window' if window is None else f'a window of {window}'}")
    # the inputs Target feeds every pass: a static graph (the same cache names and shapes) whose manifest lost its
    # "static": true passed these checks and failed in ONNX Runtime's binding, with a traceback
    for name in (SEQLENS_K, TOTAL_SEQ_LEN, NUM_LOGITS):
        if name not in inputs:
            static = any(n.startswith("attention_bias") for n in inputs)  # static_target's mask inputs
            return (f"the graph lacks the input {name}, which a dynamic target is fed" +
                    (" (a static graph: its contract needs \"static\": true)" if static else ""))
    outputs = outputs or {}
    seq = (list(inputs.get(INPUT_IDS) or []) + [None, None])[1]  # the new positions' symbolic dimension
    present = (list(outputs.get(present_key(contract.kv[0].layer)) or []) + [None] * 4)[2]
    if isinstance(seq, str) and isinstance(present, str):  # a "rows" graph returns just the new positions
        update = "rows" if present == seq else "in_place"
        if update != contract.kv_update:
            holds = "only the new positions" if update == "rows" else "the whole cache"
            return (f"its kv_update is {contract.kv_update!r}, but the graph's {present_key(contract.kv[0].layer)} "
                    f"holds {holds} (kv_update {update!r})")
    if contract.window_views != (WINDOW_SEQLENS_K in inputs):
        return (f"window_views is {str(contract.window_views).lower()}, but the graph "
                f"{'lacks' if contract.window_views else 'has'} the input {WINDOW_SEQLENS_K}")
    for name, size, field in ((LOGITS, contract.vocab_size, "vocab_size"), (LAST_HIDDEN, contract.hidden_size,
                                                                           "hidden_size")):
        shape = list(outputs.get(name) or [])
        if shape and isinstance(shape[-1], int) and shape[-1] != size:
            return f"its {field} is {size}, but the graph's output {name} is {shape}"
    return ""
