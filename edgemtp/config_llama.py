"""config.json of the llama family (llama, qwen2, qwen3, mistral, ministral3, smollm3, granite; and mistral3's
text tower) as transformers reads each: the one parser the llama builder's architectures share."""

from __future__ import annotations

from .config import ACTIVATIONS, FULL, SLIDING, Problems, Rope, TextConfig, check_common, one_rope
from .errors import EdgemtpError


def parse_llama(hf: dict, source: str) -> TextConfig:
    """llama, qwen2, qwen3, mistral, smollm3 and granite. qwen2 adds q/k/v biases; qwen3 per-head q/k norms, and
    attention_bias on q/k/v and o_proj as llama; both may have sliding-window layers; mistral slides on every
    layer; smollm3 leaves RoPE out of every 4th layer (no_rope_layers); granite scales embeddings, residual
    branches, attention scores and logits."""
    pr = Problems(source)
    qwen2, qwen3, mistral, smollm3, granite, ministral3 = (hf.get("model_type") == t for t in (
        "qwen2", "qwen3", "mistral", "smollm3", "granite", "ministral3"))
    # llama's and qwen3's attention_bias put a bias on q/k/v and o_proj; transformers' qwen2 ignores the field
    # (q/k/v biases always, none on o_proj), and mistral too (no biases)
    if ministral3 and hf.get("rope_parameters") is None and not hf.get("rope_scaling"):
        hf = {**hf, "rope_parameters": dict(MINISTRAL3_ROPE)}  # Ministral3Config's, where config.json has none
    attention_bias = True if qwen2 else False if mistral or ministral3 else pr.flag(hf, "attention_bias", False)
    hidden, heads = pr.need(hf, "hidden_size"), pr.need(hf, "num_attention_heads")
    n_layers = pr.need(hf, "num_hidden_layers")
    # Qwen3Config and Ministral3Config have head_dim 128 by default, not hidden_size / heads, and refuse a null
    # one (transformers 5.25: "Field 'head_dim' expected int"), which was read as 128 here
    if (qwen3 or ministral3) and "head_dim" in hf and hf["head_dim"] is None:
        pr.items.append(f"field 'head_dim' is null ({hf['model_type']} needs the head size)")
    # MistralConfig and Ministral3Config refuse a null num_key_value_heads too ("expected int"), which was read as
    # every head; the other classes here take null as every head
    if (mistral or ministral3) and "num_key_value_heads" in hf and hf["num_key_value_heads"] is None:
        pr.items.append(f"field 'num_key_value_heads' is null ({hf['model_type']} needs the KV head count)")
    head_dim = pr.opt(hf, "head_dim", int, 128 if qwen3 or ministral3 else hidden // heads if heads else 0)
    max_positions = pr.opt(hf, "max_position_embeddings", int, _MAX_POSITIONS.get(hf.get("model_type"), 2048))
    rope = one_rope(hf, pr, 2e6 if smollm3 else 10000.0, max_positions)  # SmolLM3Config's default_theta is 2e6
    nope = ()
    if qwen2 or qwen3:
        layer_types, window = _qwen2_layers(hf, n_layers, pr)
    elif smollm3:
        layer_types, window, nope = _smollm3_layers(hf, n_layers, pr)
    else:
        layer_types, window = _mistral_layers(hf, n_layers, pr, None if ministral3 else 4096) \
            if mistral or ministral3 else ((FULL,) * n_layers, None)
    cfg = TextConfig(
        model_type=hf.get("model_type", ""),
        vocab_size=pr.need(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=pr.need(hf, "intermediate_size"),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=pr.opt(hf, "num_key_value_heads", int, _KV_HEADS.get(hf.get("model_type"), heads)
                            if "num_key_value_heads" not in hf else heads),
        head_dim=head_dim,
        rms_norm_eps=pr.need(hf, "rms_norm_eps", float, 1e-6),
        layer_types=layer_types,
        sliding_window=window,
        rope={FULL: rope, **({SLIDING: rope} if SLIDING in layer_types else {})},  # one RoPE for every layer
        tie_word_embeddings=pr.flag(hf, "tie_word_embeddings", smollm3),
        attention_bias=attention_bias,
        output_bias=attention_bias and not qwen2,
        qk_norm=qwen3,
        nope_layers=nope,
        **(_granite_scales(hf, pr) if granite else {}),
        query_scale_beta=_llama4_beta(hf, rope, pr) if ministral3 else None,
        hidden_activation=hf.get("hidden_act", "silu"),
        bos_token_id=pr.opt(hf, "bos_token_id") if "bos_token_id" in hf else default_bos(hf, _BOS),
        eos_token_ids=pr.token_ids(hf, "eos_token_id") if "eos_token_id" in hf else default_eos(hf, _EOS),
        max_position_embeddings=max_positions,
    )
    check_common(cfg, pr)
    pr.check(cfg.hidden_activation == "silu" or cfg.hidden_activation not in ACTIVATIONS,  # else said once
             f"field 'hidden_act' {cfg.hidden_activation!r} unsupported (silu only)")
    # fields that change transformers' maths and the graph does not build (qwen2's, qwen3's and mistral's MLPs
    # have no biases whatever mlp_bias says)
    pr.check(qwen2 or qwen3 or mistral or ministral3 or not pr.flag(hf, "mlp_bias", False),
             "field 'mlp_bias' is not supported")
    pr.raise_if_any()
    return cfg


def default_bos(hf: dict, defaults: dict) -> int | None:
    """Where config.json leaves bos_token_id out (not null): the config class's, as Gemma's parsers take theirs
    (calibration and drafter training windows start with it); none where the class has none or it lies outside
    the vocabulary."""
    bos = defaults.get(hf.get("model_type"))
    vocab = hf.get("vocab_size")
    return bos if bos is not None and isinstance(vocab, int) and bos < vocab else None


def default_eos(hf: dict, defaults: dict) -> tuple[int, ...]:
    """Where config.json leaves eos_token_id out (not null): the config class's, which transformers' generate stops
    on (no stop token was read, so generation ran to its last token); one outside the vocabulary never comes."""
    vocab = hf.get("vocab_size")
    return tuple(t for t in defaults.get(hf.get("model_type"), ()) if isinstance(vocab, int) and t < vocab)


def _granite_scales(hf: dict, pr: Problems) -> dict:
    """GraniteConfig's multipliers (1 where unsaid): the embedding's, each block's output before its residual
    add, the attention scores' (in place of head_dim ** -0.5), and the logits' divisor."""
    def get(name: str) -> float:
        value = pr.opt(hf, name, float, 1.0)
        pr.check(name in pr.bad or value > 0, f"field '{name}' {value} must be positive")
        return value if value > 0 else 1.0

    return {"embed_scale": get("embedding_multiplier"), "residual_scale": get("residual_multiplier"),
            "attention_scale": get("attention_multiplier"), "logit_scale": 1.0 / get("logits_scaling")}


# Ministral3Config's RoPE where config.json has none (it wins over a top-level rope_theta)
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                   "llama_4_scaling_beta": 0.1}
# transformers' defaults where config.json says none (others: all heads)
_KV_HEADS = {"mistral": 8, "smollm3": 4, "ministral3": 8, "qwen2": 32, "qwen3": 32}  # qwen: all heads before
_EOS = {"llama": (2,), "mistral": (2,), "granite": (2,), "ministral3": (2,), "smollm3": (128001,)}  # likewise
_BOS = {"llama": 1, "mistral": 1, "granite": 1, "ministral3": 1, "smollm3": 128000}  # likewise (qwen2, qwen3: none)
_MAX_POSITIONS = {"llama": 2048, "granite": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768,
                  "smollm3": 32768, "ministral3": 262144}  # likewise


def _smollm3_layers(hf: dict, n_layers: int, pr: Problems) -> tuple[tuple[str, ...], int | None, tuple[int, ...]]:
    """(layer types, window, layers without RoPE) as SmolLM3Config reads them: no_rope_layers (1: rotate)
    or else every no_rope_layer_interval-th layer without; with use_sliding_window, the layers without RoPE
    slide unless layer_types says otherwise. A sliding layer that layer_types names slides by sliding_window
    whatever use_sliding_window says: transformers' SmolLM3 masks it with the config's window (the flag only
    picks the layer types it derives, and flash attention's window), and refuses one without a window."""
    use = pr.flag(hf, "use_sliding_window", False)
    window = pr.opt(hf, "sliding_window", int, None)
    flags = hf.get("no_rope_layers")
    if flags is None:
        every = pr.opt(hf, "no_rope_layer_interval", int, 4)
        # transformers computes (i + 1) % 0 and fails: 0 is no "every layer rotates"
        pr.check("no_rope_layer_interval" in pr.bad or every != 0, "field 'no_rope_layer_interval' must not be 0")
        flags = [int((i + 1) % every != 0) if every else 1 for i in range(n_layers)]
    ok = isinstance(flags, list) and len(flags) == n_layers and all(f in (0, 1) for f in flags)
    pr.check(ok, f"field 'no_rope_layers' must list 0 or 1 for each of the {n_layers} layers")
    nope = tuple(i for i, f in enumerate(flags) if f == 0) if ok else ()
    given = pr.layer_types(hf)
    types = tuple(given or [SLIDING if use and window is not None and i in nope else FULL for i in range(n_layers)])
    pr.check(len(types) == n_layers, f"field 'layer_types' has {len(types)} entries for {n_layers} layers")
    pr.check(SLIDING not in types or window is not None, "field 'layer_types' names sliding layers, but "
             "sliding_window is null (transformers then has no window to give them)")
    return types, window if SLIDING in types else None, nope


def _llama4_beta(hf: dict, rope: Rope, pr: Problems) -> float | None:
    """Ministral 3's llama_4_scaling_beta (in its RoPE parameters): queries scaled by position past the
    original length (its yarn original_max_position_embeddings)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    beta = pr.opt(params, "llama_4_scaling_beta", float, None, "rope_parameters") if isinstance(params, dict) else None
    pr.check(beta is None or rope.kind == "yarn", "field 'rope_parameters.llama_4_scaling_beta' needs rope_type "
                                                  "'yarn' (its original_max_position_embeddings)")
    return beta


def _mistral_layers(hf: dict, n_layers: int, pr: Problems, unsaid: int | None = 4096
                    ) -> tuple[tuple[str, ...], int | None]:
    """transformers' mistral (and ministral3): every layer slides when sliding_window is set (`unsaid` when
    the field is missing: mistral's 4096, ministral3's none; none when null); they ignore 'layer_types'."""
    window = pr.opt(hf, "sliding_window", int, None) if "sliding_window" in hf else unsaid
    return ((SLIDING if window is not None else FULL),) * n_layers, window


def _qwen2_layers(hf: dict, n_layers: int, pr: Problems) -> tuple[tuple[str, ...], int | None]:
    """(layer types, sliding window) as transformers' qwen2 and qwen3 read them: 'layer_types' as given, else with
    use_sliding_window the layers from max_window_layers on slide; the window is sliding_window, and only
    with use_sliding_window (transformers' default 4096 when the field is missing)."""
    use = pr.flag(hf, "use_sliding_window", False)
    window = pr.opt(hf, "sliding_window", int, None) if "sliding_window" in hf else 4096
    window = window if use else None
    first = pr.opt(hf, "max_window_layers", int, 28)
    given = pr.layer_types(hf)
    # null where it would be read (transformers compares a layer index with it, and fails) is not 28
    pr.check(given or window is None or "max_window_layers" not in hf or hf["max_window_layers"] is not None,
             "field 'max_window_layers' is null, but use_sliding_window needs it (the first sliding layer)")
    types = tuple(given or [SLIDING if window is not None and i >= first else FULL for i in range(n_layers)])
    pr.check(len(types) == n_layers, f"field 'layer_types' has {len(types)} entries for {n_layers} layers")
    pr.check(SLIDING not in types or window is not None, "field 'layer_types' names sliding layers, but "
             "use_sliding_window is false or sliding_window null (transformers then has no window to give them)")
    return types, window if SLIDING in types else None


def parse_mistral3_multimodal(hf: dict, source: str) -> TextConfig:
    """A multimodal `mistral3` config.json (Mistral3ForConditionalGeneration: Ministral 3, Mistral Small 3.x):
    its text_config, read by its own model_type (mistral unless it says), tied by the multimodal config's own
    flag (default true), as transformers ties it, stopping on its own eos ids where it has them."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise EdgemtpError(f"{source}: model_type 'mistral3' needs a 'text_config' object")
    kind = text.get("model_type") or "mistral"
    if kind not in ("mistral", "ministral3"):
        raise EdgemtpError(f"{source}: text_config model_type {kind!r} is not supported (mistral, ministral3)")
    top = Problems(source)
    tie = top.flag(hf, "tie_word_embeddings", True)
    # transformers' generate stops on the multimodal config's own eos ids, text_config's only where it has none
    own = {"eos_token_id": list(top.token_ids(hf, "eos_token_id"))} if hf.get("eos_token_id") is not None else {}
    top.raise_if_any()
    return parse_llama({**text, **own, "model_type": kind, "tie_word_embeddings": tie}, source + " (text_config)")
