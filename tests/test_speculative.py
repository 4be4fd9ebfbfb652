"""Speculative decoding with prompt-lookup drafts: acceptance maths, drafting, and end-to-end runs on
tiny random models (greedy output identical to plain decoding; sampling preserves the distribution)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import warnings
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from edgemtp.cli.run import speed_line
from edgemtp.errors import EdgemtpError
from edgemtp.runtime import acceptance
from edgemtp.runtime import speculative as spec
from edgemtp.runtime.drafting import DraftContext, PromptLookupDrafter, continuation, last_match
from edgemtp.runtime.kv_cache import KVCache
from edgemtp.runtime.sampling import Sampling, distribution
from edgemtp.runtime.acceptance import count_accepted
from edgemtp.runtime.speculative import (RowDistributions, SpecStats, Speculative, accept_sampled,
                                         speculative_generate)
from edgemtp.runtime.target import CapacityError


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("draft, choice, want", [
    ([], [7], 0),
    ([5], [5, 9], 1),
    ([5], [6, 9], 0),
    ([1, 2, 3], [1, 2, 3, 4], 3),
    ([1, 2, 3], [1, 2, 4, 4], 2),
    ([1, 2, 3], [9, 2, 3, 4], 0),  # a later match after a mismatch does not count
    ([4, 4, 4, 4], [4, 4, 5, 4, 4], 2),
])
def test_count_accepted(draft, choice, want):
    assert count_accepted(draft, choice) == want
    assert count_accepted(np.array(draft, np.int64), np.array(choice)) == want


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(repetition_penalty=1.3)])
def test_greedy_choices_read_the_rows_up_to_the_first_rejection_only(sampling):
    """Verify rows after the first rejected draft are thrown away: NaN there (an overflow at a position the
    target would not have reached) stopped generation. A NaN in a row that is used still raises, naming it."""
    from edgemtp.runtime.sampling import BadLogits

    logits = np.zeros((4, 8), np.float32)
    logits[0, 2] = logits[1, 3] = logits[2, 4] = 5.0
    logits[3] = np.nan
    # draft [2, 6, 4]: row 0 accepts 2, row 1 rejects 6 and chooses 3; rows 2 and 3 are not read
    assert list(acceptance.greedy_choices(logits, sampling, [1], [2, 6, 4])) == [2, 3]
    logits[2] = np.nan
    assert list(acceptance.greedy_choices(logits, sampling, [1], [2, 6, 4])) == [2, 3]
    assert list(acceptance.greedy_choices(logits, sampling, [1], [7, 6, 4])) == [2]
    with pytest.raises(BadLogits) as caught:  # draft [2, 3, 4]: row 2 is used, and bad
        acceptance.greedy_choices(logits, sampling, [1], [2, 3, 4])
    assert caught.value.row == 2
    logits[2:] = 0.0
    logits[2, 4] = 5.0
    assert list(acceptance.greedy_choices(logits, sampling, [1], [2, 3, 4])) == [2, 3, 4, 0]  # all accepted


def _first_token_pvalue(accept, p, q, n=2000, seed=0) -> float:
    """Chi-square p-value that the first token emitted by the rule `accept` is distributed as p[0]."""
    chi2 = pytest.importorskip("scipy.stats").chi2
    rng = np.random.default_rng(seed)
    V = p.shape[1]
    drafts = (np.stack([rng.choice(V, size=n, p=qi) for qi in q], axis=1) if q is not None
              else np.tile([2, 0], (n, 1)))
    counts = np.zeros(V)
    for draft in drafts.tolist():
        a, nxt = accept(draft, p, q, rng)
        counts[draft[0] if a > 0 else nxt] += 1
    expected = p[0] * n
    keep = expected > 0
    if counts[~keep].any():
        return 0.0  # emitted a token the target gives probability 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return float(chi2.sf(stat, keep.sum() - 1))


def _accept_always(draft, p, q, rng):
    row = p[len(draft)]
    return len(draft), int(rng.choice(len(row), p=row))


def _resample_from_p(draft, p, q, rng):
    """A subtle mistake: correct acceptance, but resampling from p instead of norm(max(0, p - q))."""
    for i, x in enumerate(draft):
        qx = 1.0 if q is None else q[i, x]
        if rng.random() * qx >= p[i][x]:
            return i, int(rng.choice(len(p[i]), p=p[i]))
    return len(draft), int(rng.choice(len(p[len(draft)]), p=p[len(draft)]))


def test_rejection_sampling_preserves_the_target_distribution():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(5), size=3)
    p[:, 4] = 0.0  # a token the target never emits
    p /= p.sum(axis=1, keepdims=True)
    q = rng.dirichlet(np.ones(5), size=2)
    assert _first_token_pvalue(accept_sampled, p, q) > 1e-3
    assert _first_token_pvalue(accept_sampled, p, None) > 1e-3  # deterministic drafter: q one-hot
    # the same test catches broken rules
    assert _first_token_pvalue(_accept_always, p, q) < 1e-6
    assert _first_token_pvalue(_resample_from_p, p, q) < 1e-6
    assert _first_token_pvalue(_resample_from_p, p, None) < 1e-6


def _top_p_by_full_sort(p: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus as a stable sort of the whole vocabulary gives it (sampling._top_p until session 29)."""
    order = np.argsort(-p, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=-1)
    keep = np.zeros(p.shape, bool)
    np.put_along_axis(keep, order, np.cumsum(sorted_p, axis=-1) - sorted_p < top_p, axis=-1)
    p = np.where(keep, p, 0.0)
    return p / p.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 0, 0.95), (0.3, 0, 0.5), (3.0, 0, 0.99), (1.0, 40, 0.9),
                                                       (1.0, 3, 0.999), (1.0, 0, 1e-9)])
def test_top_p_keeps_what_a_full_sort_keeps(temperature, top_k, top_p):
    """The nucleus found from the most likely tokens only (sampling.nucleus) is the full sort's, bit for bit:
    peaked and flat rows, ties at its edge (logits rounded to a coarse grid), rows cut by top-k to a few tokens."""
    rng = np.random.default_rng(7)
    logits = np.round(rng.standard_normal((4, 5000)) * 3, 1).astype(np.float32)  # many exact ties
    logits[1] = 0.0  # a flat row: every token tied
    logits[2, 17] = 40.0  # one token holds nearly all the mass
    s = Sampling(temperature, top_k=top_k, top_p=top_p, seed=0)
    plain = distribution(logits, Sampling(temperature, top_k=top_k))
    want = _top_p_by_full_sort(plain, top_p)
    got = distribution(logits, s)
    np.testing.assert_array_equal(got, want)
    assert ((got > 0).sum(axis=-1) >= 1).all()


def test_nucleus_at_the_edge_of_rounding():
    """Rows where the mass reaches top_p within an ulp: the full sort's cumulative sums round one way or the
    other, and the nucleus keeps what they keep (it once dropped the last token); top_p a hair below 1
    (every positive token then counts) on a wide row."""
    from edgemtp.runtime.sampling import nucleus

    def reference(row, top_p):
        kept = _top_p_by_full_sort(row[None], top_p)[0] > 0
        return np.flatnonzero(kept & (row > 0))

    cases = [(np.array([0.9855138675455851, 0.014486132454414935]), 0.9855138675455851)]
    a = 1 - 3 * 2.0 ** -53
    cases.append((np.array([a / 2, a / 2, 1.5 * 2.0 ** -53, 1.5 * 2.0 ** -53]), a))
    wide = distribution(np.random.default_rng(5).standard_normal((1, 20000)).astype(np.float32) * 4,
                        Sampling(0.1))[0]
    cases += [(wide, 1 - 2.0 ** -52), (wide, 1 - 1e-14), (wide, 0.9)]
    rng = np.random.default_rng(11)
    for _ in range(200):  # two to five tokens, top_p at the mass of a prefix: a tie with a rounded sum
        row = rng.random(rng.integers(2, 6)) ** 4
        row /= row.sum()
        cases.append((row, float(np.sort(row)[::-1][:rng.integers(1, len(row))].sum())))
    for row, top_p in cases:
        np.testing.assert_array_equal(np.sort(nucleus(row, top_p)), reference(row, top_p))


def test_draw_refuses_nan():
    from edgemtp.runtime.sampling import draw

    with pytest.raises(ValueError, match="nan"):
        draw(np.array([0.5, np.nan, 0.5]), np.random.default_rng(0))



def test_draw_refuses_nan_or_inf_among_few_nonzero_probabilities():
    """draw sums only the nonzero probabilities where they are few (top-p, a clustered drafter's q): a NaN or an
    infinity among them fails there too, as in the full sum, rather than draw a token."""
    from edgemtp.runtime.sampling import draw

    for bad in (np.nan, np.inf):
        for p in (np.array([0.5, bad, 0.5]), np.array([0.0] * 10 + [0.5, bad] + [0.0] * 10)):
            with pytest.raises(ValueError, match="probabilities sum to"):
                draw(p, np.random.default_rng(0))

def test_verify_distributions_are_computed_up_to_the_first_rejection():
    """accept_sampled over RowDistributions: the rows distribution() gives for the whole block, and only
    those acceptance reads (a draft the target gives probability 0 is rejected at once: one row)."""
    from edgemtp.runtime.speculative import RowDistributions

    logits = np.random.default_rng(3).standard_normal((5, 50)).astype(np.float32)
    s = Sampling(0.9, top_k=5, top_p=0.8)
    rows = RowDistributions(logits, s)
    np.testing.assert_array_equal(np.stack([rows[i] for i in range(5)]), distribution(logits, s))
    rows = RowDistributions(logits, s)
    impossible = int(np.argmin(logits[0]))  # outside the top-k: p = 0
    a, nxt = accept_sampled([impossible, 1, 2, 3], rows, None, np.random.default_rng(0))
    assert a == 0 and list(rows.rows) == [0] and rows[0][nxt] > 0


def test_draw_takes_what_rng_choice_takes():
    """sampling.draw skips rng.choice's checks, not its numbers: a seeded run samples what it sampled before."""
    from edgemtp.runtime.sampling import draw

    dense = np.random.default_rng(1).random(5000) ** 8
    sparse = np.where(np.random.default_rng(2).random(5000) < 0.05, dense, 0.0)  # draw sums only the nonzero
    for p in (dense / dense.sum(), sparse / sparse.sum()):
        a, b = np.random.default_rng(9), np.random.default_rng(9)
        assert [draw(p, a) for _ in range(300)] == [int(b.choice(len(p), p=p)) for _ in range(300)]


def test_top_k_keeps_the_k_most_likely_tokens():
    """distribution() with top_k against a softmax over the k largest logits alone (the other tests compare
    distribution() with itself, so a top-k keeping k - 1 tokens passed them)."""
    logits = np.random.default_rng(4).standard_normal((3, 50))  # no ties
    for k in (1, 2, 5, 49):
        for temperature in (0.7, 2.0):
            want = np.zeros_like(logits)
            for row, w in zip(logits, want):
                top = np.argsort(-row)[:k]
                e = np.exp((row[top] - row[top].max()) / temperature)
                w[top] = e / e.sum()
            np.testing.assert_allclose(distribution(logits, Sampling(temperature, top_k=k)), want, rtol=1e-12)


class Scripted:
    """A stand-in generator whose random() returns the given numbers in turn."""

    def __init__(self, *u):
        self.u = list(u)

    def random(self):
        return self.u.pop(0)


