"""Google's Gemma 4 assistant (`gemma4_assistant`, the MTP drafter of Gemma 4 E2B/E4B) as a drafter graph.

Built from the checkpoint's weights with our GraphBuilder, with the I/O of our own drafter (export.py), so
the runtime's DrafterSession runs either graph. Maths from transformers' `Gemma4AssistantForCausalLM` driven
by `SinglePositionMultiTokenCandidateGenerator` (tests/test_assistant.py checks it numerically):

  x     = pre_projection(concat(E_target[token] * sqrt(Hb), last_hidden))    [B, 1, 2*Hb] -> [B, 1, H]
  x     = decoder layers: Q-only attention over the target's KV, gated MLP, times `layer_scalar`
  x     = norm(x)                                                             [B, 1, H]
  next_hidden_state = post_projection(x)                                      [B, 1, Hb]
  head  = x @ E_own.T (full), or Gemma 4's masked embedding (clustered, head.py with GEMMA4_KEYS); on
          request (`context` > 0) that clustered head also scores the row's most recent tokens exactly, like
          our own drafters' (head.py `add_context`). Off by default: transformers' head has no such thing.

- The hidden it is fed is the target's `hidden_states[-1]`, which is post-final-norm for Gemma 4: exactly
  the target graph's `last_hidden_state` (tests/test_parity_gemma4.py), so the contract holds as is.
- Each layer reads the KV of the target's last KV-owning layer of its type (transformers' "store" layers =
  gemma4.Gemma4Config.drafter_kv). The token's input embedding is the target's (shared, like export.py);
  the head is the assistant's own draft-width table (`model.embed_tokens.weight`, or `lm_head.weight`
  untied), written into drafter.onnx.data. No soft-cap: the assistant applies none.
- Position: the query sits at L, the row's committed length, and reads cache rows j < L (the token at L is
  not in the cache): transformers' first draft after a prefill. Its sliding layers use a bidirectional
  window |q - kv| <= window flipped onto the past, i.e. rows L-1-window .. L-1 (window + 1 rows, one more
  than a causal sliding layer): we reproduce that. (In later rounds transformers hands the drafter the
  verify pass's KV cut to the new length, so a rejected draft's row at L can leak in; we never read rows
  >= L.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import contract as C
from ..checkpoint import Checkpoint
from ..config import SLIDING, Problems, read_config_json
from ..errors import ArgumentError, EdgemtpError
from ..exporters import components as nn
from ..exporters import rotary
from ..exporters import head as H
from ..exporters.builder import FLOAT, INT64, GraphBuilder
from ..exporters.checkpoint_checks import own_head
from ..exporters.gemma4 import Gemma4Config, parse_config
from . import DrafterConfig
from . import export as X

MODEL_TYPE = "gemma4_assistant"
GRAPH = X.GRAPH
# The target's input embedding, read from target.onnx.data; the assistant's own `model.embed_tokens.weight`
# (its head) keeps the plain name, so the target's gets a prefixed one in this graph.
TARGET_EMBEDDING = "target." + X.EMBEDDING
DRAFT_IDS, LOGITS, NEXT_HIDDEN = X.DRAFT_IDS, X.LOGITS, X.NEXT_HIDDEN
CANDIDATE_IDS, CANDIDATE_LOGITS = H.CANDIDATE_IDS, H.CANDIDATE_LOGITS
# why a head option is refused for an assistant without the clustered head (errors.ArgumentError's rule, after
# the option as the caller wrote it: drafter_top_k=2 from Python, --draft-top-k 2 from the CLI)
FULL_HEAD = "needs the clustered head, and this assistant has use_ordered_embeddings false, so its full head " \
    "scores every token"


@dataclass(frozen=True)
class AssistantConfig:
    text: Gemma4Config  # the assistant's own decoder (every layer KV-shared)
    backbone_hidden: int  # Hb: the target's hidden size
    target_kv: dict = field(hash=False)  # layer type -> target layer whose cache it reads
    tie_word_embeddings: bool = True
    num_centroids: int = 0  # > 0: the clustered head (use_ordered_embeddings)
    top_k: int = 0  # centroid_intermediate_top_k

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hidden(self) -> int:
        return self.text.hidden_size

    @property
    def head_key(self) -> str:
        return "model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"

    @property
    def clustered(self) -> H.ClusteredShape | None:
        return H.ClusteredShape(self.vocab_size, self.hidden, self.num_centroids, self.top_k) \
            if self.num_centroids else None

    def head(self, context: int = 0) -> H.ClusteredShape | None:
        """The clustered head scoring `context` recent tokens too (None: the full head, which takes none)."""
        if context and not self.clustered:
            raise ArgumentError(X.CONTEXT[0], context, FULL_HEAD, X.CONTEXT[1])
        return replace(self.clustered, context=context) if self.clustered else None

    def with_top_k(self, top_k: int | None) -> "AssistantConfig":
        """--draft-top-k: the clusters its masked embedding scores (None: the checkpoint's
        centroid_intermediate_top_k; 0: the full head over its own table, as with use_ordered_embeddings false)."""
        if top_k is None:
            return self
        if top_k == 0:
            return replace(self, num_centroids=0, top_k=0)
        if not self.clustered:
            raise ArgumentError(X.TOP_K[0], top_k, FULL_HEAD, X.TOP_K[1])
        if not 1 <= top_k <= self.num_centroids:
            raise ArgumentError(X.TOP_K[0], top_k, "must be 0 (the full head) or between 1 and the head's "
                                f"{self.num_centroids} clusters", X.TOP_K[1])
        return replace(self, top_k=top_k)

    def kv_shape(self, layer_type: str) -> tuple[int, int]:
        """(KV heads, head dim) its layers of that type expect of the target's cache."""
        i = self.text.layer_types.index(layer_type)
        return self.text.kv_heads[i], self.text.head_dims[i]

    def layer_config(self, layer_type: str) -> DrafterConfig:
        """Its layers of one type, as our own drafter's layer() reads them (same maths, that type's shape)."""
        t = self.text
        nk, d = self.kv_shape(layer_type)
        return DrafterConfig(
            vocab_size=t.vocab_size, backbone_hidden=self.backbone_hidden, hidden=t.hidden_size,
            intermediate=t.intermediate_size, num_heads=t.num_heads, num_kv_heads=nk, head_dim=d,
            layer_types=t.layer_types, target_kv=self.target_kv, rope=t.rope, sliding_window=t.sliding_window,
            rms_norm_eps=t.rms_norm_eps, attention_scale=1.0, hidden_activation=t.hidden_activation,
            embed_scale=math.sqrt(self.backbone_hidden), target_model_type="gemma4_text")

    def to_json(self) -> dict:
        t = self.text
        return {"model_type": MODEL_TYPE, "vocab_size": t.vocab_size, "backbone_hidden": self.backbone_hidden,
                "hidden": t.hidden_size, "num_layers": t.num_layers, "layer_types": list(t.layer_types),
                "head_dims": list(t.head_dims), "kv_heads": list(t.kv_heads), "sliding_window": t.sliding_window,
                "target_kv": dict(self.target_kv)}


