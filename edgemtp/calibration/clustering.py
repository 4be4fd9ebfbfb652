"""Equal-size clusters of the vocabulary for the two-stage (clustered) logit head (DESIGN §3).

Shapes: V vocabulary, d hidden size, C clusters, M = ceil(V / C) slots per cluster, N positions,
L candidate clusters kept per token while balancing.

The head's tables use Gemma 4's names (`masked_embedding.centroids`, `.token_ordering`) so an
assistant checkpoint's own tensors drop in:

    centroids       [C, d] float32  cluster score = hidden @ centroids.T
    token_ordering  [C, M] int64    the token ids of each cluster (a permutation of the vocabulary)
    token_mask      [C, M] bool     False on padding slots

V not divisible by C: the first V - C*(M-1) clusters hold M tokens, the rest M-1 tokens and one
padding slot. A padding slot repeats a real token of its own cluster (so every id is a valid row of
the embedding table, and the argmax is unchanged: a duplicate can never beat its original) and is
masked out of probabilities. When C divides V there is no padding and the mask is all True.

Without data (`cluster_vocab`): spherical k-means (scikit-learn KMeans on L2-normalised, centred
rows, fitted on a sample; plain MiniBatchKMeans collapses on embedding tables). With calibration
hidden states (`cluster_vocab_weighted`): k-means in the hidden states' geometry, and a balancing
that moves rarely predicted tokens first. Either way the assignment is *balanced*:
per-cluster prices are raised on over-full clusters until almost every token's best price-adjusted
cluster has room (a Lagrangian relaxation of the capacity constraint), then rounds in which every
unplaced token proposes to its next-best cluster and each cluster keeps its best proposers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class HeadTables:
    """The clustered head's tensors; see the module docstring for shapes."""

    centroids: np.ndarray
    token_ordering: np.ndarray
    token_mask: np.ndarray

    @property
    def clusters(self) -> int:
        return int(self.token_ordering.shape[0])

    @property
    def per_cluster(self) -> int:
        return int(self.token_ordering.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.token_mask.sum())

    def cluster_of(self) -> np.ndarray:
        """[V] int64: the cluster of each token."""
        out = np.empty(self.vocab_size, np.int64)
        rows = np.broadcast_to(np.arange(self.clusters)[:, None], self.token_ordering.shape)
        out[self.token_ordering[self.token_mask]] = rows[self.token_mask]
        return out

    def with_centroids(self, centroids: np.ndarray) -> HeadTables:
        return HeadTables(np.ascontiguousarray(centroids, np.float32), self.token_ordering, self.token_mask)


