"""The MTP drafter as an ONNX graph, built with our GraphBuilder from the trained weights (runtime/drafter_session.py
runs it).

One graph call = one draft step for B rows (DESIGN.md §2; maths in model.py):

  inputs   input_ids [B, 1] int64         the last token (not in the cache yet)
           last_hidden_state [B, 1, Hb]   the target's (post-final-norm) hidden that produced it, or the
                                          previous step's next_hidden_state
           position_ids [B, 1] int64      L: the row's committed cache length (= the last token's position)
           context_ids [B, W] int64       clustered head with a context of W only: the row's W most recent
                                          tokens (the last one is input_ids; -1 where the history is shorter)
           past_key_values.{l}.key/value  [B, Nk, capacity, D]: the target's own cache buffers for the
                                          layers in contract.drafter_kv, bound read-only (never written)
  outputs  draft_ids [B, 1] int64, next_hidden_state [B, 1, Hb], and the draft's logits:
           full head       logits [B, 1, V]
           clustered head  candidate_ids [B, 1, N] int64, candidate_logits [B, 1, N]: the tokens of the k
                           best clusters (N = k * M), then the W context ids, and their exact logits
                           (-inf on padding slots and on context ids already among the candidates)

Attention reads rows j < L (sliding layers: j > L - window), sliced out of the buffers with standard ops:
com.microsoft GroupQueryAttention always appends to the cache it reads. The embedding table (Gather for
the input, Gemm for the tied head) is the target's: with `share_embedding` the initializer points into
`target.onnx.data`, so no second 671 MB copy is written.

The clustered head (DESIGN.md §3) is why a drafter step can be cheap: the full head reads all V x Hb
weights per step (671 MB for Gemma 3 270M, as much as the target's own head), the clustered one reads
C x Hb centroids plus k x M rows. Its tables come from `edgemtp cluster` (`head.safetensors`, keys
`centroids`, `token_ordering`, `token_mask`) placed in the drafter directory. With `head_rows="int8"` it
reads int8 copies of the centroids and of the rows (the latter laid out cluster by cluster, written to
the drafter's data file) and rescores its shortlists in fp32 (exporters/head.py: int8_pick_clusters,
int8_logits, rescore): a quarter of the bytes per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .. import bundle as bundle_mod
from .. import contract as C
from ..checkpoint import Checkpoint
from ..errors import ArgumentError, EdgemtpError, missing
from ..manifest_graphs import MAX_HEAD_CONTEXT
from ..exporters import components as nn
from ..exporters import rotary
from ..exporters import head as H
from ..exporters.builder import FLOAT, INT64, GraphBuilder, _align, _set_external, read_param, share_weights
from ..exporters.gemv_head import read_transposed
from . import WEIGHTS, DrafterConfig, load_config

GRAPH = "drafter.onnx"
EMBEDDING = "model.embed_tokens.weight"  # the target's key; the drafter graph reuses it
INPUT_IDS, LAST_HIDDEN, POSITION_IDS = C.INPUT_IDS, C.LAST_HIDDEN, C.POSITION_IDS
DRAFT_IDS, LOGITS, NEXT_HIDDEN = C.DRAFT_IDS, C.LOGITS, C.NEXT_HIDDEN
CANDIDATE_IDS, CANDIDATE_LOGITS = H.CANDIDATE_IDS, H.CANDIDATE_LOGITS
HEAD_FILE = "head.safetensors"  # what `edgemtp cluster` writes; a drafter directory may hold one


def build(cfg: DrafterConfig, head: H.ClusteredShape | None = None,
          int8_ordering: np.ndarray | None = None) -> GraphBuilder:
    """The drafter step graph; `head` None: full tied head, else the clustered head of that shape, scoring
    its candidates from an int8 copy of the rows in that token ordering when one is given."""
    b = GraphBuilder("mtp_drafter")
    ids = b.input(INPUT_IDS, INT64, ["batch", 1])
    last = b.input(LAST_HIDDEN, FLOAT, ["batch", 1, cfg.backbone_hidden])
    pos = b.input(POSITION_IDS, INT64, ["batch", 1])
    context = b.input(H.CONTEXT_IDS, INT64, ["batch", head.context]) if head is not None and head.context else None
    kv = {t: _kv_inputs(b, cfg, layer) for t, layer in sorted(cfg.target_kv.items())}
    e = nn.embed(b, ids, EMBEDDING, cfg.vocab_size, cfg.backbone_hidden, cfg.embed_scale)
    x = nn.linear(b, b.op("Concat", e, last, axis=-1), "pre_projection.weight", 2 * cfg.backbone_hidden, cfg.hidden)
    types = sorted(set(cfg.layer_types))
    views = {t: committed_view(b, pos, cfg.window(t)) for t in types}
    tables = {t: rotary.rope_tables(b, cfg.rope[t], cfg.head_dim, pos) for t in types}
    for i, t in enumerate(cfg.layer_types):
        x = layer(b, cfg, f"model.layers.{i}.", x, kv[t], views[t], tables[t])
    x = nn.rms_norm(b, x, "model.norm.weight", cfg.hidden, cfg.rms_norm_eps)
    state = nn.linear(b, x, "post_projection.weight", cfg.hidden, cfg.backbone_hidden)
    if head is None:
        logits = nn.softcap(b, nn.tied_head(b, state, EMBEDDING, cfg.vocab_size, cfg.backbone_hidden),
                            cfg.final_logit_softcapping)
        b.output(b.op("ArgMax", logits, axis=-1, keepdims=0), DRAFT_IDS, INT64, ["batch", 1])
        b.output(logits, LOGITS, FLOAT, ["batch", 1, cfg.vocab_size])
    else:
        clustered_outputs(b, state, head, EMBEDDING, cfg.final_logit_softcapping, int8_ordering=int8_ordering,
                          context=context)
    b.output(state, NEXT_HIDDEN, FLOAT, ["batch", 1, cfg.backbone_hidden])
    return b


def clustered_outputs(b: GraphBuilder, state: str, head: H.ClusteredShape, head_key: str, cap: float | None,
                      keys: H.HeadKeys = H.HeadKeys(), int8_ordering: np.ndarray | None = None,
                      context: str | None = None) -> None:
    """state [B, 1, d] -> draft_ids [B, 1] (best candidate), candidate_ids / candidate_logits [B, 1, N]."""
    flat = b.op("Reshape", state, b.const([-1, head.hidden], np.int64))  # one position per row
    cand = H.clustered_head(b, flat, head_key, head, cap, keys, int8_ordering, context)
    best = b.op("ArgMax", cand.logits, axis=-1, keepdims=1)  # [B, 1] position among the candidates
    b.output(b.op("GatherElements", cand.ids, best, axis=1), DRAFT_IDS, INT64, ["batch", 1])
    one = b.const([1], np.int64)
    b.output(b.op("Unsqueeze", cand.ids, one), CANDIDATE_IDS, INT64, ["batch", 1, head.candidates])
    b.output(b.op("Unsqueeze", cand.logits, one), CANDIDATE_LOGITS, FLOAT, ["batch", 1, head.candidates])


def _kv_inputs(b: GraphBuilder, cfg: DrafterConfig, layer: int) -> tuple[str, str]:
    shape = ["batch", cfg.num_kv_heads, "capacity", cfg.head_dim]
    return b.input(C.past_key(layer), FLOAT, shape), b.input(C.past_value(layer), FLOAT, shape)


def layer(b: GraphBuilder, cfg: DrafterConfig, p: str, x: str, kv, view: nn.CacheView, rope: rotary.RopeTables) -> str:
    """Sandwich-normed Q-only attention + gated MLP: [B, 1, H] -> [B, 1, H]."""
    h, eps, n, d = cfg.hidden, cfg.rms_norm_eps, cfg.num_heads, cfg.head_dim
    a = nn.rms_norm(b, x, p + "input_layernorm.weight", h, eps)
    q = nn.heads(b, nn.linear(b, a, p + "self_attn.q_proj.weight", h, n * d), n, d)
    q = rotary.apply_rope(b, nn.rms_norm(b, q, p + "self_attn.q_norm.weight", d, eps), rope, d)
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
    if window:
        first = b.op("Sub", b.op("ReduceMin", pos, keepdims=0), b.const(window - 1, np.int64))
        start = b.op("Reshape", b.op("Max", first, b.const(0, np.int64)), b.const([1], np.int64))
    else:  # only here: a constant no node reads would stay in the graph
        start = b.const([0], np.int64)
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


def contract(cfg: DrafterConfig, head: H.ClusteredShape | None = None, head_rows: str = "fp32") -> dict:
    """The manifest's graphs.drafter.contract: what the runtime binds and reads."""
    scores = [LOGITS] if head is None else [CANDIDATE_IDS, CANDIDATE_LOGITS]
    context = [H.CONTEXT_IDS] if head is not None and head.context else []
    return {"kind": "mtp", "config": cfg.to_json(), "kv_layers": sorted(set(cfg.target_kv.values())),
            "inputs": [INPUT_IDS, LAST_HIDDEN, POSITION_IDS, *context], "outputs": [DRAFT_IDS, *scores, NEXT_HIDDEN],
            "hidden": C.HIDDEN_KIND, "head": head_json(head, head_rows)}


