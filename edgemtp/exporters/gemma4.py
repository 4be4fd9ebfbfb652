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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import contract as C
from ..config import ACTIVATIONS, FULL, SLIDING, Problems, Rope, check_limits, check_numbers
from ..errors import EdgemtpError
from . import components as nn
from . import rotary
from .builder import GraphBuilder

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
        # Gemma4ForConditionalGeneration ties by its own config's flag (default true), whatever text_config says
        hf = {**text, "tie_word_embeddings": top.flag(hf, "tie_word_embeddings", True)}
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
        eos_token_ids=pr.token_ids(hf, "eos_token_id") or (1,),
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


# --- graph ----------------------------------------------------------------------------------------------


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
    # GQA scores a sliding layer's whole past: one-row passes hand it only the window's end of the buffer,
    # which is contiguous memory when the layer has one KV head (TargetContract.window_offset)
    window_views = all(s.num_heads == 1 for s in slots if s.window)
    window = nn.window_lengths(b) if window_views else None
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
                               window_views=window_views)


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
