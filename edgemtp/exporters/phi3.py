"""Phi-3 family (`phi3`: Phi-3 / Phi-3.5 mini, Phi-4 mini): llama's decoder with q/k/v stored as one fused
`qkv_proj` matrix and gate/up as one `gate_up_proj`, partial RoPE (Phi-4 mini rotates 3/4 of each head),
LongRoPE scaling, and a window on every layer where `sliding_window` is set (Phi-3 mini 4k: 2047).

The fused matrices are read as row ranges (split_fused): q, k and v are consecutive rows of `qkv_proj`,
gate and up the two halves of `gate_up_proj`, so the llama builder reads them under llama's names and joins
them again as it joins llama's own (one MatMul each), with no copy of the weights.

LongRoPE has two sets of frequency factors: the short ones up to `original_max_position_embeddings`, the
long ones past it. transformers switches a whole pass to the long ones once a position passes that length,
while the cache keeps keys rotated with the short ones; a bundle rotates every position the same way, so its
KV capacity stays within the original length (exporters.resolve_capacity), where only the short ones apply.
"""

from __future__ import annotations

import math

from ..checkpoint import Checkpoint
from ..config import FULL, SLIDING, Problems, Rope, TextConfig, check_common
from ..config_llama import default_bos, default_eos


def parse_config(hf: dict, source: str) -> TextConfig:
    """config.json as transformers' Phi3Config reads it."""
    pr = Problems(source)
    hidden, heads = pr.need(hf, "hidden_size"), pr.need(hf, "num_attention_heads")
    n_layers = pr.need(hf, "num_hidden_layers")
    head_dim = pr.opt(hf, "head_dim", int, hidden // heads if heads else 0)
    max_positions = pr.opt(hf, "max_position_embeddings", int, 4096)
    window = pr.opt(hf, "sliding_window", int, None)
    rope = _rope(hf, pr, head_dim, max_positions)
    types = ((SLIDING if window is not None else FULL),) * n_layers
    cfg = TextConfig(
        model_type="phi3",
        vocab_size=pr.need(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=pr.need(hf, "intermediate_size"),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=pr.opt(hf, "num_key_value_heads", int, heads),
        head_dim=head_dim,
        rms_norm_eps=pr.opt(hf, "rms_norm_eps", float, 1e-5),
        layer_types=types,
        sliding_window=window,
        rope={FULL: rope, SLIDING: rope},
        tie_word_embeddings=pr.flag(hf, "tie_word_embeddings", False),
        hidden_activation=hf.get("hidden_act", "silu"),
        bos_token_id=pr.opt(hf, "bos_token_id") if "bos_token_id" in hf else default_bos(hf, {"phi3": 1}),
        eos_token_ids=pr.token_ids(hf, "eos_token_id") if "eos_token_id" in hf else default_eos(hf, {"phi3": (32000,)}),
        max_position_embeddings=max_positions,
    )
    check_common(cfg, pr)
    pr.check(cfg.hidden_activation == "silu", f"field 'hidden_act' {cfg.hidden_activation!r} unsupported (silu only)")
    pr.raise_if_any()
    return cfg


def _rope(hf: dict, pr: Problems, head_dim: int, max_positions: int) -> Rope:
    """Phi3Config's RoPE: the older rope_scaling when set, else rope_parameters ("su" and "yarn" are its old
    names for longrope), the base and partial_rotary_factor there or at the top level."""
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    p = hf.get(where) or {}
    if not isinstance(p, dict):
        pr.items.append(f"field '{where}' should be an object, got {p!r}")
        p = {}
    kind = p.get("rope_type", p.get("type")) or "default"
    kind = "longrope" if kind in ("su", "yarn") else kind
    theta = pr.opt(p, "rope_theta", float, None, where)
    theta = pr.opt(hf, "rope_theta", float, 10000.0) if theta is None else theta
    fraction = pr.opt(p, "partial_rotary_factor", float, None, where)
    fraction = pr.opt(hf, "partial_rotary_factor", float, 1.0) if fraction is None else fraction
    pr.check("partial_rotary_factor" in pr.bad or f"{where}.partial_rotary_factor" in pr.bad or 0.0 < fraction <= 1.0,
             f"field 'partial_rotary_factor' {fraction} must be in (0, 1]")
    pr.check(kind in ("default", "longrope"), f"field '{where}' rope_type {kind!r} is not supported for phi3 "
                                              "(default, longrope)")
    if kind != "longrope":
        return Rope(theta=theta, fraction=fraction)
    # Phi3Config's own field (4096 when unsaid) overwrites the RoPE parameters' (standardize_rope_params)
    original = pr.opt(hf, "original_max_position_embeddings", int, 4096)
    # transformers divides by it and by its log
    pr.check("original_max_position_embeddings" in pr.bad or original >= 2,
             f"field 'original_max_position_embeddings' {original} must be at least 2 (LongRoPE scales from it)")
    short = p.get("short_factor")
    rotated = int(head_dim * fraction)
    # the tables have one frequency per started pair (rotary.inv_freq), the short factors one per whole pair:
    # an odd count failed in the export with a numpy broadcasting error (transformers refuses it as well)
    pr.check(rotated % 2 == 0 or not 0.0 < fraction <= 1.0,  # a bad fraction is named above
             f"field 'partial_rotary_factor' {fraction} rotates {rotated} of the head's {head_dim} dims: "
             "LongRoPE needs an even number")
    pairs = rotated // 2
    numbers = isinstance(short, list) and len(short) == pairs and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf for x in short)  # not 1e400
    pr.check(numbers, f"field '{where}.short_factor' must list {pairs} positive numbers (one per rotated pair)")
    # never used within the original length, but transformers' LongRoPE reads it (a KeyError when missing)
    pr.check("long_factor" in p, f"field '{where}.long_factor' is missing (LongRoPE needs it)")
    factor = pr.opt(p, "factor", float, None, where)
    factor = max_positions / original if factor is None and original else factor or 1.0
    scale = pr.opt(p, "attention_factor", float, None, where)
    if scale is None:  # the LongRoPE paper's, as transformers computes it
        scale = 1.0 if factor <= 1.0 or original <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return Rope(theta=theta, kind="longrope", fraction=fraction, original_max_positions=original,
                ext_factors=tuple(float(x) for x in short) if numbers else (), scale=scale)


def split_fused(cfg: TextConfig, ckpt: Checkpoint) -> None:
    """Each layer's qkv_proj and gate_up_proj as llama's q/k/v_proj and gate/up_proj (row ranges of the same
    bytes); the fused names leave the checkpoint, so that nothing reports them unread."""
    if cfg.model_type != "phi3":
        return
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        ckpt.split_rows(p + "self_attn.qkv_proj.weight", {p + "self_attn.q_proj.weight": q,
                                                          p + "self_attn.k_proj.weight": kv,
                                                          p + "self_attn.v_proj.weight": kv})
        inter = cfg.intermediate_size
        ckpt.split_rows(p + "mlp.gate_up_proj.weight", {p + "mlp.gate_proj.weight": inter,
                                                        p + "mlp.up_proj.weight": inter})
