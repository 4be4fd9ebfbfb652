"""Acceptance: how many of a round's drafts the target keeps, and the token it emits after them.

greedy_choices (greedy: the target's tokens up to the first rejected draft; count_accepted, the length of the
accepted prefix) and accept_sampled (rejection sampling), with RowDistributions, the verify pass's distributions
computed row by row as acceptance reads them: the math of a round, apart from the loop in speculative.py, which
imports greedy_choices, accept_sampled and RowDistributions (tests still find the last two there).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .sampling import BadLogits, Sampling, Seen, as_seen, check_best, distribution, draw, greedy_token, penalize


def count_accepted(draft: Sequence[int], target_choice: Sequence[int]) -> int:
    """Greedy acceptance: the length of the longest prefix of `draft` [n] that equals `target_choice`
    (the target's argmax at each draft position, [>= n])."""
    n = len(draft)
    mismatch = np.flatnonzero(np.asarray(draft[:n]) != np.asarray(target_choice[:n]))
    return int(mismatch[0]) if mismatch.size else n


def accept_sampled(draft: Sequence[int], p: "np.ndarray | RowDistributions", q: np.ndarray | None,
                   rng: np.random.Generator) -> tuple[int, int]:
    """Rejection sampling (Leviathan et al. 2023, Chen et al. 2023) -> (accepted a, next token).

    draft [n] was drawn from q [n, V] (None: a deterministic drafter, q one-hot at each draft token);
    p [n+1, V] is the target's distribution at each verify position (read row by row: RowDistributions).
    Draft token x is accepted with probability min(1, p(x)/q(x)); at the first rejection the next token is
    drawn from norm(max(0, p - q)); when all n are accepted it is drawn from p[n]. draft[:a] + [next] is
    then distributed exactly as a+1 tokens sampled from the target."""
    for i, x in enumerate(draft):
        qx = 1.0 if q is None else float(q[i, x])
        if rng.random() * qx < p[i][x]:  # u < p/q without dividing
            continue
        # one full-vocabulary array, changed in place: np.maximum(p - q, 0) / total made three (2 MB each at
        # 262,144 ids), 1.8 ms against 0.3 per rejection (timeit, Gemma 3 270M's target and drafter rows)
        if q is None:
            residual = p[i].copy()
            residual[x] = 0.0
        else:
            residual = np.subtract(p[i], q[i])
            np.maximum(residual, 0.0, out=residual)
        total = residual.sum()
        if not total > 0:  # 0 only when p == q, where a rejection has probability 0: guard rounding
            return i, draw(p[i], rng)
        residual /= total
        return i, draw(residual, rng)
    return len(draft), draw(p[len(draft)], rng)


def greedy_choices(logits: np.ndarray, sampling: Sampling, history: Sequence[int] | Seen,
                   draft: Sequence[int]) -> np.ndarray:
    """The target's greedy token at each verify position of logits [n+1, V] up to the first that rejects a draft
    (or the last): [a+1] for a accepted drafts, the last the token that follows them. The positions follow
    history, then history + draft[:1], ... (the repetition penalty reads them; a stream's Seen: its ids).
    Rows after the first rejection are thrown away, so they are neither penalized nor checked: NaN in one (an
    overflow at a position the reply does not reach) stopped generation."""
    if not sampling.penalized:
        choice = logits.argmax(axis=-1)
        used = count_accepted(draft, choice) + 1
        check_best(logits[np.arange(used), choice[:used]])
        return choice[:used]
    seen, choice = as_seen(history), []
    for i, row in enumerate(logits):
        choice.append(in_row(i, greedy_token, penalize(row, sampling, seen.plus(draft[:i]))))
        if i == len(draft) or choice[i] != draft[i]:
            break
    return np.array(choice)


def in_row(i: int, choose, *args, **kwargs):
    """choose(*args, **kwargs), a BadLogits from it saying it came from row i of a block (a verify pass's position,
    a draft's step: the caller names the position)."""
    try:
        return choose(*args, **kwargs)
    except BadLogits as e:
        e.row = i
        raise


class RowDistributions:
    """p[i]: distribution(logits[i], sampling, history + draft[:i]), computed when first asked for. Acceptance
    reads the rows up to the first rejected draft only, and a row costs 1-4 ms over 262,144 logits (float64
    softmax, top-k, top-p): with a quarter of sampled drafts accepted, most rows of a verify pass were computed
    for nothing. The same numbers as distribution() over the whole block (it works row by row).
    history: the tokens before the first verify position (prompt and emitted), for the repetition penalty (a
    stream's Seen: their distinct ids)."""

    def __init__(self, logits: np.ndarray, sampling: Sampling, history: Sequence[int] | Seen = (),
                 draft: Sequence[int] = ()):
        self.logits, self.sampling, self.rows = logits, sampling, {}
        self.history, self.draft = history, draft

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self.rows:
            if self.sampling.penalized and not isinstance(self.history, Seen):
                self.history = Seen(self.history)  # once, for every row read
            seen = self.history.plus(self.draft[:i]) if self.sampling.penalized else ()
            self.rows[i] = in_row(i, distribution, self.logits[i], self.sampling, seen)
        return self.rows[i]
