"""Model configurations: frozen dataclasses parsed from a Hugging Face `config.json`.

`from_hf()` collects every problem it finds and raises them together, so a user fixing a config
sees the whole list at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .bundle import MANIFEST
from .errors import EdgemtpError, missing
from .json_file import read_json

SLIDING, FULL = "sliding_attention", "full_attention"
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu", "silu")  # the MLP activations components.py builds


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type. `fraction` < 1 rotates only the first dims (partial RoPE)."""

    theta: float
    kind: str = "default"  # default | linear | llama3 | proportional | longrope | yarn
    factor: float = 1.0
    fraction: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    ext_factors: tuple[float, ...] = ()  # longrope: each rotated pair's frequency divisor (the short factors)
    scale: float = 1.0  # longrope's and yarn's attention factor: cos and sin are multiplied by it
    beta_fast: float = 32.0  # yarn: the rotations that bound its ramp between interpolated and kept frequencies
    beta_slow: float = 1.0
    truncate: bool = True  # yarn: the ramp's bounds rounded outwards

    def __post_init__(self):  # a tuple whatever it came as (a drafter config's JSON gives a list)
        object.__setattr__(self, "ext_factors", tuple(self.ext_factors))


@dataclass(frozen=True)
class TextConfig:
    """Decoder-only text model facts shared by llama, qwen2, qwen3 and gemma3."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    layer_types: tuple[str, ...]
    rope: dict = field(hash=False)  # layer type -> Rope
    sliding_window: int | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v biases
    output_bias: bool = False  # an o_proj bias (llama's and qwen3's attention_bias; qwen2 has none)
    qk_norm: bool = False  # q and k RMS-normed per head before RoPE: qwen3 (x * w), gemma3 ((1 + w); gemma2 not)
    nope_layers: tuple[int, ...] = ()  # layers whose q and k are not rotated (smollm3's no_rope_layers)
    query_scale_beta: float | None = None  # ministral3's llama_4_scaling_beta: q *= 1 + b ln(1 + pos // original)
    embed_scale: float | None = None  # granite's embedding_multiplier (Gemma's sqrt(hidden) is its builder's)
    residual_scale: float = 1.0  # granite's residual_multiplier: each block's output times it before the add
    logit_scale: float = 1.0  # 1 / granite's logits_scaling
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int = 8192

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5


# Whole numbers beyond any model, refused as read, before anything is sized by them: num_hidden_layers 10**9
# built a list of 10**9 layer types (a MemoryError), head_dim 10**12 a RoPE table of terabytes (checkpoint
# shapes are checked after the graph is built), a number past int64 an OverflowError in the graph builder.
LIMITS = {"num_hidden_layers": 1 << 12, "head_dim": 1 << 14}
INT64 = (1 << 63) - 1


class Problems:
    """Collects config errors so they are reported together."""

    def __init__(self, source: str):
        self.source, self.items = source, []
        self.bad: set[str] = set()  # fields already reported (no knock-on "must be positive")

    def need(self, hf: dict, key: str, kind=int, default=None, within: str = ""):
        """hf[key] as `kind`; `within` names the object hf is (e.g. 'rope_scaling'), for messages."""
        value = hf.get(key, default)
        name = f"{within}.{key}" if within else key
        if value is None:
            self.items.append(f"missing field '{name}'")
            self.bad.add(name)
            return kind()
        what = "an integer" if kind is int else kind.__name__
        try:
            number = kind(value)
            # an int field takes 2048, 2048.0 or "2048" (and 10**30, past a float's precision: beyond any model
            # below), not 640.5 (int() would cut it to 640) or true; a float field not inf (1e400 as json reads it)
            # nor NaN, which every graph computes garbage from
            if kind is float and not math.isfinite(number):
                what = "a finite number"
            elif kind is not int or (not isinstance(value, bool) and (not isinstance(value, float) or value == number)):
                return number if kind is not int else self.within(name, number, LIMITS.get(key, INT64))
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity), which json.loads reads
            pass
        self.items.append(f"field '{name}' should be {what}, got {value!r}")
        self.bad.add(name)
        return kind()

    def within(self, name: str, number: int, limit: int) -> int:
        if abs(number) <= limit:
            return number
        self.items.append(f"field '{name}' {number} is beyond any model (at most {limit})")
        self.bad.add(name)
        return 0

    def opt(self, hf: dict, key: str, kind=int, default=None, within: str = ""):
        """An optional field: `default` when missing or null, else read as need() reads it."""
        return default if hf.get(key) is None else self.need(hf, key, kind, within=within)

    def flag(self, hf: dict, key: str, default: bool) -> bool:
        """A true / false field (`default` when missing or null): the string "false" is not taken for true."""
        value = hf.get(key)
        if value is None or isinstance(value, bool):
            return default if value is None else value
        self.items.append(f"field '{key}' should be true or false, got {value!r}")
        self.bad.add(key)
        return default

    def layer_types(self, hf: dict) -> list | None:
        """config.json's 'layer_types' (None when missing or empty): a string would be read letter by letter."""
        value = hf.get("layer_types")
        if value is not None and not isinstance(value, list):
            self.items.append(f"field 'layer_types' should be a list of layer types, got {value!r}")
            return None
        return value or None

    def token_ids(self, hf: dict, key: str) -> tuple[int, ...]:
        """A token id or a list of them (eos_token_id takes both); () when missing."""
        value = hf.get(key)
        ids = [] if value is None else value if isinstance(value, list) else [value]
        read = Problems(self.source)
        out = tuple(read.need({key: i}, key) for i in ids)  # each as need() reads an integer (2, 2.0, "2")
        if not read.items:
            return out
        self.items.append(f"field '{key}' should be a token id or a list of them, got {value!r}")
        self.bad.add(key)
        return ()

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if self.items:
            raise EdgemtpError(f"{self.source}: " + "; ".join(dict.fromkeys(self.items)))  # each problem once