def is_assistant(drafter_dir: Path) -> bool:
    path = Path(drafter_dir) / "config.json"
    return path.is_file() and read_config_json(drafter_dir).get("model_type") == MODEL_TYPE


def load_config(drafter_dir: Path, target: C.TargetContract) -> AssistantConfig:
    """The assistant in `drafter_dir`, checked against the target it will read from."""
    hf = read_config_json(drafter_dir)
    source = str(Path(drafter_dir) / "config.json")
    text = hf.get("text_config")
    if hf.get("model_type") != MODEL_TYPE or not isinstance(text, dict):
        raise EdgemtpError(f"{source}: not a {MODEL_TYPE} config (needs model_type {MODEL_TYPE!r} and a "
                           "'text_config' object)")
    # every assistant layer is KV-shared; parse it as an unshared decoder (shared layers only change
    # the MLP width, which the assistant never doubles)
    t = parse_config({**text, "num_kv_shared_layers": 0}, source + " (text_config)")
    pr = Problems(source)
    # flags as transformers reads them: the string "false" is not true (it refuses one)
    ordered = pr.flag(hf, "use_ordered_embeddings", False)
    cfg = AssistantConfig(t, pr.need(hf, "backbone_hidden_size", int, 1536), dict(target.drafter_kv),
                          pr.flag(hf, "tie_word_embeddings", True),
                          pr.need(hf, "num_centroids", int, 2048) if ordered else 0,
                          pr.need(hf, "centroid_intermediate_top_k", int, 32) if ordered else 0)
    pr.check(not t.ple_dim, "text_config.hidden_size_per_layer_input must be 0 for an assistant")
    pr.check(not t.use_double_wide_mlp, "text_config.use_double_wide_mlp must be false for an assistant")
    if ordered:
        pr.check(cfg.num_centroids > 0 and t.vocab_size % cfg.num_centroids == 0,
                 f"num_centroids {cfg.num_centroids} must divide text_config.vocab_size {t.vocab_size}")
        pr.check(0 < cfg.top_k <= cfg.num_centroids,
                 f"centroid_intermediate_top_k {cfg.top_k} must be in [1, num_centroids]")
    pr.raise_if_any()
    check_pair(cfg, target, Path(drafter_dir))
    # tie_word_embeddings true beside an lm_head.weight of other values: transformers does not tie them and
    # its logits (the masked embedding's too) come from lm_head.weight, as the target's (own_head)
    return own_head(cfg, Checkpoint(drafter_dir))