def test_draw_scales_p_to_sum_to_one():
    """A float32 row a hair short of 1 (rng.choice takes it, and scales it): a number near 1 draws the last
    token of positive probability, never one of probability 0 past it."""
    from edgemtp.runtime.sampling import draw

    p = np.array([0.5, 0.4997, 0.0], np.float32)
    assert draw(p, Scripted(0.9999)) == 1 and draw(p, Scripted(0.5001)) == 0 and draw(p, Scripted(0.5003)) == 1


def test_a_rejection_draws_from_the_residual_however_small():
    """Draft x is accepted when u * q(x) < p(x); once rejected, the next token comes from norm(max(0, p - q)),
    even where p and q differ by a hair (a residual of 2e-4 here: all of it on token 1)."""
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = np.array([[0.5002, 0.4998, 0.0]])
    assert accept_sampled([0], p, q, Scripted(0.9995, 0.5)) == (1, 2)  # 0.9995 * 0.5002 < 0.5: kept, then p[1]
    assert accept_sampled([0], p, q, Scripted(0.9997, 0.0)) == (0, 1)  # rejected: token 1, never token 0
    assert accept_sampled([1], p, None, Scripted(0.4, 0.0)) == (1, 0)  # q one-hot: p(x) = 0.5 accepts u < 0.5
    assert accept_sampled([1], p, None, Scripted(0.5, 0.0)) == (0, 0)  # rejected: p without x, token 0


def test_rejection_sampling_edge_cases():
    rng = np.random.default_rng(0)
    p = np.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    assert accept_sampled([0], p, None, rng) == (0, 1)  # p(x) = 0: always rejected
    assert accept_sampled([1], p, None, rng)[0] == 1  # p(x) = 1: always accepted
    assert accept_sampled([], p[:1], None, rng) == (0, 1)  # nothing drafted: sample p[0]
    q = p[:1].copy()  # q == p: residual is 0, but acceptance is certain
    assert accept_sampled([1], p, q, rng)[0] == 1


def test_a_rejection_whose_residual_rounds_to_nothing_draws_from_p():
    """p a hair under q everywhere (rows that sum to 1 only up to rounding): a rejection leaves
    max(0, p - q) all zero, and the next token comes from p, not the rejected draft repeated."""

    class Late:  # every uniform draw near 1: rejects draft 0 (p/q < 1), then draws p's last token
        def random(self):
            return 1 - 1e-12

    q = np.array([[0.5, 0.5]])
    p = np.array([[0.5 - 1e-9, 0.5 - 1e-9]])
    assert accept_sampled([0], p, q, Late()) == (0, 1)


class Paths:
    """Every way a run of a round can go, with its exact probability, for a random generator passed to the
    code: each comparison `rng.random() * c < x` is a branch of probability min(1, x / c) and each draw from a
    distribution (acceptance's draw, rng.choice) a branch per token; the runs take them all in turn."""

    def __init__(self):
        self.todo, self.script, self.at, self.weight = [[]], [], 0, 1.0

    def outcomes(self, run) -> dict:
        """{run's result: its probability} over every path through run()."""
        out = {}
        while self.todo:
            self.script, self.at, self.weight = self.todo.pop(), 0, 1.0
            result = run()
            out[result] = out.get(result, 0.0) + self.weight
        return out

    def branch(self, weights) -> int:
        if self.at == len(self.script):  # a new branch point: this run takes the first way, later runs the others
            ways = [i for i, w in enumerate(weights) if w > 0]
            self.todo += [self.script + [i] for i in ways[1:]]
            self.script.append(ways[0])
        i = self.script[self.at]
        self.at += 1
        self.weight *= weights[i]
        return i

    def random(self):
        return _Uniform(self, 1.0)

    def draw(self, p, rng=None) -> int:
        p = np.asarray(p, np.float64)
        return self.branch(p / p.sum())

    def choice(self, n, p):
        return self.draw(p)


class _Uniform:
    """u * scale, u uniform in [0, 1): compared with a number, a branch of Paths."""

    def __init__(self, paths, scale):
        self.paths, self.scale = paths, scale

    def __mul__(self, c):
        return _Uniform(self.paths, self.scale * float(c))

    def __lt__(self, x):
        below = (1.0 if x > 0 else 0.0) if self.scale == 0 else min(1.0, max(0.0, float(x) / self.scale))
        return self.paths.branch([1 - below, below]) == 1

    def __ge__(self, x):
        return not self < x


_V = 6


def _logits_at(prefix, salt) -> np.ndarray:
    """A made-up model's logits after `prefix` (each prefix its own, with ties: a grid of 0.1)."""
    return np.round(np.random.default_rng([salt, len(prefix), *prefix]).standard_normal(_V) * 1.5, 1).astype(np.float32)


def _target_at(prefix, s, history) -> np.ndarray:
    return distribution(_logits_at(prefix, 1), s, [*history, *prefix] if s.penalized else ())


def _target_runs(s, history, n) -> dict[tuple, float]:
    """The exact distribution of n tokens sampled one by one from the made-up target."""
    out = {}

    def walk(prefix, prob):
        if len(prefix) == n:
            out[tuple(prefix)] = prob
            return
        p = _target_at(prefix, s, history)
        for t in np.flatnonzero(p):
            walk([*prefix, int(t)], prob * p[t])

    walk([], 1.0)
    return out


def _round_runs(s, history, k, drafter, accept, rng) -> tuple[dict[tuple, float], set]:
    """A round of k drafts from `drafter` (prefix -> q, or None: a deterministic drafter's argmax), accepted by
    `accept` over the target's RowDistributions, its k + 1 tokens completed by plain sampling where it emits
    fewer (the rounds after it: exact if this one is). -> ({k + 1 tokens: probability}, accepted counts seen).
    rng: Paths (exact) or a seeded generator (one sample: {tokens: 1.0})."""
    accepted = set()

    def run():
        draft, qs = [], []
        for _ in range(k):
            q = drafter(draft)
            if q is None:
                draft.append(int(np.argmax(_logits_at(draft, 2))))
            else:
                qs.append(q)
                draft.append(int(rng.choice(_V, p=q)))
        logits = np.stack([_logits_at(draft[:i], 1) for i in range(k + 1)])
        a, nxt = accept(draft, RowDistributions(logits, s, history, draft), np.stack(qs) if qs else None, rng)
        accepted.add(a)
        out = [*draft[:a], nxt]
        while len(out) < k + 1:
            out.append(int(rng.choice(_V, p=_target_at(out, s, history))))
        return tuple(out)

    if isinstance(rng, Paths):
        return rng.outcomes(run), accepted
    return {run(): 1.0}, accepted


_SAMPLINGS = [Sampling(0.8, top_k=3), Sampling(1.3, top_p=0.7), Sampling(0.05, top_k=3),
              Sampling(0.6, top_k=4, top_p=0.9, min_p=0.1, repetition_penalty=1.4)]


def _drafters(s, history):
    """wide: drafts tokens outside the target's top-k / top-p (p(x) = 0); narrow: q(t) = 0 where p(t) > 0;
    same: q = p (every draft accepted); deterministic: q None (q one-hot), its argmax often outside."""
    return {"wide": lambda d: distribution(_logits_at(d, 3), Sampling(1.0)),
            "narrow": lambda d: distribution(_logits_at(d, 1), Sampling(0.5, top_k=2)),
            "same": lambda d: _target_at(d, s, history),
            "deterministic": lambda d: None}


@pytest.mark.parametrize("s", _SAMPLINGS)
def test_a_round_emits_exactly_the_target_distribution(s, monkeypatch):
    """accept_sampled, enumerated over every path of its uniform numbers and draws: the k + 1 tokens of a round
    of 2 drafts (rejected at the first draft, at the second, or both accepted and the bonus token drawn),
    completed by plain sampling, have exactly the target's distribution of 3 tokens, to rounding. The target's
    p hangs on the drafts before it (each prefix its own logits, the penalty counting the drafts). The
    statistical tests beside this one allow a few percent; this one sees a 1e-9 bias."""
    # draw's own numbers against rng.choice's: test_draw_takes_what_rng_choice_takes
    monkeypatch.setattr(acceptance, "draw", lambda p, rng: rng.draw(p))
    history = [0, 3]
    want = _target_runs(s, history, 3)
    for name, drafter in _drafters(s, history).items():
        got, accepted = _round_runs(s, history, 2, drafter, accept_sampled, Paths())
        assert set(got) <= set(want), name  # never a run the target cannot make
        np.testing.assert_allclose([got.get(run, 0.0) for run in want], list(want.values()), rtol=0, atol=1e-12,
                                   err_msg=name)
        # every way a round can end was taken (q = p rejects with probability 0)
        if name == "same":
            assert accepted == {2}
        else:  # the deterministic drafter's argmax is never the target's third token here
            assert accepted >= {0, 1} and (name == "deterministic" or 2 in accepted), name
    if s.top_k or s.top_p < 1:  # the cases named above are there
        q, support = _drafters(s, history), _target_at([], s, history) > 0
        assert (q["wide"]([]) > 0)[~support].any() and (support & (q["narrow"]([]) == 0)).any()
    # the same enumeration tells broken rules apart (resampling from p, or no rejection at all)
    for broken in (_resample_from_p, _accept_always):
        got, _ = _round_runs(s, history, 2, _drafters(s, history)["wide"], broken, Paths())
        assert max(abs(got.get(run, 0.0) - p) for run, p in want.items()) > 1e-6, broken.__name__


def test_rounds_drawn_with_a_seed_fit_the_enumerated_distribution():
    """The same rounds with a seeded generator (acceptance's own draw): 4,000 rounds of a drafter whose q
    differs from p, their 3 tokens a chi-square fit to the target's exact distribution (p-value 0.30 for this
    seed, far from the bound), and the same seed repeats the same tokens."""
    s, history = _SAMPLINGS[3], [0, 3]
    drafter = _drafters(s, history)["wide"]

    def sample(seed, n):
        rng = np.random.default_rng(seed)
        return [next(iter(_round_runs(s, history, 2, drafter, accept_sampled, rng)[0])) for _ in range(n)]

    runs = sample(0, 4000)
    assert _gof_pvalue(runs, _target_runs(s, history, 3)) > 1e-3
    assert runs[:100] == sample(0, 100) and runs[:100] != sample(1, 100)


@pytest.mark.parametrize("history, k, want", [
    ([1, 2, 3, 9, 1, 2], 3, [3, 9, 1]),  # trigram miss, bigram [1, 2] hit
    ([1, 2, 3, 1, 2, 4, 1, 2], 2, [4, 1]),  # most recent occurrence wins
    ([7, 1, 2, 3, 8, 5, 2, 3], 4, [8, 5, 2, 3]),  # longest n-gram first: [2, 3] before [3]
    ([5, 6, 5, 6], 5, [5, 6, 5, 6, 5]),  # runs into the end: keeps copying the pattern
    ([4, 4], 3, [4, 4, 4]),
    ([1, 2, 3], 3, []),  # no earlier occurrence of anything
    ([3], 2, []),
])
def test_prompt_lookup(history, k, want):
    tokens, q = PromptLookupDrafter(max_ngram=3, min_ngram=1).propose(history, k)
    assert tokens == want and q is None


def test_hybrid_drafts_lookup_up_to_k_and_mtp_up_to_its_cap():
    from edgemtp.runtime.drafting import HybridDrafter

    class Counting:
        def propose(self, history, k, ctx=None):
            return [7] * k, None

    hybrid = HybridDrafter(Counting(), mtp_k=2)
    assert hybrid.propose([1, 2, 3, 1, 2], 5)[0] == [3, 1, 2, 3, 1]  # the 2-gram "1 2" repeats: lookup, k tokens
    assert hybrid.propose([1, 2, 3, 4], 5)[0] == [7, 7]  # no repeat: the MTP drafter, capped
    assert hybrid.propose([1, 2, 3, 4], 1)[0] == [7]