def read_config_json(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise EdgemtpError(f"{model_dir}: not a directory (expected a model directory with config.json)")
    if not path.is_file():
        if (Path(model_dir) / MANIFEST).is_file():  # `export BUNDLE`: what it is, not the file it lacks
            raise EdgemtpError(f"{model_dir}: an edgemtp bundle ({MANIFEST}), not a model directory (config.json + "
                               "*.safetensors + tokenizer.json)")
        raise EdgemtpError(f"{path}: {missing(path)} (a model directory needs config.json)")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise EdgemtpError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def parse_rope(params, default_theta: float, pr: Problems, where: str, max_positions: int | None = None,
               top_original=None) -> Rope:
    """Accepts both the old `rope_theta`/`rope_scaling` and transformers 5's `rope_parameters`; `where` names
    the field the parameters came from, for messages. As transformers' standardize_rope_params, llama3's and
    yarn's original_max_position_embeddings is the top-level field where config.json has one (`top_original`,
    which wins), else the parameters', else `max_positions` (the model's max_position_embeddings)."""
    if params is not None and not isinstance(params, dict):
        pr.items.append(f"field '{where}' should be an object, got {params!r}")
        params = None
    p = dict(params or {})
    kind = p.get("rope_type", p.get("type", "default")) or "default"
    if kind in ("llama3", "yarn"):
        if top_original is not None:
            p["original_max_position_embeddings"] = top_original
        elif p.get("original_max_position_embeddings") is None and max_positions is not None:
            p["original_max_position_embeddings"] = max_positions
        original = p.get("original_max_position_embeddings")
        # yarn without a factor: transformers' max_position_embeddings / original_max_position_embeddings
        if kind == "yarn" and p.get("factor") is None and max_positions is not None and \
                isinstance(original, (int, float)) and not isinstance(original, bool) and original > 0:
            p["factor"] = max_positions / original
    # 0 is a real fraction (no pair rotated), not "unset": only null or absent means the whole head
    fraction = pr.opt(p, "partial_rotary_factor", float, None, where)
    fraction = 1.0 if fraction is None else fraction
    # transformers' llama and gemma3 rotate the whole head with 'default' RoPE (the factor is ignored) and fail
    # with 'linear' or 'llama3' (tables narrower than the head); only 'proportional' rotates a fraction
    pr.check(fraction == 1.0 or kind == "proportional" or f"{where}.partial_rotary_factor" in pr.bad,
             f"field '{where}.partial_rotary_factor' {fraction} is not supported with rope_type {kind!r} "
             "(only with 'proportional')")
    pr.check(0.0 <= fraction <= 1.0, f"field '{where}.partial_rotary_factor' {fraction} must be in [0, 1]")
    # LongRoPE's short factors and attention factor are read by phi3's parser alone (exporters/phi3.py): here
    # the Rope would have none, and building its tables failed with a numpy broadcasting error
    pr.check(kind != "longrope", f"field '{where}' rope_type 'longrope' is supported for phi3 only")
    # 0 was read as 1, where transformers divides the frequencies by it (infinite ones); a negative one turns the
    # rotation backwards (transformers warns that it must be at least 1). 'default' RoPE does not read it
    factor = pr.opt(p, "factor", float, 1.0, where)
    pr.check(kind in ("default", "longrope") or f"{where}.factor" in pr.bad or factor > 0,
             f"field '{where}.factor' {factor} must be positive")
    rope = Rope(
        theta=pr.opt(p, "rope_theta", float, default_theta, where),
        kind=kind,
        factor=factor,
        fraction=fraction,
        low_freq_factor=pr.opt(p, "low_freq_factor", float, 1.0, where),
        high_freq_factor=pr.opt(p, "high_freq_factor", float, 4.0, where),
        original_max_positions=pr.opt(p, "original_max_position_embeddings", int, 8192, where),
    )
    # yarn takes its log (a math domain error); llama3's wavelength bounds would all be 0 or negative
    original = "original_max_position_embeddings" if top_original is not None else \
        f"{where}.original_max_position_embeddings"
    pr.check(kind not in ("llama3", "yarn") or original in pr.bad or rope.original_max_positions > 0,
             f"field '{original}' {rope.original_max_positions} must be positive")
    return _yarn(rope, p, pr, where) if kind == "yarn" else rope


def _yarn(rope: Rope, p: dict, pr: Problems, where: str) -> Rope:
    """YaRN as transformers computes it (_compute_yarn_parameters): the same frequencies at every length, so a
    bundle of any capacity rotates as it does; cos and sin scaled by the attention factor (given, or from
    mscale / mscale_all_dim, or 0.1 ln(factor) + 1)."""
    for name in ("factor", "original_max_position_embeddings"):
        pr.check(p.get(name) is not None, f"field '{where}.{name}' is missing (rope_type 'yarn' needs it)")

    def mscale(m: float) -> float:
        return 1.0 if rope.factor <= 1 else 0.1 * m * math.log(rope.factor) + 1.0

    scale = pr.opt(p, "attention_factor", float, None, where)
    m, m_all = pr.opt(p, "mscale", float, None, where), pr.opt(p, "mscale_all_dim", float, None, where)
    if scale is None:
        scale = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)
    return replace(rope, scale=scale, beta_fast=pr.opt(p, "beta_fast", float, None, where) or 32.0,
                   beta_slow=pr.opt(p, "beta_slow", float, None, where) or 1.0,
                   truncate=pr.flag(p, "truncate", True))


