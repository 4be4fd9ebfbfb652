"""config.json and generation_config.json for a model imported from a GGUF file (gguf_import.py writes them).

The GGUF's metadata fields (`{arch}.block_count`, `{arch}.rope.freq_base`, ...) become transformers'
config keys; each is checked against the tensors' shapes where a wrong one would only fail later, and a
field out of range is named as read. Phi-3's LongRoPE factors and Llama 3.1+'s RoPE scaling are stored by
llama.cpp as tensors: they come back as config (llama3_scaling); linear and YaRN scaling as fields (_rope_scaling).

Sliding windows come as llama.cpp reads the file: gemma3's window and layer pattern (no window: every layer global),
gemma2's on every other layer, phi3's on every layer (0 or no field: none; no field with a warning). llama, qwen2,
qwen3 and smollm3 files carry none, and llama.cpp slides none of their layers: a Mistral 7B v0.1 file (llama;
sliding_window 4096 in its config.json) comes in attending to every position, as llama.cpp runs it, and without a
warning, since nothing in the file tells it from Mistral v0.2 or a Llama, which would all be warned about."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from edgemtp.errors import EdgemtpError, app_stacklevel

ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")  # phi3's LongRoPE: config, not weights
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+'s RoPE scaling, as llama.cpp keeps it: config, not a weight
HF_CLASSES = {"gemma3": ("Gemma3ForCausalLM", "gemma3_text"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
              "llama": ("LlamaForCausalLM", "llama"), "smollm3": ("SmolLM3ForCausalLM", "smollm3"),
              "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
              "phi3": ("Phi3ForCausalLM", "phi3")}

_REQUIRED = object()


def field(meta: dict, key: str, path: Path, kind=int, default=_REQUIRED, least=None):
    """GGUF metadata `key` as `kind` (int: a whole number; float: any number), at least `least`; `default`
    when the file has no such field (none: the field is required)."""
    if key not in meta:
        if default is _REQUIRED:
            raise EdgemtpError(f"{path}: GGUF field {key} is missing")
        return default
    value = meta[key]
    ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)  # NaN, infinity: config.json would hold NaN / Infinity, which JSON has not
    if not ok or (least is not None and value < least):
        what = (("a whole number" if kind is int else "a number")
                + (f" of at least {least}" if least is not None else ""))
        raise EdgemtpError(f"{path}: GGUF field {key} = {value!r} must be {what}")
    return kind(value)


def hf_config(meta: dict, shapes: dict[str, tuple[int, ...]], path: Path, factors: dict | None = None) -> dict:
    """The transformers `config.json` for a gemma3, gemma2, llama, qwen2, qwen3 or phi3 GGUF (`factors`: the
    values of phi3's rope_factors_* tensors and llama's rope_freqs, by name)."""
    arch = meta["general.architecture"]

    def get(key, kind=int, default=_REQUIRED, least=1):
        return field(meta, f"{arch}.{key}", path, kind, default, least)

    if "token_embd.weight" not in shapes:
        raise EdgemtpError(f"{path}: tensor token_embd.weight is missing")
    heads, hidden = get("attention.head_count"), get("embedding_length")
    vocab = shapes["token_embd.weight"][0]  # the embedding matrix, not the tokenizer, fixes the vocabulary size
    _check_shape(shapes, "token_embd.weight", 1, hidden, f"{arch}.embedding_length = {hidden}", path)
    config = {
        "architectures": [HF_CLASSES[arch][0]],
        "model_type": HF_CLASSES[arch][1],
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": _block_count(get("block_count"), shapes, f"{arch}.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", default=heads),
        "head_dim": get("attention.key_length", default=hidden // heads),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", float, least=0)),
        "rope_theta": _f32(get("rope.freq_base", float, 10_000.0, least=0)),
        "rope_scaling": _rope_scaling(meta, arch, path),
        "max_position_embeddings": get("context_length", least=2),  # room for a prompt and a token
        "vocab_size": vocab,
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in shapes,
        **{f"{name}_token_id": _token_id(meta, f"tokenizer.ggml.{key}_token_id", vocab, path)
           for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))},
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    _check_attention(config, shapes, arch, path)
    _check_vocabulary(meta, vocab, path)
    if arch == "phi3":
        return config | _phi3_config(meta, config, factors or {}, path)
    if arch == "llama" and ROPE_FREQS in (factors or {}):
        if config["rope_scaling"] is not None:
            raise EdgemtpError(f"{path}: tensor {ROPE_FREQS} and GGUF field llama.rope.scaling.type both scale RoPE")
        config["rope_scaling"] = llama3_scaling(factors[ROPE_FREQS], config, path)
    extra = {"gemma3": _gemma3_config, "gemma2": _gemma2_config}.get(arch, _llama_config)(meta, config, shapes, path)
    return config | extra


def _check_shape(shapes: dict, name: str, axis: int, want: int, key: str, path: Path) -> None:
    """Tensor `name` (numpy order) has `want` along `axis`, as GGUF field `key` says: a field that disagrees
    with the tensors would write a config.json no export accepts (or fail un-permuting q/k rows)."""
    shape = shapes.get(name)
    if shape is not None and (len(shape) != 2 or shape[axis] != want):
        raise EdgemtpError(f"{path}: GGUF field {key} implies {want} {('rows', 'columns')[axis]} for tensor "
                           f"{name}, which is {list(shape)}")


def _check_attention(config: dict, shapes: dict, arch: str, path: Path) -> None:
    """Every layer's q/k/v rows against the head counts and head size (llama's q/k rows are un-permuted
    by head: a wrong count would fail there with a numpy error)."""
    head_dim = config["head_dim"]
    for i in range(config["num_hidden_layers"]):
        for part, heads, count in (("q", config["num_attention_heads"], "head_count"),
                                   ("k", config["num_key_value_heads"], "head_count_kv"),
                                   ("v", config["num_key_value_heads"], "head_count_kv")):
            _check_shape(shapes, f"blk.{i}.attn_{part}.weight", 0, heads * head_dim,
                         f"{arch}.attention.{count} = {heads} (heads of {head_dim})", path)


def _check_vocabulary(meta: dict, vocab: int, path: Path) -> None:
    """llama.cpp refuses a file whose tokens outnumber the embedding rows; the tokenizer would make ids the
    model has no row for."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > vocab:
        raise EdgemtpError(f"{path}: GGUF field tokenizer.ggml.tokens lists {len(tokens)} tokens, but "
                           f"token_embd.weight has {vocab} rows")