def head_json(head: H.ClusteredShape | None, rows: str = "fp32") -> dict:
    if head is None:
        return {"kind": "full"}
    return {"kind": "clustered", "clusters": head.clusters, "top_k": head.top_k, "candidates": head.candidates,
            "rows": rows, "context": head.context}


# the head options' names in export(), and their flags: the refusals name them so (errors.ArgumentError)
TOP_K = ("drafter_top_k", "--draft-top-k")
CONTEXT = ("drafter_head_context", "--draft-head-context")
ROWS = ("drafter_head_rows", "--draft-head-rows")


def head_shape(drafter_dir: Path, cfg: DrafterConfig, top_k: int | None = None,
               context: int = 0) -> H.ClusteredShape | None:
    """The clustered head to build: None (full head) when top_k == 0, or when top_k is None and the
    drafter directory has no head tables; otherwise the tables' C with k = top_k (default: the k
    `edgemtp cluster` was run with) and `context` recent token ids as candidates too."""
    from ..calibration.head_report import load_head

    check_context(context)
    if top_k is not None and top_k < 0:
        raise ArgumentError(TOP_K[0], top_k, "must be 0 (the full head) or a number of clusters", TOP_K[1])
    path = Path(drafter_dir) / HEAD_FILE
    if top_k == 0 or (top_k is None and not path.is_file()):
        return None
    if not path.is_file():
        raise ArgumentError(TOP_K[0], top_k, f"needs the drafter's clustered-head tables, and {path} is missing "
                            f"(write them with `edgemtp cluster TARGET_DIR -o {drafter_dir}`)", TOP_K[1])
    tables, meta = load_head(path)
    clusters, hidden = tables.centroids.shape
    if (tables.vocab_size, hidden) != (cfg.vocab_size, cfg.backbone_hidden):
        raise EdgemtpError(f"{path}: head tables are for vocab {tables.vocab_size}, hidden {hidden}; the drafter "
                           f"has vocab {cfg.vocab_size}, hidden {cfg.backbone_hidden}")
    if top_k is not None and not 1 <= top_k <= clusters:
        raise ArgumentError(TOP_K[0], top_k, f"must be 0 (the full head) or between 1 and the head's {clusters} "
                            "clusters", TOP_K[1])
    k = top_k if top_k is not None else int(meta.get("top_k", 32))
    if not 1 <= k <= clusters:  # the tables' own default, no argument's
        raise EdgemtpError(f"{path}: its top_k {k} is not between 1 and its {clusters} clusters")
    return H.ClusteredShape(cfg.vocab_size, cfg.backbone_hidden, clusters, k, context)