def one_rope(hf: dict, pr: Problems, default_theta: float = 10000.0, max_positions: int | None = None) -> Rope:
    """The RoPE of a model with one for every layer, as transformers 5 reads it (convert_rope_params_to_dict):
    rope_scaling when set, else rope_parameters; a base neither gives from the top-level rope_theta, else the
    config class's default_theta."""
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    top = pr.opt(hf, "original_max_position_embeddings", int, None)  # transformers prefers it to the parameters'
    params = hf.get(where)
    fraction = pr.opt(hf, "partial_rotary_factor", float, None)
    if fraction is not None and "partial_rotary_factor" not in pr.bad and \
            (params is None or isinstance(params, dict)) and (params or {}).get("partial_rotary_factor") is None:
        # a default for the parameters' own (transformers' setdefault): left out, the whole head was rotated where
        # transformers rotates a part of it (proportional) or fails (tables narrower than the head)
        kind = (params or {}).get("rope_type", (params or {}).get("type", "default")) or "default"
        supported = fraction == 1.0 or kind == "proportional"
        pr.check(supported, f"field 'partial_rotary_factor' {fraction} is not supported with rope_type {kind!r} "
                 "(only with 'proportional')")
        if supported:
            params = {**(params or {}), "partial_rotary_factor": fraction}
    return parse_rope(params, pr.opt(hf, "rope_theta", float, default_theta), pr, where, max_positions, top)


