"""Gemma 4's config.json (`gemma4_text`, or the `text_config` of a multimodal `gemma4` checkpoint): Gemma4Config,
and parse_config, which names every problem it finds. gemma4.py builds the graph."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ACTIVATIONS, FULL, SLIDING, Problems, Rope, check_limits, check_numbers
from ..errors import EdgemtpError

MODEL_TYPES = ("gemma4_text", "gemma4")
# transformers' defaults when config.json has no rope_parameters
DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")
# a multimodal config's placeholder tokens (transformers' Gemma4Config defaults), which its text tower embeds as pad
PLACEHOLDERS = {"image_token_id": 258_880, "video_token_id": 258_884, "audio_token_id": 258_881}


@dataclass(frozen=True)
class Gemma4Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]  # per layer
    kv_heads: tuple[int, ...]  # per layer
    rope: dict = field(hash=False)  # layer type -> Rope
    sliding_window: int = 512
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    ple_dim: int = 0  # hidden_size_per_layer_input; 0: no per-layer embeddings
    ple_vocab: int = 0  # vocab_size_per_layer_input
    bos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = (1,)
    max_position_embeddings: int = 131_072
    placeholder_ids: tuple[int, ...] = ()  # multimodal `gemma4`: read as pad_token_id (text_ids)
    pad_token_id: int = 0

    @property
    def first_shared(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def is_shared(self, i: int) -> bool:
        return i >= self.first_shared

    def kv_owner(self, i: int) -> int:
        """The layer whose cache layer i attends to: itself, or the last non-shared layer of its type."""
        if not self.is_shared(i):
            return i
        return max(j for j in range(self.first_shared) if self.layer_types[j] == self.layer_types[i])

    def drafter_kv(self) -> dict:
        """{layer type: last KV-owning layer of that type}: the caches an MTP drafter reads (DESIGN §2)."""
        return {t: max(j for j in range(self.first_shared) if self.layer_types[j] == t)
                for t in sorted(set(self.layer_types))}

    def type_head_dim(self, layer_type: str) -> int:
        return self.head_dims[self.layer_types.index(layer_type)]

    def mlp_width(self, i: int) -> int:
        return self.intermediate_size * (2 if self.use_double_wide_mlp and self.is_shared(i) else 1)

    @property
    def ignored_on_load(self) -> tuple[str, ...]:
        """Name prefixes of tensors transformers skips on load (`_keys_to_ignore_on_load_unexpected`): the K/V
        projections and norms of KV-shared layers, which own no KV. Google's E2B checkpoint still holds them
        (layers 15-34), so they are expected there, not a sign of a config.json from another checkpoint."""
        return tuple(f"model.layers.{i}.self_attn.{name}." for i in range(self.first_shared, self.num_layers)
                     for name in ("k_proj", "v_proj", "k_norm", "v_norm"))

    def values_are_keys(self, i: int) -> bool:
        """attention_k_eq_v applies to full-attention layers only (transformers: `use_alternative_attention`)."""
        return self.attention_k_eq_v and self.layer_types[i] == FULL


# --- config ---------------------------------------------------------------------------------------------


def parse_config(hf: dict, source: str) -> Gemma4Config:
    """config.json of a `gemma4_text` model, or of a multimodal `gemma4` one (its `text_config`)."""
    top = Problems(source)  # a multimodal config's own fields, named as its own (not its text_config's)
    placeholders = {}
    if hf.get("model_type") == "gemma4":
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise EdgemtpError(f"{source}: model_type 'gemma4' needs a 'text_config' object")
        # missing: transformers' default id; null: no such placeholder
        placeholders = {k: top.opt(hf, k) if k in hf else default for k, default in PLACEHOLDERS.items()}
        # transformers' generate stops on the multimodal config's own eos ids, text_config's only where it has none
        own = {"eos_token_id": list(top.token_ids(hf, "eos_token_id"))} if hf.get("eos_token_id") is not None else {}
        # Gemma4ForConditionalGeneration ties by its own config's flag (default true), whatever text_config says
        hf = {**text, **own, "tie_word_embeddings": top.flag(hf, "tie_word_embeddings", True)}
        source += " (text_config)"
    pr = Problems(source)
    vocab = pr.need(hf, "vocab_size")
    # ids outside the vocabulary never reach the graph
    placeholder_ids = tuple(sorted({i for i in placeholders.values() if i is not None and 0 <= i < vocab}))
    n = pr.need(hf, "num_hidden_layers")
    types = _layer_types(hf, n, pr)
    head_dims, kv_heads = _layer_shapes(hf, types, pr)
    cfg = Gemma4Config(
        model_type="gemma4_text",
        vocab_size=vocab,
        hidden_size=pr.need(hf, "hidden_size"),
        intermediate_size=pr.need(hf, "intermediate_size"),
        num_layers=n,
        num_heads=pr.need(hf, "num_attention_heads"),
        layer_types=types,
        head_dims=head_dims,
        kv_heads=kv_heads,
        rope=_ropes(hf.get("rope_parameters") or DEFAULT_ROPE, types, pr),
        sliding_window=pr.need(hf, "sliding_window", int, 512),
        rms_norm_eps=pr.need(hf, "rms_norm_eps", float, 1e-6),
        hidden_activation=str(hf.get("hidden_activation") or "gelu_pytorch_tanh"),
        final_logit_softcapping=pr.opt(hf, "final_logit_softcapping", float),
        tie_word_embeddings=pr.flag(hf, "tie_word_embeddings", True),
        attention_k_eq_v=pr.flag(hf, "attention_k_eq_v", False),
        num_kv_shared_layers=pr.need(hf, "num_kv_shared_layers", int, 0),
        use_double_wide_mlp=pr.flag(hf, "use_double_wide_mlp", False),
        ple_dim=_ple_dim(hf, pr),
        ple_vocab=pr.need(hf, "vocab_size_per_layer_input", int, 262_144),
        bos_token_id=pr.opt(hf, "bos_token_id") if "bos_token_id" in hf else 2,  # null: no BOS
        eos_token_ids=pr.token_ids(hf, "eos_token_id") if "eos_token_id" in hf else (1,),  # null: none
        max_position_embeddings=pr.need(hf, "max_position_embeddings", int, 131_072),
        placeholder_ids=placeholder_ids,
        pad_token_id=pr.opt(hf, "pad_token_id", int, 0),
    )
    _check(cfg, hf, pr)
    _raise_if_any(top, pr)
    return cfg


def _raise_if_any(*problems: Problems) -> None:
    """Every problem found, each under the name of the object that holds its field."""
    found = [p for p in problems if p.items]
    if found:
        raise EdgemtpError("; ".join(f"{p.source}: " + "; ".join(dict.fromkeys(p.items)) for p in found))


def _layer_types(hf: dict, n: int, pr: Problems) -> tuple[str, ...]:
    types = list(pr.layer_types(hf) or [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
    if types and types[-1] != FULL:
        types[-1] = FULL  # transformers forces the last layer to full attention (with a warning)
    return tuple(types)


def _layer_shapes(hf: dict, types: tuple[str, ...], pr: Problems) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(head dim, KV heads) of every layer: the global values, overridden per layer by `per_layer_config`
    (transformers >= 5 writes it) or, in older configs, by `global_head_dim` / `num_global_key_value_heads`
    on full layers (the latter only with `attention_k_eq_v`, as transformers does)."""
    base = {"head_dim": pr.need(hf, "head_dim", int, 256), "num_key_value_heads": pr.need(hf, "num_key_value_heads")}
    overrides = hf.get("per_layer_config")
    if overrides is None:
        full = {"head_dim": pr.need(hf, "global_head_dim", int, 512)}
        if hf.get("attention_k_eq_v") and hf.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = pr.need(hf, "num_global_key_value_heads")
        overrides = {i: full for i, t in enumerate(types) if t == FULL}
    if not isinstance(overrides, dict):
        pr.check(False, "field 'per_layer_config' should be an object {layer index: overrides}")
        overrides = {}
    layers = [dict(base) for _ in types]
    for key, over in overrides.items():
        i = int(key) if str(key).isdigit() else -1
        if not 0 <= i < len(types) or not isinstance(over, dict):
            pr.check(False, f"field 'per_layer_config' has a bad entry {key!r}: {over!r}")
            continue
        bad = sorted(set(over) - set(PER_LAYER_KEYS))
        pr.check(not bad, f"field 'per_layer_config' layer {i} overrides {bad} (supported: {list(PER_LAYER_KEYS)})")
        for k in PER_LAYER_KEYS:
            if k in over:
                layers[i][k] = pr.need(over, k)
    return tuple(layer["head_dim"] for layer in layers), tuple(layer["num_key_value_heads"] for layer in layers)