def check_pair(cfg: AssistantConfig, target: C.TargetContract, drafter_dir: Path) -> None:
    """Refuses an assistant trained for another target, naming every field that differs."""
    bad = []
    if cfg.backbone_hidden != target.hidden_size:
        bad.append(f"backbone_hidden_size {cfg.backbone_hidden} != target hidden_size {target.hidden_size}")
    if cfg.vocab_size != target.vocab_size:
        bad.append(f"text_config.vocab_size {cfg.vocab_size} != target vocab_size {target.vocab_size}")
    slots = {s.layer: s for s in target.kv}
    for t in sorted(set(cfg.text.layer_types)):
        slot = slots.get(target.drafter_kv.get(t, -1))
        if slot is None:
            bad.append(f"text_config.layer_types has {t} layers, the target offers no {t} KV "
                       f"(drafter KV: {target.drafter_kv})")
            continue
        nk, d = cfg.kv_shape(t)
        if d != slot.head_dim:
            bad.append(f"{t} head_dim {d} != target layer {slot.layer}'s {slot.head_dim}")
        if nk != slot.num_heads:
            bad.append(f"{t} num_key_value_heads {nk} != target layer {slot.layer}'s {slot.num_heads}")
    if bad:
        raise EdgemtpError(f"{drafter_dir}: {MODEL_TYPE} does not match this target: " + "; ".join(bad))


# --- graph ----------------------------------------------------------------------------------------------