def check_context(context: int) -> None:
    if not 0 <= context <= MAX_CONTEXT:
        raise ArgumentError(CONTEXT[0], context, f"must be between 0 and {MAX_CONTEXT} recent tokens", CONTEXT[1])


# recent tokens a clustered head scores besides its clusters' (`edgemtp export`'s default): on Gemma 3 270M
# 64 lifted recall@32 from 0.989 to 0.994 (code) and 0.988 to 0.991 (prose); see the README
DEFAULT_CONTEXT = 64
MAX_CONTEXT = MAX_HEAD_CONTEXT
HEAD_ROWS = ("fp32", "int8")  # how a clustered head scores its candidates (see head.int8_logits)


def check_head_rows(rows: str, head: H.ClusteredShape | None) -> None:
    if rows not in HEAD_ROWS:
        raise ArgumentError(ROWS[0], rows, f"must be one of {', '.join(HEAD_ROWS)}", ROWS[1])
    if rows != "fp32" and head is None:
        raise ArgumentError(ROWS[0], rows, "needs a clustered head, and this drafter has the full head (no head "
                            "tables or no use_ordered_embeddings, or a top k of 0 clusters)", ROWS[1])


def int8_ordering(drafter_dir: Path, rows: str) -> np.ndarray | None:
    """The head tables' token ordering when the candidates are scored from int8 rows (laid out by it)."""
    if rows != "int8":
        return None
    from ..calibration.head_report import load_head
    return load_head(Path(drafter_dir) / HEAD_FILE)[0].token_ordering