def _ropes(params: dict, types: tuple[str, ...], pr: Problems) -> dict:
    """Gemma 4's 'default' RoPE rotates the whole head (it ignores partial_rotary_factor); 'proportional'
    rotates a fraction of the frequency pairs (see rotary.inv_freq)."""
    out = {}
    for t in sorted(set(types)):
        p = params.get(t) if isinstance(params, dict) else None
        if not isinstance(p, dict) or p.get("rope_theta") is None:
            pr.check(False, f"field 'rope_parameters' needs {t!r} with a 'rope_theta'")
            continue
        kind = p.get("rope_type", "default")
        try:
            if kind == "default":
                out[t] = Rope(theta=float(p["rope_theta"]))
            elif kind == "proportional":
                # 0 is a real value here (no pair rotated: a NoPE layer), not "unset": only null means 1
                fraction = float(1.0 if p.get("partial_rotary_factor") is None else p["partial_rotary_factor"])
                pr.check(0.0 <= fraction <= 1.0, f"field 'rope_parameters.{t}.partial_rotary_factor' {fraction} "
                                                 "must be in [0, 1]")
                # transformers divides the frequencies by it: 0 makes them infinite (NaN logits), not 1
                factor = float(1.0 if p.get("factor") is None else p["factor"])
                pr.check(factor > 0, f"field 'rope_parameters.{t}.factor' {factor} must be positive (null: 1)")
                out[t] = Rope(theta=float(p["rope_theta"]), kind=kind, factor=factor, fraction=fraction)
            else:
                pr.check(False, f"field 'rope_parameters.{t}.rope_type' {kind!r} unsupported (default, proportional)")
        except (TypeError, ValueError):
            pr.check(False, f"field 'rope_parameters.{t}' has a non-numeric value: {p!r}")
    return out


