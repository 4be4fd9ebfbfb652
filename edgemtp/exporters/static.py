"""Static-shape, standard-op target graphs for NPUs (QNN HTP, CoreML, OpenVINO NPU).

    b, contract = build_static(cfg, "gemma3_text", capacity=1024, window=5)

Batch 1, KV capacity C and input width W (the verify window K+1; prefill runs in chunks of W) are
fixed. No com.microsoft op: attention is MatMul/Softmax over the whole cache with an additive mask,
RMSNorm is spelled out, RoPE is a Gather from constant cos/sin tables (no Sin/Cos on activations,
whose angles grow to C radians and would not survive int8/int16 quantization).

I/O (T = C + W; `edgemtp.runtime.static_target` feeds it):
    input_ids [1, W] int64, position_ids [1, W] int64 (< C)
    attention_bias [1, 1, W, T] float: 0 visible, MASK_VALUE hidden; columns [0, C) are cache slots,
        [C, T) the window's own positions; `attention_bias.sliding` the same for sliding layers
    past_key_values.{i}.key/value [1, Nk, C, D]: the cache buffers, read only
 -> logits [1, W, V], last_hidden_state [1, W, H],
    present.{i}.key/value [1, Nk, W, D]: the window's new keys/values only (the runtime writes the
        real positions into its buffers at the sequence's length)

The mask Add and Softmax of each layer are named `attn_bias_add.{i}` / `attn_softmax.{i}`
(KEEP_FLOAT): a quantizer should leave them in float (the mask's range would swamp the scores').
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import contract as C
from ..config import FULL, TextConfig
from ..errors import ArgumentError, EdgemtpError
from ..runtime.static_target import ATTENTION_BIAS, SLIDING_ATTENTION_BIAS, StaticContract
from . import check_whole, gemma3
from . import components as nn
from . import rotary
from .builder import FLOAT, INT64, GraphBuilder, plus_one

ARCHS = ("gemma3_text", "gemma2", "llama", "qwen2", "qwen3", "mistral", "ministral3", "phi3", "smollm3", "granite")
KEEP_FLOAT = ("attn_bias_add.", "attn_softmax.")  # node-name prefixes a QDQ pass leaves in float


@dataclass(frozen=True)
class _Spec:
    """What every layer of a static graph shares."""

    window: int  # W
    capacity: int  # C
    position_ids: str
    bias: dict  # sliding window (None: full) -> mask input name


def build_static(cfg: TextConfig, arch: str | None, capacity: int, window: int) -> tuple[GraphBuilder, dict]:
    """The static target graph of `cfg` and its contract (StaticContract.to_json())."""
    arch = arch or cfg.model_type
    _validate(cfg, arch, capacity, window)
    b = GraphBuilder(f"{arch}_static")
    ids = b.input(C.INPUT_IDS, INT64, [1, window])
    pos = b.input(C.POSITION_IDS, INT64, [1, window])
    slots = gemma3.kv_slots(cfg)  # windowed where a layer slides (Gemma 3, qwen2's sliding layers)
    bias = {w: b.input(SLIDING_ATTENTION_BIAS if w else ATTENTION_BIAS, FLOAT, [1, 1, window, capacity + window])
            for w in sorted({s.window for s in slots}, key=lambda w: w or 0)}
    sp = _Spec(window, capacity, pos, bias)
    body = _gemma3_body if arch in ("gemma3_text", "gemma2") else _llama_body
    body(b, cfg, sp, ids, slots)
    target = C.TargetContract(cfg.vocab_size, cfg.hidden_size, capacity, slots, drafter_kv=gemma3.drafter_kv(cfg))
    names = {name: w for w, name in bias.items()}
    return b, StaticContract(target, window, names).to_json()


def check_verify_window(window: int) -> None:
    """export's static_window (--verify-window from the CLI)."""
    check_whole("static_window", window, "--verify-window")
    if window < 1:
        raise ArgumentError("static_window", window, "must be at least 1 (K+1 with K >= 0)", "--verify-window")


def _validate(cfg: TextConfig, arch: str, capacity: int, window: int) -> None:
    """The refusals name export's capacity= and static_window= from Python, --max-context and --verify-window from
    the CLI."""
    if arch not in ARCHS:
        # both kinds: a qdq export is static too, and a user who asked only for it did not know of "static export"
        raise EdgemtpError(f"static graphs (--static or --quant qdq; static_window= or quant='qdq' from Python) "
                           f"support {', '.join(ARCHS)}; not {arch!r}")
    check_verify_window(window)
    check_whole("capacity", capacity, "--max-context")
    if capacity <= window:
        raise ArgumentError("capacity", capacity, f"must exceed the static graph's verify window ({window})",
                            "--max-context")
    if capacity > cfg.max_position_embeddings:
        raise ArgumentError("capacity", capacity, "exceeds the model's max_position_embeddings "
                            f"({cfg.max_position_embeddings}, config.json)", "--max-context")
    if cfg.num_heads % cfg.num_kv_heads:
        raise EdgemtpError(f"num_attention_heads {cfg.num_heads} is not a multiple of num_key_value_heads "
                           f"{cfg.num_kv_heads}")


