"""Learning the clustered head from real final hidden states: the centroid matrix, then the assignment.

Shapes: N calibration positions, d hidden size, V vocabulary, C clusters, T cached top tokens per
position. numpy only (no torch): the problem is a softmax classifier with C classes.

Targets come from the full head on the calibration positions: `top_ids` [N, T] and `top_probs`
[N, T] (the T most probable tokens and their probabilities, best first).

* `train_centroids`: centroid matrix W [C, d] of a softmax classifier hidden -> cluster of the
  full-head argmax (optionally mixed with the clusters' probability mass: soft targets), trained with
  Adam from the k-means centroids and pulled back towards them (L2), so clusters the calibration
  text never reaches keep a sensible geometric centroid.
* `refine_assignment`: with W fixed, the classifier's log-likelihood of putting token t in cluster c
  is linear in W_c . s_t, where s_t sums the hidden states of the positions that predict t (weighted
  by probability). Often-predicted tokens move to their best cluster by swapping with a rarely
  predicted token there (sizes stay equal); W is then trained again.
* `packed_tables` (the best method measured, what `edgemtp cluster` builds): the in-domain tokens
  (predicted on the calibration text, occurring in it, or spelt with its characters only) are
  clustered among themselves into clusters of their own, the rest of the vocabulary (other scripts,
  byte pieces) into the remaining clusters; then trained centroids, then `swap_misplaced`.
  Mixing rarely predicted in-domain tokens into clusters of out-of-domain ones is what loses them:
  such clusters are never selected.
* `swap_misplaced`: often-predicted tokens whose cluster is rarely among the top-k where they are
  predicted swap into the cluster that is (hit rate measured with the trained centroids).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .clustering import (
    HeadTables,
    cluster_sizes,
    layout,
    member_means,
    tiered_assign,
)

Progress = Callable[[int, int, str], None]


def targets(top_ids: np.ndarray, top_probs: np.ndarray, cluster_of: np.ndarray, soft: float = 0.0) -> tuple:
    """Per-position target as a sparse mix: hard cluster of the argmax (1 - soft), and the probability
    mass of each cluster among the top tokens (soft). Returns (cols [N, T'], weights [N, T'])."""
    hard = cluster_of[top_ids[:, :1]]
    if not soft:
        return hard, np.ones(hard.shape, np.float32)
    cols = np.concatenate([hard, cluster_of[top_ids]], axis=1)
    mass = top_probs / np.maximum(top_probs.sum(axis=1, keepdims=True), 1e-12)
    weights = np.concatenate([np.full((len(mass), 1), 1.0 - soft), soft * mass], axis=1)
    return cols, weights.astype(np.float32)


def train_centroids(hidden: np.ndarray, cols: np.ndarray, weights: np.ndarray, init: np.ndarray,
                    epochs: int = 20, lr: float = 0.01, l2: float = 1e-4, batch: int = 1024, seed: int = 0,
                    progress: Progress | None = None) -> np.ndarray:
    """hidden [N, d], sparse targets (cols, weights) [N, T'], init [C, d] -> centroids [C, d].

    Minimises cross-entropy + l2 * ||W - init||^2 with Adam on hidden states scaled to unit mean norm
    (so lr and l2 do not depend on the model's hidden-state scale)."""
    scale = float(np.linalg.norm(hidden, axis=1).mean())
    x = (hidden / scale).astype(np.float32)
    init = _fit_temperature(x, cols, weights, init * scale)
    w, m, v = init.copy(), np.zeros_like(init), np.zeros_like(init)
    rng = np.random.default_rng(seed)
    step = 0
    for epoch in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // batch)):
            step += 1
            g = _grad(x[idx], cols[idx], weights[idx], w) + 2 * l2 * (w - init)
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            w -= lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
        if progress:
            progress(epoch + 1, epochs, "training centroids")
    return (w / scale).astype(np.float32)


def _grad(x: np.ndarray, cols: np.ndarray, weights: np.ndarray, w: np.ndarray) -> np.ndarray:
    """d/dW of the mean cross-entropy of softmax(x @ W.T) against the sparse targets."""
    logits = x @ w.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p *= weights.sum(axis=1, keepdims=True)
    np.add.at(p, (np.arange(len(x))[:, None], cols), -weights)
    return (p.T @ x) / len(x)


def _fit_temperature(x: np.ndarray, cols: np.ndarray, weights: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Scale the initial centroids by the best of a few temperatures (by cross-entropy): Adam then
    starts from calibrated scores instead of spending its first epochs on the scale."""
    sub = slice(0, min(len(x), 4096))
    logits = x[sub] @ w.T
    best, best_loss = 1.0, np.inf
    for t in 2.0 ** np.arange(-4, 9):
        z = t * logits
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        loss = float((weights[sub] * (lse[:, None] - np.take_along_axis(z, cols[sub], 1))).sum(1).mean())
        if loss < best_loss:
            best, best_loss = t, loss
    return (w * best).astype(np.float32)


def token_contexts(hidden: np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray,
                   vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the hidden states that predict each token, weighted by probability: s [V, d], mass [V]."""
    from scipy.sparse import csr_matrix
    rows = np.broadcast_to(np.arange(len(hidden))[:, None], top_ids.shape)
    p = csr_matrix((top_probs.ravel(), (top_ids.ravel(), rows.ravel())), shape=(vocab, len(hidden)))
    return np.asarray(p @ hidden, np.float32), np.asarray(p.sum(axis=1), np.float32).ravel()


def refine_assignment(tables: HeadTables, hidden: np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray,
                      min_mass: float = 1.0) -> HeadTables:
    """Move often-predicted tokens to the cluster the (trained) centroids send their contexts to.

    The classifier's log-likelihood of token t in cluster c is W_c . s_t up to a constant (s_t: the
    hidden states predicting t, probability-weighted). Each token with at least `min_mass` predicted
    mass whose best cluster is not its own swaps places with the least-predicted token there (so
    sizes stay equal and rare tokens, which barely matter, absorb the moves), best gain first."""
    s, mass = token_contexts(hidden, top_ids, top_probs, tables.vocab_size)
    cur = tables.cluster_of()
    heavy = np.flatnonzero(mass >= min_mass)
    gain = s[heavy] @ tables.centroids.T
    best = gain.argmax(axis=1)
    delta = gain[np.arange(len(heavy)), best] - gain[np.arange(len(heavy)), cur[heavy]]
    movers = np.argsort(-delta, kind="stable")
    movers = movers[delta[movers] > 0]
    light = np.argsort(mass, kind="stable")  # least predicted first
    light = light[mass[light] < min_mass]
    by_cluster = {c: list(light[cur[light] == c][::-1]) for c in np.unique(best[movers])}
    for i in movers:
        t, c = heavy[i], best[i]
        if by_cluster[c]:
            other = by_cluster[c].pop()
            cur[other], cur[t] = cur[t], c
    sizes = tables.token_mask.sum(axis=1)
    ordering, mask = layout(cur, sizes)
    return HeadTables(tables.centroids, ordering, mask)


def full_head_top(hidden: np.ndarray, embed: np.ndarray, top: int = 64, block: int = 256, softcap: float | None = None,
                  progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full head on [N, d] hidden states, in blocks: top ids [N, T], their probabilities [N, T]
    (best first) and the logsumexp [N] of all V logits."""
    n = len(hidden)
    ids, probs, lse = np.empty((n, top), np.int64), np.empty((n, top), np.float32), np.empty(n, np.float32)
    for start in range(0, n, block):
        z = hidden[start:start + block] @ embed.T
        if softcap:
            z = softcap * np.tanh(z / softcap)
        part = np.argpartition(-z, top - 1, axis=1)[:, :top]
        vals = np.take_along_axis(z, part, 1)
        order = np.argsort(-vals, axis=1, kind="stable")
        mx = z.max(axis=1, keepdims=True)
        lse_b = (np.log(np.exp(z - mx).sum(axis=1, keepdims=True)) + mx)
        ids[start:start + block] = np.take_along_axis(part, order, 1)
        probs[start:start + block] = np.exp(np.take_along_axis(vals, order, 1) - lse_b)
        lse[start:start + block] = lse_b[:, 0]
        if progress:
            progress(min(start + block, n), n, "full head on the calibration positions")
    return ids, probs, lse


def hidden_metric(hidden: np.ndarray) -> np.ndarray:
    """[d, d] square root of the hidden states' second moment E[h h^T]."""
    h = np.asarray(hidden, np.float64)
    vals, vecs = np.linalg.eigh(h.T @ h / len(h))
    return ((vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T).astype(np.float32)


# --- packed tables: in-domain tokens in clusters of their own ---------------------------------------

def predicted_mass(top_ids: np.ndarray, top_probs: np.ndarray, vocab: int) -> np.ndarray:
    """[V] float64: the summed probability of each token over the calibration positions (top lists)."""
    return np.bincount(top_ids.ravel(), weights=top_probs.ravel(), minlength=vocab)


def in_domain(mass: np.ndarray, token_texts: list[str] | None = None, chars: set[str] | None = None,
              seen: np.ndarray | None = None) -> np.ndarray:
    """[V] bool: tokens predicted on the calibration text (mass > 0), occurring in it (`seen`: token
    ids), or spelt only with characters of it (`chars`; default printable ASCII) when `token_texts`
    (each token's decoded text) is given."""
    out = np.asarray(mass) > 0
    if seen is not None:
        out[np.asarray(seen, np.int64)] = True
    if token_texts is not None:
        ok = set(chars) if chars is not None else {chr(c) for c in range(32, 127)} | {"\n", "\t"}
        ok.add(" ")
        spelt = np.fromiter((len(t) > 0 and all(ch in ok for ch in t) for t in token_texts), bool, len(token_texts))
        out[:len(spelt)] |= spelt
    return out


def packed_tables(embed: np.ndarray, clusters: int, hidden: np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray,
                  domain: np.ndarray | None = None, seed: int = 0, epochs: int = 4, refine: int = 2,
                  floor: float = 0.01, swap: bool = True, progress: Progress | None = None) -> HeadTables:
    """The clustered head from calibration data, in-domain tokens packed into clusters of their own.

    embed [V, d], hidden [N, d], top_ids / top_probs [N, T] (see `full_head_top`), domain [V] bool
    (see `in_domain`; default: the predicted tokens only). Rows are clustered as embed @ metric (the
    hidden states' geometry, see `cluster_vocab_weighted`), in-domain tokens first; the balanced
    assignment keeps often-predicted tokens in place; centroids are trained as a softmax classifier;
    then `swap_misplaced` and a short retraining."""
    embed = np.asarray(embed, np.float32)
    vocab = len(embed)
    mass = predicted_mass(top_ids, top_probs, vocab)
    weights = (mass + floor).astype(np.float32)
    domain = mass > 0 if domain is None else np.asarray(domain, bool)
    rows = embed @ hidden_metric(hidden)
    groups = [np.flatnonzero(domain), np.flatnonzero(~domain)]
    sizes = cluster_sizes(vocab, clusters)
    assign = tiered_assign(rows, groups, sizes, weights, seed, refine, progress=progress)
    del rows
    ordering, mask = layout(assign, sizes)
    tables = HeadTables(member_means(embed, assign, clusters, weights), ordering, mask)
    cols, w = targets(top_ids[:, :1], top_probs[:, :1], assign)
    tables = tables.with_centroids(train_centroids(hidden, cols, w, tables.centroids, epochs, seed=seed,
                                                   progress=progress))
    if not swap:
        return tables
    swapped, moved = swap_misplaced(tables, hidden, top_ids, top_probs, mass=mass)
    if not moved:
        return tables
    cols, w = targets(top_ids[:, :1], top_probs[:, :1], swapped.cluster_of())
    return swapped.with_centroids(train_centroids(hidden, cols, w, tables.centroids, max(1, epochs // 2),
                                                  seed=seed, progress=progress))


def top_clusters(hidden: np.ndarray, centroids: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """[N, k] the k best-scoring clusters of each position (unordered)."""
    k = min(k, len(centroids))
    out = np.empty((len(hidden), k), np.int64)
    for start in range(0, len(hidden), block):
        s = hidden[start:start + block] @ centroids.T
        out[start:start + block] = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.arange(k)
    return out


def hit_scores(hidden: np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray, centroids: np.ndarray, k: int,
               vocab: int):
    """Sparse [V, C] (scipy CSR): sum over positions of p(t | position) * [c among the position's top-k
    clusters]. Row t over its mass: how often cluster c would be selected where t is predicted."""
    from scipy.sparse import csr_matrix
    n, t = top_ids.shape
    pos = np.repeat(np.arange(n), t)
    p = csr_matrix((top_probs.ravel().astype(np.float32), (top_ids.ravel(), pos)), shape=(vocab, n))
    top = top_clusters(hidden, centroids, k)
    hit = csr_matrix((np.ones(top.size, np.float32), (np.repeat(np.arange(n), top.shape[1]), top.ravel())),
                     shape=(n, len(centroids)))
    return (p @ hit).tocsr()


def swap_misplaced(tables: HeadTables, hidden: np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray,
                   k: int = 32, min_mass: float = 1.0, max_hit: float = 0.8, gain: float = 1.5,
                   mass: np.ndarray | None = None) -> tuple[HeadTables, int]:
    """Swap often-predicted tokens out of clusters that are rarely selected where they are predicted.

    A token with predicted mass >= `min_mass` whose cluster is among the top-k (by the centroids) on
    less than `max_hit` of its mass, and whose best cluster scores at least `gain` times better, swaps
    places with the least-predicted token of that best cluster (sizes stay equal), best gain first.
    Returns (tables with the same centroids, number of swaps)."""
    vocab = tables.vocab_size
    mass = predicted_mass(top_ids, top_probs, vocab) if mass is None else mass
    cur = tables.cluster_of()
    cand = np.flatnonzero(mass >= min_mass)
    if len(cand) == 0:
        return tables, 0
    hits = hit_scores(hidden, top_ids, top_probs, tables.centroids, min(k, tables.clusters), vocab)[cand]
    best = np.asarray(hits.argmax(axis=1)).ravel()
    best_v = hits.max(axis=1).toarray().ravel()
    cur_v = np.asarray(hits[np.arange(len(cand)), cur[cand]]).ravel()
    move = (cur_v < max_hit * mass[cand]) & (best_v >= gain * np.maximum(cur_v, 1e-12)) & (best != cur[cand])
    movers, dest, by = cand[move], best[move], np.argsort(-(best_v - cur_v)[move], kind="stable")
    locked = np.zeros(vocab, bool)
    locked[movers] = True
    light: dict[int, list[int]] = {}
    swaps = 0
    for i in by:
        t, c = movers[i], dest[i]
        if c not in light:
            members = np.flatnonzero(cur == c)
            light[c] = list(members[np.argsort(-mass[members], kind="stable")])  # pop(): least predicted
        pool = light[c]
        while pool and (locked[pool[-1]] or cur[pool[-1]] != c):
            pool.pop()
        if not pool or mass[pool[-1]] >= mass[t]:
            continue
        other = pool.pop()
        cur[other], cur[t] = cur[t], c
        locked[other] = True
        swaps += 1
    ordering, mask = layout(cur, tables.token_mask.sum(axis=1))
    return HeadTables(tables.centroids, ordering, mask), swaps