def test_auto_drafts_by_lookup_for_an_int8_or_int4_target_on_the_cpu():
    """--draft auto: hybrid for a bundle with an MTP drafter, lookup where its target is int8 or int4 on the CPU
    (MatMulNBits' cost grows with a verify window's rows: int4 Gemma 3 270M drafted 1.44x plain by lookup, 1.09x
    by MTP)."""
    from types import SimpleNamespace

    from edgemtp.runtime.drafting import auto_mode, cpu_quantized

    class Bundle:  # what auto_mode reads of a bundle with an MTP drafter
        def __init__(self, quant):
            self.quant = quant

        def has_graph(self, name):
            return True

        def graph(self, name):
            return SimpleNamespace(quant=self.quant)

    for quant, want in (("fp32", "hybrid"), ("fp16", "hybrid"), ("int8", "lookup"), ("int4", "lookup")):
        assert auto_mode(Bundle(quant)) == want and cpu_quantized(Bundle(quant)) == (want == "lookup"), quant


def test_prompt_lookup_helpers_and_options():
    h = np.array([1, 2, 3, 1, 2])
    assert last_match(h, 2) == 0 and last_match(h, 3) is None and last_match(h, 5) is None
    assert continuation(np.array([9, 1, 2]), 1, 5) == [1, 2, 1, 2, 1]
    assert PromptLookupDrafter(max_ngram=3, min_ngram=2).propose([1, 2, 3, 9, 3], 2) == ([], None)
    with pytest.raises(EdgemtpError, match="n-gram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)


def test_last_match_is_the_most_recent_earlier_repeat():
    """last_match against the definition, written out: the largest start s <= len-n-1 whose n tokens are the
    last n (short random histories over 3 ids, so that repeats of every length are common)."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        h = rng.integers(0, 3, rng.integers(0, 30))
        for n in range(0, 6):
            want = max((s for s in range(len(h) - n) if n >= 1 and list(h[s:s + n]) == list(h[len(h) - n:])),
                       default=None)
            assert last_match(h, n) == want, (list(h), n)


def test_token_ids_array_is_the_list_as_it_grows():
    """TokenIds.array() against np.asarray of the same list, after random appends, extends, pops and calls in
    between (random histories over 4 ids: lookup finds repeats of every length), and lookup's drafts alike."""
    from edgemtp.runtime.drafting import TokenIds

    rng, lookup = np.random.default_rng(0), PromptLookupDrafter(max_ngram=3, min_ngram=1)
    for _ in range(50):
        ids = TokenIds(rng.integers(0, 4, rng.integers(0, 5)).tolist())
        for _ in range(60):
            change = rng.integers(0, 10)
            if change < 6:
                ids.append(int(rng.integers(0, 4)))
            elif change < 8:
                ids.extend(rng.integers(0, 4, rng.integers(0, 40)).tolist())
            elif ids:
                ids.pop()
            assert np.array_equal(ids.array(), np.asarray(list(ids), np.int64)) and ids.array().dtype == np.int64
            assert lookup.propose(ids, 5) == lookup.propose(list(ids), 5)


def test_token_ids_array_follows_changes_in_place():
    """TokenIds is a list: a change other than appending (an id set, a pop and an append, a sort) between two
    array() calls left the array as it was, so prompt lookup drafted from ids the history no longer held; and an
    array given before a change keeps its ids (a new one is made, not the old one written over)."""
    from edgemtp.runtime.drafting import TokenIds

    changes = (lambda ids: ids.__setitem__(1, 9), lambda ids: (ids.pop(), ids.append(9)),
               lambda ids: ids.__setitem__(slice(0, 2), [9, 9]), lambda ids: ids.insert(0, 9),
               lambda ids: ids.remove(2), lambda ids: ids.sort(reverse=True), lambda ids: ids.reverse(),
               lambda ids: (ids.clear(), ids.extend([9, 9, 9, 9])), lambda ids: ids.__delitem__(0),
               lambda ids: ids.__imul__(2))
    for change in changes:
        ids = TokenIds([1, 2, 3, 4])
        before = ids.array()
        change(ids)
        assert ids.array().tolist() == list(ids), list(ids)
        assert before.tolist() == [1, 2, 3, 4], list(ids)
        ids.append(5)
        assert ids.array().tolist() == list(ids), list(ids)


class _CountingNumpy:
    """numpy for drafting.py, counting the ids of the Python sequences it converts to arrays."""

    def __init__(self):
        self.converted = 0

    def __getattr__(self, name):
        return getattr(np, name)

    def asarray(self, a, *args, **kwargs):
        if not isinstance(a, np.ndarray):
            self.converted += len(a)
        return np.asarray(a, *args, **kwargs)


def test_prompt_lookup_converts_only_the_ids_a_round_added(monkeypatch):
    """Prompt lookup converted the whole history (prompt and reply) into an array every round, twice with an
    adaptive hybrid (its guess's kind, then its draft): 0.5 ms a call at 32k ids. The rounds' history keeps its
    array as it grows (drafting.TokenIds), so a generation converts its prompt once and each token about once,
    and drafts the same tokens."""
    from edgemtp.runtime import drafting
    from edgemtp.runtime.drafting import HybridDrafter

    class NoMTP:
        def propose(self, history, k, ctx=None):
            return [], None

    prompt, n = [1, 2, 3, 4, 5, 6, 7, 1, 2] * 300, 40  # 2,700 ids
    target = FakeTarget(capacity=len(prompt) + n + 8)
    for make, adaptive in ((PromptLookupDrafter, False), (lambda: HybridDrafter(NoMTP(), min_ngram=1), True)):
        want = spec.speculative_generate(target, make(), [prompt], n, k=3, adaptive=adaptive)[0].tokens
        counting = _CountingNumpy()
        monkeypatch.setattr(drafting, "np", counting)
        got = spec.speculative_generate(target, make(), [prompt], n, k=3, adaptive=adaptive)[0].tokens
        monkeypatch.undo()
        assert got == want == plain_greedy(target, prompt, n), adaptive
        assert counting.converted <= len(prompt) + 2 * n, (adaptive, counting.converted)


# ---------------------------------------------------------------- a numpy stand-in target

class FakeTarget:
    """A causal toy LM in numpy with a token-id 'KV cache'. Unlike ORT's CPU GQA it verifies several
    rows of S > 1 positions in one pass, so it exercises the padded batched verify. Its logits hash
    the whole prefix, weighted by position: any stale, lost or misplaced cache entry changes them."""

    V = 8

    def __init__(self, capacity: int = 48):
        self.contract = SimpleNamespace(capacity=capacity, vocab_size=self.V, kv=())  # no KV slots: a token-id cache
        self.table = np.random.default_rng(0).normal(size=(97, self.V)).astype(np.float32)
        self.calls: list[tuple[int, int]] = []  # (rows, S) per forward

    def new_cache(self, batch: int) -> KVCache:
        cache = KVCache((), batch, self.contract.capacity)
        cache.tokens = np.zeros((batch, self.contract.capacity), np.int64)
        return cache

    def forward(self, ids, cache, rows=None, n_logits=1):
        rows = rows or slice(0, cache.batch)
        ids = np.asarray(ids)
        S, lengths = ids.shape[1], cache.lengths[rows]
        if lengths.max() + S > cache.capacity:
            raise CapacityError("full")
        self.calls.append((len(ids), S))
        logits = np.zeros((len(ids), S, self.V), np.float32)
        for i, (row, n) in enumerate(zip(range(rows.start, rows.stop), lengths)):
            cache.tokens[row, n:n + S] = ids[i]
            for j in range(S):
                prefix = cache.tokens[row, :n + j + 1]
                logits[i, j] = self.table[int(prefix @ np.arange(1, len(prefix) + 1)) % 97]
        cache.lengths[rows] += S
        return logits[:, S - n_logits:], logits


def plain_greedy(target, prompt, max_new, stop_ids=()):
    cache = target.new_cache(1)
    logits, _ = target.forward(np.array([prompt]), cache)
    out = []
    while True:
        out.append(int(logits[0, -1].argmax()))
        if out[-1] in stop_ids or len(out) == max_new or cache.room(0) < 1:
            return out
        logits, _ = target.forward(np.array([[out[-1]]]), cache)


def steady_clock(monkeypatch) -> None:
    """The speculative loop's clock ticks once a reading: every pass and drafter run seems to take the same
    time, so the adaptive draft length's choices do not hang on this machine's timing noise."""
    ticks = itertools.count()
    monkeypatch.setattr(spec, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))


FAKE_PROMPTS = [[1, 2, 3, 1, 2], [5], [3, 3, 3, 3, 3, 3, 3], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], [6, 2]]


@pytest.mark.parametrize("options", [dict(batched_verify=True), dict(batched_verify=True, adaptive=True), dict()])
def test_padded_batched_verify_changes_nothing(options, monkeypatch):
    steady_clock(monkeypatch)
    target = FakeTarget()
    want = [plain_greedy(target, p, 30) for p in FAKE_PROMPTS]
    target.calls.clear()
    stats = SpecStats()
    got = speculative_generate(target, PromptLookupDrafter(), FAKE_PROMPTS, 30, k=4, stats=stats, **options)
    assert [r.tokens for r in got] == want
    assert stats.accepted > 0 and stats.drafted > stats.accepted  # both outcomes exercised
    multi_row_verify = any(b > 1 and s > 1 for b, s in target.calls)
    assert multi_row_verify == options.get("batched_verify", False)


class BrokenTarget(FakeTarget):
    """FakeTarget whose logits go bad from the position `at` on (a broken bundle, an overflow): `spoil` changes
    each such row of logits in place."""

    def __init__(self, spoil, at: int = 7):
        super().__init__()
        self.spoil, self.at = spoil, at

    def forward(self, ids, cache, rows=None, n_logits=1):
        start = int(cache.lengths[rows or slice(0, cache.batch)].max())
        logits, hidden = super().forward(ids, cache, rows, n_logits)
        S = np.asarray(ids).shape[1]
        for j in range(logits.shape[1]):
            if start + S - logits.shape[1] + j >= self.at:
                self.spoil(logits[:, j])
        return logits, hidden


def _all_nan(row):
    row[:] = np.nan


def _one_nan(row):
    row[..., 5] = np.nan


def _all_minus_inf(row):
    row[:] = -np.inf


@pytest.mark.parametrize("spoil", [_all_nan, _one_nan, _all_minus_inf])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(repetition_penalty=1.3), Sampling(0.8, seed=1),
                                      Sampling(0.8, top_p=0.9, seed=1), Sampling(0.8, top_k=3, seed=1)])
@pytest.mark.parametrize("k", [0, 3])
def test_logits_no_token_can_come_from_are_one_clear_error(spoil, sampling, k):
    """NaN logits (or -inf at every id) leave no token to choose: greedy decoding took argmax's answer, the first
    NaN's id or token 0 at every step (a silent stream of wrong tokens), and sampling raised draw()'s ValueError,
    a traceback from the CLI. Both now stop with one EdgemtpError that says so."""
    target = BrokenTarget(spoil)
    with pytest.raises(EdgemtpError, match="the model gave logits that hold NaN or are -inf at every token"):
        speculative_generate(target, PromptLookupDrafter(), [[1, 2, 3, 1, 2]], 10, sampling, k=k)
    clean = speculative_generate(FakeTarget(), PromptLookupDrafter(), [[1, 2, 3, 1, 2]], 2, sampling, k=k)
    assert speculative_generate(BrokenTarget(spoil), PromptLookupDrafter(), [[1, 2, 3, 1, 2]], 2, sampling,
                                k=k)[0].tokens == clean[0].tokens  # the positions before `at` still run