# ---------------------------------------------------------------- architectures


# Gemma's residual stream is carried divided by this: Gemma 3 270M's reaches 1e5 at the BOS position, past fp16's
# 65,504, where an NPU runs float ops in fp16. Only norms read it, and a norm does not see a scale (its eps scaled
# as the square): the embedding and the post-norms that write into it are scaled instead, in their constants
RESIDUAL_DIVISOR = 16.0


def into_residual(w: np.ndarray) -> np.ndarray:
    """A Gemma post-norm's weight, (1 + w), scaled as the residual stream it adds to (RESIDUAL_DIVISOR)."""
    return plus_one(w) / np.float32(RESIDUAL_DIVISOR)


def _gemma3_body(b: GraphBuilder, cfg: TextConfig, sp: _Spec, ids: str, slots) -> None:
    """Gemma 3: scaled embedding, sandwich norms, QK-norm, sliding + global layers, soft-capped head; the residual
    stream carried divided by RESIDUAL_DIVISOR (read by `read`'s norms, written by the embedding and `write`)."""
    emb = "model.embed_tokens.weight"
    x = nn.embed(b, ids, emb, cfg.vocab_size, cfg.hidden_size, math.sqrt(cfg.hidden_size) / RESIDUAL_DIVISOR)
    tables = {t: rope_table(b, cfg.rope[t], cfg.head_dim, sp) for t in sorted(set(cfg.layer_types))}
    eps, hid = cfg.rms_norm_eps, cfg.hidden_size

    def head_norm(v: str, key: str) -> str:  # QK-norm, of each head's [head_dim] row
        return rms_norm(b, v, b.param(key, (cfg.head_dim,), plus_one), eps)

    def read(x: str, key: str) -> str:  # a norm of the residual stream x: eps scaled as x's square is
        return rms_norm(b, x, b.param(key, (hid,), plus_one), eps / RESIDUAL_DIVISOR ** 2)

    def write(x: str, v: str, key: str) -> str:  # x + a post-norm of v, scaled as the residual stream x is
        return b.op("Add", x, rms_norm(b, v, b.param(key, (hid,), into_residual), eps))

    for i, slot in enumerate(slots):
        p = f"model.layers.{i}."
        h = read(x, p + "input_layernorm.weight")
        a = p + "self_attn."
        q, k, v = _qkv(b, cfg, a, h, bias=False)
        if cfg.qk_norm:  # Gemma 3 (not Gemma 2)
            q, k = head_norm(q, a + "q_norm.weight"), head_norm(k, a + "k_norm.weight")
        q = rotary.apply_rope(b, q, tables[cfg.layer_types[i]], cfg.head_dim)
        k = rotary.apply_rope(b, k, tables[cfg.layer_types[i]], cfg.head_dim)
        h = attention(b, sp, slot, q, k, v, cfg.num_heads, cfg.scale, cfg.attn_logit_softcapping)
        x = write(x, nn.linear(b, h, a + "o_proj.weight", cfg.num_heads * cfg.head_dim, hid),
                  p + "post_attention_layernorm.weight")
        h = nn.gated_mlp(b, read(x, p + "pre_feedforward_layernorm.weight"), p + "mlp.", hid, cfg.intermediate_size,
                         cfg.hidden_activation)
        x = write(x, h, p + "post_feedforward_layernorm.weight")
    x = _rename_last(b, read(x, "model.norm.weight"), C.LAST_HIDDEN)
    head_key = emb if cfg.tie_word_embeddings else "lm_head.weight"
    logits = nn.softcap(b, head(b, x, head_key, cfg.vocab_size, hid, sp.window), cfg.final_logit_softcapping)
    _outputs(b, logits, cfg, sp)


