"""The MTP drafter as an ONNX graph (built with our GraphBuilder from the trained weights) and its runner.

One graph call = one draft step for B rows (DESIGN.md §2; maths in model.py):

  inputs   input_ids [B, 1] int64         the last token (not in the cache yet)
           last_hidden_state [B, 1, Hb]   the target's (post-final-norm) hidden that produced it, or the
                                          previous step's next_hidden_state
           position_ids [B, 1] int64      L: the row's committed cache length (= the last token's position)
           past_key_values.{l}.key/value  [B, Nk, capacity, D]: the target's own cache buffers for the
                                          layers in contract.drafter_kv, bound read-only (never written)
  outputs  draft_ids [B, 1] int64, logits [B, 1, V], next_hidden_state [B, 1, Hb]

Attention reads rows j < L (sliding layers: j > L - window), sliced out of the buffers with standard ops:
com.microsoft GroupQueryAttention always appends to the cache it reads. The embedding table (Gather for
the input, Gemm for the tied head) is the target's: with `share_embedding` the initializer points into
`target.onnx.data`, so no second 671 MB copy is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .. import bundle as bundle_mod
from .. import contract as C
from ..checkpoint import Checkpoint
from ..errors import EdgemtpError
from ..exporters import components as nn
from ..exporters.builder import FLOAT, INT64, GraphBuilder, _align, _set_external
from . import DrafterConfig, load_config

GRAPH = "drafter.onnx"
EMBEDDING = "model.embed_tokens.weight"  # the target's key; the drafter graph reuses it
INPUT_IDS, LAST_HIDDEN, POSITION_IDS = C.INPUT_IDS, C.LAST_HIDDEN, C.POSITION_IDS
DRAFT_IDS, LOGITS, NEXT_HIDDEN = "draft_ids", C.LOGITS, "next_hidden_state"


def build(cfg: DrafterConfig) -> GraphBuilder:
    b = GraphBuilder("mtp_drafter")
    ids = b.input(INPUT_IDS, INT64, ["batch", 1])
    last = b.input(LAST_HIDDEN, FLOAT, ["batch", 1, cfg.backbone_hidden])
    pos = b.input(POSITION_IDS, INT64, ["batch", 1])
    kv = {t: _kv_inputs(b, cfg, layer) for t, layer in sorted(cfg.target_kv.items())}
    e = nn.embed(b, ids, EMBEDDING, cfg.vocab_size, cfg.backbone_hidden, cfg.embed_scale)
    x = nn.linear(b, b.op("Concat", e, last, axis=-1), "pre_projection.weight", 2 * cfg.backbone_hidden, cfg.hidden)
    types = sorted(set(cfg.layer_types))
    views = {t: committed_view(b, pos, cfg.window(t)) for t in types}
    tables = {t: nn.rope_tables(b, cfg.rope[t], cfg.head_dim, pos) for t in types}
    for i, t in enumerate(cfg.layer_types):
        x = layer(b, cfg, f"model.layers.{i}.", x, kv[t], views[t], tables[t])
    x = nn.rms_norm(b, x, "model.norm.weight", cfg.hidden, cfg.rms_norm_eps)
    state = nn.linear(b, x, "post_projection.weight", cfg.hidden, cfg.backbone_hidden)
    logits = nn.softcap(b, nn.tied_head(b, state, EMBEDDING, cfg.vocab_size, cfg.backbone_hidden),
                        cfg.final_logit_softcapping)
    b.output(b.op("ArgMax", logits, axis=-1, keepdims=0), DRAFT_IDS, INT64, ["batch", 1])
    b.output(logits, LOGITS, FLOAT, ["batch", 1, cfg.vocab_size])
    b.output(state, NEXT_HIDDEN, FLOAT, ["batch", 1, cfg.backbone_hidden])
    return b


def _kv_inputs(b: GraphBuilder, cfg: DrafterConfig, layer: int) -> tuple[str, str]:
    shape = ["batch", cfg.num_kv_heads, "capacity", cfg.head_dim]
    return b.input(C.past_key(layer), FLOAT, shape), b.input(C.past_value(layer), FLOAT, shape)


def layer(b: GraphBuilder, cfg: DrafterConfig, p: str, x: str, kv, view: nn.CacheView, rope: nn.RopeTables) -> str:
    """Sandwich-normed Q-only attention + gated MLP: [B, 1, H] -> [B, 1, H]."""
    h, eps, n, d = cfg.hidden, cfg.rms_norm_eps, cfg.num_heads, cfg.head_dim
    a = nn.rms_norm(b, x, p + "input_layernorm.weight", h, eps)
    q = nn.heads(b, nn.linear(b, a, p + "self_attn.q_proj.weight", h, n * d), n, d)
    q = nn.apply_rope(b, nn.rms_norm(b, q, p + "self_attn.q_norm.weight", d, eps), rope, d)
    a = attend(b, nn.merge_heads(b, q), kv, view, n, cfg.num_kv_heads, d, cfg.attention_scale)
    a = nn.linear(b, a, p + "self_attn.o_proj.weight", n * d, h)
    x = b.op("Add", x, nn.rms_norm(b, a, p + "post_attention_layernorm.weight", h, eps))
    m = nn.gated_mlp(b, nn.rms_norm(b, x, p + "pre_feedforward_layernorm.weight", h, eps), p + "mlp.", h,
                     cfg.intermediate, cfg.hidden_activation)
    return b.op("Add", x, nn.rms_norm(b, m, p + "post_feedforward_layernorm.weight", h, eps))


def committed_view(b: GraphBuilder, pos: str, window: int | None) -> nn.CacheView:
    """Cache rows [start, end) with end = max L, and the mask: row b's query sees j < L_b (and j > L_b - window).

    A sliding view starts at the earliest row any query can see, so only ~window rows are read."""
    end = b.op("Reshape", b.op("ReduceMax", pos, keepdims=0), b.const([1], np.int64))
    start = b.const([0], np.int64)
    if window:
        first = b.op("Sub", b.op("ReduceMin", pos, keepdims=0), b.const(window - 1, np.int64))
        start = b.op("Reshape", b.op("Max", first, b.const(0, np.int64)), b.const([1], np.int64))
    keys = b.op("Range", b.op("Squeeze", start), b.op("Squeeze", end), b.const(1, np.int64))  # [T]
    p = b.op("Unsqueeze", pos, b.const([-1], np.int64))  # [B, 1, 1]
    ok = b.op("Less", keys, p)
    if window:
        ok = b.op("And", ok, b.op("Greater", keys, b.op("Sub", p, b.const(window, np.int64))))
    bias = b.op("Where", ok, b.const(np.float32(0)), b.const(np.float32(np.finfo(np.float32).min)))
    return nn.CacheView(start, end, b.op("Unsqueeze", bias, b.const([1, 2], np.int64)))  # [B, 1, 1, 1, T]


def attend(b: GraphBuilder, q: str, kv: tuple[str, str], view: nn.CacheView, n: int, nk: int, d: int,
           scale: float) -> str:
    """q [B, 1, N*D] over the view's rows of k/v [B, Nk, cap, D] -> [B, 1, N*D]; query head h reads kv head h // G."""
    g, axis = n // nk, b.const([2], np.int64)

    def rows(name: str) -> str:  # [B, Nk, cap, D] -> [B, Nk, 1, T, D]
        return b.op("Unsqueeze", b.op("Slice", name, view.start, view.end, axis), b.const([2], np.int64))

    qh = b.op("Transpose", b.op("Reshape", q, b.const([0, 0, nk, g, d], np.int64)), perm=[0, 2, 3, 1, 4])
    scores = b.op("MatMul", qh, b.op("Transpose", rows(kv[0]), perm=[0, 1, 2, 4, 3]))  # [B, Nk, G, 1, T]
    if scale != 1.0:
        scores = b.op("Mul", scores, b.const(np.float32(scale)))
    probs = b.op("Softmax", b.op("Add", scores, view.bias), axis=-1)
    out = b.op("Transpose", b.op("MatMul", probs, rows(kv[1])), perm=[0, 3, 1, 2, 4])
    return b.op("Reshape", out, b.const([0, 0, n * d], np.int64))


