"""Gemma 4 text decoder (`gemma4_text`, or the text tower of a multimodal `gemma4` checkpoint).

What it adds to Gemma 3 (maths checked against transformers' `models/gemma4`, see tests/test_parity_gemma4.py):
- RMSNorm multiplies by w (not 1 + w); v is RMS-normed too, without a weight; attention scale 1.0.
- Sliding and full layers differ in head dim (`head_dim` / `global_head_dim`) and, with
  `attention_k_eq_v`, in KV heads (`num_global_key_value_heads`) on full layers, whose values are then
  the raw key projection (before k_norm and RoPE). Full layers use partial "proportional" RoPE.
- Per-layer embeddings (PLE): a second embedding gives each layer a `hidden_size_per_layer_input`
  vector that gates a small residual branch at the end of that layer.
- KV sharing: the last `num_kv_shared_layers` layers own no KV; each attends to the cache of the last
  non-shared layer of its type, and has an MLP twice as wide with `use_double_wide_mlp`.
- Each layer's output is multiplied by its `layer_scalar`; logits are soft-capped.

This module builds the graph; gemma4_config.py reads config.json into a Gemma4Config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import contract as C
from ..config import SLIDING
from . import components as nn
from . import rotary
from .builder import GraphBuilder
from .gemma4_config import MODEL_TYPES, Gemma4Config, parse_config  # noqa: F401 (re-exported)


def kv_slots(cfg: Gemma4Config) -> tuple[C.KVSlot, ...]:
    """One cache per KV-owning layer; KV-shared layers have none."""
    return tuple(C.KVSlot(i, cfg.kv_heads[i], cfg.head_dims[i],
                          cfg.sliding_window if cfg.layer_types[i] == SLIDING else None)
                 for i in range(cfg.first_shared))


def build(cfg: Gemma4Config, capacity: int) -> tuple[GraphBuilder, C.TargetContract]:
    b = GraphBuilder("gemma4_text")
    io = nn.target_inputs(b)
    slots = kv_slots(cfg)
    emb = "model.embed_tokens.weight"
    ids = text_ids(b, cfg, io.input_ids)
    x = nn.embed(b, ids, emb, cfg.vocab_size, cfg.hidden_size, math.sqrt(cfg.hidden_size))
    ple = per_layer_inputs(b, cfg, ids, x) if cfg.ple_dim else [None] * cfg.num_layers
    # KV-owning layers' GroupQueryAttention rotates q and k from cached tables; KV-shared layers rotate q
    shared_types = sorted(set(cfg.layer_types[cfg.first_shared:]))
    own_types = sorted(set(cfg.layer_types[:cfg.first_shared]))
    caches = {t: nn.gqa_rope(b, cfg.rope[t], cfg.type_head_dim(t), capacity, io) for t in own_types}
    tables = {t: rotary.rope_tables(b, cfg.rope[t], cfg.type_head_dim(t), io.position_ids) for t in shared_types}
    # GQA scores a sliding layer's whole past: one-row passes hand it only the window's end of the buffer
    # (TargetContract.window_offset; with several KV heads a copy of it, runtime/kv_cache.py's shadows)
    window = nn.window_lengths(b)
    views = {t: nn.cache_view(b, io, cfg.sliding_window, window) if t == SLIDING else nn.cache_view(b, io, None)
             for t in shared_types}
    for i, t in enumerate(cfg.layer_types):
        # slots[j] is layer j's cache for every KV-owning j < first_shared
        rope = tables[t] if cfg.is_shared(i) else caches[t]
        attn = Attention(cfg, i, slots[cfg.kv_owner(i)], rope, io, capacity, views.get(t),
                         window if t == SLIDING else None)
        x = decoder_layer(b, cfg, i, x, ple[i], attn)
    x = nn.rms_norm(b, x, "model.norm.weight", cfg.hidden_size, cfg.rms_norm_eps)
    head_key = emb if cfg.tie_word_embeddings else "lm_head.weight"
    logits = nn.tied_head(b, nn.last_positions(b, x, io.num_logits), head_key, cfg.vocab_size, cfg.hidden_size)
    nn.graph_outputs(b, nn.softcap(b, logits, cfg.final_logit_softcapping), x, cfg.vocab_size, cfg.hidden_size)
    return b, C.TargetContract(cfg.vocab_size, cfg.hidden_size, capacity, slots, drafter_kv=cfg.drafter_kv(),
                               window_views=True)


def text_ids(b: GraphBuilder, cfg: Gemma4Config, ids: str) -> str:
    """ids [B, S] with a multimodal checkpoint's image / video / audio placeholders as its pad token:
    transformers' Gemma4Model embeds them (per-layer embeddings included) as pad, for the encoders' features
    to overwrite, which a text graph has none of."""
    if not cfg.placeholder_ids:
        return ids
    hits = [b.op("Equal", ids, b.const(np.int64(t), np.int64)) for t in cfg.placeholder_ids]
    hit = hits[0]
    for h in hits[1:]:
        hit = b.op("Or", hit, h)
    return b.op("Where", hit, b.const(np.int64(cfg.pad_token_id), np.int64), ids)


def per_layer_inputs(b: GraphBuilder, cfg: Gemma4Config, ids: str, x: str) -> list[str]:
    """PLE: ids [B, S] and the scaled embedding x [B, S, H] -> one [B, S, P] input per layer.

    (norm(proj(x) / sqrt(H)) + E_ple[ids] * sqrt(P)) / sqrt(2), with proj and E_ple packing all L layers
    into their last axis [.., L*P] and the norm taken per layer over P."""
    n, p, h = cfg.num_layers, cfg.ple_dim, cfg.hidden_size
    tokens = nn.embed(b, ids, "model.embed_tokens_per_layer.weight", cfg.ple_vocab, n * p, math.sqrt(p))
    proj = nn.linear(b, x, "model.per_layer_model_projection.weight", h, n * p)
    proj = b.op("Mul", proj, b.const(np.float32(h ** -0.5)))
    proj = nn.rms_norm(b, nn.heads(b, proj, n, p), "model.per_layer_projection_norm.weight", p, cfg.rms_norm_eps)
    both = b.op("Mul", b.op("Add", proj, nn.heads(b, tokens, n, p)), b.const(np.float32(2.0 ** -0.5)))
    parts = b.op("Split", nn.merge_heads(b, both), b.const([p] * n, np.int64), axis=-1, n_out=n)
    return [parts] if n == 1 else list(parts)


def decoder_layer(b: GraphBuilder, cfg: Gemma4Config, i: int, x: str, ple: str | None, attn: "Attention") -> str:
    """x [B, S, H] -> [B, S, H]: Gemma 3's sandwich-normed attention and MLP, then the PLE branch, then
    the whole residual stream times `layer_scalar`."""
    p, hid, eps = f"model.layers.{i}.", cfg.hidden_size, cfg.rms_norm_eps
    h = attn(b, nn.rms_norm(b, x, p + "input_layernorm.weight", hid, eps))
    x, h = nn.add_norm(b, x, nn.rms_norm(b, h, p + "post_attention_layernorm.weight", hid, eps),
                       p + "pre_feedforward_layernorm.weight", hid, eps)
    h = nn.gated_mlp(b, h, p + "mlp.", hid, cfg.mlp_width(i), cfg.hidden_activation)
    x = b.op("Add", x, nn.rms_norm(b, h, p + "post_feedforward_layernorm.weight", hid, eps))
    if ple is not None:
        h = nn.activation(b, nn.linear(b, x, p + "per_layer_input_gate.weight", hid, cfg.ple_dim),
                          cfg.hidden_activation)
        h = nn.linear(b, b.op("Mul", h, ple), p + "per_layer_projection.weight", cfg.ple_dim, hid)
        x = b.op("Add", x, nn.rms_norm(b, h, p + "post_per_layer_input_norm.weight", hid, eps))
    return b.op("Mul", x, b.param(p + "layer_scalar", (1,)))


@dataclass(frozen=True)
class Attention:
    """Attention of layer `i`; `slot` is the cache it reads (its own, or its owner's if KV-shared)."""

    cfg: Gemma4Config
    i: int
    slot: C.KVSlot
    rope: rotary.RopeTables | rotary.RopeCache  # a cache where GroupQueryAttention rotates (nn.gqa_rope)
    io: nn.TargetInputs
    capacity: int
    view: nn.CacheView | None = None  # KV-shared layers: the cache positions of their type
    lengths: tuple[str, str] | None = None  # sliding layers of a window_views graph: nn.window_lengths

    def __call__(self, b: GraphBuilder, x: str) -> str:
        """x [B, S, H] -> [B, S, H]"""
        return self.shared(b, x) if self.cfg.is_shared(self.i) else self.own(b, x)

    def query(self, b: GraphBuilder, x: str) -> str:
        """x [B, S, H] -> q [B, S, N*D], RMS-normed per head, then RoPE unless GroupQueryAttention does it."""
        p, n, d = self.prefix, self.cfg.num_heads, self.cfg.head_dims[self.i]
        q = nn.heads(b, nn.linear(b, x, p + "q_proj.weight", self.cfg.hidden_size, n * d), n, d)
        q = nn.rms_norm(b, q, p + "q_norm.weight", d, self.cfg.rms_norm_eps)
        rotated = q if isinstance(self.rope, rotary.RopeCache) else rotary.apply_rope(b, q, self.rope, d)
        return nn.merge_heads(b, rotated)

    def own(self, b: GraphBuilder, x: str) -> str:
        """A KV-owning layer: appends its K/V to its cache in place. [B, S, H] -> [B, S, H]."""
        cfg, p, nk, d = self.cfg, self.prefix, self.slot.num_heads, self.slot.head_dim
        k_raw = nn.heads(b, nn.linear(b, x, p + "k_proj.weight", cfg.hidden_size, nk * d), nk, d)
        # attention_k_eq_v: values are the key projection itself, taken before k_norm and RoPE
        v = k_raw if cfg.values_are_keys(self.i) else \
            nn.heads(b, nn.linear(b, x, p + "v_proj.weight", cfg.hidden_size, nk * d), nk, d)
        k = nn.rms_norm(b, k_raw, p + "k_norm.weight", d, cfg.rms_norm_eps)
        gqa_rotates = isinstance(self.rope, rotary.RopeCache)
        k = k if gqa_rotates else rotary.apply_rope(b, k, self.rope, d)
        k, v = nn.merge_heads(b, k), nn.merge_heads(b, nn.rms_norm_unscaled(b, v, d, cfg.rms_norm_eps))
        buffers = nn.kv_buffers(b, self.slot, self.capacity, window_view=self.lengths is not None)
        out = nn.gqa(b, self.query(b, x), k, v, buffers, self.slot, self.io, cfg.num_heads, 1.0, None,
                     self.rope if gqa_rotates else None, self.lengths)
        return self.output(b, out)

    def shared(self, b: GraphBuilder, x: str) -> str:
        """A KV-shared layer: attends to its owner's cache (this step's K/V included), writes none."""
        return self.output(b, nn.attend_cache(b, self.query(b, x), self.slot, self.view, self.cfg.num_heads, 1.0))

    def output(self, b: GraphBuilder, out: str) -> str:
        n, d = self.cfg.num_heads, self.cfg.head_dims[self.i]
        return nn.linear(b, out, self.prefix + "o_proj.weight", n * d, self.cfg.hidden_size)

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.i}.self_attn."