def _block_count(count: int, shapes: dict, key: str, path: Path) -> int:
    """The layer count, checked against the tensors (blk.N.*): a wrong one would export another model."""
    layers = {int(name.split(".")[1]) for name in shapes if name.startswith("blk.") and name.split(".")[1].isdigit()}
    if len(layers) != count or layers != set(range(count)):  # the length first: a corrupt count may be 2**40
        raise EdgemtpError(f"{path}: GGUF field {key} = {count}, but the file has tensors of {len(layers)} layers")
    return count


def _token_id(meta: dict, key: str, vocab: int, path: Path) -> int | None:
    value = field(meta, key, path, int, None, least=0)
    if value is not None and value >= vocab:
        raise EdgemtpError(f"{path}: GGUF field {key} = {value} is outside the vocabulary of {vocab}")
    return value


def _gemma3_config(meta: dict, config: dict, shapes: dict, path: Path) -> dict:
    layers = config["num_hidden_layers"]
    # llama.cpp's attention scale: 1/sqrt(head_dim), except Gemma 3 27B (62 layers), whose HF config
    # has query_pre_attn_scalar = hidden_size / num_attention_heads.
    scalar = config["head_dim"] if layers != 62 else config["hidden_size"] // config["num_attention_heads"]
    # convert_hf_to_gguf.py leaves the window out for a Gemma 3 whose layers are all global (sliding_window_pattern
    # 1), and llama.cpp slides no layer of a file without one or with 0 (each on the global RoPE base). Then the
    # window is Gemma3TextConfig's default, which no layer uses; transformers' Gemma 3 fails on a null one.
    window = field(meta, "gemma3.attention.sliding_window", path, int, 0, least=0)
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": scalar,
        "sliding_window": window or 4096,
        "layer_types": _gemma3_layer_types(meta, layers, path) if window else ["full_attention"] * layers,
        # llama.cpp hard-codes 10k for the local (sliding) layers' rotary base
        "rope_local_base_freq": _f32(field(meta, "gemma3.rope.freq_base_swa", path, float, 10_000.0, least=0)),
        "final_logit_softcapping": _f32(field(meta, "gemma3.final_logit_softcapping", path, float, None, least=0)),
        "attn_logit_softcapping": _f32(field(meta, "gemma3.attn_logit_softcapping", path, float, None, least=0)),
    }


