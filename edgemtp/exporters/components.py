"""Graph components as plain functions: each takes the builder and value names, returns value names.

Shapes in docstrings: B batch, S new positions, H hidden size, N query heads, Nk KV heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import contract as C
from ..config import Rope
from . import rotary
from .builder import FLOAT, INT32, INT64, MS_DOMAIN, GraphBuilder, plus_one, transpose


@dataclass(frozen=True)
class TargetInputs:
    input_ids: str
    position_ids: str
    seqlens_k: str
    total_len: str
    num_logits: str


def target_inputs(b: GraphBuilder) -> TargetInputs:
    return TargetInputs(
        b.input(C.INPUT_IDS, INT64, ["batch", "seq"]),
        b.input(C.POSITION_IDS, INT64, ["batch", "seq"]),
        b.input(C.SEQLENS_K, INT32, ["batch"]),
        b.input(C.TOTAL_SEQ_LEN, INT32, []),
        b.input(C.NUM_LOGITS, INT64, []),
    )


def kv_buffers(b: GraphBuilder, slot: C.KVSlot, capacity: int, window_view: bool = False) -> tuple[str, str]:
    """Declare the in-place cache buffers of one layer: past in, present out (same memory at run).
    window_view: the runtime may bind the buffers from an offset on (window_lengths), so fewer positions."""
    shape = ["batch", slot.num_heads, "window_capacity" if window_view else capacity, slot.head_dim]
    k = b.input(C.past_key(slot.layer), FLOAT, shape)
    v = b.input(C.past_value(slot.layer), FLOAT, shape)
    return k, v


def linear(b: GraphBuilder, x: str, key: str, n_in: int, n_out: int, bias: str | None = None) -> str:
    """x [.., n_in] @ W.T with W the checkpoint's [n_out, n_in] `key` (stored transposed)."""
    y = b.op("MatMul", x, b.param(key, (n_in, n_out), transpose))
    if bias is not None:
        y = b.op("Add", y, b.param(bias, (n_out,)))
    return y


def linears(b: GraphBuilder, x: str, keys: list[str], n_in: int, n_outs: list[int],
            biases: list[str] | None = None) -> tuple[str, ...]:
    """linear() for several weights that read the same x (q/k/v, gate/up): one MatMul over the weights
    joined along the output axis, split back. The same numbers (each output column is its own dot
    product), and a Gemma 3 270M fp32 decode step ran 1-6% faster than with one MatMul per weight."""
    head = keys[0].rsplit(".", 2)[0]  # "model.layers.0.self_attn" -> "...self_attn.q_proj+k_proj+v_proj.weight"
    name = f"{head}.{'+'.join(k[len(head) + 1:].removesuffix('.weight') for k in keys)}.weight"
    y = b.op("MatMul", x, b.param(tuple(keys), (n_in, sum(n_outs)), transpose, name=name, parts=tuple(n_outs)))
    if biases is not None:
        y = b.op("Add", y, b.param(tuple(biases), (sum(n_outs),), name=name.removesuffix(".weight") + ".bias",
                                   parts=tuple(n_outs)))
    return b.op("Split", y, b.const(n_outs, np.int64), axis=-1, n_out=len(n_outs))


def joined_parts(name: str) -> list[str]:
    """The weights a joined one was made of (linears' names, read back), e.g. "a.q_proj+k_proj.weight" ->
    ["a.q_proj.weight", "a.k_proj.weight"]; [] for any other name."""
    head, _, rest = name.rpartition(".")
    head, _, joined = head.rpartition(".")
    if "+" not in joined:
        return []
    return [f"{head}.{part}.{rest}" for part in joined.split("+")]


def rms_norm(b: GraphBuilder, x: str, key: str, dim: int, eps: float) -> str:
    """RMSNorm over the last axis with weight w (llama style: x * w)."""
    return b.op("RMSNormalization", x, b.param(key, (dim,)), axis=-1, epsilon=eps)


def gemma_rms_norm(b: GraphBuilder, x: str, key: str, dim: int, eps: float) -> str:
    """Gemma's RMSNorm multiplies by (1 + w): the 1 is folded into the initializer at bind time."""
    return b.op("RMSNormalization", x, b.param(key, (dim,), plus_one), axis=-1, epsilon=eps)


def head_norm(b: GraphBuilder, x: str, key: str, n: int, d: int, eps: float, norm=rms_norm) -> str:
    """[B, S, n*d] -> [B, S, n*d], RMS-normed per head by `norm` (rms_norm: qwen3, gemma_rms_norm). One head
    is normed as it is, without the two Reshapes around the norm (for Gemma 3 270M's one KV head: 36 of the
    355 nodes of a decode step)."""
    if n == 1:
        return norm(b, x, key, d, eps)
    return merge_heads(b, norm(b, heads(b, x, n, d), key, d, eps))