def contract(cfg: DrafterConfig) -> dict:
    """The manifest's graphs.drafter.contract: what the runtime binds and reads."""
    return {"kind": "mtp", "config": cfg.to_json(), "kv_layers": sorted(set(cfg.target_kv.values())),
            "inputs": [INPUT_IDS, LAST_HIDDEN, POSITION_IDS], "outputs": [DRAFT_IDS, LOGITS, NEXT_HIDDEN],
            "hidden": "post_final_norm"}


def write(out_dir: Path, drafter_dir: Path, target_graph: Path, share_embedding: bool = True) -> list[str]:
    """Writes drafter.onnx + drafter.onnx.data into `out_dir` (a bundle being built, beside `target_graph`).

    share_embedding: the embedding initializer points at the target's bytes in its external data file
    (which must then sit in `out_dir` too); False copies those bytes into drafter.onnx.data.
    Returns the file names written."""
    out_dir, drafter_dir, target_graph = Path(out_dir), Path(drafter_dir), Path(target_graph)
    cfg = load_config(drafter_dir)
    b = build(cfg)
    model, weights = b.model(), Checkpoint(drafter_dir)
    location, offset, length = embedding_location(target_graph, cfg)
    if share_embedding and target_graph.parent.resolve() != out_dir.resolve():
        raise EdgemtpError(f"{target_graph}: a shared embedding needs the target graph in {out_dir}")
    inits = {t.name: t for t in model.graph.initializer}
    data_name = GRAPH + ".data"
    with open(out_dir / data_name, "wb") as f:
        for prm in b.params.values():
            if prm.source == EMBEDDING and share_embedding:
                _set_external(inits[prm.name], location, offset, length)
                continue
            arr = _embedding(target_graph.parent / location, offset, cfg) if prm.source == EMBEDDING \
                else weights[prm.source]
            arr = np.ascontiguousarray(prm.transform(arr) if prm.transform else arr, dtype=prm.dtype)
            if tuple(arr.shape) != prm.shape:
                raise EdgemtpError(f"{drafter_dir}: tensor '{prm.source}' has shape {list(arr.shape)}, "
                                   f"config.json implies {list(prm.shape)}")
            pos = _align(f)
            f.write(arr.tobytes())
            _set_external(inits[prm.name], data_name, pos, arr.nbytes)
    onnx.save(model, str(out_dir / GRAPH))
    return [GRAPH, data_name]