def write(out_dir: Path, drafter_dir: Path, target_graph: Path, share_embedding: bool = True,
          top_k: int | None = None, name: str = GRAPH, head_rows: str = "fp32", context: int = 0,
          progress=None) -> dict:
    """Writes `name` (drafter.onnx) + its .data into `out_dir` (a bundle being built, beside `target_graph`)
    and returns the manifest's graph entry.

    share_embedding: the embedding initializer points at the target's bytes in its external data file
    (which must then sit in `out_dir` too); False copies those bytes into the drafter's data file.
    top_k: clusters kept by the clustered head (see head_shape; 0 = full head).
    context: recent token ids the clustered head scores too (exporters/head.py `add_context`; 0 = none).
    head_rows: "int8" scores the clustered head's candidates from an int8 copy of the table in cluster order
    (written to the drafter's data: V x d bytes), a quarter of the bytes a step gathers."""
    out_dir, drafter_dir, target_graph = Path(out_dir), Path(drafter_dir), Path(target_graph)
    cfg = load_config(drafter_dir)
    head = head_shape(drafter_dir, cfg, top_k, context)
    check_head_rows(head_rows, head)
    graph = build(cfg, head, int8_ordering(drafter_dir, head_rows))
    where = embedding_location(target_graph, cfg)
    if where[3]:  # a --gemv-head target keeps only the transposed table
        read_transposed(graph, EMBEDDING)
    if not (Path(drafter_dir) / WEIGHTS).is_file():  # else the head tables' file would be searched for weights
        path = Path(drafter_dir) / WEIGHTS
        raise EdgemtpError(f"{path}: {missing(path)} (a drafter directory needs config.json and {WEIGHTS})")
    save(graph, out_dir / name, Checkpoint(drafter_dir), target_graph, EMBEDDING, cfg, share_embedding, where,
         progress)
    return {"file": name, "quant": "fp32", "contract": contract(cfg, head, head_rows)}


FULL_HEAD_GRAPH = "drafter_full_head.onnx"


def write_full_head(out_dir: Path, drafter_dir: Path, entry: dict, name: str = FULL_HEAD_GRAPH) -> dict | None:
    """For a clustered-head drafter graph (`entry`, as write() returned it): the same drafter with the full
    head, its initializers pointing into the clustered graph's data (no new weight bytes), so `edgemtp
    profile` can put full vs clustered head side by side. None when `entry` already has the full head."""
    if entry["contract"]["head"]["kind"] != "clustered":
        return None
    cfg = load_config(drafter_dir)
    graph = build(cfg, None)
    if embedding_location(Path(out_dir) / "target.onnx", cfg)[3]:  # as write() did
        read_transposed(graph, EMBEDDING)
    try:
        model = share_weights(graph, Path(out_dir) / entry["file"])
    except ValueError as e:
        raise EdgemtpError(f"{drafter_dir}: the full-head graph cannot share the clustered graph's weights "
                           f"({e})") from None
    onnx.save(model, str(Path(out_dir) / name))
    return {"file": name, "quant": entry["quant"], "contract": contract(cfg, None)}


def save(b: GraphBuilder, path: Path, weights: Checkpoint, target_graph: Path, embedding: str, cfg,
         share_embedding: bool = True, where: tuple[str, int, int, bool] | None = None, progress=None) -> None:
    """Writes a drafter graph and `path`.data: its parameter `embedding` is the target's embedding
    (cfg.vocab_size x cfg.backbone_hidden), shared in place or copied; every other one comes from `weights`.
    `where`: embedding_location(target_graph, cfg), if the caller has it (it parses the target graph).
    `progress(done, total, name)` after each parameter (the int8 head rows take seconds)."""
    if share_embedding and target_graph.parent.resolve() != path.parent.resolve():
        raise EdgemtpError(f"{target_graph}: a shared embedding needs the target graph in {path.parent}")
    model = b.model()
    location, offset, length, transposed = where or embedding_location(target_graph, cfg)
    shared = embedding + ".T" if transposed else embedding  # the parameter naming the target's table itself
    inits = {t.name: t for t in model.graph.initializer}
    data_name = path.name + ".data"
    table = None  # the [V, Hb] table, read once if a parameter is made from it (int8 rows) or copied
    with open(path.parent / data_name, "wb") as f:
        for i, prm in enumerate(b.params.values()):
            if progress:
                progress(i, len(b.params), prm.name)
            if prm.name == shared and prm.source == embedding and share_embedding:
                _set_external(inits[prm.name], location, offset, length)
                continue
            if prm.source == embedding:
                if table is None:
                    table = _embedding(target_graph.parent / location, offset, cfg, transposed)
                arr = prm.transform(table) if prm.transform else table
            else:
                try:
                    arr = read_param(prm, weights.__getitem__)
                except ValueError as e:  # a part of a joined parameter has the wrong shape
                    raise EdgemtpError(f"{weights.dir}: {e}") from None
            arr = np.ascontiguousarray(arr, dtype=prm.dtype)
            if tuple(arr.shape) != prm.shape:
                raise EdgemtpError(f"{weights.dir}: tensor '{prm.source}' has shape {list(arr.shape)}, "
                                   f"config.json implies {list(prm.shape)}")
            pos = _align(f)
            f.write(memoryview(arr.reshape(-1)).cast("B"))
            _set_external(inits[prm.name], data_name, pos, arr.nbytes)
    if progress:
        progress(len(b.params), len(b.params), "")
    onnx.save(model, str(path))


