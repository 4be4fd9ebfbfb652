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
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .clustering import HeadTables, cluster_vocab_weighted, layout

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


def full_head_top(hidden: np.ndarray, embed: np.ndarray, top: int = 64, block: int = 256,
                  softcap: float | None = None, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def calibrated_tables(embed: np.ndarray, clusters: int, hidden: np.ndarray, top_ids: np.ndarray,
                      top_probs: np.ndarray, seed: int = 0, epochs: int = 4, floor: float = 0.01,
                      progress: Progress | None = None) -> HeadTables:
    """The clustered head from calibration data: k-means in the hidden states' geometry, balanced
    so that rarely predicted tokens move, then centroids trained on the hidden states.

    embed [V, d], hidden [N, d], top_ids / top_probs [N, T] (see `full_head_top`)."""
    mass = np.bincount(top_ids.ravel(), weights=top_probs.ravel(), minlength=len(embed))
    tables = cluster_vocab_weighted(embed, clusters, hidden_metric(hidden), (mass + floor).astype(np.float32),
                                    seed, progress)
    cols, weights = targets(top_ids, top_probs, tables.cluster_of())
    return tables.with_centroids(train_centroids(hidden, cols, weights, tables.centroids, epochs,
                                                 seed=seed, progress=progress))