@pytest.mark.parametrize("spoil", [_all_nan, _one_nan])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(repetition_penalty=1.3), Sampling(0.8, seed=1)])
@pytest.mark.parametrize("k", [0, 3])
def test_logits_no_token_can_come_from_name_the_position(spoil, sampling, k):
    """The error names where generation was (evaluate's names its window position): the logits from position 7
    on are bad, so the token at position 8, the reply's 4th after a prompt of 5, is the first that cannot be
    chosen, whichever verify row of a round (or drafter step before it) met them."""
    with pytest.raises(EdgemtpError) as caught:
        speculative_generate(BrokenTarget(spoil), PromptLookupDrafter(), [[1, 2, 3, 1, 2]], 10, sampling, k=k)
    assert "at every token for position 8 (token 4 of the reply), so no token can be chosen" in str(caught.value)
    with pytest.raises(EdgemtpError, match=r"for position 5 \(token 1 of the reply\)"):  # the prefill's
        speculative_generate(BrokenTarget(spoil, at=4), PromptLookupDrafter(), [[1, 2, 3, 1, 2]], 10, sampling, k=k)



class CleanGreedy(PromptLookupDrafter):
    """Drafts FakeTarget's own greedy continuation (of an unbroken one): every draft is accepted where its verify
    row is good, so a round meets bad logits at the verify row of their position, not at row 0."""

    def propose(self, history, k, ctx=None):
        target, tokens = FakeTarget(), []
        cache = target.new_cache(1)
        logits, _ = target.forward(np.array([history]), cache)
        for _ in range(k):
            tokens.append(int(logits[0, -1].argmax()))
            logits, _ = target.forward(np.array([[tokens[-1]]]), cache)
        return tokens, None


@pytest.mark.parametrize("spoil", [_all_nan, _one_nan])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(1e-3, seed=1)], ids=["greedy", "sampled"])
def test_bad_logits_at_a_later_verify_row_name_that_rows_position(spoil, sampling):
    """The first round verifies positions 5..8 of a prompt of 5 (its first token at 5) with every draft right:
    the logits at position 7, its row 2, are the first bad ones, and choose position 8, the reply's 4th token.
    Sampled (near-greedy: each draft accepted) the rows come from RowDistributions, whose row must be named too;
    the lookup drafts of the test above were rejected there before row 2."""
    stats = SpecStats()
    with pytest.raises(EdgemtpError) as caught:
        speculative_generate(BrokenTarget(spoil), CleanGreedy(), [[1, 2, 3, 1, 2]], 10, sampling, k=3, stats=stats)
    assert "at every token for position 8 (token 4 of the reply), so no token can be chosen" in str(caught.value)
    clean = speculative_generate(FakeTarget(), CleanGreedy(), [[1, 2, 3, 1, 2]], 10, sampling, k=3)[0]
    assert clean.accepted == clean.drafted > 0  # the drafts are right: the bad row is reached by acceptance

class NaNAtThirdStep(PromptLookupDrafter):
    """An app's drafter choosing its tokens step by step with edgemtp's sampling, whose logits are NaN at its third
    step (step 2): `tag` wraps each step in acceptance.in_row, as the bundle's MTP drafter does, or not."""

    def __init__(self, tag: bool):
        super().__init__()
        self.tag = tag

    def propose(self, history, k, ctx=None):
        from edgemtp.runtime.sampling import pick

        tokens = []
        for i in range(k):
            logits = np.full(FakeTarget.V, np.nan if i == 2 else 0.0)
            step = (lambda: acceptance.in_row(i, pick, logits, ctx.sampling, ctx.rng)) if self.tag else (
                lambda: pick(logits, ctx.sampling, ctx.rng))
            tokens.append(step())
        return tokens, None


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(0.8, seed=1)], ids=["greedy", "sampled"])
def test_bad_logits_from_an_apps_drafter_are_placed_at_its_step_or_not_at_all(sampling):
    """After a prompt of 5 and the prefill's token (position 5) the first draft's step 0 chooses position 6 and
    step 2 position 8. A drafter tagging its steps (acceptance.in_row) names step 2's position; an untagged error
    gives no step, and was put at step 0's position 6: now the draft's first position, 'or later'."""
    with pytest.raises(EdgemtpError) as caught:
        speculative_generate(FakeTarget(), NaNAtThirdStep(tag=True), [[1, 2, 3, 1, 2]], 10, sampling, k=3)
    assert "at every token for position 8 (token 4 of the reply), so no" in str(caught.value)
    with pytest.raises(EdgemtpError) as caught:
        speculative_generate(FakeTarget(), NaNAtThirdStep(tag=False), [[1, 2, 3, 1, 2]], 10, sampling, k=3)
    assert "at every token for position 6 or later (token 2 of the reply or later), so no" in str(caught.value)


def test_the_repetition_penalty_reads_a_streams_distinct_ids_not_its_whole_history(monkeypatch):
    """Every step converted the whole history (prompt and reply) into an array for the penalty: 1-2 ms a token at
    32k tokens. The rounds now hand it the stream's distinct ids (a draft's added), as many as the vocabulary at
    most, and choose the same tokens as the penalty over the whole history (plain decoding's loop, here)."""
    from edgemtp.runtime import sampling as sampling_mod
    from edgemtp.runtime.sampling import pick

    sizes, penalize = [], sampling_mod.penalize

    def counting(logits, s, seen=()):
        sizes.append(len(seen))
        return penalize(logits, s, seen)

    prompt, n = [7, 0] * 1000, 12  # 2,000 tokens of FakeTarget's 8 ids
    for sampling in (Sampling(repetition_penalty=3.0), Sampling(0.8, seed=1, repetition_penalty=3.0)):
        target = FakeTarget(capacity=len(prompt) + n + 8)
        cache, rng, want = target.new_cache(1), np.random.default_rng(1), []
        logits, _ = target.forward(np.array([prompt]), cache)
        for _ in range(n):  # the penalty over the whole history, as before
            want.append(pick(logits[0, -1], sampling, rng, [*prompt, *want]))
            logits, _ = target.forward(np.array([[want[-1]]]), cache)
        assert len(set(want)) > 4  # the penalty steers it (greedy without: 0s only)
        monkeypatch.setattr(sampling_mod, "penalize", counting)
        monkeypatch.setattr(acceptance, "penalize", counting)
        for k in (0, 3) if sampling.greedy else (0,):  # drafting samples otherwise: other tokens, as it should
            sizes.clear()
            got = spec.speculative_generate(target, PromptLookupDrafter(), [prompt], n, sampling, k=k)
            assert got[0].tokens == want and 0 < max(sizes) <= FakeTarget.V, (sampling, k)
        monkeypatch.undo()


def test_plus_inf_logits_are_the_best_tokens():
    """+inf (a value that overflowed upwards) is no error: its token is the best (ties between +inf alike)."""
    def spoil(row):
        row[..., 5] = np.inf

    for sampling in (Sampling(), Sampling(0.8, seed=1), Sampling(repetition_penalty=1.3)):
        got = speculative_generate(BrokenTarget(spoil, at=0), PromptLookupDrafter(), [[1, 2, 3, 1, 2]], 6, sampling,
                                   k=3)
        assert got[0].tokens == [5] * 6


def test_a_batched_verify_leaves_out_a_row_without_room_for_the_others_drafts():
    """A row near the end of its cache shares no pass wider than its room: padded to the other row's width,
    its pass would run past the capacity."""
    target = FakeTarget(capacity=20)
    prompts = [[1, 2, 3, 1, 2] * 3, [1, 2, 3, 1, 2]]  # 15 + 5 tokens: the first row has room for 5 more
    want = [plain_greedy(target, p, 30) for p in prompts]
    got = speculative_generate(target, PromptLookupDrafter(), prompts, 30, k=4, batched_verify=True)
    assert [r.tokens for r in got] == want
    assert [r.stop_reason for r in got] == ["KV capacity reached"] * 2
    stats = SpecStats()  # rows that end for different reasons: both named, in row order
    got = speculative_generate(target, PromptLookupDrafter(), prompts, 8, k=4, batched_verify=True, stats=stats)
    assert [r.tokens for r in got] == [want[0], want[1][:8]]
    assert stats.stop_reasons == ["KV capacity reached", "max new tokens"]
    assert stats.stop_reason == "KV capacity reached; max new tokens"


def test_stats_passed_again_add_up():
    """SpecStats handed to several generations holds their sums: drafting counts as tokens."""
    target, stats = FakeTarget(), SpecStats()
    runs = [speculative_generate(target, PromptLookupDrafter(), [p], 20, k=3, stats=stats) for p in FAKE_PROMPTS[:3]]
    results = [r for run in runs for r in run]
    assert stats.accepted > 0
    assert (stats.rounds, stats.drafted, stats.accepted, stats.decode_tokens) == \
        (sum(r.rounds for r in results), sum(r.drafted for r in results), sum(r.accepted for r in results),
         sum(len(r.tokens) - 1 for r in results))

    def at(counts):  # per draft position, K = 3 long
        return [*counts, 0, 0, 0][:3]

    for name in ("drafted_at", "accepted_at"):
        assert at(getattr(stats, name)) == np.sum([at(getattr(r, name)) for r in results], axis=0).tolist()


def test_acceptance_by_position_covers_every_drafted_position():
    stats = SpecStats(drafted=9, accepted=2, drafted_at=[4, 3, 2], accepted_at=[2])  # never accepted past the first
    assert stats.acceptance_by_position == [0.5, 0.0, 0.0]


def test_adaptive_length_is_told_each_verify_pass_its_rows_and_width(monkeypatch):
    """The draft length model costs a pass per row: it must be told how many rows shared each pass."""
    from edgemtp.runtime.draft_length import DraftLength

    steady_clock(monkeypatch)
    told = []
    monkeypatch.setattr(DraftLength, "timed_verify", lambda self, rows, width, seconds: told.append((rows, width)))
    target = FakeTarget()
    speculative_generate(target, PromptLookupDrafter(), FAKE_PROMPTS, 12, k=3, adaptive=True, batched_verify=True)
    assert told == target.calls[len(FAKE_PROMPTS):]  # every pass after the prefills, as the target ran it
    assert any(rows > 1 for rows, _ in told)


def test_a_cache_rolls_back_only_within_what_it_holds():
    cache = KVCache((), 2, 10)
    cache.lengths[:] = [5, 3]
    cache.rollback(0, 2)
    cache.rollback(1, 3)
    assert cache.lengths.tolist() == [2, 3] and cache.room(0) == 8
    for length in (4, -1):  # past what was written: stale positions would be read as verified ones
        with pytest.raises(ValueError, match=f"cannot roll sequence 1 back from 3 to {length}"):
            cache.rollback(1, length)
    assert cache.lengths.tolist() == [2, 3]


# ---------------------------------------------------------------- tiny exported models