def parse_gemma3(hf: dict, source: str) -> TextConfig:
    pr = Problems(source)
    n_layers = pr.need(hf, "num_hidden_layers")
    pattern = pr.opt(hf, "sliding_window_pattern", int, 6)
    given = pr.layer_types(hf)
    # 0 was read as 6 (transformers: layer i slides unless (i + 1) % pattern is 0, a ZeroDivisionError)
    pr.check(given or pattern != 0, "field 'sliding_window_pattern' must not be 0 (layer types are derived from it)")
    layer_types = tuple(given or [SLIDING if pattern and (i + 1) % pattern else FULL for i in range(n_layers)])
    max_positions = pr.opt(hf, "max_position_embeddings", int, 131_072)  # Gemma3TextConfig's default
    rope = _gemma3_rope(hf, pr, max_positions)
    cfg = TextConfig(
        model_type="gemma3_text",
        vocab_size=pr.need(hf, "vocab_size"),
        hidden_size=pr.need(hf, "hidden_size"),
        intermediate_size=pr.need(hf, "intermediate_size"),
        num_layers=n_layers,
        num_heads=pr.need(hf, "num_attention_heads"),
        num_kv_heads=pr.need(hf, "num_key_value_heads"),
        head_dim=pr.need(hf, "head_dim", int, 256),
        rms_norm_eps=pr.need(hf, "rms_norm_eps", float, 1e-6),
        layer_types=layer_types,
        rope=rope,
        sliding_window=_gemma3_window(hf, pr, layer_types),
        tie_word_embeddings=pr.flag(hf, "tie_word_embeddings", True),
        attention_scale=query_scale(pr.opt(hf, "query_pre_attn_scalar", float, 256.0), pr),  # 0: not 256
        attn_logit_softcapping=pr.opt(hf, "attn_logit_softcapping", float),
        final_logit_softcapping=pr.opt(hf, "final_logit_softcapping", float),
        hidden_activation=hf.get("hidden_activation") or "gelu_pytorch_tanh",
        bos_token_id=pr.opt(hf, "bos_token_id") if "bos_token_id" in hf else 2,  # null: no BOS
        eos_token_ids=pr.token_ids(hf, "eos_token_id") if "eos_token_id" in hf else (1,),  # null: none
        max_position_embeddings=max_positions,
        qk_norm=True,
    )
    check_common(cfg, pr)
    pr.check(len(layer_types) == n_layers, f"field 'layer_types' has {len(layer_types)} entries for {n_layers} layers")
    pr.check(not hf.get("use_bidirectional_attention"), "field 'use_bidirectional_attention' is not supported")
    pr.check(not pr.flag(hf, "attention_bias", False), "field 'attention_bias' is not supported")
    # null was read as 4096: transformers' Gemma 3 then has no window for its sliding layers and fails
    pr.check(SLIDING not in layer_types or "sliding_window" not in hf or hf["sliding_window"] is not None,
             "field 'sliding_window' is null, but layer_types names sliding layers (give their window)")
    # transformers' Gemma 3 keeps the field but never caps attention scores (nor does llama.cpp), while the
    # field says to: a checkpoint that sets it may have been made under either maths
    pr.check(cfg.attn_logit_softcapping is None,
             f"field 'attn_logit_softcapping' {cfg.attn_logit_softcapping} is not supported (transformers' Gemma 3 "
             "does not apply it; null)")
    pr.raise_if_any()
    return cfg