def _llama_body(b: GraphBuilder, cfg: TextConfig, sp: _Spec, ids: str, slots) -> None:
    """Llama / Qwen2 / Qwen3 / Mistral / Phi-3 / SmolLM3 / Granite: pre-norm, RoPE, SwiGLU; q/k/v biases (qwen2,
    attention_bias), o_proj's (attention_bias but qwen2's); q/k norms per head (qwen3); granite's multipliers."""
    emb = "model.embed_tokens.weight"
    x = nn.embed(b, ids, emb, cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
    table = rope_table(b, cfg.rope[FULL], cfg.head_dim, sp)
    eps, hid = cfg.rms_norm_eps, cfg.hidden_size
    qscale = None if cfg.query_scale_beta is None else b.op("Unsqueeze", nn.llama4_query_scale(
        b, sp.position_ids, cfg.query_scale_beta, cfg.rope[FULL].original_max_positions), b.const([-1], np.int64))
    for i, slot in enumerate(slots):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        h = rms_norm(b, x, b.param(p + "input_layernorm.weight", (hid,)), eps)
        q, k, v = _qkv(b, cfg, a, h, bias=cfg.attention_bias)
        if cfg.qk_norm:  # qwen3: per head, before RoPE
            q, k = (rms_norm(b, t, b.param(a + name, (cfg.head_dim,)), eps) for t, name in
                    ((q, "q_norm.weight"), (k, "k_norm.weight")))
        if i not in cfg.nope_layers:  # smollm3's layers without RoPE
            q, k = rotary.apply_rope(b, q, table, cfg.head_dim), rotary.apply_rope(b, k, table, cfg.head_dim)
        if qscale is not None:  # ministral3: [1, W, 1, 1]
            q = b.op("Mul", q, qscale)
        h = attention(b, sp, slot, q, k, v, cfg.num_heads, cfg.scale, None)
        h = nn.linear(b, h, a + "o_proj.weight", cfg.num_heads * cfg.head_dim, hid,
                      a + "o_proj.bias" if cfg.output_bias else None)
        x = b.op("Add", x, nn.scaled(b, h, cfg.residual_scale))
        h = rms_norm(b, x, b.param(p + "post_attention_layernorm.weight", (hid,)), eps)
        h = nn.gated_mlp(b, h, p + "mlp.", hid, cfg.intermediate_size, cfg.hidden_activation)
        x = b.op("Add", x, nn.scaled(b, h, cfg.residual_scale))
    x = _rename_last(b, rms_norm(b, x, b.param("model.norm.weight", (hid,)), eps), C.LAST_HIDDEN)
    head_key = emb if cfg.tie_word_embeddings else "lm_head.weight"
    _outputs(b, nn.scaled(b, head(b, x, head_key, cfg.vocab_size, hid, sp.window), cfg.logit_scale), cfg, sp)


def _qkv(b: GraphBuilder, cfg: TextConfig, a: str, x: str, bias: bool) -> tuple[str, str, str]:
    """x [1, W, H] -> q [1, W, N, D], k [1, W, Nk, D], v [1, W, Nk*D] (before norms and RoPE)."""
    n, nk, d, hid = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    key = (lambda name: a + name + ".bias") if bias else (lambda name: None)
    q = nn.heads(b, nn.linear(b, x, a + "q_proj.weight", hid, n * d, key("q_proj")), n, d)
    k = nn.heads(b, nn.linear(b, x, a + "k_proj.weight", hid, nk * d, key("k_proj")), nk, d)
    return q, k, nn.linear(b, x, a + "v_proj.weight", hid, nk * d, key("v_proj"))


def _outputs(b: GraphBuilder, logits: str, cfg: TextConfig, sp: _Spec) -> None:
    _rename_last(b, logits, C.LOGITS)
    b.outputs.append(_vi(C.LOGITS, [1, sp.window, cfg.vocab_size]))
    b.outputs.append(_vi(C.LAST_HIDDEN, [1, sp.window, cfg.hidden_size]))


# ---------------------------------------------------------------- standard-op pieces


def rms_norm(b: GraphBuilder, x: str, weight: str, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in ops every NPU provider takes, computed as
    y / sqrt(mean(y^2) + (sqrt(eps) / m)^2) with y = x / m, m = the row's largest |x| (at least 2^-14): the same
    value for any m > 0, and no intermediate overflows where an NPU runs float ops in fp16 (QNN HTP). x^2 did
    past |x| = 256, and a residual stream's rows reach thousands (Gemma 3 270M: 1e5 at the BOS): the norm's
    output went to 0, and every token with it."""
    axis = b.const([-1], np.int64)
    magnitude = b.op("Max", x, b.op("Mul", x, b.const(np.float32(-1))))  # |x| (CoreML has no Abs)
    m = b.op("Max", b.op("ReduceMax", magnitude, axis, keepdims=1), b.const(np.float32(2.0 ** -14)))
    y = b.op("Div", x, m)
    e = b.op("Div", b.const(np.float32(math.sqrt(eps))), m)  # eps / m^2 without m^2, which overflows past 256
    ms = b.op("Add", b.op("ReduceMean", b.op("Mul", y, y), axis, keepdims=1), b.op("Mul", e, e))
    return b.op("Mul", b.op("Div", y, b.op("Sqrt", ms)), weight)


def rope_table(b: GraphBuilder, rope, head_dim: int, sp: _Spec) -> rotary.RopeTables:
    """cos/sin [1, W, 1, R/2] gathered by position from constant [C, R/2] tables (float32 angles, as
    the dynamic graph and transformers compute them; cos/sin then taken in float64), in the external data
    file (GraphBuilder.table)."""
    inv = rotary.inv_freq(rope, head_dim)
    angles = (np.arange(sp.capacity, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float64)
    axis = b.const([2], np.int64)

    def table(values: np.ndarray, hint: str) -> str:
        return b.op("Unsqueeze", b.op("Gather", b.table(values.astype(np.float32), hint=hint),
                                      sp.position_ids, axis=0), axis)

    scale = np.float32(rope.scale)  # longrope's attention factor (1 otherwise)
    return rotary.RopeTables(table(np.cos(angles) * scale, "rope_cos"), table(np.sin(angles) * scale, "rope_sin"),
                         2 * len(inv))


def attention(b: GraphBuilder, sp: _Spec, slot: C.KVSlot, q: str, k: str, v: str, num_heads: int,
              scale: float, softcap: float | None) -> str:
    """Attention of the window over the cache (masked to the committed length) and over itself
    (causal), without concatenating the cache: scores of both parts are joined instead.

    q [1, W, N, D], k [1, W, Nk, D] (RoPE applied), v [1, W, Nk*D] -> [1, W, N*D]. Declares the
    layer's cache inputs and present outputs. Ranks stay <= 4; query head h uses KV head h // G."""
    W, cap, nk, d, layer = sp.window, sp.capacity, slot.num_heads, slot.head_dim, slot.layer
    g = num_heads // nk
    past_k = b.input(C.past_key(layer), FLOAT, [1, nk, cap, d])
    past_v = b.input(C.past_value(layer), FLOAT, [1, nk, cap, d])
    k_new = b.op("Transpose", k, perm=[0, 2, 1, 3], out=C.present_key(layer))  # [1, Nk, W, D]
    v_new = b.op("Transpose", _shape(b, v, [1, W, nk, d]), perm=[0, 2, 1, 3], out=C.present_value(layer))
    b.outputs += [_vi(C.present_key(layer), [1, nk, W, d]), _vi(C.present_value(layer), [1, nk, W, d])]
    qg = b.op("Transpose", b.op("Mul", q, b.const(np.float32(scale))), perm=[0, 2, 1, 3])  # [1, N, W, D]
    qg = _shape(b, qg, [1, nk, g * W, d])
    s_past = b.op("MatMul", qg, b.op("Transpose", past_k, perm=[0, 1, 3, 2]))  # [1, Nk, G*W, C]
    s_new = b.op("MatMul", qg, b.op("Transpose", k_new, perm=[0, 1, 3, 2]))  # [1, Nk, G*W, W]
    s = _shape(b, b.op("Concat", s_past, s_new, axis=-1), [nk, g, W, cap + W])
    s = nn.softcap(b, s, softcap)
    s = _named(b, b.op("Add", s, sp.bias[slot.window]), f"attn_bias_add.{layer}")
    p = _named(b, b.op("Softmax", s, axis=-1), f"attn_softmax.{layer}")
    p_past, p_new = b.op("Split", _shape(b, p, [1, nk, g * W, cap + W]), b.const([cap, W], np.int64),
                         axis=-1, n_out=2)
    out = b.op("Add", b.op("MatMul", p_past, past_v), b.op("MatMul", p_new, v_new))  # [1, Nk, G*W, D]
    out = b.op("Transpose", _shape(b, out, [1, num_heads, W, d]), perm=[0, 2, 1, 3])  # [1, W, N, D]
    return _shape(b, out, [1, W, num_heads * d])


def head(b: GraphBuilder, x: str, key: str, vocab: int, hidden: int, window: int) -> str:
    """[1, W, H] -> [1, W, V] with Gemm(transB) on the [V, H] matrix (the embedding when tied)."""
    flat = _shape(b, x, [window, hidden])
    return _shape(b, b.op("Gemm", flat, b.param(key, (vocab, hidden)), transB=1), [1, window, vocab])


def _shape(b: GraphBuilder, x: str, shape: list[int]) -> str:
    return b.op("Reshape", x, b.const(shape, np.int64))


def _named(b: GraphBuilder, value: str, name: str) -> str:
    """Gives the node that produced `value` (the last one) a stable name, for quantizer exclusions."""
    assert b.nodes[-1].output[0] == value
    b.nodes[-1].name = name
    return value


def _rename_last(b: GraphBuilder, value: str, name: str) -> str:
    """Renames the last node's output to `name` (a graph output without an Identity node)."""
    assert b.nodes[-1].output[0] == value, "rename right after the op, before anything reads it"
    b.nodes[-1].output[0] = name
    return name


def _vi(name: str, shape: list[int]):
    from onnx import helper

    return helper.make_tensor_value_info(name, FLOAT, shape)


__all__ = ["build_static", "rms_norm", "rope_table", "attention", "head", "KEEP_FLOAT", "ARCHS"]
