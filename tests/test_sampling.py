"""Sampling's logits processors beside transformers' own: the repetition penalty, temperature, top-k, top-p and
min-p, in generate's order, on random logits (the end-to-end runs are in test_speculative and test_golden)."""

from __future__ import annotations

import numpy as np
import pytest

from edgemtp.errors import ArgumentError
from edgemtp.runtime.sampling import Sampling, distribution, penalize, pick

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def transformers_probabilities(logits: np.ndarray, seen: list[int], s: Sampling) -> np.ndarray:
    """softmax of the scores transformers' generate samples from, with its processors for `s`."""
    from transformers import generation as g

    processors = g.LogitsProcessorList()
    if s.repetition_penalty != 1:
        processors.append(g.RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    processors.append(g.TemperatureLogitsWarper(s.temperature))
    if s.top_k:
        processors.append(g.TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
        processors.append(g.TopPLogitsWarper(s.top_p))
    if s.min_p:
        processors.append(g.MinPLogitsWarper(s.min_p))
    scores = processors(torch.tensor([seen]), torch.tensor(logits[None]))
    return torch.softmax(scores.double(), -1)[0].numpy()


@pytest.mark.parametrize("s", [
    Sampling(0.7, repetition_penalty=1.3), Sampling(1.0, min_p=0.05), Sampling(1.2, top_p=0.9, min_p=0.1),
    Sampling(0.8, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.5), Sampling(1.0, repetition_penalty=0.7),
    Sampling(0.5, min_p=1.0)])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "mostly-inf"])