def _gemma3_rope(hf: dict, pr: Problems, max_positions: int) -> dict:
    """Layer type -> Rope as Gemma3TextConfig merges them: rope_parameters per layer type (old configs have none),
    rope_scaling updated into the full layers' parameters, and a base neither gives from the top-level rope_theta
    (full layers) or rope_local_base_freq (sliding layers)."""
    rp = hf.get("rope_parameters")
    rp = rp if isinstance(rp, dict) else {}  # a flat dict is not per layer type: transformers reads none of it
    full, sliding = (dict(rp[t]) if isinstance(rp.get(t), dict) else {"rope_type": "default"} for t in (FULL, SLIDING))
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict):
        # transformers 5 updates {"rope_type": "default"} with it, so an old 'type' alone is not read (4 read it)
        kind = scaling.get("type")
        pr.check(kind in (None, "default") or "rope_type" in scaling or full.get("rope_type", kind) == kind,
                 f"field 'rope_scaling.type' {kind!r} is not read by transformers' Gemma 3 (its RoPE stays "
                 "'default'): name it 'rope_type'")
        full.update(scaling)
    elif scaling is not None:
        pr.items.append(f"field 'rope_scaling' should be an object, got {scaling!r}")
    where = "rope_scaling" if scaling else f"rope_parameters.{FULL}"
    rope = {FULL: parse_rope(full, pr.opt(hf, "rope_theta", float, 1e6), pr, where, max_positions),
            SLIDING: parse_rope(sliding, pr.opt(hf, "rope_local_base_freq", float, 1e4), pr,
                                f"rope_parameters.{SLIDING}", max_positions)}
    # Gemma 3's RoPE parameters are per layer type, and transformers' yarn reads `truncate` from the outer
    # dict (config.rope_parameters.get("truncate", True)), which never has it: always truncated
    return {t: replace(r, truncate=True) for t, r in rope.items()}


# Gemma3TextConfig's defaults: a multimodal Gemma 3 (4B, 12B, 27B) config.json leaves some out of text_config
GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
                        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                        "head_dim": 256, "max_position_embeddings": 131_072}


