"""Gemma 3 text decoder (`gemma3_text`): sandwich norms, QK-norm, sliding + global layers, tied head; Gemma 2
(`gemma2`, exporters/gemma2.py) too, without the QK-norm."""

from __future__ import annotations

import math

from .. import contract as C
from ..config import SLIDING, TextConfig
from . import components as nn
from . import rotary
from .builder import GraphBuilder, plus_one


def kv_slots(cfg: TextConfig) -> tuple[C.KVSlot, ...]:
    return tuple(C.KVSlot(i, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window if t == SLIDING else None)
                 for i, t in enumerate(cfg.layer_types))


def build(cfg: TextConfig, capacity: int, in_place: bool = True) -> tuple[GraphBuilder, C.TargetContract]:
    """`in_place`: GroupQueryAttention updates the cache buffers in place (the target graph); False: the
    batched verify graph, which reads the cache and returns only the new K/V rows (nn.window_attention:
    several rows x several new positions per pass)."""
    b = GraphBuilder(cfg.model_type)
    io = nn.target_inputs(b)
    slots = kv_slots(cfg)
    views = None if in_place else {s.window: nn.window_view(b, io, s.window) for s in slots}
    # GQA scores a sliding layer's whole past: one-row passes hand it only the window's end of the buffer
    # (TargetContract.window_offset; with several KV heads a copy of it, runtime/kv_cache.py's shadows)
    window_views = in_place
    window = nn.window_lengths(b) if window_views else None
    emb = "model.embed_tokens.weight"
    x = nn.embed(b, io.input_ids, emb, cfg.vocab_size, cfg.hidden_size, math.sqrt(cfg.hidden_size))
    # GroupQueryAttention rotates q and k from cached tables where it can; the verify graph rotates them itself.
    # In sorted order, so the tables get the same names every run (a set's order changes with the hash seed).
    rope = {t: nn.gqa_rope(b, cfg.rope[t], cfg.head_dim, capacity, io) if in_place else
            rotary.rope_tables(b, cfg.rope[t], cfg.head_dim, io.position_ids) for t in sorted(set(cfg.layer_types))}
    h = norm(b, cfg, x, "model.layers.0.input_layernorm.weight")
    for i, slot in enumerate(slots):
        after = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < len(slots) else "model.norm.weight"
        x, h = decoder_layer(b, cfg, f"model.layers.{i}.", x, h, after, slot, rope[cfg.layer_types[i]], io,
                             capacity, views, window if slot.window else None)
    head_key = emb if cfg.tie_word_embeddings else "lm_head.weight"  # h: the final norm's output
    logits = nn.tied_head(b, nn.last_positions(b, h, io.num_logits), head_key, cfg.vocab_size, cfg.hidden_size)
    nn.graph_outputs(b, nn.softcap(b, logits, cfg.final_logit_softcapping), h, cfg.vocab_size, cfg.hidden_size)
    return b, C.TargetContract(cfg.vocab_size, cfg.hidden_size, capacity, slots, drafter_kv=drafter_kv(cfg),
                               kv_update="in_place" if in_place else "rows", window_views=window_views)


def drafter_kv(cfg: TextConfig) -> dict:
    """The last layer of each attention type: what an MTP drafter attends to (its queries rotated: the last
    with RoPE where some layers have none, as SmolLM3's last layer)."""
    def last(t: str) -> int:
        layers = [i for i, lt in enumerate(cfg.layer_types) if lt == t]
        rotated = [i for i in layers if i not in getattr(cfg, "nope_layers", ())]
        return max(rotated or layers)

    return {t: last(t) for t in sorted(set(cfg.layer_types))}


def norm(b, cfg: TextConfig, x: str, key: str) -> str:
    return nn.gemma_rms_norm(b, x, key, cfg.hidden_size, cfg.rms_norm_eps)


def add_norm(b, cfg: TextConfig, x: str, h: str, key: str) -> tuple[str, str]:
    return nn.add_norm(b, x, h, key, cfg.hidden_size, cfg.rms_norm_eps, plus_one)


def decoder_layer(b, cfg: TextConfig, p: str, x: str, h: str, after: str, slot: C.KVSlot, rope,
                  io: nn.TargetInputs, capacity: int, views: dict | None = None,
                  lengths: tuple[str, str] | None = None) -> tuple[str, str]:
    """(residual x, h = x input-normed) -> (residual after the layer, it normed by `after`: the next
    layer's input norm or the final norm). Each residual add shares an op with the norm that follows it."""
    h = attention(b, cfg, p + "self_attn.", h, slot, rope, io, capacity, views, lengths)
    x, h = add_norm(b, cfg, x, norm(b, cfg, h, p + "post_attention_layernorm.weight"),
                    p + "pre_feedforward_layernorm.weight")
    h = nn.gated_mlp(b, h, p + "mlp.", cfg.hidden_size, cfg.intermediate_size, cfg.hidden_activation)
    return add_norm(b, cfg, x, norm(b, cfg, h, p + "post_feedforward_layernorm.weight"), after)


def attention(b, cfg: TextConfig, p: str, x: str, slot: C.KVSlot, rope, io: nn.TargetInputs, capacity: int,
              views: dict | None = None, lengths: tuple[str, str] | None = None) -> str:
    """[B, S, H] -> [B, S, H]; q/k are RMS-normed per head before RoPE. views: None for GQA in place.
    lengths: the window-view seqlens_k / total_sequence_length inputs for this layer's GQA."""
    n, nk, d, hid = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    q, k, v = nn.linears(b, x, [p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"], hid,
                         [n * d, nk * d, nk * d])
    if isinstance(rope, rotary.RopeCache):  # GroupQueryAttention rotates: q and k stay [B, S, heads * d]
        if cfg.qk_norm:  # Gemma 3 (not Gemma 2)
            q = nn.gemma_head_norm(b, q, p + "q_norm.weight", n, d, cfg.rms_norm_eps)
            k = nn.gemma_head_norm(b, k, p + "k_norm.weight", nk, d, cfg.rms_norm_eps)
    else:  # rotated here, per head
        q, k = nn.heads(b, q, n, d), nn.heads(b, k, nk, d)
        if cfg.qk_norm:
            q = nn.gemma_rms_norm(b, q, p + "q_norm.weight", d, cfg.rms_norm_eps)
            k = nn.gemma_rms_norm(b, k, p + "k_norm.weight", d, cfg.rms_norm_eps)
        q, k = (nn.merge_heads(b, rotary.apply_rope(b, t, rope, d)) for t in (q, k))
        rope = None
    if views is None:
        buffers = nn.kv_buffers(b, slot, capacity, window_view=lengths is not None)
        out = nn.gqa(b, q, k, v, buffers, slot, io, n, cfg.scale, cfg.attn_logit_softcapping, rope, lengths)
    else:
        out = nn.window_attention(b, q, k, v, slot, views[slot.window], n, cfg.scale, cfg.attn_logit_softcapping,
                                  capacity)
    return nn.linear(b, out, p + "o_proj.weight", n * d, hid)