def _gemma2_config(meta: dict, config: dict, shapes: dict, path: Path) -> dict:
    """llama.cpp's Gemma 2: sliding layers first and every other one, scores and logits soft-capped (50 and 30
    unless the file says), the attention scale of head_dim except for the 27B (46 layers: hidden / heads)."""
    layers = config["num_hidden_layers"]
    scalar = config["head_dim"] if layers != 46 else config["hidden_size"] // config["num_attention_heads"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": scalar,
        "sliding_window": field(meta, "gemma2.attention.sliding_window", path, int, 4096, least=1),
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "final_logit_softcapping": _f32(field(meta, "gemma2.final_logit_softcapping", path, float, 30.0, least=0)),
        "attn_logit_softcapping": _f32(field(meta, "gemma2.attn_logit_softcapping", path, float, 50.0, least=0)),
    }


def _phi3_config(meta: dict, config: dict, factors: dict, path: Path) -> dict:
    """llama.cpp's Phi-3: partial RoPE (rope.dimension_count), a window on every layer where it has one (as
    transformers' Phi-3; llama.cpp itself has run none since May 2025), none where the file says 0 or nothing (with a
    warning for nothing), and LongRoPE where the file carries its factors (original_context_length the pretraining
    length)."""
    def get(key, kind=int, default=None, least=1):
        return field(meta, f"phi3.{key}", path, kind, default, least)

    rotary = get("rope.dimension_count", default=config["head_dim"])
    if rotary > config["head_dim"] or rotary % 2:
        raise EdgemtpError(f"{path}: phi3.rope.dimension_count = {rotary} does not fit heads of {config['head_dim']}")
    rope = {"rope_type": "default", "rope_theta": config["rope_theta"],
            "partial_rotary_factor": rotary / config["head_dim"]}
    # llama.cpp writes 0 for a model without a window (Phi-4: sliding_window null in its config.json)
    window = get("attention.sliding_window", least=0)
    if "phi3.attention.sliding_window" not in meta:
        # files made before llama.cpp wrote the field (July 2024) do not say; llama.cpp runs every phi3 file
        # without a window, but transformers' Phi-3 4k models slide, so the difference is named
        warnings.warn(f"{path}: GGUF field phi3.attention.sliding_window is missing (a file made before llama.cpp "
                      "wrote it): imported without a window, as llama.cpp runs it; Phi-3 mini and medium 4k slide "
                      "over 2,047 positions in transformers, so past those the logits differ unless config.json's "
                      "sliding_window says so", stacklevel=app_stacklevel())
    out = {"hidden_act": "silu", "sliding_window": window or None,
           "original_max_position_embeddings": get("rope.scaling.original_context_length",
                                                   default=config["max_position_embeddings"])}
    if factors:
        if sorted(factors) != sorted(ROPE_FACTORS) or any(len(v) != rotary // 2 for v in factors.values()):
            raise EdgemtpError(f"{path}: tensors {' and '.join(ROPE_FACTORS)} must both hold {rotary // 2} "
                               "factors (one per rotated pair)")
        rope.update(rope_type="longrope", long_factor=factors["rope_factors_long.weight"],
                    short_factor=factors["rope_factors_short.weight"])
        scale = get("rope.scaling.attn_factor", float, None, least=0)
        if scale is not None:
            rope["attention_factor"] = _f32(scale)
    return out | {"rope_scaling": rope}


def _gemma3_layer_types(meta: dict, layers: int, path: Path) -> list[str]:
    """Five sliding-window layers, then one global, repeated: llama.cpp hard-codes that pattern of 6
    for gemma3 unless the file lists it per layer (true = sliding)."""
    key = "gemma3.attention.sliding_window_pattern"
    pattern = meta.get(key, 6)
    if isinstance(pattern, list):
        if not all(isinstance(p, bool) for p in pattern):  # llama.cpp's swa_layers: read by truthiness, "no" slid
            shown = f"[{len(pattern)} entries]" if len(pattern) > 4 else repr(pattern)
            raise EdgemtpError(f"{path}: GGUF field {key} = {shown} must be a list of bools (true: sliding) or a "
                               "whole number")
        if len(pattern) < layers:
            raise EdgemtpError(f"{path}: GGUF field {key} lists {len(pattern)} layers of {layers}")
        return ["sliding_attention" if p else "full_attention" for p in pattern[:layers]]
    pattern = field(meta, key, path, int, 6, least=1)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def _llama_config(meta: dict, config: dict, shapes: dict, path: Path) -> dict:
    """llama, smollm3, qwen2 and qwen3 (the file's q/k/v biases say attention_bias; qwen2 has them whatever it
    says). smollm3 leaves RoPE out of every 4th layer: llama.cpp hard-codes that step (the file has no key for
    it), as SmolLM3Config's default no_rope_layer_interval."""
    arch = meta["general.architecture"]
    rotary = field(meta, f"{arch}.rope.dimension_count", path, int, config["head_dim"], least=1)
    if rotary != config["head_dim"]:
        raise EdgemtpError(f"{path}: {arch}.rope.dimension_count = {rotary} (partial rotary) is not supported")
    if ROPE_FREQS in shapes and arch != "llama":
        raise EdgemtpError(f"{path}: tensor {ROPE_FREQS} (RoPE frequency factors) is not supported for {arch}")
    extra = {"hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in shapes}
    if arch in ("llama", "smollm3"):
        extra["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    if arch == "smollm3":
        extra["no_rope_layer_interval"] = 4
    if arch != "llama":  # no sliding window: llama.cpp runs every qwen2 / qwen3 / smollm3 layer on the whole context
        extra["use_sliding_window"] = False
    return extra


def llama3_scaling(divisors: list, config: dict, path: Path) -> dict | None:
    """Llama 3.1+'s RoPE scaling from the per-frequency divisors llama.cpp stores in its place (rope_freqs,
    computed by convert_hf_to_gguf.py from the llama3 parameters, which the file does not keep): parameters
    that give these divisors by transformers' llama3 formula, checked against them. The original length, low
    and high frequency factors enter the divisors only through two combinations, so with 8192 as the original
    length (Llama 3.1's and 3.2's) the other two follow from two frequencies in the smoothed band; Llama 3's
    own (1, 4) are tried first. None: every divisor 1 (no scaling)."""
    dim = config["head_dim"]
    r = np.asarray(divisors, np.float64)
    if r.shape != (dim // 2,):
        raise EdgemtpError(f"{path}: tensor {ROPE_FREQS} holds {r.size} factors; heads of {dim} need {dim // 2} "
                           "(one per rotated pair)")
    bad = np.flatnonzero(~np.isfinite(r) | (r < 1 - 1e-6))  # the count was right, a value is not
    if bad.size:
        raise EdgemtpError(f"{path}: tensor {ROPE_FREQS} holds {float(r[bad[0]]):.6g} at {bad[0]}, not a finite "
                           "factor of at least 1")
    factor = float(r.max())
    if factor <= 1 + 1e-6:
        return None
    inv_freq = config["rope_theta"] ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    original = 8192
    tries = [(1.0, 4.0)]
    band = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
    if band.sum() >= 2:  # smooth = (original / wavelen - low) / (high - low) at each: two unknowns, least squares
        smooth = (1 / r[band] - 1 / factor) / (1 - 1 / factor)
        lhs = np.stack([1 - smooth, smooth], axis=1)
        (low, high), *_ = np.linalg.lstsq(lhs, original * inv_freq[band] / (2 * np.pi), rcond=None)
        tries.append((float(low), float(high)))
    for low, high in tries:
        if 0 < low < high and np.allclose(_llama3_divisors(inv_freq, factor, low, high, original), r, rtol=1e-4):
            return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise EdgemtpError(f"{path}: tensor {ROPE_FREQS} holds factors that no llama3 RoPE scaling gives (only Llama "
                       "3.1's kind is supported)")


def _llama3_divisors(inv_freq: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """What each frequency is divided by under llama3 scaling (transformers' _compute_llama3_parameters)."""
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    scaled = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, scaled))


def _rope_scaling(meta: dict, arch: str, path: Path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if arch == "phi3":  # its LongRoPE factors are tensors (_phi3_config); another scaling would be left out silently
        if kind != "none":
            raise EdgemtpError(f"{path}: GGUF field phi3.rope.scaling.type = {kind!r} is not supported (phi3's "
                               "LongRoPE comes as the rope_factors_* tensors)")
        return None
    if kind == "none":
        return None
    if kind == "yarn":
        return _yarn_scaling(meta, arch, path)
    if kind != "linear":
        raise EdgemtpError(f"{path}: GGUF field {arch}.rope.scaling.type = {kind!r} is not supported (only linear "
                           "and yarn)")
    # llama.cpp scales cos and sin by attn_factor; transformers' linear scaling has no such parameter
    _check_neutral(meta, f"{arch}.rope.scaling", "linear", {"attn_factor": 1.0}, path)
    return {"rope_type": "linear", "factor": _f32(field(meta, f"{arch}.rope.scaling.factor", path, float, least=1))}


def _check_neutral(meta: dict, key: str, kind: str, neutral: dict, path: Path) -> None:
    """Refuses llama.cpp's fields under `key` that transformers' `kind` scaling has no parameter for, unless at the
    value that changes nothing."""
    for name, value_when_off in neutral.items():
        value = field(meta, f"{key}.{name}", path, float, None)
        if value is not None and value != value_when_off:
            raise EdgemtpError(f"{path}: GGUF field {key}.{name} = {value} is not supported with rope.scaling.type "
                               f"'{kind}' (transformers' {kind} has no such parameter; only {value_when_off} maps)")


# convert_hf_to_gguf.py's YaRN fields, written from a config.json's rope parameters of these names where it has them
_YARN_OPTIONAL = {"yarn_attn_factor": "attention_factor", "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}
# llama.cpp's own knobs, which transformers' yarn has no parameter for: only their neutral values can be mapped
_YARN_NEUTRAL = {"yarn_ext_factor": 1.0, "yarn_log_multiplier": 0.0, "attn_factor": 1.0}


def _yarn_scaling(meta: dict, arch: str, path: Path) -> dict:
    """transformers' rope_type 'yarn' parameters back from the fields convert_hf_to_gguf.py wrote them to (factor,
    original_context_length, and where the config had them yarn_attn_factor, yarn_beta_fast, yarn_beta_slow): the
    config.json the file was made from. transformers' own GGUF loader keeps no RoPE scaling for these
    architectures. Without original_context_length llama.cpp takes context_length, as transformers does."""
    key = f"{arch}.rope.scaling"
    # yarn_ext_factor: how much of the ramp extrapolates (transformers: all of it); yarn_log_multiplier
    # (DeepSeek's mscale_all_dim) and attn_factor scale cos and sin in llama.cpp by rules of its own
    _check_neutral(meta, key, "yarn", _YARN_NEUTRAL, path)
    rope = {"rope_type": "yarn", "factor": _f32(field(meta, f"{key}.factor", path, float, least=1)),
            "original_max_position_embeddings": field(meta, f"{key}.original_context_length", path, int,
                                                      field(meta, f"{arch}.context_length", path, int), least=1)}
    for name, hf in _YARN_OPTIONAL.items():
        value = field(meta, f"{key}.{name}", path, float, None, least=0)
        if value is not None:
            rope[hf] = _f32(value)
    return rope


def generation_config(meta: dict, config: dict) -> dict:
    """Stop on EOS and on the end-of-turn token when the vocabulary has one (chat models)."""
    eos = [config["eos_token_id"]] if config["eos_token_id"] is not None else []
    tokens = meta.get("tokenizer.ggml.tokens", [])
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if meta.get(key) is not None and meta[key] not in eos:
            eos.append(meta[key])
    if config["model_type"] in ("gemma3_text", "gemma2") and "<end_of_turn>" in tokens:
        eos.append(tokens.index("<end_of_turn>"))
    # Qwen's instruct models stop on <|im_end|> (the file's eos) and <|endoftext|>, as their generation_config
    if config["model_type"] in ("qwen2", "qwen3") and "<|endoftext|>" in tokens:
        eos.append(tokens.index("<|endoftext|>"))
    # Llama 3.x's files name one end token (instruct: <|eot_id|>) and no eot/eom field; llama.cpp ends a reply on
    # each of these, as the instruct models' generation_config does (<|eom_id|> follows a tool call)
    if config["model_type"] in ("llama", "smollm3"):
        eos += [tokens.index(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if t in tokens]
    # Phi-3's files name <|endoftext|> as eos and no eot; its chat turns end with <|end|>, on which llama.cpp (by the
    # token's text) and the instruct models' generation_config ([32000, 32001, 32007]) stop
    if config["model_type"] == "phi3":
        eos += [tokens.index(t) for t in ("<|endoftext|>", "<|end|>") if t in tokens]
    eos = list(dict.fromkeys(eos))
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": config["pad_token_id"]}


def _f32(x: float | None) -> float | None:
    """GGUF stores float32: write 1e-06, not 9.999999974752427e-07."""
    return None if x is None else float(str(np.float32(x)))