def table_problem(tables: HeadTables) -> str:
    """What keeps the head graph (exporters/head.py) from taking `tables`, '' if nothing: it takes clusters of
    M = ceil(V / C) slots, gathers a row of the table for every slot (padding too) and drafts any unmasked one,
    so every slot must hold a token id and the unmasked ones each token once (as `layout` makes them)."""
    ordering, mask, centroids = tables.token_ordering, tables.token_mask, tables.centroids
    if ordering.ndim != 2 or ordering.shape != mask.shape or centroids.ndim != 2 or len(centroids) != len(ordering):
        return (f"token_ordering {list(ordering.shape)}, token_mask {list(mask.shape)} and centroids "
                f"{list(centroids.shape)} must be [C, M], [C, M] and [C, hidden]")
    vocab, clusters = tables.vocab_size, tables.clusters
    if vocab == 0:
        return "token_mask marks no token"
    per = -(-vocab // clusters)
    if ordering.shape[1] != per:
        return (f"token_ordering is {list(ordering.shape)}: {vocab} tokens in {clusters} clusters take "
                f"[{clusters}, {per}] (at most {per} tokens a cluster, as `edgemtp cluster` makes them)")
    bad = np.argwhere((ordering < 0) | (ordering >= vocab))
    if len(bad):
        at = tuple(int(i) for i in bad[0])
        return f"token_ordering holds {ordering[at]} at {list(at)}, not a token id (0..{vocab - 1})"
    counts = np.bincount(ordering[mask], minlength=vocab)
    if (counts != 1).any():
        return (f"token_ordering's unmasked slots hold token {int(np.argmax(counts > 1))} twice and miss token "
                f"{int(np.argmax(counts == 0))} (each token must be in one cluster)")
    return ""


def check_sizes(vocab: int, clusters: int, top_k: int | None = None, prefix: str = "") -> None:
    """Raise ArgumentError unless 1 <= top_k <= clusters <= vocab: it names the arguments `clusters` and `top_k`
    (with `prefix`: head_clusters=) from Python, --clusters and --top-k (--head-clusters) from the CLI."""
    if clusters < 1:
        raise ArgumentError(f"{prefix}clusters", clusters, "needs at least 1 cluster")
    if clusters > vocab:
        raise ArgumentError(f"{prefix}clusters", clusters, f"is more than the vocabulary ({vocab} tokens)")
    if top_k is not None and not 1 <= top_k <= clusters:
        raise ArgumentError(f"{prefix}top_k", top_k, f"must be between 1 and the number of clusters ({clusters})")


def cluster_sizes(vocab: int, clusters: int) -> np.ndarray:
    """[C] int64: M tokens in the first V - C*(M-1) clusters, M-1 in the rest."""
    check_sizes(vocab, clusters)
    per = -(-vocab // clusters)
    sizes = np.full(clusters, per - 1, np.int64)
    sizes[: vocab - clusters * (per - 1)] = per
    return sizes


def unit_rows(x: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """[n, d] -> [n, d] float32 rows (minus `center`) scaled to unit length."""
    x = np.asarray(x, np.float32)
    if center is not None:
        x = x - center
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans(rows: np.ndarray, clusters: int, seed: int = 0, sample: int = 32768, iters: int = 12) -> np.ndarray:
    """[n, d] rows -> [C, d] centroids: scikit-learn KMeans (random init) on a seeded sample."""
    from sklearn.cluster import KMeans
    rng = np.random.default_rng(seed)
    n = len(rows)
    pick = np.sort(rng.choice(n, size=min(n, max(sample, clusters)), replace=False))
    km = KMeans(clusters, init="random", n_init=1, max_iter=iters, tol=0.0, random_state=seed,
                algorithm="lloyd")
    km.fit(rows[pick])
    return km.cluster_centers_.astype(np.float32)


def euclidean(rows: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Augment so that a dot product ranks by distance: [x, 1] . [c, -|c|^2/2] = x.c - |c|^2/2."""
    ones = np.ones((len(rows), 1), np.float32)
    half = -0.5 * (centroids * centroids).sum(axis=1, keepdims=True)
    return np.hstack([rows, ones]), np.hstack([centroids, half]).astype(np.float32)


def top_candidates(rows: np.ndarray, centroids: np.ndarray, width: int, block: int = 16384,
                   progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `width` best clusters of each row by dot product: ids [n, L] int64, scores [n, L] float32."""
    n, width = len(rows), min(width, len(centroids))
    ids = np.empty((n, width), np.int64)
    scores = np.empty((n, width), np.float32)
    ct = np.ascontiguousarray(centroids.T, np.float32)
    for start in range(0, n, block):
        s = rows[start:start + block] @ ct
        part = np.argpartition(-s, width - 1, axis=1)[:, :width] if width < s.shape[1] else \
            np.broadcast_to(np.arange(s.shape[1]), s.shape)
        ids[start:start + block] = part
        scores[start:start + block] = np.take_along_axis(s, part, axis=1)
        if progress:
            progress(min(start + block, n), n, "scoring tokens against centroids")
    return ids, scores


def balance_prices(ids: np.ndarray, scores: np.ndarray, sizes: np.ndarray, steps: int = 60) -> np.ndarray:
    """[C] prices such that each token's best `score - price` candidate rarely overfills a cluster.

    Subgradient ascent on the dual of the capacity constraints; the step is scaled by the typical
    gap between a token's two best candidates, so it adapts to the score scale."""
    order = np.sort(scores, axis=1)
    gap = float(np.median(order[:, -1] - order[:, -2])) if scores.shape[1] > 1 else 1.0
    prices = np.zeros(len(sizes), np.float64)
    for t in range(steps):
        choice = _best(ids, scores, prices)
        over = np.bincount(choice, minlength=len(sizes)) - sizes
        if over.clip(0).sum() <= 0.002 * len(ids):
            break
        prices = np.maximum(prices + (2.0 * gap / (1 + t) ** 0.5) * over / np.maximum(sizes, 1), 0.0)
    return prices.astype(np.float32)


def _best(ids: np.ndarray, scores: np.ndarray, prices: np.ndarray) -> np.ndarray:
    adj = scores - prices[ids]
    return ids[np.arange(len(ids)), adj.argmax(axis=1)]


def place_in_rounds(ids: np.ndarray, scores: np.ndarray, room: np.ndarray) -> np.ndarray:
    """[n] cluster per token, -1 where all of its candidates filled up.

    Each round every unplaced token proposes to its next-best candidate; a cluster keeps its
    best-scoring proposers up to its remaining room. `room` [C] is updated in place."""
    n, width = ids.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    assign = np.full(n, -1, np.int64)
    ptr = np.zeros(n, np.int64)
    while True:
        todo = np.flatnonzero((assign < 0) & (ptr < width))
        if len(todo) == 0:
            return assign
        want, score = ids[todo, ptr[todo]], scores[todo, ptr[todo]]
        by = np.lexsort((todo, -score, want))
        want_by = want[by]
        first = np.searchsorted(want_by, want_by, side="left")
        keep = (np.arange(len(by)) - first) < room[want_by]
        assign[todo[by[keep]]] = want_by[keep]
        room -= np.bincount(want_by[keep], minlength=len(room))
        ptr[todo[by[~keep]]] += 1


def neighbor_candidates(rows: np.ndarray, assign: np.ndarray, sizes: np.ndarray, centroids: np.ndarray,
                        width: int, neighbors: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Like `top_candidates`, but each row is scored only against the `neighbors` centroids nearest
    to its current (balanced) cluster's: ~30x cheaper than a full pass, enough for refinement."""
    nb = min(neighbors, len(centroids))
    width = min(width, nb)
    near = np.argsort(-(centroids @ centroids.T), axis=1, kind="stable")[:, :nb]  # [C, nb]
    ordering, mask = layout(assign, sizes)  # [C, M]: the members of each cluster, one batch
    s = np.matmul(rows[ordering], centroids[near].transpose(0, 2, 1))  # [C, M, nb]
    top = np.argsort(-s, axis=2, kind="stable")[:, :, :width]
    ids = np.empty((len(rows), width), np.int64)
    scores = np.empty((len(rows), width), np.float32)
    ids[ordering[mask]] = np.take_along_axis(np.broadcast_to(near[:, None, :], s.shape), top, 2)[mask]
    scores[ordering[mask]] = np.take_along_axis(s, top, 2)[mask]
    return ids, scores


def balanced_assign(rows: np.ndarray, centroids: np.ndarray, sizes: np.ndarray, width: int = 24,
                    candidates: tuple[np.ndarray, np.ndarray] | None = None, weights: np.ndarray | None = None,
                    progress: Progress | None = None) -> np.ndarray:
    """[V] cluster of each row, with at most sizes[c] rows in cluster c (exactly, when the sizes sum
    to V), maximising the sum of weights[t] * (rows @ centroids.T)[t, cluster of t]: heavy rows keep
    their best cluster and light ones move when a cluster is over-full.

    `candidates` (ids, scores) [V, L] skips the full scoring pass (see `neighbor_candidates`)."""
    ids, scores = candidates or top_candidates(rows, centroids, width, progress=progress)
    if weights is not None:
        scores = scores * weights[:, None].astype(np.float32)
    prices = balance_prices(ids, scores, sizes)
    room = sizes.copy()
    assign = place_in_rounds(ids, scores - prices[ids], room)
    left = np.flatnonzero(assign < 0)
    if len(left):  # every candidate full: any cluster with room, best first
        open_ = np.flatnonzero(room > 0)
        s = rows[left] @ centroids[open_].T
        assign[left] = place_in_rounds(np.broadcast_to(open_, s.shape).copy(), s, room)
    return assign


def tiered_assign(rows: np.ndarray, groups: list[np.ndarray], sizes: np.ndarray, weights: np.ndarray | None = None,
                  seed: int = 0, refine: int = 2, sample: int = 65536, progress: Progress | None = None) -> np.ndarray:
    """[V] cluster of each row, the rows of each group packed into clusters of their own.

    groups: disjoint index arrays covering all rows, in order: group g takes the next
    ceil(rest / M) clusters after filling the room (less than one cluster's worth) its predecessors
    left, so a group shares clusters with the next one only through that slack.
    Inside a group: k-means (Euclidean, `rows` already in the metric wanted), then the weighted
    balanced assignment and `refine` balanced Lloyd rounds (member means, reassign)."""
    weights = np.ones(len(rows), np.float32) if weights is None else np.asarray(weights, np.float32)
    assign = np.full(len(rows), -1, np.int64)
    room, start = sizes.copy(), 0
    groups = [np.asarray(g, np.int64) for g in groups if len(g)]
    for gi, tok in enumerate(groups):
        _tick(progress, gi, len(groups), f"k-means of token group {gi + 1} of {len(groups)} ({len(tok)} tokens)")
        partial = np.flatnonzero(room[:start] > 0)
        # clusters needed beyond the predecessors' slack, counted by their own sizes: the later clusters
        # hold M-1 tokens, so ceil(rest / M) of them can be too few (tokens left over, a crash)
        rest = len(tok) - int(room[partial].sum())
        need = min(len(sizes) - start, int(np.searchsorted(np.cumsum(sizes[start:]), rest)) + 1 if rest > 0 else 0)
        if gi == len(groups) - 1:
            need = len(sizes) - start  # the last group takes every cluster left
        new = np.arange(start, start + need)
        cand = np.concatenate([partial, new])
        cents = ([member_means(rows, np.where(assign >= 0, assign, len(sizes)), len(sizes) + 1)[partial]]
                 if len(partial) else [])
        if need:
            cents.append(kmeans(rows[tok], need, seed + gi, sample=sample))
        cent = np.vstack(cents)
        cap = room[cand].copy()
        a = _balanced_euclidean(rows[tok], cent, cap, weights[tok])
        for _ in range(refine):
            moved_cent = member_means(rows[tok], a, len(cand))
            keep = np.bincount(a, minlength=len(cand)) == 0  # empty: keep the old centroid
            moved_cent[keep] = cent[keep]
            cent = moved_cent
            a = _balanced_euclidean(rows[tok], cent, cap, weights[tok])
        assign[tok] = cand[a]
        room[cand] -= np.bincount(a, minlength=len(cand))
        start += need
    _tick(progress, len(groups), len(groups), "done")
    return assign


def _balanced_euclidean(rows: np.ndarray, centroids: np.ndarray, cap: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Balanced assignment by distance to `centroids` (weighted, capacities `cap` summing to >= n)."""
    aug, cent = euclidean(rows, centroids)
    return balanced_assign(aug, cent, cap, weights=weights)


def layout(assign: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[V] cluster per token -> token_ordering [C, M] int64, token_mask [C, M] bool.

    Tokens keep increasing id order inside a cluster; padding slots repeat the cluster's first token."""
    counts = np.bincount(assign, minlength=len(sizes))
    if not np.array_equal(counts, sizes):
        raise ValueError("assignment does not match the cluster sizes")
    per = int(sizes.max())
    tokens = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot = np.arange(per)[None, :]
    mask = slot < sizes[:, None]
    index = starts[:, None] + np.where(mask, slot, 0)
    return tokens[index].astype(np.int64), mask


def cluster_vocab(embed: np.ndarray, clusters: int, seed: int = 0, refine: int = 2,
                  progress: Progress | None = None) -> HeadTables:
    """[V, d] head rows -> HeadTables by balanced spherical k-means (no data needed).

    Rows are centred and L2-normalised; `centroids` are the clusters' mean head rows (the score is
    then a cluster's mean logit). `edgemtp.calibration.centroids` does better with hidden states."""
    check_sizes(len(embed), clusters)
    sizes = cluster_sizes(len(embed), clusters)
    rows = unit_rows(embed, np.asarray(embed, np.float32).mean(axis=0))
    steps = refine + 2
    _tick(progress, 0, steps, "k-means on a sample of the vocabulary")
    cent = unit_rows(kmeans(rows, clusters, seed))
    _tick(progress, 1, steps, "balanced assignment of every token")
    assign = balanced_assign(rows, cent, sizes)
    for it in range(refine):
        _tick(progress, 2 + it, steps, "balanced k-means refinement")
        cent = member_means(rows, assign, clusters, unit=True)
        assign = balanced_assign(rows, cent, sizes, candidates=neighbor_candidates(rows, assign, sizes, cent, 24))
    _tick(progress, steps, steps, "done")
    ordering, mask = layout(assign, sizes)
    return HeadTables(member_means(np.asarray(embed, np.float32), assign, clusters), ordering, mask)


def cluster_vocab_weighted(embed: np.ndarray, clusters: int, metric: np.ndarray, weights: np.ndarray,
                           seed: int = 0, progress: Progress | None = None) -> HeadTables:
    """Balanced k-means in the geometry the hidden states see, keeping heavy tokens in place.

    metric [d, d]: rows are clustered as embed @ metric (metric = the square root of the hidden
    states' second moment, so a squared distance is the expected squared logit difference).
    weights [V]: how often each token is predicted (plus a floor): k-means itself is unweighted
    (weighting it overfits the calibration text), but the balanced assignment and the centroids
    (weighted mean head rows) favour heavy tokens, so balancing moves the rarely predicted ones."""
    check_sizes(len(embed), clusters)
    sizes = cluster_sizes(len(embed), clusters)
    rows = np.asarray(embed, np.float32) @ metric.astype(np.float32)
    _tick(progress, 0, 2, "k-means on a sample of the vocabulary")
    rows, cent = euclidean(rows, kmeans(rows, clusters, seed))
    _tick(progress, 1, 2, "weighted balanced assignment of every token")
    assign = balanced_assign(rows, cent, sizes, weights=weights)
    _tick(progress, 2, 2, "done")
    ordering, mask = layout(assign, sizes)
    return HeadTables(member_means(embed, assign, clusters, weights), ordering, mask)


def member_means(rows: np.ndarray, assign: np.ndarray, clusters: int, weights: np.ndarray | None = None,
                 unit: bool = False) -> np.ndarray:
    """[C, d] (weighted) mean row of each cluster (unit length if `unit`; empty clusters: zeros)."""
    rows = np.asarray(rows, np.float32)
    w = np.ones(len(rows), np.float32) if weights is None else np.asarray(weights, np.float32)
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(clusters + 1))
    full = np.diff(bounds) > 0
    sums = np.zeros((clusters, rows.shape[1]), np.float32)
    sums[full] = np.add.reduceat(rows[order] * w[order, None], bounds[:-1][full], axis=0)
    total = np.bincount(assign, weights=w, minlength=clusters)
    means = (sums / np.maximum(total, 1e-12)[:, None]).astype(np.float32)
    return unit_rows(means) if unit else means


def _tick(progress: Progress | None, done: int, total: int, desc: str) -> None:
    if progress:
        progress(done, total, desc)


# --- the two-stage head in numpy: the reference the ONNX graph is tested against -----------------

def select_clusters(hidden: np.ndarray, centroids: np.ndarray, top_k: int) -> np.ndarray:
    """hidden [N, d] -> [N, k] cluster ids, best score first (ties: lower id first, as TopK)."""
    scores = hidden @ centroids.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :top_k]


def clustered_logits(hidden: np.ndarray, embed: np.ndarray, tables: HeadTables, top_k: int,
                     softcap: float | None = None, context: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """hidden [N, d] -> candidate ids [N, k*M (+ W)] and their logits (padding slots: -inf).

    context [N, W]: recent token ids (-1: none), candidates too (exporters/head.py `add_context`); one that
    is -1, already a live cluster candidate or repeated later in its row gets -inf."""
    check_sizes(tables.vocab_size, tables.clusters, top_k)
    picked = select_clusters(hidden, tables.centroids, top_k)
    ids = tables.token_ordering[picked].reshape(len(hidden), -1)
    valid = tables.token_mask[picked].reshape(len(hidden), -1)
    if context is not None:
        ctx = np.asarray(context, np.int64)
        dup = np.zeros(ctx.shape, bool)
        for n, (r, i, v) in enumerate(zip(ctx, ids, valid)):
            live = set(i[v].tolist())
            dup[n] = [t < 0 or t in live or t in r[j + 1:] for j, t in enumerate(r.tolist())]
        ids, valid = np.concatenate([ids, np.maximum(ctx, 0)], 1), np.concatenate([valid, ~dup], 1)
    logits = np.einsum("nd,nkd->nk", hidden, embed[ids])
    if softcap:
        logits = softcap * np.tanh(logits / softcap)
    return ids, np.where(valid, logits, -np.inf).astype(np.float32)


def clustered_argmax(hidden: np.ndarray, embed: np.ndarray, tables: HeadTables, top_k: int,
                     context: np.ndarray | None = None) -> np.ndarray:
    """[N] the best token among the selected clusters (and the `context` ids, see clustered_logits)."""
    ids, logits = clustered_logits(hidden, embed, tables, top_k, context=context)
    return ids[np.arange(len(ids)), logits.argmax(axis=1)]