def embedding_location(target_graph: Path, cfg: DrafterConfig) -> tuple[str, int, int]:
    """(file, offset, length) of the target's fp32 embedding [V, Hb] in its external data."""
    g = onnx.load(str(target_graph), load_external_data=False)
    t = next((t for t in g.graph.initializer if t.name == EMBEDDING), None)
    want = [cfg.vocab_size, cfg.backbone_hidden]
    if t is None or t.data_type != onnx.TensorProto.FLOAT or list(t.dims) != want:
        raise EdgemtpError(f"{target_graph}: no float32 initializer '{EMBEDDING}' {want} to share with the drafter")
    ext = {e.key: e.value for e in t.external_data}
    if "location" not in ext:
        raise EdgemtpError(f"{target_graph}: '{EMBEDDING}' is not stored as external data")
    return ext["location"], int(ext.get("offset", 0)), int(ext["length"])


def _embedding(path: Path, offset: int, cfg: DrafterConfig) -> np.ndarray:
    return np.memmap(path, np.float32, "r", offset, (cfg.vocab_size, cfg.backbone_hidden))


def add_to_bundle(bundle_dir: Path, drafter_dir: Path, share_embedding: bool = True) -> Path:
    """Adds (or replaces) the drafter graph of an existing bundle and rewrites its manifest.

    The exporter proper should call `write()` inside its atomic bundle directory instead; this is for tests,
    benchmarks and bundles exported before the drafter existed."""
    bundle_dir = Path(bundle_dir)
    b = bundle_mod.load(bundle_dir, verify=False)
    cfg = load_config(drafter_dir)
    target = b.target_contract
    if (target.hidden_size, target.vocab_size) != (cfg.backbone_hidden, cfg.vocab_size) or \
            {int(v) for v in target.drafter_kv.values()} != set(cfg.target_kv.values()):
        raise EdgemtpError(f"{drafter_dir}: drafter was trained for another target (hidden {cfg.backbone_hidden}, "
                           f"vocab {cfg.vocab_size}, kv layers {cfg.target_kv}); bundle has {target.hidden_size}, "
                           f"{target.vocab_size}, {target.drafter_kv}")
    write(bundle_dir, drafter_dir, b.graph("target").path, share_embedding)
    m = {k: v for k, v in b.manifest.items() if k not in ("files", "format", "schema_version")}
    m["graphs"] = {**m["graphs"], "drafter": {"file": GRAPH, "quant": "fp32", "contract": contract(cfg)}}
    bundle_mod.write_manifest(bundle_dir, m)
    return bundle_dir


