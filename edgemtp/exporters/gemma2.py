"""Gemma 2 (`gemma2`): Gemma 3's decoder (sandwich norms, (1 + w) RMSNorms, the embedding scaled by
sqrt(hidden), sliding and global layers) without its q/k norms, with one RoPE for both layer types, attention
scores soft-capped (tanh(s / 50) * 50 by default: GroupQueryAttention's softcap) and sliding layers taking
turns with global ones from the first. gemma3.build builds it."""

from __future__ import annotations

from ..config import FULL, SLIDING, Problems, TextConfig, check_common, one_rope, query_scale


def parse_config(hf: dict, source: str) -> TextConfig:
    """config.json as transformers' Gemma2Config reads it (its defaults where a field is missing)."""
    pr = Problems(source)
    n_layers = pr.need(hf, "num_hidden_layers")
    types = tuple(pr.layer_types(hf) or [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)])
    max_positions = pr.opt(hf, "max_position_embeddings", int, 8192)
    rope = one_rope(hf, pr, max_positions=max_positions)  # yarn without an original length: this, as transformers
    # null: transformers' sliding layers then see the whole past (no window)
    window = pr.opt(hf, "sliding_window", int, None) if "sliding_window" in hf else 4096
    cfg = TextConfig(
        model_type="gemma2",
        vocab_size=pr.need(hf, "vocab_size"),
        hidden_size=pr.need(hf, "hidden_size"),
        intermediate_size=pr.need(hf, "intermediate_size"),
        num_layers=n_layers,
        num_heads=pr.need(hf, "num_attention_heads"),
        num_kv_heads=pr.opt(hf, "num_key_value_heads", int, 4),
        head_dim=pr.opt(hf, "head_dim", int, 256),
        rms_norm_eps=pr.opt(hf, "rms_norm_eps", float, 1e-6),
        layer_types=types,
        rope={FULL: rope, SLIDING: rope},
        sliding_window=window,
        tie_word_embeddings=pr.flag(hf, "tie_word_embeddings", True),
        # 0 is refused as transformers refuses it (0 ** -0.5), not read as unset
        attention_scale=query_scale(pr.opt(hf, "query_pre_attn_scalar", float, 256.0), pr),
        # missing: Gemma2Config's 50 and 30; null: none
        attn_logit_softcapping=pr.opt(hf, "attn_logit_softcapping", float) if "attn_logit_softcapping" in hf
        else 50.0,
        final_logit_softcapping=pr.opt(hf, "final_logit_softcapping", float) if "final_logit_softcapping" in hf
        else 30.0,
        hidden_activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        bos_token_id=pr.opt(hf, "bos_token_id") if "bos_token_id" in hf else 2,
        eos_token_ids=pr.token_ids(hf, "eos_token_id") if "eos_token_id" in hf else (1,),  # null: none
        max_position_embeddings=max_positions,
    )
    check_common(cfg, pr)
    pr.check(len(types) == n_layers, f"field 'layer_types' has {len(types)} entries for {n_layers} layers")
    pr.check(not pr.flag(hf, "attention_bias", False), "field 'attention_bias' is not supported")
    pr.check(not hf.get("use_bidirectional_attention"), "field 'use_bidirectional_attention' is not supported")
    pr.raise_if_any()
    return cfg
