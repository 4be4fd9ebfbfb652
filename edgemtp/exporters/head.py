"""Logit heads as graph components: the full tied head and the two-stage clustered head (DESIGN §3).

Clustered head, per position:

    hidden [N, d] -> cluster scores [N, C] -> TopK -> picked [N, k]
                  -> candidate ids = token_ordering[picked]  [N, k*M]
                  -> exact logits over the gathered head rows  [N, k*M]  (soft-cap, padding -inf)
                  -> top token(s), their logits and probabilities over the candidates

N positions (a drafter flattens [B, S] first), d hidden, V vocab, C clusters, M = V/C (rounded up)
slots per cluster, k clusters kept. With a context of W, the W most recent token ids (`context_ids`
[N, W]) are candidates too, scored exactly (`add_context`): a model often predicts a token it has just
read (a name, an identifier), such a token is often one the calibration text never had as an argmax,
and then the clusters picked for it often miss it. With int8 rows the candidates are scored from an
int8 copy of the head rows stored in cluster order instead (`int8_logits`): a quarter of the bytes,
read as k contiguous blocks rather than k*M scattered rows. Weights are bound by name at save time like
every other parameter: the head rows are the (tied) embedding's own initializer, and the head tables
come from `edgemtp cluster` (keys `centroids`, `token_ordering`, `token_mask`) or, with `GEMMA4_KEYS`,
from a Gemma 4 assistant checkpoint's `masked_embedding.*` tensors (its flat [V] ordering is viewed as
[C, M] at bind time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract import CANDIDATE_IDS, CANDIDATE_LOGITS, CONTEXT_IDS  # noqa: F401  (the head's I/O names)
from ..errors import EdgemtpError
from .builder import FLOAT, INT64, GraphBuilder

INPUT = "hidden_states"
TOKEN_IDS, TOKEN_LOGITS, TOKEN_PROBS = "token_ids", "token_logits", "token_probs"
LOGITS = "logits"
INT8_ZERO = 128  # int8 rows are stored as uint8 with this zero point (see `int8_logits`)
RESCORE = 8  # int8 rows: the best this many candidates get exact fp32 logits (`rescore`)


@dataclass(frozen=True)
class HeadKeys:
    """Checkpoint keys of the clustered head's tables (the head rows' key is passed separately)."""

    centroids: str = "centroids"
    token_ordering: str = "token_ordering"
    token_mask: str = "token_mask"


GEMMA4_KEYS = HeadKeys("masked_embedding.centroids.weight", "masked_embedding.token_ordering",
                       "masked_embedding.token_mask")


@dataclass(frozen=True)
class ClusteredShape:
    vocab: int
    hidden: int
    clusters: int
    top_k: int
    context: int = 0  # W: recent token ids scored besides the clusters' tokens (`add_context`)

    @property
    def per_cluster(self) -> int:
        return -(-self.vocab // self.clusters)

    @property
    def padded(self) -> bool:
        """True when C does not divide V: padding slots exist and are masked."""
        return self.clusters * self.per_cluster != self.vocab

    @property
    def cluster_candidates(self) -> int:
        return self.top_k * self.per_cluster

    @property
    def candidates(self) -> int:
        return self.cluster_candidates + self.context


@dataclass(frozen=True)
class Candidates:
    ids: str     # [N, k*M] int64 token ids
    logits: str  # [N, k*M] float, -inf on padding slots


def cluster_scores(b: GraphBuilder, h: str, key: str, hidden: int, clusters: int) -> str:
    """h [N, d] -> [N, C] = h @ centroids.T (centroids stored [C, d], as Gemma 4's Linear)."""
    return b.op("Gemm", h, b.param(key, (clusters, hidden)), transB=1)


def pick_clusters(b: GraphBuilder, scores: str, top_k: int) -> str:
    """[N, C] -> [N, k] int64 cluster ids, best first."""
    _, picked = b.op("TopK", scores, b.const([top_k], np.int64), axis=-1, largest=1, sorted=1, n_out=2)
    return picked


def candidate_ids(b: GraphBuilder, picked: str, key: str, shape: ClusteredShape) -> str:
    """[N, k] -> [N, k*M] token ids: rows of token_ordering [C, M]."""
    table = b.param(key, (shape.clusters, shape.per_cluster), _as_table(shape), dtype=np.int64)
    return b.op("Reshape", b.op("Gather", table, picked, axis=0), b.const([0, -1], np.int64))


# doc_string of a MatMul(Gather(table, ids [N, K]), Unsqueeze(h [N, d], -1)): every row dotted with the h of its
# own leading index, no broadcasting. The quantized rewrite may fuse such a pair (quantnodes.table_dot).
ROW_DOTS = "edgemtp: rows [N, K, d] x h [N, d, 1], one h per leading index"


def exact_logits(b: GraphBuilder, h: str, ids: str, embed_key: str, vocab: int, hidden: int) -> str:
    """h [N, d], ids [N, K] -> [N, K] = <h, head row of each id> (rows gathered from the tied table)."""
    rows = b.op("Gather", b.param(embed_key, (vocab, hidden)), ids, axis=0)  # [N, K, d]
    col = b.op("Unsqueeze", h, b.const([-1], np.int64))  # [N, d, 1]
    return b.op("Squeeze", b.op("MatMul", rows, col, doc_string=ROW_DOTS), b.const([-1], np.int64))


@dataclass(frozen=True)
class Quantized:
    """h quantized per tensor to uint8 (DynamicQuantizeLinear): values, scale, zero point."""
    values: str
    scale: str
    zero: str


def quantize(b: GraphBuilder, h: str) -> Quantized:
    return Quantized(*b.op("DynamicQuantizeLinear", h, n_out=3))


def int8_pick_clusters(b: GraphBuilder, h: str, hq: Quantized, key: str, shape: ClusteredShape) -> str:
    """h [N, d] -> [N, k] int64 cluster ids, best first, as pick_clusters(cluster_scores(...)) would give
    them: int8 centroid scores (a quarter of the fp32 centroids' bytes) choose a shortlist of 2k clusters,
    whose exact fp32 scores (2k rows of the centroid matrix) choose and order the k. Differs from the
    fp32 pick only if one of the k best clusters scores below the shortlist in int8."""
    short = min(2 * shape.top_k, shape.clusters)
    table = b.param(key, (shape.hidden, shape.clusters), int8_columns, name=key + ".int8_columns", dtype=np.uint8)
    scales = b.param(key, (shape.clusters,), _scales, name=key + ".int8_scales")
    dots = b.op("MatMulInteger", hq.values, table, hq.zero, b.const(np.uint8(INT8_ZERO), np.uint8))  # [N, C]
    approx = b.op("Mul", b.op("Mul", b.op("Cast", dots, to=FLOAT), scales), hq.scale)
    candidates = pick_clusters(b, approx, short)  # [N, 2k]
    exact = exact_logits(b, h, candidates, key, shape.clusters, shape.hidden)  # [N, 2k]
    _, best = b.op("TopK", exact, b.const([shape.top_k], np.int64), axis=-1, largest=1, sorted=1, n_out=2)
    return b.op("GatherElements", candidates, best, axis=1)


def int8_logits(b: GraphBuilder, hq: Quantized, picked: str, embed_key: str, shape: ClusteredShape,
                ordering: np.ndarray) -> str:
    """hq (h [N, d] quantized), picked [N, k] -> [N, k*M] ~ <h, head row of each candidate>, from an int8 copy of the
    table laid out by cluster: block c is [d, M], the rows of cluster c's tokens (`ordering` [C, M]),
    transposed, one scale per token.

    Why this layout: the fp32 head's cost is gathering k*M scattered rows (4*d bytes each) and reading
    them back. Here it gathers k contiguous blocks of a quarter of the bytes, and each block is one
    [1, d] x [d, M] integer product (MatMulInteger, exact sums; h is quantized per tensor to uint8 by
    DynamicQuantizeLinear), so the only errors are the two roundings (measured in docs/measurements.md).
    The int8 values are stored offset by 128 as uint8 (zero point 128): ONNX Runtime's uint8 x int8
    kernels sum pairs of products in int16 and saturate on x86 without VNNI (errors of 1e5 measured
    here), its uint8 x uint8 ones do not."""
    blocks_key, scales_key = int8_keys(embed_key)
    blocks = b.param(embed_key, (shape.clusters, shape.hidden, shape.per_cluster), int8_blocks(ordering, shape),
                     name=blocks_key, dtype=np.uint8)
    scales = b.param(embed_key, (shape.clusters, shape.per_cluster), int8_block_scales(ordering, shape),
                     name=scales_key)
    a = b.op("Unsqueeze", hq.values, b.const([1, 2], np.int64))  # [N, 1, 1, d] uint8
    rows = b.op("Gather", blocks, picked, axis=0)  # [N, k, d, M]
    dots = b.op("MatMulInteger", a, rows, hq.zero, b.const(np.uint8(INT8_ZERO), np.uint8))  # [N, k, 1, M] int32
    flat = b.const([0, -1], np.int64)
    per_token = b.op("Reshape", b.op("Gather", scales, picked, axis=0), flat)  # [N, k*M]
    return b.op("Mul", b.op("Mul", b.op("Cast", b.op("Reshape", dots, flat), to=FLOAT), per_token), hq.scale)


def int8_keys(embed_key: str) -> tuple[str, str]:
    """Initializer names of the int8 copy of the head rows and of its per-token scales."""
    return embed_key + ".int8_cluster_blocks", embed_key + ".int8_cluster_scales"


# the padding mask's initializer: its 0 / -inf are the only weights of a bundle not finite on purpose
ADDITIVE = ".additive"


def padding_mask(b: GraphBuilder, picked: str, key: str, shape: ClusteredShape) -> str:
    """[N, k*M]: 0 on the candidates, -inf on padding slots, added to their logits. The mask is bound as
    an additive [C, M] float table."""
    table = b.param(key, (shape.clusters, shape.per_cluster), additive_mask, name=key + ADDITIVE)
    return b.op("Reshape", b.op("Gather", table, picked, axis=0), b.const([0, -1], np.int64))


def softcap(b: GraphBuilder, x: str, cap: float | None) -> str:
    """cap * tanh(x / cap): Gemma's final logit soft-cap (identity when cap is None)."""
    if not cap:
        return x
    return b.op("Mul", b.op("Tanh", b.op("Div", x, b.const(np.float32(cap)))), b.const(np.float32(cap)))


def clustered_head(b: GraphBuilder, h: str, embed_key: str, shape: ClusteredShape,
                   cap: float | None = None, keys: HeadKeys = HeadKeys(),
                   int8_ordering: np.ndarray | None = None, context: str | None = None) -> Candidates:
    """h [N, d] -> the candidates of the k best clusters and their (soft-capped) logits: exact, or
    with `int8_ordering` (the token ordering, known at build time) from an int8 copy of the rows laid
    out in that cluster order (`int8_logits`), the best few then recomputed exactly (`rescore`); the
    clusters are then picked with int8 centroid scores and an exact shortlist (`int8_pick_clusters`).
    With `shape.context`, `context` [N, W] recent token ids follow them (`add_context`)."""
    if int8_ordering is None:
        picked = pick_clusters(b, cluster_scores(b, h, keys.centroids, shape.hidden, shape.clusters), shape.top_k)
        ids = candidate_ids(b, picked, keys.token_ordering, shape)
        logits = softcap(b, exact_logits(b, h, ids, embed_key, shape.vocab, shape.hidden), cap)
        if shape.padded:
            logits = b.op("Add", logits, padding_mask(b, picked, keys.token_mask, shape))
    else:
        hq = quantize(b, h)
        picked = int8_pick_clusters(b, h, hq, keys.centroids, shape)
        ids = candidate_ids(b, picked, keys.token_ordering, shape)
        logits = softcap(b, int8_logits(b, hq, picked, embed_key, shape, int8_ordering), cap)
        if shape.padded:
            # masked before rescoring: a padding slot repeats a real token, and would take one of the rescored
            # places from a real candidate; and after: where fewer candidates are live than places (a tiny
            # head), padding slots are rescored too, and get their token's exact logit
            mask = padding_mask(b, picked, keys.token_mask, shape)
            logits = b.op("Add", rescore(b, h, ids, b.op("Add", logits, mask), embed_key, shape, cap), mask)
        else:
            logits = rescore(b, h, ids, logits, embed_key, shape, cap)
    if shape.context:
        if context is None:
            raise ValueError(f"a clustered head with a context of {shape.context} needs the context ids")
        return add_context(b, h, Candidates(ids, logits), context, embed_key, shape, cap)
    return Candidates(ids, logits)


def add_context(b: GraphBuilder, h: str, cand: Candidates, context: str, embed_key: str, shape: ClusteredShape,
                cap: float | None) -> Candidates:
    """Appends `context` [N, W] (token ids, -1 for none) to the candidates with exact logits. A context id
    that is -1, already a live cluster candidate (padding slots may repeat a real id: those do not count)
    or repeated later in the context gets -inf, so each token keeps one finite logit and probabilities
    over the candidates stay a softmax over distinct tokens."""
    zero = b.const(0, np.int64)
    ids = b.op("Max", context, zero)  # -1 -> 0, masked below
    logits = softcap(b, exact_logits(b, h, ids, embed_key, shape.vocab, shape.hidden), cap)
    col, row = b.const([2], np.int64), b.const([1], np.int64)
    live = b.op("Unsqueeze", b.op("Not", b.op("IsInf", cand.logits, detect_positive=0)), row)  # [N, 1, K]
    in_clusters = b.op("And", b.op("Equal", b.op("Unsqueeze", context, col), b.op("Unsqueeze", cand.ids, row)), live)
    later = np.triu(np.ones((shape.context, shape.context), bool), 1)  # [j, j']: j' after j
    repeated = b.op("And", b.op("Equal", b.op("Unsqueeze", context, col), b.op("Unsqueeze", context, row)),
                    b.const(later, np.bool_))
    drop = b.op("Or", b.op("Less", context, zero), b.op("Or", _any(b, in_clusters), _any(b, repeated)))
    logits = b.op("Where", drop, b.const(-np.inf), logits)
    return Candidates(b.op("Concat", cand.ids, ids, axis=1), b.op("Concat", cand.logits, logits, axis=1))


def _any(b: GraphBuilder, x: str) -> str:
    """bool [N, W, K] -> [N, W]: any along the last axis."""
    as_int = b.op("Cast", x, to=6)  # int32: ReduceMax takes no bool
    return b.op("Cast", b.op("ReduceMax", as_int, b.const([-1], np.int64), keepdims=0), to=9)


def rescore(b: GraphBuilder, h: str, ids: str, logits: str, embed_key: str, shape: ClusteredShape,
            cap: float | None, n: int = RESCORE) -> str:
    """Approximate (int8) candidate logits [N, K] -> the same with the best n recomputed exactly in fp32
    (n rows of the fp32 table: cheap). Measured on Gemma 3 270M's held-out states, the int8 logits alone
    changed the argmax at 2-5% of positions (near-ties); rescored, at none of 16,384 (docs/measurements.md)."""
    n = min(n, shape.cluster_candidates)
    _, pos = b.op("TopK", logits, b.const([n], np.int64), axis=-1, largest=1, sorted=1, n_out=2)
    best_ids = b.op("GatherElements", ids, pos, axis=1)
    exact = softcap(b, exact_logits(b, h, best_ids, embed_key, shape.vocab, shape.hidden), cap)
    return b.op("ScatterElements", logits, pos, exact, axis=1)


def top_tokens(b: GraphBuilder, logits: str, n: int, ids: str | None = None) -> tuple[str, str, str]:
    """logits [N, K] -> token ids [N, n] int64, their logits [N, n], probabilities over the K.

    `ids` [N, K] maps positions to token ids (the candidates); None when positions are token ids."""
    values, pos = b.op("TopK", logits, b.const([n], np.int64), axis=-1, largest=1, sorted=1, n_out=2)
    probs = b.op("GatherElements", b.op("Softmax", logits, axis=-1), pos, axis=1)
    tokens = pos if ids is None else b.op("GatherElements", ids, pos, axis=1)
    return tokens, values, probs


def full_head(b: GraphBuilder, h: str, embed_key: str, vocab: int, hidden: int, cap: float | None = None) -> str:
    """h [N, d] -> [N, V] logits through the whole tied table (Gemm with transB: no copy)."""
    return softcap(b, b.op("Gemm", h, b.param(embed_key, (vocab, hidden)), transB=1), cap)


def _outputs(b: GraphBuilder, tokens: tuple[str, str, str], n: int) -> None:
    for value, name, kind in zip(tokens, (TOKEN_IDS, TOKEN_LOGITS, TOKEN_PROBS), (INT64, FLOAT, FLOAT)):
        b.output(value, name, kind, ["N", n])


def clustered_graph(shape: ClusteredShape, embed_key: str, n_top: int = 1, cap: float | None = None,
                    keys: HeadKeys = HeadKeys(), int8_ordering: np.ndarray | None = None) -> GraphBuilder:
    """Standalone head for measurement: `hidden_states` [N, d] -> token_ids / token_logits /
    token_probs [N, n_top] and candidate_ids / candidate_logits [N, k*M] (with int8 rows: int8 logits
    but for the best few, see `clustered_head`)."""
    b = GraphBuilder("clustered_head" if int8_ordering is None else "clustered_head_int8_rows")
    h = b.input(INPUT, FLOAT, ["N", shape.hidden])
    context = b.input(CONTEXT_IDS, INT64, ["N", shape.context]) if shape.context else None
    cand = clustered_head(b, h, embed_key, shape, cap, keys, int8_ordering, context)
    _outputs(b, top_tokens(b, cand.logits, n_top, cand.ids), n_top)
    b.output(cand.ids, CANDIDATE_IDS, INT64, ["N", shape.candidates])
    b.output(cand.logits, CANDIDATE_LOGITS, FLOAT, ["N", shape.candidates])
    return b


def full_graph(vocab: int, hidden: int, embed_key: str, n_top: int = 1, cap: float | None = None,
               with_logits: bool = False) -> GraphBuilder:
    """Standalone full head: `hidden_states` [N, d] -> token_ids / token_logits / token_probs [N, n_top]
    (and `logits` [N, V] when asked: the benchmark leaves it out so no [N, V] copy is returned)."""
    b = GraphBuilder("full_head")
    h = b.input(INPUT, FLOAT, ["N", hidden])
    logits = full_head(b, h, embed_key, vocab, hidden, cap)
    _outputs(b, top_tokens(b, logits, n_top), n_top)
    if with_logits:
        b.output(logits, LOGITS, FLOAT, ["N", vocab])
    return b


def _as_table(shape: ClusteredShape):
    """Bind-time view of an ordering as [C, M]: Gemma 4 stores it flat [V] (V = C*M there)."""
    def view(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.int64).reshape(shape.clusters, shape.per_cluster)
    view.__qualname__ = f"as_table_{shape.clusters}x{shape.per_cluster}"
    return view


def int8_blocks(ordering: np.ndarray, shape: ClusteredShape, chunk: int = 64, step: int = 4096):
    """Bind-time transform: [V, d] float table -> [C, d, M] uint8, block c = cluster c's rows, transposed,
    each row rounded to the 255 levels -127..127 of its own scale (`int8_block_scales`), plus 128. The rows
    are rounded in vocabulary order, `step` at a time (_row_blocks: no full-size float temporary is made, E2B's
    table is 1.6 GB), into a [V, d] uint8 table that is then gathered `chunk` clusters at a time."""
    table = _as_table(shape)(ordering)

    def blocks(w: np.ndarray) -> np.ndarray:
        rounded = np.empty((len(w), shape.hidden), np.uint8)
        for start, rows in _row_blocks(w, step):
            rounded[start:start + len(rows)] = (np.rint(rows / _scales(rows)[:, None]) + INT8_ZERO).astype(np.uint8)
        out = np.empty((shape.clusters, shape.hidden, shape.per_cluster), np.uint8)
        for c in range(0, shape.clusters, chunk):
            ids = table[c:c + chunk].ravel()
            out[c:c + chunk] = rounded[ids].reshape(-1, shape.per_cluster, shape.hidden).transpose(0, 2, 1)
        return out
    blocks.__qualname__ = f"int8_blocks_{shape.clusters}x{shape.per_cluster}"
    return blocks


def int8_block_scales(ordering: np.ndarray, shape: ClusteredShape, step: int = 4096):
    """Bind-time transform: [V, d] table -> [C, M] float32, the int8 scale of each slot's row."""
    table = _as_table(shape)(ordering)

    def scales(w: np.ndarray) -> np.ndarray:
        return np.concatenate([_scales(rows) for _, rows in _row_blocks(w, step)])[table]
    scales.__qualname__ = f"int8_block_scales_{shape.clusters}x{shape.per_cluster}"
    return scales


def _row_blocks(w: np.ndarray, step: int):
    """(start, w[start:start + step] as float32) over the table's rows. A transposed view (the [H, V] table of
    a --gemv-head target, read as [V, H]) is read as stored, a [H, step] slab of runs of `step` numbers, and
    transposed in memory: gathering rows from it directly reads one number from each of H rows 1 MB apart
    per row (Gemma 3 270M's default export took 3.4 s in such gathers). When that view is of a memory-mapped
    file (the target's data, as the drafter export reads it), the runs are read from the file instead: a
    slab's runs, 1 MB apart, map pages across the whole table (the kernel maps a page cache's large folio
    whole), which then counted in the export's peak RSS."""
    transposed = w.ndim == 2 and w.flags.f_contiguous and not w.flags.c_contiguous
    stored = _stored_as(w) if transposed else None
    for start in range(0, len(w), step):
        if stored is not None:
            yield start, np.ascontiguousarray(_read_runs(*stored, w.shape, start, min(step, len(w) - start)).T)
        elif transposed:
            yield start, np.ascontiguousarray(np.asarray(w.T[:, start:start + step], np.float32).T)
        else:
            yield start, np.asarray(w[start:start + step], np.float32)


def _stored_as(w: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) when `w` is the transpose of a whole float32 np.memmap of a file."""
    m = w.base
    if (isinstance(m, np.memmap) and m.filename and m.dtype == np.float32 and m.ndim == 2
            and m.flags.c_contiguous and w.shape == m.shape[::-1] and w.ctypes.data == m.ctypes.data):
        return m.filename, m.offset
    return None


def _read_runs(path: str, offset: int, shape: tuple[int, int], start: int, n: int) -> np.ndarray:
    """[H, n] float32: numbers start..start + n of each row of the [H, V] table stored at `offset` (`shape`
    is the [V, H] view's)."""
    vocab, hidden = shape
    out = np.empty((hidden, n), np.float32)
    with open(path, "rb", buffering=0) as f:
        for h in range(hidden):
            f.seek(offset + 4 * (h * vocab + start))
            if f.readinto(memoryview(out[h]).cast("B")) != 4 * n:
                raise EdgemtpError(f"{path}: shorter than its table (truncated?)")
    return out


def int8_columns(w: np.ndarray) -> np.ndarray:
    """Bind-time transform: [C, d] centroids -> [d, C] uint8, each centroid rounded to -127..127 of its
    own scale (`_scales`), plus 128: the B operand of one [N, d] x [d, C] MatMulInteger."""
    w = np.asarray(w, np.float32)
    return (np.rint(w / _scales(w)[:, None]) + INT8_ZERO).astype(np.uint8).T.copy()


def _scales(rows: np.ndarray) -> np.ndarray:
    """Per-row symmetric int8 scale: max |row| / 127 (1 for an all-zero row, whose int8 row is zero)."""
    peak = np.abs(rows).max(axis=-1) / 127.0
    return np.where(peak > 0, peak, 1.0).astype(np.float32)


def additive_mask(mask: np.ndarray) -> np.ndarray:
    """[C, M] bool (True = real token) -> 0 / -inf float32, added to the candidate logits."""
    return np.where(np.asarray(mask, bool), 0.0, -np.inf).astype(np.float32)