class DrafterSession:
    """Runs drafter.onnx on the target's KVCache (numpy + onnxruntime; implements runtime.drafting.Drafter)."""

    def __init__(self, session, cfg: DrafterConfig):
        self.session, self.cfg = session, cfg
        self.kv_layers = sorted(set(cfg.target_kv.values()))

    @classmethod
    def load(cls, bundle: bundle_mod.Bundle, provider: str = "cpu", threads: int | None = None) -> "DrafterSession":
        from ..runtime.session import make_session

        g = bundle.graph("drafter")
        cfg = DrafterConfig.from_json({k: v for k, v in g.contract["config"].items() if k != "model_type"})
        return cls(make_session(g.path, provider, threads), cfg)

    def step(self, ids: np.ndarray, hidden: np.ndarray, cache, rows: slice) -> tuple[np.ndarray, ...]:
        """ids [b, 1], hidden [b, 1, Hb] for cache rows `rows` (queries at their committed lengths)
        -> (draft_ids [b, 1], logits [b, 1, V], next_hidden_state [b, 1, Hb])."""
        io = self.session.io_binding()
        io.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input(LAST_HIDDEN, np.ascontiguousarray(hidden, np.float32))
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(cache.lengths[rows][:, None], np.int64))
        values = cache.ort_values(rows)
        for layer in self.kv_layers:
            io.bind_ortvalue_input(C.past_key(layer), values[layer][0])
            io.bind_ortvalue_input(C.past_value(layer), values[layer][1])
        for name in (DRAFT_IDS, LOGITS, NEXT_HIDDEN):
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        return tuple(o.numpy() for o in io.get_outputs())

    def draft(self, token: np.ndarray, hidden: np.ndarray, cache, rows: slice, k: int):
        """Greedy K-step draft for rows: token [b], hidden [b, Hb] -> (tokens [b, k], logits [b, k, V])."""
        ids, h = np.asarray(token, np.int64)[:, None], np.asarray(hidden, np.float32)[:, None]
        tokens, logits = [], []
        for _ in range(k):
            ids, lg, h = self.step(ids, h, cache, rows)
            tokens.append(ids[:, 0])
            logits.append(lg[:, 0])
        return np.stack(tokens, 1), np.stack(logits, 1)

    def propose(self, history: Sequence[int], k: int, ctx=None):
        """Drafter protocol: greedy drafts (q None) or, when sampling, tokens drawn from q = distribution()."""
        from ..runtime.sampling import distribution

        if ctx is None or ctx.hidden is None or ctx.cache is None or k < 1:
            return [], None
        rows = slice(ctx.row, ctx.row + 1)
        ids, h = np.array([[history[-1]]], np.int64), np.asarray(ctx.hidden, np.float32).reshape(1, 1, -1)
        tokens, qs = [], []
        for _ in range(k):
            ids, lg, h = self.step(ids, h, ctx.cache, rows)
            if not ctx.sampling.greedy:
                q = distribution(lg[0, 0], ctx.sampling)
                ids = np.array([[ctx.rng.choice(q.shape[-1], p=q)]], np.int64)
                qs.append(q)
            tokens.append(int(ids[0, 0]))
        return tokens, (np.stack(qs) if qs else None)