def gemma_head_norm(b: GraphBuilder, x: str, key: str, n: int, d: int, eps: float) -> str:
    return head_norm(b, x, key, n, d, eps, gemma_rms_norm)


def embed(b: GraphBuilder, ids: str, key: str, vocab: int, hidden: int, scale: float | None = None) -> str:
    """ids [B, S] -> [B, S, H], optionally scaled (Gemma multiplies by sqrt(H))."""
    x = b.op("Gather", b.param(key, (vocab, hidden)), ids, axis=0)
    if scale is not None:
        x = b.op("Mul", x, b.const(np.float32(scale)))
    return x


def gqa_rope(b: GraphBuilder, rope: Rope, head_dim: int, capacity: int,
             io: TargetInputs) -> rotary.RopeCache | rotary.RopeTables:
    """What a GroupQueryAttention layer rotates q and k with: tables for GQA itself (RopeCache) where it
    can, else per-run tables for apply_rope before it (RopeTables)."""
    if rotary.gqa_rotates(rope, head_dim):
        return rotary.rope_cache(b, rope, head_dim, capacity)
    return rotary.rope_tables(b, rope, head_dim, io.position_ids)


def add_norm(b: GraphBuilder, x: str, h: str, key: str, dim: int, eps: float, transform=None) -> tuple[str, str]:
    """(x + h, RMSNorm(x + h) * w): a residual add and the norm that reads it, as one op
    (SkipSimplifiedLayerNormalization; ONNX Runtime does not fuse RMSNormalization with the Add itself)."""
    normed, _, _, total = b.op("SkipSimplifiedLayerNormalization", h, x, b.param(key, (dim,), transform),
                               domain=MS_DOMAIN, n_out=4, epsilon=eps)
    node = b.nodes[-1]
    node.output[1] = node.output[2] = ""  # the mean and 1/std outputs are not needed
    return total, normed


def heads(b: GraphBuilder, x: str, n: int, d: int) -> str:
    """[B, S, n*d] -> [B, S, n, d]"""
    return b.op("Reshape", x, b.const([0, 0, n, d], np.int64))


def merge_heads(b: GraphBuilder, x: str) -> str:
    """[B, S, n, d] -> [B, S, n*d]"""
    return b.op("Reshape", x, b.const([0, 0, -1], np.int64))


def window_lengths(b: GraphBuilder) -> tuple[str, str]:
    """The inputs of a graph whose sliding layers read their buffers from an offset on (window_views)."""
    return b.input(C.WINDOW_SEQLENS_K, INT32, ["batch"]), b.input(C.WINDOW_TOTAL_SEQ_LEN, INT32, [])


def gqa(b: GraphBuilder, q: str, k: str, v: str, kv: tuple[str, str], slot: C.KVSlot,
        io: TargetInputs, num_heads: int, scale: float, softcap: float | None, rope: rotary.RopeCache | None = None,
        lengths: tuple[str, str] | None = None) -> str:
    """Causal (optionally sliding-window) attention that appends k, v to the cache in place.

    q [B, S, N*D], k/v [B, S, Nk*D] -> [B, S, N*D]. With `rope` GroupQueryAttention rotates q and k at
    position_ids itself; without, q and k come rotated. `lengths`: the (seqlens_k, total_sequence_length)
    inputs to use instead of the graph's own (window_lengths for a window-view layer)."""
    rotation = (rope.cos, rope.sin, io.position_ids) if rope else ()
    seqlens, total = lengths or (io.seqlens_k, io.total_len)
    out, _, _ = b.op(
        "GroupQueryAttention", q, k, v, kv[0], kv[1], seqlens, total, *rotation,
        domain=MS_DOMAIN, n_out=3, num_heads=num_heads, kv_num_heads=slot.num_heads, scale=scale,
        softcap=float(softcap or 0.0), local_window_size=slot.window or -1, do_rotary=int(rope is not None))
    # present outputs share the past buffers; name them by contract
    node = b.nodes[-1]
    node.output[1], node.output[2] = C.present_key(slot.layer), C.present_value(slot.layer)
    shape = ["batch", slot.num_heads, "capacity", slot.head_dim]
    b.outputs += [_vi(C.present_key(slot.layer), shape), _vi(C.present_value(slot.layer), shape)]
    return out


