"""Llama-family decoder (`llama`, `qwen2`): pre-norm, RoPE, SwiGLU; qwen2 adds q/k/v biases."""

from __future__ import annotations

from .. import contract as C
from ..config import FULL, TextConfig
from . import components as nn
from .builder import GraphBuilder


def build(cfg: TextConfig, capacity: int, in_place: bool = True) -> tuple[GraphBuilder, C.TargetContract]:
    """`in_place`: GroupQueryAttention updates the cache buffers in place (the target graph); False: the
    batched verify graph, which reads the cache and returns only the new K/V rows (nn.window_attention:
    several rows x several new positions per pass)."""
    b = GraphBuilder(cfg.model_type)
    io = nn.target_inputs(b)
    slots = tuple(C.KVSlot(i, cfg.num_kv_heads, cfg.head_dim) for i in range(cfg.num_layers))
    view = None if in_place else nn.window_view(b, io, None)
    emb = "model.embed_tokens.weight"
    x = nn.embed(b, io.input_ids, emb, cfg.vocab_size, cfg.hidden_size)
    rope = nn.rope_tables(b, cfg.rope[FULL], cfg.head_dim, io.position_ids)
    for i, slot in enumerate(slots):
        p = f"model.layers.{i}."
        h = nn.rms_norm(b, x, p + "input_layernorm.weight", cfg.hidden_size, cfg.rms_norm_eps)
        x = b.op("Add", x, attention(b, cfg, p + "self_attn.", h, slot, rope, io, capacity, view))
        h = nn.rms_norm(b, x, p + "post_attention_layernorm.weight", cfg.hidden_size, cfg.rms_norm_eps)
        x = b.op("Add", x, nn.gated_mlp(b, h, p + "mlp.", cfg.hidden_size, cfg.intermediate_size,
                                         cfg.hidden_activation))
    x = nn.rms_norm(b, x, "model.norm.weight", cfg.hidden_size, cfg.rms_norm_eps)
    head_key = emb if cfg.tie_word_embeddings else "lm_head.weight"
    logits = nn.tied_head(b, nn.last_positions(b, x, io.num_logits), head_key, cfg.vocab_size, cfg.hidden_size)
    nn.graph_outputs(b, logits, x, cfg.vocab_size, cfg.hidden_size)
    return b, C.TargetContract(cfg.vocab_size, cfg.hidden_size, capacity, slots,
                               drafter_kv={FULL: cfg.num_layers - 1}, kv_update="in_place" if in_place else "rows")


def attention(b, cfg: TextConfig, p: str, x: str, slot: C.KVSlot, rope: nn.RopeTables,
              io: nn.TargetInputs, capacity: int, view: nn.CacheView | None = None) -> str:
    n, nk, d, hid = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    bias = (lambda name: p + name + ".bias") if cfg.attention_bias else (lambda name: None)
    q = nn.linear(b, x, p + "q_proj.weight", hid, n * d, bias("q_proj"))
    k = nn.linear(b, x, p + "k_proj.weight", hid, nk * d, bias("k_proj"))
    v = nn.linear(b, x, p + "v_proj.weight", hid, nk * d, bias("v_proj"))
    q = nn.merge_heads(b, nn.apply_rope(b, nn.heads(b, q, n, d), rope, d))
    k = nn.merge_heads(b, nn.apply_rope(b, nn.heads(b, k, nk, d), rope, d))
    if view is not None:
        out = nn.window_attention(b, q, k, v, slot, view, n, cfg.scale, None, capacity)
    else:
        out = nn.gqa(b, q, k, v, nn.kv_buffers(b, slot, capacity), slot, io, n, cfg.scale, None)
    return nn.linear(b, out, p + "o_proj.weight", n * d, hid)