def test_distribution_is_transformers(s, masked):
    """The same tokens kept, with the same probabilities; seen ids repeat (penalised once) and hold tokens of
    both signs (a positive logit divided, a negative one multiplied). Also on a row that is -inf but at a few
    hundred candidates, a clustered MTP drafter's, which distribution() computes over those alone."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(4000) * 3).astype(np.float32)
    if masked:
        logits[rng.permutation(4000)[:3600]] = -np.inf
    seen = [int(t) for t in rng.integers(0, 4000, size=300)] + [7, 7, 7]
    want = transformers_probabilities(logits, seen, s)
    got = distribution(logits, s, seen)
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    if s.repetition_penalty != 1:  # the penalty changes what is kept: the test can tell
        assert not np.array_equal(got > 0, distribution(logits, s) > 0) or not np.allclose(got, distribution(logits, s))



@pytest.mark.parametrize("masked", [False, True], ids=["dense", "mostly-inf"])
def test_distribution_writes_into_out_what_it_returns_without(masked):
    """distribution(out=row) fills `row` (a drafter's q, [k, V], written row by row) with the probabilities it
    gives without out: the other tests never pass out, and a q left at zeros accepts every draft (u * 0 < p)."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((3, 4000)) * 3).astype(np.float32)
    if masked:  # a clustered drafter's rows: computed over their candidates alone
        logits[:, rng.permutation(4000)[:3600]] = -np.inf
    s = Sampling(0.8, top_k=50, top_p=0.95, min_p=0.02)
    q = np.zeros((3, 4000))
    for i, row in enumerate(logits):
        got = distribution(row, s, out=q[i])
        assert np.shares_memory(got, q[i])
    want = np.stack([distribution(row, s) for row in logits])
    assert (want > 0).sum(axis=1).min() > 1  # rows worth comparing
    np.testing.assert_array_equal(q, want)

def test_the_penalty_in_greedy_decoding():
    """Greedy decoding takes the penalty too (transformers' generate with do_sample=False and
    repetition_penalty): the best token, once seen, gives way to one not seen."""
    logits = np.array([3.0, 2.5, -1.0, -4.0], np.float32)
    s, rng = Sampling(repetition_penalty=2.0), np.random.default_rng(0)
    assert pick(logits, s, rng) == 0 and pick(logits, s, rng, [0]) == 1
    assert pick(logits, s, rng, [0, 1]) == 0  # both divided: 1.5 beats 1.25
    np.testing.assert_array_equal(penalize(logits, s, [0, 2, 2]), [1.5, 2.5, -2.0, -4.0])
    assert penalize(logits, Sampling(), [0]) is logits and penalize(logits, s) is logits  # nothing to do
    np.testing.assert_array_equal(logits, [3.0, 2.5, -1.0, -4.0])  # never written in place


@pytest.mark.parametrize("field, value", [("min_p", -0.1), ("min_p", 1.5), ("min_p", "0.1"), ("min_p", True),
                                          ("repetition_penalty", 0), ("repetition_penalty", -1.0),
                                          ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf"))])
def test_bad_values_are_refused(field, value):
    with pytest.raises(ArgumentError, match=field):
        Sampling(1.0, **{field: value})


def test_greedy_warns_about_the_sampling_fields_it_ignores():
    """Sampling(top_p=0.9) decodes greedily (temperature 0): a warning names what has no effect, as transformers'
    generate warns at do_sample=False; a setting that samples, or greedy with only a penalty, says nothing."""
    with pytest.warns(UserWarning, match=r"^Sampling: top_p, seed have no effect at temperature 0 ") as caught:
        Sampling(top_p=0.9, seed=3)
    assert caught[0].filename == __file__  # points at the caller's line, not at sampling.py
    with pytest.warns(UserWarning, match=r"^Sampling: min_p has no effect"):
        Sampling(0, min_p=0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sampling(), Sampling(0.7, top_k=5, top_p=0.9, min_p=0.1, seed=1), Sampling(repetition_penalty=1.3)


def test_a_penalty_so_small_that_logits_overflow_samples_the_overflowed_tokens():
    """repetition_penalty 1e-40 divides a positive logit past float32's range: inf - inf made the distribution NaN
    and sampling raised ValueError; the overflowed tokens are the best, alike (greedy takes the first of them, as
    transformers' argmax over its inf scores does)."""
    logits = np.array([1.0, 3.0, -2.0, 2.0, 0.5], np.float32)
    s = Sampling(0.8, repetition_penalty=1e-40, seed=0)
    with np.errstate(all="raise"):  # and no overflow warning on the way
        p = distribution(logits, s, seen=[1, 2, 3])
    np.testing.assert_array_equal(p, [0.0, 0.5, 0.0, 0.5, 0.0])
    draws = {pick(logits, s, np.random.default_rng(i), [1, 2, 3]) for i in range(40)}
    assert draws == {1, 3}
    assert pick(logits, Sampling(repetition_penalty=1e-40), None, [1, 2, 3]) == 1


def test_distribution_is_transformers_with_ties_and_masked_tokens():
    """Short rows with many exact ties (logits on a grid of 1 or 0.1) and -inf entries, at temperatures from
    1e-30 to 1e6 and top-k / top-p from off to one token: the probabilities transformers' warpers give
    (over float64 scores: float32's softmax rounds some top-p edges the other way), token for token but
    among tokens of equal logits, where top-p's edge may cut a tie. There the nucleus keeps the lower ids (a
    stable sort) and transformers' ascending sort the higher: the same probabilities, on other tokens."""
    rng = np.random.default_rng(0)
    cut_ties = 0
    for _ in range(600):
        n = int(rng.integers(2, 40))
        logits = np.round(rng.standard_normal(n) * 2, int(rng.integers(0, 2))).astype(np.float32)
        if rng.random() < 0.5:
            logits[rng.random(n) < 0.4] = -np.inf
            logits[0] = max(logits[0], -1.0)  # one finite logit at least
        s = Sampling(float(rng.choice([1e-30, 0.05, 0.7, 1.0, 5.0, 1e6])), top_k=int(rng.choice([0, 1, 2, 5, 50])),
                     top_p=float(rng.choice([1.0, 0.9, 0.5, 1e-6])))
        got = distribution(logits, s)
        want = transformers_probabilities(np.float64(logits), [], s)
        for value in np.unique(logits):
            tied = logits == value
            np.testing.assert_allclose(np.sort(got[tied]), np.sort(want[tied]), rtol=1e-9, atol=1e-12)
            kept = np.flatnonzero(tied & (got > 0))
            assert list(kept) == list(np.flatnonzero(tied)[:len(kept)])  # the lower ids of a cut tie
        cut_ties += not np.allclose(got, want, rtol=1e-9, atol=1e-12)
    assert 20 < cut_ties < 300  # ties cut at top-p's edge were there; most rows matched token for token


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "some-inf"])
def test_the_extremes_of_each_setting(masked):
    """top_p tiny keeps the argmax alone; top_k = 1 samples what greedy picks; a tiny temperature is the argmax
    too, a huge one uniform over what top-k keeps (and never a -inf token)."""
    rng = np.random.default_rng(2)
    for _ in range(50):
        logits = rng.standard_normal(30).astype(np.float32) * 3  # no ties
        if masked:
            logits[rng.permutation(30)[:12]] = -np.inf
        best, finite = int(np.argmax(logits)), np.isfinite(logits)
        one_hot = np.eye(30)[best]
        for s in (Sampling(1.0, top_p=1e-9), Sampling(50.0, top_p=1e-9), Sampling(0.7, top_k=1),
                  Sampling(1e-300), Sampling(5e-324, top_k=3, top_p=0.5)):
            np.testing.assert_array_equal(distribution(logits, s), one_hot)
            assert pick(logits, s, np.random.default_rng(int(rng.integers(1000)))) == pick(logits, Sampling(), None)
        np.testing.assert_allclose(distribution(logits, Sampling(1e300)), finite / finite.sum(), rtol=1e-12)
        top5 = np.argsort(-logits)[:5]
        np.testing.assert_allclose(distribution(logits, Sampling(1e6, top_k=5))[top5], 0.2, rtol=1e-5)


def test_the_penalty_over_a_long_history_from_its_distinct_ids_is_the_same():
    """The runtime keeps each stream's distinct ids (Seen), added to token by token, instead of converting its whole
    history every step (1-2 ms a token at 32k tokens): the penalized logits are exactly those of the history,
    with a draft's tokens too (a verify pass's rows)."""
    from edgemtp.runtime.sampling import Seen

    rng = np.random.default_rng(0)
    history = rng.integers(0, 1000, 40_000).tolist()  # every id many times over
    logits = rng.normal(size=1000).astype(np.float32) * 5
    s = Sampling(repetition_penalty=1.3)
    seen = Seen(history[:100])
    for token in history[100:]:
        seen.add(token)
    assert sorted(seen.ids.tolist()) == sorted(set(history))
    assert np.array_equal(penalize(logits, s, seen.ids), penalize(logits, s, history))
    few = Seen([1, 2])
    for draft in ([], [7], [7, 1, 7, 999]):
        assert np.array_equal(penalize(logits, s, few.plus(draft)), penalize(logits, s, [1, 2, *draft]))
    assert few.ids.tolist() == [1, 2]  # plus leaves the stream's ids as they were