def build(cfg: AssistantConfig, int8_ordering: np.ndarray | None = None, context: int = 0) -> GraphBuilder:
    """The assistant's step graph; `int8_ordering` (its masked embedding's token ordering): the clustered
    head scores its candidates from int8 copies of its table (export.HEAD_ROWS); `context` > 0: that head
    takes `context_ids` [B, context] and scores those tokens too."""
    t, hb, head = cfg.text, cfg.backbone_hidden, cfg.head(context)
    b = GraphBuilder("gemma4_assistant")
    ids = b.input(X.INPUT_IDS, INT64, ["batch", 1])
    last = b.input(X.LAST_HIDDEN, FLOAT, ["batch", 1, hb])
    pos = b.input(X.POSITION_IDS, INT64, ["batch", 1])
    recent = b.input(H.CONTEXT_IDS, INT64, ["batch", context]) if context else None
    types = sorted(set(t.layer_types))
    kv = {lt: _kv_inputs(b, cfg, lt) for lt in types}
    e = nn.embed(b, ids, TARGET_EMBEDDING, cfg.vocab_size, hb, math.sqrt(hb))
    x = nn.linear(b, b.op("Concat", e, last, axis=-1), "pre_projection.weight", 2 * hb, t.hidden_size)
    views = {lt: X.committed_view(b, pos, _span(t, lt)) for lt in types}
    tables = {lt: rotary.rope_tables(b, t.rope[lt], t.type_head_dim(lt), pos) for lt in types}
    layers = {lt: cfg.layer_config(lt) for lt in types}
    for i, lt in enumerate(t.layer_types):
        p = f"model.layers.{i}."
        x = X.layer(b, layers[lt], p, x, kv[lt], views[lt], tables[lt])
        x = b.op("Mul", x, b.param(p + "layer_scalar", (1,)))
    x = nn.rms_norm(b, x, "model.norm.weight", t.hidden_size, t.rms_norm_eps)
    if head:
        X.clustered_outputs(b, x, head, cfg.head_key, None, H.GEMMA4_KEYS, int8_ordering, recent)
    else:
        logits = nn.tied_head(b, x, cfg.head_key, cfg.vocab_size, t.hidden_size)
        b.output(b.op("ArgMax", logits, axis=-1, keepdims=0), DRAFT_IDS, INT64, ["batch", 1])
        b.output(logits, LOGITS, FLOAT, ["batch", 1, cfg.vocab_size])
    state = nn.linear(b, x, "post_projection.weight", t.hidden_size, hb)
    b.output(state, NEXT_HIDDEN, FLOAT, ["batch", 1, hb])
    return b


def _span(t: Gemma4Config, layer_type: str) -> int | None:
    """committed_view's window that yields rows L-1-window .. L-1 (see the module docstring)."""
    return t.sliding_window + 2 if layer_type == SLIDING else None


def _kv_inputs(b: GraphBuilder, cfg: AssistantConfig, layer_type: str) -> tuple[str, str]:
    nk, d = cfg.kv_shape(layer_type)
    layer, shape = cfg.target_kv[layer_type], ["batch", nk, "capacity", d]
    return b.input(C.past_key(layer), FLOAT, shape), b.input(C.past_value(layer), FLOAT, shape)


def contract(cfg: AssistantConfig, head_rows: str = "fp32", context: int = 0) -> dict:
    """The manifest's graphs.drafter.contract: export.contract()'s fields, this config and head."""
    scores = [CANDIDATE_IDS, CANDIDATE_LOGITS] if cfg.clustered else [LOGITS]
    recent = [H.CONTEXT_IDS] if context else []
    return {"kind": "mtp", "config": cfg.to_json(), "kv_layers": sorted(set(cfg.target_kv.values())),
            "inputs": [X.INPUT_IDS, X.LAST_HIDDEN, X.POSITION_IDS, *recent],
            "outputs": [DRAFT_IDS, *scores, NEXT_HIDDEN], "hidden": C.HIDDEN_KIND,
            "head": X.head_json(cfg.head(context), head_rows)}


def write(out_dir: Path, drafter_dir: Path, target_graph: Path, cfg: AssistantConfig,
          share_embedding: bool = True, head_rows: str = "fp32", context: int = 0, progress=None) -> dict:
    """Writes drafter.onnx + drafter.onnx.data into `out_dir` (a bundle being built, beside `target_graph`)
    and returns the manifest's graph entry.

    The target's input embedding is shared (its initializer points into the target's data file) or, with
    share_embedding False, copied; every other tensor comes from the assistant's checkpoint. head_rows
    "int8": the clustered head reads int8 copies of the assistant's table (written to drafter.onnx.data).
    context: recent tokens its clustered head scores too (0: none, as transformers' head)."""
    out_dir, drafter_dir, target_graph = Path(out_dir), Path(drafter_dir), Path(target_graph)
    X.check_head_rows(head_rows, cfg.clustered)
    ckpt = Checkpoint(drafter_dir)
    ordering = np.asarray(ckpt[H.GEMMA4_KEYS.token_ordering]) if head_rows == "int8" else None
    X.check_context(context)
    X.save(build(cfg, ordering, context), out_dir / GRAPH, ckpt, target_graph, TARGET_EMBEDDING, cfg,
           share_embedding, progress=progress)
    return {"file": GRAPH, "quant": "fp32", "contract": contract(cfg, head_rows, context)}