def window_attention(b: GraphBuilder, q: str, k: str, v: str, slot: C.KVSlot, view: "CacheView",
                     num_heads: int, scale: float, cap: float | None, capacity: int) -> str:
    """The verify graph's attention: S new positions of each row over its cache (read, never written)
    and over themselves, for rows of different lengths at once. ONNX Runtime's CPU GroupQueryAttention
    refuses batch > 1 with S > 1 and a past; this is standard ops over the cache rows the view slices out.

    Declares the layer's cache inputs [B, Nk, cap, D] and its present outputs [B, Nk, S, D]: the new rows
    only, which the runtime writes into its buffers at each row's length.
    q [B, S, N*D], k/v [B, S, Nk*D] (RoPE applied) -> [B, S, N*D]."""
    nk, d, layer = slot.num_heads, slot.head_dim, slot.layer
    g = num_heads // nk
    past = [b.input(name, FLOAT, ["batch", nk, capacity, d]) for name in (C.past_key(layer), C.past_value(layer))]
    new = [b.op("Transpose", b.op("Reshape", x, b.const([0, 0, nk, d], np.int64)), perm=[0, 2, 1, 3], out=name)
           for x, name in ((k, C.present_key(layer)), (v, C.present_value(layer)))]  # [B, Nk, S, D]
    b.outputs += [_vi(C.present_key(layer), ["batch", nk, "seq", d]),
                  _vi(C.present_value(layer), ["batch", nk, "seq", d])]
    axis = b.const([2], np.int64)
    past_rows = [b.op("Unsqueeze", b.op("Slice", x, view.start, view.end, axis), axis)
                 for x in past]  # [B, Nk, 1, T, D]
    new_rows = [b.op("Unsqueeze", x, axis) for x in new]  # [B, Nk, 1, S, D]
    # query head h uses KV head h // g (transformers' repeat_kv): group the heads instead of repeating K/V
    qh = b.op("Transpose", b.op("Reshape", q, b.const([0, 0, nk, g, d], np.int64)), perm=[0, 2, 3, 1, 4])
    scores = b.op("Concat", *(b.op("MatMul", qh, b.op("Transpose", x, perm=[0, 1, 2, 4, 3]))
                              for x in (past_rows[0], new_rows[0])), axis=-1)  # [B, Nk, G, S, T + S]
    if scale != 1.0:
        scores = b.op("Mul", scores, b.const(np.float32(scale)))
    probs = b.op("Softmax", b.op("Add", softcap(b, scores, cap), view.bias), axis=-1)
    sizes = b.op("Concat", b.op("Sub", view.end, view.start), b.op("Shape", q, start=1, end=2), axis=0)
    p_past, p_new = b.op("Split", probs, sizes, axis=-1, n_out=2)
    out = b.op("Add", b.op("MatMul", p_past, past_rows[1]), b.op("MatMul", p_new, new_rows[1]))  # [B, Nk, G, S, D]
    out = b.op("Transpose", out, perm=[0, 3, 1, 2, 4])
    return b.op("Reshape", out, b.const([0, 0, num_heads * d], np.int64))


def window_view(b: GraphBuilder, io: TargetInputs, window: int | None) -> "CacheView":
    """Which keys each new position of a verify graph sees: cache rows [start, end) with end = total_len - S
    (the longest row's committed length) then the S new positions. Query s of row b sits at position_ids[b, s];
    the row's committed length is position_ids[b, 0]. A cache key j is visible iff j < that length (rows
    shorter than the longest hold stale slots there) and j > pos - window; new key s' iff s' <= s (and
    within the window). bias: [B, 1, 1, S, T + S] additive."""
    S = b.op("Shape", io.input_ids, start=1, end=2)
    end = b.op("Sub", b.op("Reshape", b.op("Cast", io.total_len, to=INT64), b.const([1], np.int64)), S)
    if window:
        first = b.op("Sub", b.op("ReduceMin", io.position_ids, keepdims=0), b.const(window - 1, np.int64))
        start = b.op("Reshape", b.op("Min", b.op("Max", first, b.const(0, np.int64)), b.op("Squeeze", end)),
                     b.const([1], np.int64))
    else:  # only here: a constant no node reads would stay in the graph
        start = b.const([0], np.int64)
    keys = b.op("Range", b.op("Squeeze", start), b.op("Squeeze", end), b.const(1, np.int64))  # [T]
    pos = b.op("Unsqueeze", io.position_ids, b.const([-1], np.int64))  # [B, S, 1]
    length = b.op("Slice", pos, b.const([0], np.int64), b.const([1], np.int64), b.const([1], np.int64))  # [B, 1, 1]
    new_keys = b.op("Unsqueeze", io.position_ids, b.const([1], np.int64))  # [B, 1, S]
    ok_past = b.op("Less", keys, length)
    ok_new = b.op("LessOrEqual", new_keys, pos)
    if window:
        lowest = b.op("Sub", pos, b.const(window, np.int64))
        ok_past = b.op("And", ok_past, b.op("Greater", keys, lowest))
        ok_new = b.op("And", ok_new, b.op("Greater", new_keys, lowest))
    ok_past = b.op("And", ok_past, b.op("Equal", pos, pos))  # broadcast to [B, S, T]
    ok = b.op("Concat", ok_past, ok_new, axis=-1)
    bias = b.op("Where", ok, b.const(np.float32(0)), b.const(np.float32(np.finfo(np.float32).min)))
    return CacheView(start, end, b.op("Unsqueeze", bias, b.const([1, 2], np.int64)))