def parse_gemma3_multimodal(hf: dict, source: str) -> TextConfig:
    """A multimodal `gemma3` config.json (Gemma3ForConditionalGeneration): its text_config, with
    Gemma3TextConfig's defaults where it is silent, tied by the multimodal config's own flag (default true)."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise EdgemtpError(f"{source}: model_type 'gemma3' needs a 'text_config' object")
    top = Problems(source)
    tie = top.flag(hf, "tie_word_embeddings", True)
    # transformers' generate stops on the multimodal config's own eos ids (Gemma 3 4B-it: [1, 106], <end_of_turn>
    # only there), text_config's only where it has none
    own = {"eos_token_id": list(top.token_ids(hf, "eos_token_id"))} if hf.get("eos_token_id") is not None else {}
    top.raise_if_any()
    return parse_gemma3({**GEMMA3_TEXT_DEFAULTS, **text, **own, "tie_word_embeddings": tie},
                        source + " (text_config)")


def query_scale(scalar: float, pr: Problems) -> float:
    """query_pre_attn_scalar ** -0.5; a negative one would make it a complex number (a crash in the builder),
    and 0 a ZeroDivisionError (both refused, with a stand-in returned so that every problem is listed)."""
    pr.check("query_pre_attn_scalar" in pr.bad or scalar > 0,
             f"field 'query_pre_attn_scalar' {scalar} must be positive")
    return abs(scalar) ** -0.5 if scalar else 1.0


def check_limits(cfg, pr: Problems) -> None:
    """Every architecture: token ids in the vocabulary, room for a prompt and a token."""
    if "vocab_size" not in pr.bad:  # a vocab_size already refused reads as 0: no "outside the vocabulary of 0"
        pr.check(cfg.bos_token_id is None or "bos_token_id" in pr.bad or 0 <= cfg.bos_token_id < cfg.vocab_size,
                 f"field 'bos_token_id' {cfg.bos_token_id} outside the vocabulary of {cfg.vocab_size}")
        pr.check(all(0 <= e < cfg.vocab_size for e in cfg.eos_token_ids),
                 f"field 'eos_token_id' {list(cfg.eos_token_ids)} outside the vocabulary of {cfg.vocab_size}")
    pr.check("max_position_embeddings" in pr.bad or cfg.max_position_embeddings >= 2,
             f"field 'max_position_embeddings' {cfg.max_position_embeddings} leaves no room for a prompt and a new "
             "token (at least 2)")


# TextConfig's names -> config.json's, for messages
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}
ROPE_KINDS = ("default", "linear", "llama3", "proportional", "longrope", "yarn")


def _gemma3_window(hf: dict, pr: Problems, layer_types: tuple[str, ...]) -> int:
    """sliding_window (null: refused in parse_gemma3). 0 was read as the default 4096, which transformers' Gemma 3
    never computes: its sliding layers then mask every key (a forward with its cache fails on the mask's size, one
    without gives eager and sdpa different logits), so 0 is kept for check_common to refuse where a layer
    slides. Where none does the window is unused, as in transformers."""
    window = pr.opt(hf, "sliding_window", int, 4096)
    return window if window or SLIDING in layer_types else 4096


def check_common(cfg: TextConfig, pr: Problems) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim"):
        field = HF_NAMES.get(name, name)
        pr.check(field in pr.bad or getattr(cfg, name) > 0, f"field '{field}' must be positive")
    check_limits(cfg, pr)
    pr.check(cfg.hidden_activation in ACTIVATIONS,
             f"activation {cfg.hidden_activation!r} unsupported ({', '.join(ACTIVATIONS)})")
    for rope in cfg.rope.values():
        pr.check(rope.kind in ROPE_KINDS, f"rope_type {rope.kind!r} unsupported ({', '.join(ROPE_KINDS)})")
    pr.check(cfg.sliding_window is None or cfg.sliding_window > 0,
             f"field 'sliding_window' {cfg.sliding_window} must be positive")
    if cfg.num_heads and cfg.num_kv_heads:
        pr.check(cfg.num_heads % cfg.num_kv_heads == 0,
                 f"num_attention_heads {cfg.num_heads} must be a multiple of num_key_value_heads {cfg.num_kv_heads}"
                 " (where config.json leaves it out: the transformers config class's default)")
    pr.check(cfg.head_dim % 2 == 0, "head_dim must be even (rotary embedding)")
    check_numbers(cfg, pr)
    for lt in dict.fromkeys(cfg.layer_types):  # each unknown type once
        pr.check(lt in (SLIDING, FULL), f"unknown layer type {lt!r} in 'layer_types'")


def check_numbers(cfg, pr: Problems) -> None:
    """Fields that would make every logit NaN or garbage rather than fail: a negative epsilon under the
    norms' square root, a RoPE base of 0 or less, a softcap of 0 (tanh(x / 0); null turns it off)."""
    pr.check("rms_norm_eps" in pr.bad or cfg.rms_norm_eps >= 0,
             f"field 'rms_norm_eps' {cfg.rms_norm_eps} must not be negative")
    theta_refused = any(n.endswith("rope_theta") or n == "rope_local_base_freq" for n in pr.bad)  # said so
    for rope in cfg.rope.values():
        pr.check(theta_refused or rope.theta > 0, f"rope_theta {rope.theta} must be positive")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = getattr(cfg, name, None)
        pr.check(cap is None or name in pr.bad or cap > 0, f"field '{name}' {cap} must be positive (null: none)")


# the llama family's parsers live in their own module; importers may take them from here too
from .config_llama import parse_llama, parse_mistral3_multimodal  # noqa: E402,F401
