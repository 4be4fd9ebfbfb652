"""Llama-family decoder (`llama`, `qwen2`, `qwen3`, `mistral`, `smollm3`, and `phi3` through phi3.py): pre-norm,
RoPE, SwiGLU; qwen2 adds q/k/v biases, qwen3 q/k norms per head; both may have sliding-window layers (the same
RoPE, a window on attention), mistral a window on every layer; smollm3 has layers without RoPE; llama's,
qwen3's, smollm3's and granite's attention_bias put biases on q/k/v and o_proj; granite's multipliers scale
the embedding, each block's output, the attention scores and the logits."""

from __future__ import annotations

from .. import contract as C
from ..config import FULL, TextConfig
from . import components as nn
from . import rotary
from . import gemma3  # kv_slots, drafter_kv: one KV slot per layer, windowed where it slides
from .builder import GraphBuilder


def build(cfg: TextConfig, capacity: int, in_place: bool = True) -> tuple[GraphBuilder, C.TargetContract]:
    """`in_place`: GroupQueryAttention updates the cache buffers in place (the target graph); False: the
    batched verify graph, which reads the cache and returns only the new K/V rows (nn.window_attention:
    several rows x several new positions per pass)."""
    b = GraphBuilder(cfg.model_type)
    io = nn.target_inputs(b)
    slots = gemma3.kv_slots(cfg)
    views = None if in_place else {s.window: nn.window_view(b, io, s.window) for s in slots}
    # as Gemma 3's: one-row passes hand a sliding layer's GroupQueryAttention only the window's end of its buffers
    # (a graph without sliding layers keeps the contract older runtimes read: no window inputs)
    window_views = in_place and any(s.window for s in slots)
    window = nn.window_lengths(b) if window_views else None
    emb = "model.embed_tokens.weight"
    x = nn.embed(b, io.input_ids, emb, cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
    # GroupQueryAttention rotates q and k from cached tables; the verify graph rotates them itself
    rope = nn.gqa_rope(b, cfg.rope[FULL], cfg.head_dim, capacity, io) if in_place else \
        rotary.rope_tables(b, cfg.rope[FULL], cfg.head_dim, io.position_ids)
    hid, eps = cfg.hidden_size, cfg.rms_norm_eps
    qscale = None if cfg.query_scale_beta is None else \
        nn.llama4_query_scale(b, io.position_ids, cfg.query_scale_beta, cfg.rope[FULL].original_max_positions)
    h = nn.rms_norm(b, x, "model.layers.0.input_layernorm.weight", hid, eps)
    for i, slot in enumerate(slots):  # each residual add shares an op with the norm that reads it
        p = f"model.layers.{i}."
        after = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < len(slots) else "model.norm.weight"
        layer_rope = None if i in cfg.nope_layers else rope  # smollm3: some layers rotate nothing
        out = attention(b, cfg, p + "self_attn.", h, slot, layer_rope, io, capacity, views and views[slot.window],
                        qscale, window if slot.window else None)
        x, h = nn.add_norm(b, x, nn.scaled(b, out, cfg.residual_scale), p + "post_attention_layernorm.weight",
                           hid, eps)
        out = nn.gated_mlp(b, h, p + "mlp.", hid, cfg.intermediate_size, cfg.hidden_activation)
        x, h = nn.add_norm(b, x, nn.scaled(b, out, cfg.residual_scale), after, hid, eps)
    head_key = emb if cfg.tie_word_embeddings else "lm_head.weight"
    logits = nn.tied_head(b, nn.last_positions(b, h, io.num_logits), head_key, cfg.vocab_size, cfg.hidden_size)
    logits = nn.scaled(b, logits, cfg.logit_scale)  # granite: 1 / logits_scaling
    nn.graph_outputs(b, logits, h, cfg.vocab_size, cfg.hidden_size)  # h: the final norm's output
    return b, C.TargetContract(cfg.vocab_size, cfg.hidden_size, capacity, slots,
                               drafter_kv=gemma3.drafter_kv(cfg), kv_update="in_place" if in_place else "rows",
                               window_views=window_views)


def attention(b, cfg: TextConfig, p: str, x: str, slot: C.KVSlot, rope, io: nn.TargetInputs, capacity: int,
              view: nn.CacheView | None = None, qscale: str | None = None,
              lengths: tuple[str, str] | None = None) -> str:
    """`qscale`: [B, S, 1] factors of the queries (ministral3's, llama4_query_scale). `lengths`: the window-view
    seqlens_k / total_sequence_length inputs for a sliding layer's GroupQueryAttention (nn.window_lengths)."""
    n, nk, d, hid = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    names = [p + "q_proj", p + "k_proj", p + "v_proj"]
    q, k, v = nn.linears(b, x, [m + ".weight" for m in names], hid, [n * d, nk * d, nk * d],
                         [m + ".bias" for m in names] if cfg.attention_bias else None)
    if qscale is not None:  # before any norm would undo it: ministral3 has none
        q = b.op("Mul", q, qscale)
    eps = cfg.rms_norm_eps
    if isinstance(rope, rotary.RopeTables):  # rotated here, not by GroupQueryAttention
        q, k = nn.heads(b, q, n, d), nn.heads(b, k, nk, d)
        if cfg.qk_norm:  # qwen3: per head, before RoPE
            q, k = nn.rms_norm(b, q, p + "q_norm.weight", d, eps), nn.rms_norm(b, k, p + "k_norm.weight", d, eps)
        q, k = (nn.merge_heads(b, rotary.apply_rope(b, t, rope, d)) for t in (q, k))
        rope = None
    elif cfg.qk_norm:  # GroupQueryAttention rotates the normed q and k (rope None: a layer without RoPE)
        q, k = nn.head_norm(b, q, p + "q_norm.weight", n, d, eps), nn.head_norm(b, k, p + "k_norm.weight", nk, d, eps)
    if view is None:
        buffers = nn.kv_buffers(b, slot, capacity, window_view=lengths is not None)
        out = nn.gqa(b, q, k, v, buffers, slot, io, n, cfg.scale, None, rope, lengths)
    else:
        out = nn.window_attention(b, q, k, v, slot, view, n, cfg.scale, None, capacity)
    return nn.linear(b, out, p + "o_proj.weight", n * d, hid, p + "o_proj.bias" if cfg.output_bias else None)