WINDOW = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgemtp.exporters import export
    from edgemtp.runtime.engine import Engine

    from .reference import save_tiny
    from .test_parity import tiny

    torch.manual_seed(0)
    # tied embeddings + random init make a tiny llama repeat its input token; untied it wanders
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)).eval()
    tmp = tmp_path_factory.mktemp("spec")
    out = {}
    for kind, model in [("gemma3_text", tiny("gemma3_text")), ("llama", llama),
                        ("gemma3_text_mqa", tiny("gemma3_text_mqa")), ("qwen3_sliding", tiny("qwen3_sliding"))]:
        model_dir = save_tiny(model, tmp / kind)
        for capacity in (64, 24):
            export(model_dir, tmp / f"{kind}-{capacity}", capacity=capacity)
            out[kind, capacity] = Engine.load(tmp / f"{kind}-{capacity}", threads=1)
    assert out["gemma3_text", 64].target.contract.kv[0].window == WINDOW
    assert out["gemma3_text_mqa", 64].target.contract.window_views
    return out


def _prompts(engine) -> tuple[list[list[int]], list[list[int]]]:
    """Random prompts of different lengths, and repetitive ones on which lookup drafts get accepted."""
    rng = np.random.default_rng(1)
    random = [[int(t) for t in rng.integers(3, 96, size=n)] for n in (1, 4, 9, 14)]
    own = list(engine.token_ids([11, 12], 12))  # the model's own continuation, then its start again
    repetitive = [[5, 6, 7, 8] * 4, [11, 12] + own + [11, 12], [9, 10] * 6 + [9]]
    return random, repetitive


@pytest.mark.parametrize("kind", ["gemma3_text", "llama", "gemma3_text_mqa", "qwen3_sliding"])
def test_greedy_matches_plain_decoding(models, kind, monkeypatch):
    """gemma3_text_mqa: one-row passes read the sliding layers' buffers from a moving offset (window views),
    rolled back after rejected drafts, and batched passes read them whole: the tokens must not differ.
    qwen3_sliding: two KV heads per sliding layer (window views through copies, kv_cache's shadows), q/k norms in
    both graphs."""
    engine = models[kind, 64]
    random, repetitive = _prompts(engine)
    prompts = random + repetitive
    want = [list(engine.token_ids(p, 32)) for p in prompts]
    assert max(len(p) + len(w) for p, w in zip(prompts, want)) > 2 * WINDOW
    configs = [dict(k=1), dict(k=3), dict(k=6), dict(k=4, adaptive=True)]
    steady_clock(monkeypatch)
    for cfg in configs:
        stats = SpecStats()
        got = speculative_generate(engine.target, PromptLookupDrafter(), prompts, 32,
                                   stop_ids=engine.stop_ids, stats=stats, **cfg)
        for p, w, r in zip(prompts, want, got):
            assert r.tokens == w, f"{kind} {cfg} prompt {p}"
        assert sum(r.accepted for r in got[len(random):]) > 0, f"{kind} {cfg}: nothing accepted"
        assert stats.drafted > stats.accepted > 0
    for p, w in zip(prompts, want):  # batch of one
        assert speculative_generate(engine.target, PromptLookupDrafter(), [p], 32, k=3,
                                    stop_ids=engine.stop_ids)[0].tokens == w


def test_adaptive_measurements_carry_over_between_calls(models, monkeypatch):
    """An engine keeps one adaptive draft length per (mode, K, batch): a later call starts from the earlier
    calls' pass costs and acceptance instead of measuring afresh; output stays plain greedy's."""
    from edgemtp.runtime.draft_length import DraftLength
    from edgemtp.runtime.engine import Draft

    steady_clock(monkeypatch)
    engine = models["gemma3_text", 64]
    _, repetitive = _prompts(engine)
    draft = Draft("lookup", 4, adaptive=True)
    starts = []  # per call: (the model, the widths it knew and the outcomes it held at its first choice)
    choose = DraftLength.choose

    def recording(self, *args, **kwargs):
        if len(starts) < calls:
            starts.append((self, sorted(self.verify), {k: float(c[:, 1].sum()) for k, c in self.counts.items()}))
        return choose(self, *args, **kwargs)

    monkeypatch.setattr(DraftLength, "choose", recording)
    for calls, p in enumerate(repetitive, start=1):
        assert list(engine.token_stream(p, 24, draft=draft)) == list(engine.token_ids(p, 24))
    assert len(starts) == 3 and all(model is starts[0][0] for model, _, _ in starts)
    assert 1 in starts[1][1] and len(starts[2][1]) > 1  # plain and wider passes measured by earlier calls
    assert sum(starts[2][2].values()) > 0  # and guesses scored
    assert list(engine._draft_lengths) == [("lookup", 4, 1, 0.0)]


def test_an_engine_keeps_draft_lengths_for_its_recent_settings_only(models):
    """A server whose requests each pick their own K and batch size: the engine keeps the adaptive draft
    lengths of the DRAFT_SETTINGS_KEPT settings used last (it kept one per setting ever used, for good), the
    one in use carrying over; a call that does not adapt keeps none."""
    from edgemtp.runtime.engine import DRAFT_SETTINGS_KEPT, Draft

    engine = models["gemma3_text", 64]
    engine._draft_lengths.clear()
    for k in range(1, 5):
        engine.generate("t5 t6 t7 t5 t6", 4, draft=Draft("lookup", k))
    assert not engine._draft_lengths
    kept = engine._lengths(Draft("lookup", 2, adaptive=True), 1)
    for k in range(1, 3 * DRAFT_SETTINGS_KEPT):
        engine.generate("t5 t6 t7 t5 t6", 4, draft=Draft("lookup", k, adaptive=True))
        engine.generate_batch(["t5 t6 t7 t5 t6", "t1 t2"], 3, draft=Draft("lookup", k, adaptive=True))
        assert len(engine._draft_lengths) <= DRAFT_SETTINGS_KEPT
        if k % 4 == 0:  # used again and again: never the least recently used one
            assert engine._lengths(Draft("lookup", 2, adaptive=True), 1) is kept
    # an MTP draft cut by p_min reaches later positions after confident tokens only: measured apart
    assert engine._lengths(Draft("mtp", 2, adaptive=True, p_min=0.3), 1) is not \
        engine._lengths(Draft("mtp", 2, adaptive=True), 1)

def test_generate_batch_drafts_only_when_asked_to(models):
    """Engine.generate_batch: auto does not draft at batch > 1 (slower there) unless the engine has the fast
    batched verify; lookup does; all equal plain greedy per row, and auto still drafts for a single prompt."""
    from edgemtp.runtime.engine import Draft, Engine

    engine = models["gemma3_text", 64]
    prompts = ["t5 t6 t7 t5 t6 t7 t5 t6 t7", "t1 t2"]
    plain = [engine.generate(p, 16).tokens for p in prompts]
    auto = engine.generate_batch(prompts, 16, draft=Draft("auto", 3))
    lookup = engine.generate_batch(prompts, 16, draft=Draft("lookup", 3))
    none = engine.generate_batch(prompts, 16)  # no draft at all: crashed on its stats until session 27
    off = engine.generate_batch(prompts, 16, draft=Draft("none"))
    assert [g.tokens for g in auto] == [g.tokens for g in lookup] == [g.tokens for g in none] == \
        [g.tokens for g in off] == plain
    assert auto[0].stats.drafted == 0 and lookup[0].stats.drafted > 0 and none[0].stats.drafted == 0
    assert engine.generate_batch(prompts[:1], 16, draft=Draft("auto", 3))[0].stats.drafted > 0
    fast = Engine.load(engine.bundle.dir, threads=1, fast_verify=True)  # batched verify measured faster there
    auto = fast.generate_batch(prompts, 16, draft=Draft("auto", 3))
    assert [g.tokens for g in auto] == plain and auto[0].stats.drafted > 0


def test_a_draft_of_zero_tokens_is_plain_decoding(models):
    """Draft(K=0) is allowed and drafts nothing: plain decoding's tokens, and its plain stats (no drafting)."""
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.stats import Stats

    engine = models["gemma3_text", 64]
    plain = engine.generate("t5 t6 t7 t5 t6", 8)
    zero = engine.generate("t5 t6 t7 t5 t6", 8, draft=Draft("lookup", 0))
    assert zero.tokens == plain.tokens and type(zero.stats) is type(plain.stats) is Stats


@pytest.mark.parametrize("kind", ["gemma3_text", "llama"])
def test_rows_of_different_lengths_in_one_pass(models, kind):
    """The batched verify: several rows of different lengths x several new positions in one target pass
    (the graph reads the cache and returns only the new K/V rows) give each row's logits and cache as a
    pass over that row alone does, across the sliding window."""
    target = models[kind, 64].target
    assert target.multi_row_verify
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, size=n) for n in (3, 11, 20)]
    for S in (1, 3, 5):
        new = rng.integers(0, 96, size=(3, S))
        cache = target.new_cache(3)
        for b, p in enumerate(prompts):
            target.forward(p[None], cache, rows=slice(b, b + 1))
        batched, hidden = target.forward(new, cache, n_logits=S)
        for b, p in enumerate(prompts):
            one = target.new_cache(1)
            target.forward(p[None], one)
            alone, alone_hidden = target.forward(new[b:b + 1], one, n_logits=S)
            np.testing.assert_allclose(batched[b], alone[0], atol=1e-5)
            np.testing.assert_allclose(hidden[b], alone_hidden[0], atol=1e-5)
            n = len(p) + S
            assert cache.lengths[b] == one.lengths[0] == n
            for layer in one.keys:
                np.testing.assert_allclose(cache.keys[layer][b, :, :n], one.keys[layer][0, :, :n], atol=1e-5)
                np.testing.assert_allclose(cache.values[layer][b, :, :n], one.values[layer][0, :, :n], atol=1e-5)


@contextlib.contextmanager
def counted_passes(target):
    """A list of (ids' shape, rows) for each target pass run inside the block."""
    calls, forward = [], target.forward

    def counting(ids, cache, rows=None, n_logits=1):
        calls.append((np.asarray(ids).shape, rows))
        return forward(ids, cache, rows, n_logits)

    target.forward = counting
    try:
        yield calls
    finally:
        del target.forward


def test_batched_speculative_verifies_rows_together(models):
    """Drafted rows of a batch share one verify pass (no per-row passes), and the output is plain greedy's."""
    engine = models["gemma3_text", 64]
    random, repetitive = _prompts(engine)
    prompts = repetitive + random[:2]
    with counted_passes(engine.target) as calls:
        got = speculative_generate(engine.target, PromptLookupDrafter(), prompts, 24, k=3, stop_ids=engine.stop_ids)
    assert [r.tokens for r in got] == [list(engine.token_ids(p, 24)) for p in prompts]
    verify = calls[len(prompts):]  # after the per-row prefills
    assert any(shape[0] > 1 and shape[1] > 1 for shape, _ in verify)
    assert all(shape[0] == len(prompts) for shape, _ in verify[:1])  # the first round: every row at once