def embedding_location(target_graph: Path, cfg: DrafterConfig) -> tuple[str, int, int, bool]:
    """(file, offset, length, transposed) of the target's fp32 embedding in its external data: [V, Hb], or
    a --gemv-head target's [Hb, V] (transposed True) when it has no [V, Hb] table."""
    g = onnx.load(str(target_graph), load_external_data=False)
    stored = {t.name: t for t in g.graph.initializer}
    want = [cfg.vocab_size, cfg.backbone_hidden]
    for name, dims, transposed in ((EMBEDDING, want, False), (EMBEDDING + ".T", want[::-1], True)):
        t = stored.get(name)
        if t is not None and t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == dims:
            break
    else:
        raise EdgemtpError(f"{target_graph}: no float32 initializer '{EMBEDDING}' {want} to share with the drafter")
    ext = {e.key: e.value for e in t.external_data}
    if "location" not in ext:
        raise EdgemtpError(f"{target_graph}: '{t.name}' is not stored as external data")
    return ext["location"], int(ext.get("offset", 0)), int(ext["length"]), transposed


def _embedding(path: Path, offset: int, cfg: DrafterConfig, transposed: bool = False) -> np.ndarray:
    """The target's table as [V, Hb], memory-mapped: a transposed one as a view of its [Hb, V] bytes (the
    transforms made from it read its stored rows in order: head._row_blocks)."""
    if transposed:
        return np.memmap(path, np.float32, "r", offset, (cfg.backbone_hidden, cfg.vocab_size)).T
    return np.memmap(path, np.float32, "r", offset, (cfg.vocab_size, cfg.backbone_hidden))


def add_to_bundle(bundle_dir: Path, drafter_dir: Path, share_embedding: bool = True,
                  top_k: int | None = None, context: int = 0) -> Path:
    """Adds (or replaces) the drafter graph of an existing bundle and rewrites its manifest.

    The exporter proper should call `write()` inside its atomic bundle directory instead; this is for tests,
    benchmarks and bundles exported before the drafter existed."""
    bundle_dir = Path(bundle_dir)
    b = bundle_mod.load(bundle_dir, verify=False)
    cfg = load_config(drafter_dir)
    target = b.target_contract
    if not cfg.fits(target):
        raise EdgemtpError(f"{drafter_dir}: drafter was trained for another target (hidden {cfg.backbone_hidden}, "
                           f"vocab {cfg.vocab_size}, kv layers {cfg.target_kv}); bundle has {target.hidden_size}, "
                           f"{target.vocab_size}, {target.drafter_kv}")
    entry = write(bundle_dir, drafter_dir, b.graph("target").path, share_embedding, top_k, context=context)
    m = {k: v for k, v in b.manifest.items() if k not in ("files", "format", "schema_version")}
    graphs = {k: v for k, v in m["graphs"].items() if k not in ("drafter", "drafter_full_head")}
    m["graphs"] = {**graphs, "drafter": entry}
    full = write_full_head(bundle_dir, drafter_dir, entry)
    if full is not None:
        m["graphs"]["drafter_full_head"] = full
    else:
        (bundle_dir / FULL_HEAD_GRAPH).unlink(missing_ok=True)
    bundle_mod.write_manifest(bundle_dir, m)
    return bundle_dir