def _vi(name, shape):
    from onnx import helper
    return helper.make_tensor_value_info(name, FLOAT, shape)


def gated_mlp(b: GraphBuilder, x: str, prefix: str, hidden: int, inter: int, act: str) -> str:
    """down(act(gate(x)) * up(x)); act is silu (llama) or tanh-approximated gelu (gemma)."""
    gate, up = linears(b, x, [prefix + "gate_proj.weight", prefix + "up_proj.weight"], hidden, [inter, inter])
    if act == "silu":
        gate = b.op("Mul", gate, b.op("Sigmoid", gate))
    elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
        gate = b.op("Gelu", gate, approximate="tanh")
    elif act == "gelu":
        gate = b.op("Gelu", gate)
    else:
        raise ValueError(f"activation {act!r} is not supported")
    return linear(b, b.op("Mul", gate, up), prefix + "down_proj.weight", inter, hidden)


def last_positions(b: GraphBuilder, x: str, num_logits: str) -> str:
    """x [B, S, H] -> [B, n, H]: only the positions whose logits are used (prefill needs one)."""
    start = b.op("Neg", b.op("Reshape", num_logits, b.const([1], np.int64)))
    return b.op("Slice", x, start, b.const([np.iinfo(np.int64).max], np.int64), b.const([1], np.int64))


def tied_head(b: GraphBuilder, x: str, key: str, vocab: int, hidden: int) -> str:
    """[B, n, H] -> [B, n, V] through the embedding matrix itself (Gemm with transB: no copy)."""
    flat = b.op("Reshape", x, b.const([-1, hidden], np.int64))
    logits = b.op("Gemm", flat, b.param(key, (vocab, hidden)), transB=1)
    shape = b.op("Concat", b.op("Shape", x, start=0, end=2), b.const([vocab], np.int64), axis=0)
    return b.op("Reshape", logits, shape)


def llama4_query_scale(b: GraphBuilder, position_ids: str, beta: float, original: int) -> str:
    """[B, S] positions -> [B, S, 1]: 1 + beta ln(1 + floor(pos / original)), Ministral 3's query scale (1 within
    the original length). Rotation is linear, so q scaled before GroupQueryAttention rotates it is the same."""
    pos = b.op("Cast", position_ids, to=FLOAT)
    steps = b.op("Floor", b.op("Div", pos, b.const(np.float32(original))))
    one = b.const(np.float32(1.0))
    s = b.op("Add", one, b.op("Mul", b.const(np.float32(beta)), b.op("Log", b.op("Add", one, steps))))
    return b.op("Unsqueeze", s, b.const([-1], np.int64))


def scaled(b: GraphBuilder, x: str, factor: float) -> str:
    """x * factor (no op for 1: granite's multipliers, 1 in every other model)."""
    return x if factor == 1.0 else b.op("Mul", x, b.const(np.float32(factor)))


def softcap(b: GraphBuilder, x: str, cap: float | None) -> str:
    """cap * tanh(x / cap): Gemma's final logit soft-cap."""
    if not cap:
        return x
    return b.op("Mul", b.op("Tanh", b.op("Div", x, b.const(np.float32(cap)))), b.const(np.float32(cap)))


def graph_outputs(b: GraphBuilder, logits: str, hidden_states: str, vocab: int, hidden: int) -> None:
    b.output(logits, C.LOGITS, FLOAT, ["batch", "num_logits", vocab])
    b.output(hidden_states, C.LAST_HIDDEN, FLOAT, ["batch", "seq", hidden])


def rms_norm_unscaled(b: GraphBuilder, x: str, dim: int, eps: float) -> str:
    """RMSNorm over the last axis without a learned weight (Gemma 4's v_norm)."""
    return b.op("RMSNormalization", x, b.const(np.ones(dim, np.float32), hint="ones"), axis=-1, epsilon=eps)