@pytest.mark.parametrize("kind", ["gemma3_text", "qwen3_sliding"])
def test_a_row_finished_between_others_leaves_them_one_pass(models, kind):
    """Rows 0 and 2 still running after row 1 stopped share each target pass: the finished row between them rides
    along and is rolled back, where they ran two passes a round (each about as dear as one over all three rows,
    on Gemma 3 270M); tokens are still each row's alone. qwen3_sliding: shadows, which a batched pass leaves stale."""
    from edgemtp.runtime.drafting import NoDrafter

    engine = models[kind, 64]
    rng = np.random.default_rng(2)
    for _ in range(50):  # prompts where row 1's second token is one rows 0 and 2 never give: it stops there
        prompts = [[int(t) for t in rng.integers(3, 96, size=n)] for n in (9, 4, 6)]
        want = [list(engine.token_ids(p, 12)) for p in prompts]
        stop = want[1][1]
        if stop != want[1][0] and stop not in want[0] + want[2]:
            break
    with counted_passes(engine.target) as calls:
        for drafter, k in ((NoDrafter(), 0), (PromptLookupDrafter(), 3)):
            calls.clear()
            cache, got, held = engine.target.new_cache(3), [spec.SeqResult([]) for _ in prompts], None
            for _ in Speculative(engine.target, drafter, k).stream(prompts, 12, stop_ids={stop}, results=got,
                                                                    cache=cache):
                if got[1].stop_reason and held is None:
                    held = int(cache.lengths[1])  # row 1's cache when it stopped
            assert int(cache.lengths[1]) == held, drafter  # riding along, it was rolled back each pass
            assert [r.tokens for r in got] == [want[0], want[1][:2], want[2]], drafter
            assert [r.stop_reason for r in got] == ["max new tokens", "stop token", "max new tokens"]
            passes = calls[len(prompts):]  # after the per-row prefills
            assert len(passes) == max(r.rounds for r in got), (drafter, passes)  # one pass a round
            assert passes[2][1] == slice(0, 3), (drafter, passes)  # row 1 stopped in round 1


def test_a_pass_carries_no_more_finished_rows_than_running_ones():
    """A pass spanning finished rows costs each of them a row's work: on Gemma 3 270M (fp32, 2 threads, 200-token
    rows) two one-row steps took 150 ms, a 4-row step 99 ms, a 16-row one 186 ms; verifying 5 positions with
    fast_verify, two one-row passes 186-208 ms, an 8-row pass 356 ms. So a pass carries at most as many finished rows
    as it has running ones."""
    target = SimpleNamespace(contract=SimpleNamespace(capacity=64), one_run_for_rows=True, multi_row_verify=True)
    cache = SimpleNamespace(room=lambda b: 32)
    s = Speculative(target, None, 4)
    one = np.array([7])
    assert s._passes(cache, {0: one, 2: one}) == [[0, 2]]  # one finished row, two running
    assert s._passes(cache, {0: one, 3: one, 4: one}) == [[0, 3, 4]]  # two and three
    assert s._passes(cache, {0: one, 15: one}) == [[0], [15]]  # 14 finished rows: two passes of one row
    assert s._passes(cache, {0: one, 1: one, 4: one, 9: one}) == [[0, 1, 4], [9]]


def test_capacity_edge(models):
    engine = models["llama", 24]
    prompts = [[5, 6, 7, 8] * 3, [3, 4, 5, 6, 7], [9] * 23]  # 23: one position left
    for k in (2, 5):
        got = speculative_generate(engine.target, PromptLookupDrafter(), prompts, 100, k=k,
                                   stop_ids=engine.stop_ids)
        for p, r in zip(prompts, got):
            assert r.tokens == list(engine.token_ids(p, 100))
            assert r.stop_reason == "KV capacity reached"
            assert len(p) + len(r.tokens) == engine.capacity + 1  # the last token never needs a slot
    full = [9] * 24  # fills the cache: its one next token needs no slot, a second would
    for k in (1, 4):
        got = speculative_generate(engine.target, PromptLookupDrafter(), [full, prompts[0]], 5, k=k)
        assert got[0].tokens == list(engine.token_ids(full, 5)) and len(got[0].tokens) == 1
        assert got[0].stop_reason == "KV capacity reached" and len(got[1].tokens) == 5
        # rows running on either side of the full one: a pass over both would carry it past the capacity
        got = speculative_generate(engine.target, PromptLookupDrafter(), [prompts[0], full, prompts[1]], 5, k=k)
        assert [r.tokens for r in got] == [list(engine.token_ids(p, 5)) for p in (prompts[0], full, prompts[1])]
        assert [r.stop_reason for r in got] == ["max new tokens", "KV capacity reached", "max new tokens"]
    with pytest.raises(CapacityError, match="prompt of 25 tokens does not fit the bundle's KV capacity of 24"):
        speculative_generate(engine.target, PromptLookupDrafter(), [[1] * 25], 5)


class Continuing(PromptLookupDrafter):
    """Drafts each row's plain greedy continuation (`texts`: prompt + it, one a row), so every draft is
    accepted and each round verifies as many drafts as the cache's room allows; `asked` records each K asked."""

    def __init__(self, texts):
        super().__init__()
        self.texts, self.asked = texts, []

    def propose(self, history, k, ctx=None):
        self.asked.append(k)
        text = next(t for t in self.texts if t[:len(history)] == list(history))
        return text[len(history):len(history) + k], None


def test_drafts_accepted_up_to_the_capacity_match_plain_decoding(models):
    """Gemma 3's sliding layers (window 8) at a capacity of 24: rows 1..7 positions short of it, every draft
    accepted, so the last round has room for fewer than K drafts; alone and in one batch, whose rows reach the
    capacity at different rounds (and the full row stops at its prefill). Each row's tokens and stop reason are
    plain decoding's, the last token one past the cache's last position."""
    engine = models["gemma3_text", 24]
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 96, size=24 - short)] for short in range(8)]
    plain = [list(engine.token_ids(p, 100)) for p in prompts]
    assert [len(p) + len(t) for p, t in zip(prompts, plain)] == [25] * 8  # no stop token: all reach the capacity
    for k in (1, 2, 3, 4):
        drafter = Continuing([p + t for p, t in zip(prompts, plain)])
        for p, want in zip(prompts, plain):
            r = speculative_generate(engine.target, drafter, [p], 100, k=k, stop_ids=engine.stop_ids)[0]
            assert (r.tokens, r.stop_reason) == (want, "KV capacity reached"), (k, len(p))
            assert r.accepted == r.drafted
        assert k == 1 or min(drafter.asked) < k  # a round short of K: the capacity's, not max_new_tokens'
        for batched in (False, True):
            got = speculative_generate(engine.target, drafter, prompts, 100, k=k, stop_ids=engine.stop_ids,
                                       batched_verify=batched)
            assert [r.tokens for r in got] == plain, (k, batched)
            assert {r.stop_reason for r in got} == {"KV capacity reached"}


def test_adaptive_draft_k_beyond_the_capacity_keeps_short_tables(models, monkeypatch):
    """Speculative(adaptive=True) without an Engine's lengths: K is capped at the KV capacity, and so must be
    the draft length's tables (they were K long: a K of 10**9 hung building a 10**9-row table)."""
    steady_clock(monkeypatch)
    engine = models["llama", 24]
    prompt = [5, 6, 7, 8] * 3
    s = Speculative(engine.target, PromptLookupDrafter(), 10**9, adaptive=True)
    assert s.k == s.lengths.k_max == engine.capacity
    assert s.generate([prompt], 8, stop_ids=engine.stop_ids)[0].tokens == list(engine.token_ids(prompt, 8))


def test_stop_token_inside_an_accepted_run_and_max_new_tokens(models):
    engine = models["llama", 64]
    base = _prompts(engine)[1][1]
    prompt = base + list(engine.token_ids(base, 12))  # the model's own text: lookup drafts get accepted
    plain = list(engine.token_ids(prompt, 32))
    j = next(i for i in range(1, len(plain)) if plain[i] not in plain[:i])
    stop, want = plain[j], plain[:j + 1]

    drafts = []

    class Recording(PromptLookupDrafter):
        def propose(self, history, k, ctx=None):
            drafts.append((len(history), *super().propose(history, k, ctx)))
            return drafts[-1][1:]

    stats = SpecStats()
    r = speculative_generate(engine.target, Recording(), [prompt], 32, k=6, stop_ids={stop}, stats=stats)[0]
    assert r.tokens == want and r.stop_reason == "stop token"
    # the drafts the stop dropped were accepted by the target, but tokens/round counts what was emitted
    assert stats.tokens_per_round == stats.decode_tokens / stats.rounds < stats.mean_accepted_per_round + 1
    assert f"{stats.tokens_per_round:.2f} tokens/round" in speed_line(stats)
    n_before, last_draft, _ = drafts[-1]
    kept = len(prompt) + len(want) - n_before  # tokens the last round emitted, the stop token last
    assert last_draft[kept - 1] == stop and len(last_draft) > kept, "the stop should cut an accepted run"
    for n in (1, 2, 5):
        r = speculative_generate(engine.target, PromptLookupDrafter(), [prompt], n, k=6)[0]
        assert r.tokens == plain[:n] and r.stop_reason == "max new tokens"


def test_a_stream_left_early_reports_its_drafting(models):
    """The drafting counts fill round by round, as decode_tokens: a stream left early (a chat reply stopped by
    Ctrl-C) reported its tokens with 0 rounds, drafts and acceptance, totalled only once generation ended."""
    from edgemtp.runtime.engine import Draft

    engine = models["gemma3_text", 64]
    prompt = _prompts(engine)[1][1]  # the model's own text: lookup drafts get accepted
    stats, results = SpecStats(), [spec.SeqResult([])]
    stream = Speculative(engine.target, PromptLookupDrafter(), k=3).stream([prompt], 40, stats=stats, results=results)
    seen = []
    for _row, _tokens in stream:
        seen.append((stats.decode_tokens, stats.rounds, stats.accepted))
        if results[0].accepted and len(results[0].tokens) > 12:
            break
    stream.close()
    r = results[0]
    assert len(r.tokens) < 40 and r.stop_reason == "closed"  # left early: said so, not ""
    assert (stats.stop_reason, stats.stop_reasons) == ("closed", ["closed"])
    assert (stats.rounds, stats.drafted, stats.accepted) == (r.rounds, r.drafted, r.accepted) and r.accepted > 0
    assert (sum(stats.drafted_at), sum(stats.accepted_at)) == (r.drafted, r.accepted)
    # each round emits its accepted drafts and the target's own token (no stop cuts a run here)
    assert all(tokens == rounds + accepted for tokens, rounds, accepted in seen)
    assert stats.other_s == stats.decode_s - stats.draft_s - stats.verify_s
    # through the engine, as `edgemtp chat --json` reads it after a Ctrl-C
    stats = SpecStats()
    tokens = engine.token_stream(prompt, 40, draft=Draft("lookup", 3), stats=stats)
    got = [t for t, _ in zip(tokens, range(13))]
    tokens.close()
    assert stats.rounds > 0 and stats.decode_tokens == stats.rounds + stats.accepted >= len(got) - 1  # whole rounds
    assert (stats.stop_reason, stats.stop_reasons) == ("closed", ["closed"])


def test_a_drafting_stream_closed_inside_its_last_round_says_closed(models):
    """A drafting stream gives a round's tokens one by one: its reader closing it before the last round's last
    token had not seen the end, yet stop_reason said the round's own ("max new tokens") where plain decoding, closed
    at the same token, says "closed" (README: "closed" for a stream closed before its end)."""
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.stats import Stats

    engine = models["gemma3_text", 64]
    prompt = _prompts(engine)[1][1]  # the model's own text: lookup drafts get accepted
    rounds = Speculative(engine.target, engine.drafter("lookup"), 3)
    n = next(n for n in range(2, 30) if len(list(rounds.stream([prompt], n))[-1][1]) > 1)  # a last round of 2+
    for draft in (None, Draft("lookup", 3)):
        for stats in ([SpecStats(), Stats()] if draft else [Stats()]):
            stream = engine.token_stream(prompt, n, draft=draft, stats=stats)
            got = list(itertools.islice(stream, n - 1))
            stream.close()
            assert len(got) == n - 1 and stats.stop_reason == "closed", (draft, type(stats), stats.stop_reason)


