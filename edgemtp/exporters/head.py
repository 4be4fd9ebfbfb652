"""Logit heads as graph components: the full tied head and the two-stage clustered head (DESIGN §3).

Clustered head, per position:

    hidden [N, d] -> cluster scores [N, C] -> TopK -> picked [N, k]
                  -> candidate ids = token_ordering[picked]  [N, k*M]
                  -> exact logits over the gathered head rows  [N, k*M]  (soft-cap, padding -inf)
                  -> top token(s), their logits and probabilities over the candidates

N positions (a drafter flattens [B, S] first), d hidden, V vocab, C clusters, M = V/C (rounded up)
slots per cluster, k clusters kept. Weights are bound by name at save time like every other
parameter: the head rows are the (tied) embedding's own initializer, and the head tables come from
`edgemtp cluster` (keys `centroids`, `token_ordering`, `token_mask`) or, with `GEMMA4_KEYS`, from a
Gemma 4 assistant checkpoint's `masked_embedding.*` tensors (its flat [V] ordering is viewed as
[C, M] at bind time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .builder import FLOAT, INT64, GraphBuilder

INPUT = "hidden_states"
TOKEN_IDS, TOKEN_LOGITS, TOKEN_PROBS = "token_ids", "token_logits", "token_probs"
CANDIDATE_IDS, CANDIDATE_LOGITS = "candidate_ids", "candidate_logits"
LOGITS = "logits"


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

    @property
    def per_cluster(self) -> int:
        return -(-self.vocab // self.clusters)

    @property
    def padded(self) -> bool:
        """True when C does not divide V: padding slots exist and are masked."""
        return self.clusters * self.per_cluster != self.vocab

    @property
    def candidates(self) -> int:
        return self.top_k * self.per_cluster


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


def exact_logits(b: GraphBuilder, h: str, ids: str, embed_key: str, vocab: int, hidden: int) -> str:
    """h [N, d], ids [N, K] -> [N, K] = <h, head row of each id> (rows gathered from the tied table)."""
    rows = b.op("Gather", b.param(embed_key, (vocab, hidden)), ids, axis=0)  # [N, K, d]
    col = b.op("Unsqueeze", h, b.const([-1], np.int64))  # [N, d, 1]
    return b.op("Squeeze", b.op("MatMul", rows, col), b.const([-1], np.int64))


def mask_padding(b: GraphBuilder, logits: str, picked: str, key: str, shape: ClusteredShape) -> str:
    """Add -inf on padding slots: the mask is bound as an additive [C, M] float table."""
    table = b.param(key, (shape.clusters, shape.per_cluster), additive_mask, name=key + ".additive")
    add = b.op("Reshape", b.op("Gather", table, picked, axis=0), b.const([0, -1], np.int64))
    return b.op("Add", logits, add)


def softcap(b: GraphBuilder, x: str, cap: float | None) -> str:
    """cap * tanh(x / cap): Gemma's final logit soft-cap (identity when cap is None)."""
    if not cap:
        return x
    return b.op("Mul", b.op("Tanh", b.op("Div", x, b.const(np.float32(cap)))), b.const(np.float32(cap)))


def clustered_head(b: GraphBuilder, h: str, embed_key: str, shape: ClusteredShape,
                   cap: float | None = None, keys: HeadKeys = HeadKeys()) -> Candidates:
    """h [N, d] -> the candidates of the k best clusters and their exact (soft-capped) logits."""
    scores = cluster_scores(b, h, keys.centroids, shape.hidden, shape.clusters)
    picked = pick_clusters(b, scores, shape.top_k)
    ids = candidate_ids(b, picked, keys.token_ordering, shape)
    logits = softcap(b, exact_logits(b, h, ids, embed_key, shape.vocab, shape.hidden), cap)
    if shape.padded:
        logits = mask_padding(b, logits, picked, keys.token_mask, shape)
    return Candidates(ids, logits)


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
                    keys: HeadKeys = HeadKeys()) -> GraphBuilder:
    """Standalone head for measurement: `hidden_states` [N, d] -> token_ids / token_logits /
    token_probs [N, n_top] and candidate_ids / candidate_logits [N, k*M]."""
    b = GraphBuilder("clustered_head")
    h = b.input(INPUT, FLOAT, ["N", shape.hidden])
    cand = clustered_head(b, h, embed_key, shape, cap, keys)
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


def additive_mask(mask: np.ndarray) -> np.ndarray:
    """[C, M] bool (True = real token) -> 0 / -inf float32, added to the candidate logits."""
    return np.where(np.asarray(mask, bool), 0.0, -np.inf).astype(np.float32)