def activation(b: GraphBuilder, x: str, act: str) -> str:
    """The checkpoint's `hidden_act`/`hidden_activation` applied elementwise (same choices as gated_mlp)."""
    if act == "silu":
        return b.op("Mul", x, b.op("Sigmoid", x))
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return b.op("Gelu", x, approximate="tanh")
    if act == "gelu":
        return b.op("Gelu", x)
    raise ValueError(f"activation {act!r} is not supported")



@dataclass(frozen=True)
class CacheView:
    """Which cache positions a query may attend to, shared by the KV-shared layers of one type."""

    start: str  # [1] int64: first row sliced out of the bound buffer (a position, less any window offset)
    end: str  # [1] int64: one past the last
    bias: str  # [B, 1, 1, S, T] additive mask, T = end - start


def cache_view(b: GraphBuilder, io: TargetInputs, window: int | None,
               lengths: tuple[str, str] | None = None) -> CacheView:
    """Causal (optionally sliding-window) mask over cache positions [start, total_len).

    Query s of row b sits at position_ids[b, s] and sees key j iff j <= pos (and j > pos - window). A
    sliding view starts at the earliest key any query of the batch can see, so only ~window rows are read.
    `lengths` (window_lengths): the buffers are bound from an offset on (total_len - the window total), so
    the rows sliced are the positions minus that offset."""
    end = b.op("Reshape", b.op("Cast", io.total_len, to=INT64), b.const([1], np.int64))
    if window:
        first = b.op("Sub", b.op("ReduceMin", io.position_ids, keepdims=0), b.const(window - 1, np.int64))
        start = b.op("Reshape", b.op("Max", first, b.const(0, np.int64)), b.const([1], np.int64))
    else:  # only here: a constant no node reads would stay in the graph
        start = b.const([0], np.int64)
    keys = b.op("Range", b.op("Squeeze", start), b.op("Squeeze", end), b.const(1, np.int64))  # [T]
    pos = b.op("Unsqueeze", io.position_ids, b.const([-1], np.int64))  # [B, S, 1]
    ok = b.op("LessOrEqual", keys, pos)
    if window:
        ok = b.op("And", ok, b.op("Greater", keys, b.op("Sub", pos, b.const(window, np.int64))))
    bias = b.op("Where", ok, b.const(np.float32(0)), b.const(np.float32(np.finfo(np.float32).min)))
    if lengths is not None:
        offset = b.op("Sub", end, b.op("Reshape", b.op("Cast", lengths[1], to=INT64), b.const([1], np.int64)))
        start, end = b.op("Sub", start, offset), b.op("Sub", end, offset)
    return CacheView(start, end, b.op("Unsqueeze", bias, b.const([1, 2], np.int64)))


def attend_cache(b: GraphBuilder, q: str, slot: C.KVSlot, view: CacheView, num_heads: int, scale: float) -> str:
    """Attention over layer `slot.layer`'s cache as it stands after this step, writing nothing.

    For KV-shared layers: they read `present.{owner}` (the owner's GQA has appended this step's K/V by
    then; the data edge orders the two). Standard ops rather than GroupQueryAttention: GQA cannot read a
    cache without appending to it, and a second GQA with its own present copies the whole past each step.
    Only the view's rows are sliced out, so a sliding layer reads ~window rows however long the context.

    q [B, S, N*D] (RoPE applied) -> [B, S, N*D]."""
    nk, d = slot.num_heads, slot.head_dim
    g, axis = num_heads // nk, b.const([2], np.int64)

    def rows(name: str) -> str:  # [B, Nk, cap, D] -> [B, Nk, 1, T, D]
        return b.op("Unsqueeze", b.op("Slice", name, view.start, view.end, axis), b.const([2], np.int64))

    # query head h uses KV head h // g (transformers' repeat_kv): group the heads instead of repeating K/V
    qh = b.op("Transpose", b.op("Reshape", q, b.const([0, 0, nk, g, d], np.int64)), perm=[0, 2, 3, 1, 4])
    scores = b.op("MatMul", qh, b.op("Transpose", rows(C.present_key(slot.layer)), perm=[0, 1, 2, 4, 3]))
    if scale != 1.0:
        scores = b.op("Mul", scores, b.const(np.float32(scale)))
    probs = b.op("Softmax", b.op("Add", scores, view.bias), axis=-1)  # [B, Nk, G, S, T]
    out = b.op("MatMul", probs, rows(C.present_value(slot.layer)))  # [B, Nk, G, S, D]
    out = b.op("Transpose", out, perm=[0, 3, 1, 2, 4])
    return b.op("Reshape", out, b.const([0, 0, num_heads * d], np.int64))