def test_decode_s_counts_the_readers_time_after_the_first_token(models):
    """decode_s runs from the first token to the last, a stream's reader's time between tokens included (README):
    a drafting stream started its clock only once its reader asked for the second token, so a reader slow on the
    first (an app rendering it) made tokens_per_s higher than plain decoding's for the same wait."""
    import time

    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.stats import Stats

    engine = models["gemma3_text", 64]
    prompt = _prompts(engine)[1][1]
    for draft in (None, Draft("lookup", 3)):
        stats = SpecStats() if draft else Stats()
        stream = engine.token_stream(prompt, 8, draft=draft, stats=stats)
        next(stream)
        time.sleep(0.2)
        rest = list(stream)
        assert rest and stats.decode_s >= 0.2, (draft, stats.decode_s)


def test_a_closed_stream_says_so_in_its_stop_reason(models):
    """stop_reason "closed" for a stream its reader closed before its end (an app cancelling a request), for
    every kind of stream; rows of a batch that had ended keep their own reason; a stream read to its end is not
    "closed" by a close after it."""
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.stats import Stats

    engine = models["gemma3_text", 64]
    prompt = _prompts(engine)[1][1]
    text = engine.decode(prompt)
    for draft in (None, Draft("lookup", 3)):
        makes = {"token_stream": lambda stats: engine.token_stream(prompt, 20, draft=draft, stats=stats),
                 "stream": lambda stats: engine.stream(text, 20, draft=draft, stats=stats)}
        for name, make in makes.items():
            # a plain Stats given to a drafting stream too: it gets the loop's reason as the stream closes
            for stats in ([SpecStats(), Stats()] if draft else [Stats()]):
                stream = make(stats)
                next(stream), next(stream)
                stream.close()
                assert stats.stop_reason == "closed", (name, draft, type(stats))
            stats = SpecStats() if draft else Stats()
            stream = make(stats)
            list(stream)
            stream.close()
            assert stats.stop_reason == "max new tokens", (name, draft)
    # a batch whose first row has met its stop token while the second still generates
    stats, results = SpecStats(), [spec.SeqResult([]), spec.SeqResult([])]
    plain = engine.generate(text, 6).tokens
    stream = Speculative(engine.target, PromptLookupDrafter(), k=3).stream(
        [prompt, prompt[:3]], 30, stop_ids=[plain[1]], stats=stats, results=results)
    for row, _ in stream:
        if results[0].stop_reason and len(results[1].tokens) > 2 and not results[1].stop_reason:
            break
    stream.close()
    assert results[0].stop_reason == "stop token" and results[1].stop_reason == "closed"
    assert stats.stop_reasons == ["stop token", "closed"] and stats.stop_reason == "stop token; closed"


def test_a_stream_read_to_its_last_token_keeps_its_stop_reason(models):
    """A reader that takes the stream's last token and closes it without asking for another (itertools.islice
    over max_new_tokens, a zip with a range) got "closed" from plain decoding, where drafting said "max new
    tokens": the stream had ended, only its StopIteration was not read. Every stream says why it ended."""
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.stats import Stats

    engine = models["gemma3_text", 64]
    prompt = _prompts(engine)[1][1]
    for draft in (None, Draft("lookup", 3)):
        for n, want in ((20, "max new tokens"), (64, "KV capacity reached")):  # the bundle's capacity is 64
            whole = list(engine.token_ids(prompt, n))
            # every position the cache has: the last token given is never run, so one past them
            assert len(whole) == min(n, 64 - len(prompt) + 1)
            stats = SpecStats() if draft else Stats()
            stream = engine.token_stream(prompt, n, draft=draft, stats=stats)
            got = list(itertools.islice(stream, len(whole)))
            stream.close()
            assert got == whole and stats.stop_reason == want, (draft, n)