def _ple_dim(hf: dict, pr: Problems) -> int:
    """transformers' default is 256; null or 0 turns per-layer embeddings off."""
    return pr.need(hf, "hidden_size_per_layer_input", int, 256) if hf.get("hidden_size_per_layer_input", 256) else 0


def _check(cfg: Gemma4Config, hf: dict, pr: Problems) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
        pr.check(getattr(cfg, name) > 0, f"field for {name} must be positive")
    check_limits(cfg, pr)
    pr.check(len(cfg.layer_types) == cfg.num_layers,
             f"field 'layer_types' has {len(cfg.layer_types)} entries for {cfg.num_layers} layers")
    for t in sorted(set(cfg.layer_types) - {SLIDING, FULL}):
        pr.check(False, f"unknown layer type {t!r} in 'layer_types'")
    for i, (d, nk) in enumerate(zip(cfg.head_dims, cfg.kv_heads)):
        pr.check(d > 0 and d % 2 == 0, f"layer {i}: head dim {d} must be positive and even")
        pr.check(nk > 0 and cfg.num_heads % nk == 0, f"layer {i}: num_attention_heads must be a multiple of "
                                                     f"its {nk} KV heads")
    for t in sorted(set(cfg.layer_types)):  # one RoPE table and one cache shape per type
        shapes = {(d, nk) for lt, d, nk in zip(cfg.layer_types, cfg.head_dims, cfg.kv_heads) if lt == t}
        pr.check(len(shapes) == 1, f"{t} layers differ in head dim / KV heads: {sorted(shapes)}")
    _check_sharing(cfg, pr)
    check_numbers(cfg, pr)
    pr.check(SLIDING not in cfg.layer_types or cfg.sliding_window > 0, "field 'sliding_window' must be positive")
    pr.check(cfg.ple_dim >= 0, "field 'hidden_size_per_layer_input' must not be negative")
    pr.check(not cfg.ple_dim or cfg.ple_vocab > 0, "field 'vocab_size_per_layer_input' must be positive")
    _check_pad(cfg, pr)
    pr.check(cfg.hidden_activation in ACTIVATIONS,
             f"field 'hidden_activation' {cfg.hidden_activation!r} unsupported ({', '.join(ACTIVATIONS)})")
    pr.check(not hf.get("enable_moe_block"), "field 'enable_moe_block': mixture-of-experts Gemma 4 is not supported")
    pr.check(not hf.get("attention_bias"), "field 'attention_bias' is not supported")
    pr.check(hf.get("use_bidirectional_attention") in (None, "vision"),
             f"field 'use_bidirectional_attention' {hf.get('use_bidirectional_attention')!r} is not supported")


def _check_pad(cfg: Gemma4Config, pr: Problems) -> None:
    """A multimodal checkpoint's placeholders are embedded as pad_token_id (text_ids), in the token and the
    per-layer tables: an id outside either would export, then fail in ONNX Runtime's Gather the first time a
    placeholder is read (transformers refuses such a config: nn.Embedding's padding_idx). A text-only graph
    never reads it."""
    if not cfg.placeholder_ids or "pad_token_id" in pr.bad:
        return
    tables = [("vocabulary", "vocab_size", cfg.vocab_size)]
    if cfg.ple_dim:
        tables.append(("per-layer embedding", "vocab_size_per_layer_input", cfg.ple_vocab))
    for what, name, size in tables:
        pr.check(0 <= cfg.pad_token_id < size, f"field 'pad_token_id' {cfg.pad_token_id} outside the {what} table "
                 f"({name} {size}): the image / video / audio placeholders {list(cfg.placeholder_ids)} are embedded "
                 "as it")


def _check_sharing(cfg: Gemma4Config, pr: Problems) -> None:
    k = cfg.num_kv_shared_layers
    if not 0 <= k < cfg.num_layers:
        pr.check(False, f"field 'num_kv_shared_layers' {k} must be in [0, num_hidden_layers={cfg.num_layers})")
        return
    owners = set(cfg.layer_types[:cfg.first_shared])
    missing = sorted(set(cfg.layer_types[cfg.first_shared:]) - owners)
    pr.check(not missing, f"field 'num_kv_shared_layers' {k} leaves no KV-owning layer of type(s) {missing}")