def test_drafter_context_carries_the_verified_hidden_state(models):
    """ctx.hidden must be the target's hidden state at the position that produced history[-1] (what an
    MTP drafter consumes), and the cache must hold exactly the verified positions."""
    target = models["gemma3_text", 64].target
    seen = []

    class Checking(PromptLookupDrafter):
        def propose(self, history, k, ctx: DraftContext | None = None):
            seen.append((list(history), ctx.hidden.copy(), int(ctx.cache.lengths[ctx.row])))
            return super().propose(history, k, ctx)

    prompts = [[5, 6, 7, 8] * 3, [1, 2, 3]]
    speculative_generate(target, Checking(), prompts, 16, k=3)
    assert len(seen) > 4
    for history, hidden, cached in seen[::max(1, len(seen) // 5)]:
        assert cached == len(history) - 1
        cache = target.new_cache(1)
        _, want = target.forward(np.array([history[:-1]]), cache)
        np.testing.assert_allclose(hidden, want[0, -1], atol=1e-4)


# ---------------------------------------------------------------- sampling

class NoisyLookup(PromptLookupDrafter):
    """A stochastic drafter: samples each draft token from q = 0.6 one-hot(lookup guess) + 0.4 uniform."""

    def propose(self, history, k, ctx=None):
        guess, _ = super().propose(history, k)
        V = 96
        q = np.full((len(guess), V), 0.4 / V)
        q[np.arange(len(guess)), guess] += 0.6
        return [int(ctx.rng.choice(V, p=qi)) for qi in q], q


def _exact_first_tokens(target, prompt, sampling, n) -> dict[tuple, float]:
    """The exact distribution of the first n generated tokens under plain sampling (by enumeration)."""
    out = {}

    def walk(prefix, prob):
        if len(prefix) == n:
            out[tuple(prefix)] = prob
            return
        logits, _ = target.forward(np.array([prompt + prefix]), target.new_cache(1))
        p = distribution(logits[0, -1], sampling, prompt + prefix)
        for v in np.flatnonzero(p):
            walk(prefix + [int(v)], prob * p[v])

    walk([], 1.0)
    return out


def _gof_pvalue(samples: list[tuple], expected: dict[tuple, float]) -> float:
    """Chi-square goodness of fit. Outcomes expected fewer than 5 times share one bin (with the
    outcomes the target cannot produce); that bin joins the smallest other one if still under 5."""
    chi2 = pytest.importorskip("scipy.stats").chi2
    n, counts = len(samples), Counter(samples)
    big = sorted((o for o, p in expected.items() if p * n >= 5), key=lambda o: -expected[o])
    obs = [counts[o] for o in big]
    exp = [expected[o] * n for o in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp < 1e-6:
        if rest_obs:
            return 0.0  # outcomes the target cannot produce
    elif rest_exp < 5:
        obs[-1] += rest_obs
        exp[-1] += rest_exp
    else:
        obs.append(rest_obs)
        exp.append(rest_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return float(chi2.sf(stat, len(exp) - 1))


def test_sampling_preserves_the_distribution(models, monkeypatch):
    """Many seeded runs with drafting give the exact plain-sampling distribution of the first 3 tokens
    (computed by enumerating the target); the same test fails once the acceptance rule is broken."""
    engine = models["gemma3_text", 64]
    own = list(engine.token_ids([11, 12], 12))
    prompt = [11, 12] + own + [11, 12] + own[:2]  # lookup drafts the model's own greedy text
    sampling = Sampling(temperature=0.1, top_k=3, seed=7)
    expected = _exact_first_tokens(engine.target, prompt, sampling, 3)
    assert abs(sum(expected.values()) - 1) < 1e-9

    def run(drafter, n):
        stats = SpecStats()
        got = speculative_generate(engine.target, drafter, [prompt] * n, 3, sampling, k=2, stats=stats)
        assert stats.drafted > n / 3 and stats.accepted > 0
        return [tuple(r.tokens) for r in got], stats

    for drafter in (PromptLookupDrafter(), NoisyLookup()):
        samples, stats = run(drafter, 300)
        assert stats.accepted < stats.drafted
        assert _gof_pvalue(samples, expected) > 1e-3, type(drafter).__name__
    monkeypatch.setattr(spec, "accept_sampled", _accept_always)
    samples, stats = run(PromptLookupDrafter(), 150)
    assert stats.accepted == stats.drafted
    assert _gof_pvalue(samples, expected) < 1e-6


def test_a_penalised_sampling_keeps_its_distribution(models):
    """With a repetition penalty and min-p the target's distribution at each verify position hangs on the drafts
    before it: drafted runs still give plain sampling's exact distribution of the first 3 tokens (enumerated with
    the penalty over prompt + the tokens before), for a deterministic and a sampling drafter."""
    engine = models["gemma3_text", 64]
    own = list(engine.token_ids([11, 12], 12))
    prompt = [11, 12] + own + [11, 12] + own[:2]
    sampling = Sampling(temperature=0.3, top_k=4, min_p=0.02, repetition_penalty=1.3, seed=7)
    expected = _exact_first_tokens(engine.target, prompt, sampling, 3)
    assert expected != _exact_first_tokens(engine.target, prompt, Sampling(0.3, top_k=4, min_p=0.02), 3)
    for drafter in (PromptLookupDrafter(), NoisyLookup()):
        stats = SpecStats()
        got = speculative_generate(engine.target, drafter, [prompt] * 300, 3, sampling, k=2, stats=stats)
        assert stats.drafted > 100 and stats.drafted > stats.accepted > 0
        assert _gof_pvalue([tuple(r.tokens) for r in got], expected) > 1e-3, type(drafter).__name__
    # drafts of new tokens, nearly all accepted: the second position's penalty must count the first draft
    prompt, sampling = [40, 41], Sampling(temperature=0.5, top_k=2, repetition_penalty=3.0, seed=1)
    expected = _exact_first_tokens(engine.target, prompt, sampling, 3)
    stats = SpecStats()
    got = speculative_generate(engine.target, ExactDrafter(engine.target), [prompt] * 300, 3, sampling, k=2,
                               stats=stats)
    assert stats.accepted > 0.9 * stats.drafted > 250
    assert _gof_pvalue([tuple(r.tokens) for r in got], expected) > 1e-3


class ExactDrafter(PromptLookupDrafter):
    """Draws each draft from the target's own distribution there (a fresh forward over history + drafts), q = p:
    every draft is accepted unless the round's p is computed wrong."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def propose(self, history, k, ctx=None):
        tokens, qs = [], []
        for _ in range(k):
            logits, _ = self.target.forward(np.array([[*history, *tokens]]), self.target.new_cache(1))
            qs.append(distribution(logits[0, -1], ctx.sampling, [*history, *tokens]))
            tokens.append(int(ctx.rng.choice(len(qs[-1]), p=qs[-1])))
        return tokens, np.stack(qs)


@pytest.mark.parametrize("kind", ["gemma3_text", "llama"])
def test_greedy_with_a_repetition_penalty_matches_plain_decoding(models, kind, monkeypatch):
    """The penalty reads the tokens before each position, the drafts among them: drafted rounds give the
    engine's plain penalised tokens, which are a reference loop's (each step the argmax of the last logits with
    every earlier token's penalised) and not the unpenalised ones."""
    engine = models[kind, 64]
    random, repetitive = _prompts(engine)
    sampling = Sampling(repetition_penalty=1.6)
    want = [list(engine.token_ids(p, 24, sampling)) for p in random + repetitive]
    assert want != [list(engine.token_ids(p, 24)) for p in random + repetitive]
    for p, w in zip(random[:2], want):
        out = []
        while len(out) < len(w):
            logits, _ = engine.target.forward(np.array([p + out]), engine.target.new_cache(1))
            x = logits[0, -1].copy()
            for t in set(p + out):
                x[t] = x[t] / 1.6 if x[t] > 0 else x[t] * 1.6
            out.append(int(x.argmax()))
        assert out == w
    steady_clock(monkeypatch)
    prompts = random + repetitive
    for drafter in (PromptLookupDrafter(), Oracle(prompts, want)):
        for cfg in (dict(k=1), dict(k=3), dict(k=4, adaptive=True)):
            stats = SpecStats()
            got = speculative_generate(engine.target, drafter, prompts, 24, sampling, stop_ids=engine.stop_ids,
                                       stats=stats, **cfg)
            assert [r.tokens for r in got] == want, (drafter, cfg)
        assert stats.drafted > stats.accepted > 10 or isinstance(drafter, PromptLookupDrafter)


class Oracle(PromptLookupDrafter):
    """Drafts the known continuation of each prompt, every third token of it wrong: rounds accept runs of
    drafts whose tokens the penalty at the positions after them must count."""

    def __init__(self, prompts, continuations):
        super().__init__()
        self.known = {tuple(p): c for p, c in zip(prompts, continuations)}

    def propose(self, history, k, ctx=None):
        prompt = next(p for p in self.known if tuple(history[:len(p)]) == p and len(history) > len(p))
        at = len(history) - len(prompt)
        return [t if (at + i) % 3 else (t + 1) % 96 for i, t in enumerate(self.known[prompt][at:at + k])], None


def test_no_drafts_reproduce_the_engines_sampled_stream(models):
    engine = models["llama", 64]
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=123)
    want = list(engine.token_ids([4, 5, 6], 20, sampling))
    got = speculative_generate(engine.target, PromptLookupDrafter(), [[4, 5, 6]], 20, sampling, k=0)
    assert got[0].tokens == want


def test_stats_and_errors(models):
    engine = models["llama", 64]
    stats = SpecStats()
    prompts = [[5, 6, 7, 8] * 3, [1, 2]]
    got = Speculative(engine.target, PromptLookupDrafter(), k=3).generate(prompts, 12, stats=stats)
    assert stats.rounds == sum(r.rounds for r in got) > 0
    assert stats.decode_tokens == sum(len(r.tokens) - 1 for r in got)
    assert stats.mean_accepted_per_round == stats.accepted / stats.rounds
    assert stats.drafted > stats.accepted > 0 and stats.acceptance_rate == stats.accepted / stats.drafted
    assert (sum(stats.drafted_at), sum(stats.accepted_at)) == (stats.drafted, stats.accepted)
    by_position = [a / d for a, d in zip(stats.accepted_at + [0] * 3, stats.drafted_at)]
    assert stats.acceptance_by_position == by_position and len(by_position) == 3
    assert stats.draft_s >= 0 and stats.verify_s > 0 and stats.other_s >= 0
    assert stats.stop_reasons == ["max new tokens"] * 2 and stats.stop_reason == "max new tokens"  # said once
    js = stats.to_json()
    assert {"rounds", "drafted", "accepted", "acceptance_rate", "mean_accepted_per_round", "draft_s",
            "verify_s", "other_s"} <= set(js)
    assert js["tokens_per_s"] == stats.decode_tokens / stats.decode_s and js["decode_tokens"] == stats.decode_tokens
    assert (js["acceptance_rate"], js["mean_accepted_per_round"], js["acceptance_by_position"]) == \
        (stats.acceptance_rate, stats.mean_accepted_per_round, by_position)
    with pytest.raises(EdgemtpError, match="empty"):
        speculative_generate(engine.target, PromptLookupDrafter(), [[1], []], 5)
    with pytest.raises(ValueError):
        Speculative(engine.target, PromptLookupDrafter(), k=-1)

    class Broken(PromptLookupDrafter):
        def propose(self, history, k, ctx=None):
            return [96], None

    with pytest.raises(EdgemtpError, match="Broken proposed \\[96\\]: outside the target's vocabulary of 96"):
        speculative_generate(engine.target, Broken(), [[1, 2]], 5)


def test_streams_check_their_arguments_at_the_call(models):
    """token_ids, token_stream and stream raise for bad arguments when called, not at the first next(): an
    app's streaming response (a generator handed to a web framework) fails before it has started. Nothing
    runs until iterated: the kept cache is untouched by a stream never read."""
    from edgemtp.errors import ArgumentError
    from edgemtp.runtime.engine import Draft, Engine, new_stats

    engine = models["llama", 64]
    for draft in (None, Draft("lookup", 3)):
        calls = [lambda: engine.token_ids([5, 6], 0),
                 lambda: engine.token_stream([5, 6], 4, draft=draft, stop=[""]),
                 lambda: engine.token_stream([], 4, draft=draft),
                 lambda: engine.token_stream([999], 4, draft=draft),
                 lambda: engine.stream("t5 t6", -1, draft=draft),
                 lambda: engine.stream("t5", 4, draft=draft, stop=5)]
        for call in calls:
            with pytest.raises(EdgemtpError):
                call()  # no next()
    with pytest.raises(ArgumentError, match="max_new_tokens=0 must be at least 1"):
        engine.stream("t5", 0)
    # made, never read: no pass runs and the kept cache stays for the next generation (an engine that keeps one)
    reuse = Engine.load(engine.bundle.dir, threads=1, reuse_prefix=True)
    prompt = [5, 6, 7, 8]
    out = list(reuse.token_ids(prompt, 4))
    passes, forward = [], reuse.target.forward
    reuse.target.forward = lambda *a, **k: passes.append(1) or forward(*a, **k)
    unread = [reuse.stream("t5 t6", 4, draft=draft) for draft in (None, Draft("lookup", 2))]
    unread += [reuse.token_stream([5, 6], 4, draft=draft) for draft in (None, Draft("lookup", 2))]
    assert passes == []
    del reuse.target.forward
    follow, stats = prompt + out + [9], new_stats(None)
    assert list(reuse.token_ids(follow, 4, stats=stats)) == list(engine.token_ids(follow, 4))
    assert stats.cached_tokens == len(prompt) + len(out) - 1
    del unread


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork: POSIX only")
def test_an_engine_used_in_a_forked_process_says_to_load_it_after_the_fork(tiny_gemma3):
    """A pre-fork server (gunicorn --preload) loads the engine, then forks its workers. ONNX Runtime's thread
    pool does not survive the fork: a worker generated the same tokens on one thread, silently (plain decoding
    of Gemma 3 270M 1.9x slower with --threads 2). The worker is told once, with what to do; the tokens stay
    right. One thread loses nothing: no warning."""
    from edgemtp.runtime.engine import Draft, Engine

    prompt = "t1 t2 t3 t1 t2"
    engines = {threads: Engine.load(tiny_gemma3[2], threads=threads) for threads in (1, 2)}
    want = engines[1].generate(prompt, 8).tokens
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: its findings go to the parent through the pipe, and it ends without pytest's exit
        try:
            found = []
            for threads, engine in engines.items():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tokens = [engine.generate(prompt, 8).tokens, engine.generate_batch([prompt], 8)[0].tokens,
                              list(engine.token_stream(engine.encode(prompt), 8, draft=Draft("lookup", 3)))]
                found.append([threads, tokens, [str(w.message) for w in caught]])
            os.write(write, json.dumps(found).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        found = json.loads(f.read() or "[]")
    os.waitpid(pid, 0)
    assert [tokens for _, tokens, _ in found] == [[want] * 3] * 2
    assert found[0][2] == []
    assert len(found[1][2]) == 1  # once a process, not at every call
    assert re.fullmatch(rf"this engine was loaded in process {os.getpid()} and runs in process \d+, forked from it: "
                        r"ONNX Runtime's thread pools do not survive a fork, so its graphs run on one thread here "
                        r"\(2 asked\); load the engine after the fork \(gunicorn: without --preload\), or before it "
                        r"with threads=1",
                        found[1][2][0])
    assert engines[2].generate(prompt, 8).tokens == want  # the parent's, unchanged


def test_the_fork_warning_points_at_the_apps_call(tiny_gemma3):
    """At the app's line, through generate, generate_batch, stream, token_stream and token_ids alike: it pointed at
    engine.py for the calls that reach the check through another of the engine's methods."""
    from edgemtp.runtime.engine import Draft, Engine

    engine = Engine.load(tiny_gemma3[2], threads=2)
    ids = engine.encode("t1 t2")
    calls = [lambda: engine.generate("t1 t2", 2), lambda: engine.generate_batch(["t1 t2"], 2),
             lambda: list(engine.stream("t1 t2", 2)), lambda: list(engine.token_ids(ids, 2)),
             lambda: list(engine.token_stream(ids, 2, draft=Draft("lookup", 2))),
             lambda: list(engine.token_stream(ids, 2))]
    for call in calls:
        engine._pid = -1  # as if loaded in another process, forked from
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in caught] == [__file__], [(w.filename, w.lineno) for w in caught]


def test_the_fork_warning_counts_the_threads_onnx_runtime_made(tiny_gemma3, tmp_path, monkeypatch):
    """The default threads (threads=None) are ONNX Runtime's one per physical core: on a machine of one core
    with 2 hyper-threads (a 2-vCPU cloud VM) that is one thread, which a fork costs nothing, and the forked
    worker was told '2 asked' and to load with threads=1. Two cores of 2 threads each do warn, with 2."""
    import edgemtp.runtime.session as S
    from edgemtp.runtime.engine import Engine

    engine = Engine.load(tiny_gemma3[2])
    monkeypatch.setattr(S, "CGROUP", tmp_path / "cgroup")  # no quota
    for cores, threads_each in ((1, 2), (2, 2)):
        cpus = cores * threads_each
        for cpu in range(cpus):  # core c is CPUs c, c + cores, ... as Linux numbers them on x86
            topology = tmp_path / f"{cores}" / f"cpu{cpu}" / "topology"
            topology.mkdir(parents=True)
            (topology / "thread_siblings_list").write_text(",".join(str(cpu % cores + cores * t)
                                                                     for t in range(threads_each)))
        monkeypatch.setattr(S, "CPUS", tmp_path / f"{cores}")
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        engine._pid = -1  # as if this process were forked from the one that loaded it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine._check_process()
        assert [re.search(r"\((\d+) asked\)", str(w.message))[1] for w in caught] == ([] if cores == 1 else ["2"])


def test_the_fork_warning_counts_the_threads_the_cpu_affinity_gave(tiny_gemma3, tmp_path, monkeypatch):
    """Under taskset (a CI runner's cpuset) the sessions were made with one thread per allowed core
    (allowed_cpus), not one per core of the machine: a worker forked from an engine loaded on one allowed CPU of
    8 lost no pool and is not told to load with threads=1; two allowed CPUs warn with 2, the whole machine 8."""
    import edgemtp.runtime.session as S
    from edgemtp.runtime.engine import Engine

    engine = Engine.load(tiny_gemma3[2])
    monkeypatch.setattr(S, "CGROUP", tmp_path / "cgroup")  # no quota
    monkeypatch.setattr(S, "CPUS", tmp_path / "cpus")  # no topology: each CPU its own core
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for allowed, said in (({3}, []), ({2, 5}, ["2"]), (set(range(8)), ["8"])):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed)
        engine._pid = -1  # as if this process were forked from the one that loaded it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine._check_process()
        assert [re.search(r"\((\d+) asked\)", str(w.message))[1] for w in caught] == said, allowed
