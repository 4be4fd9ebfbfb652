"""The adaptive draft length (runtime.draft_length): its choices from given costs and outcomes, and
speculative rounds steered by it on a clock the fake target advances (no real timing)."""

from types import SimpleNamespace

import numpy as np
import pytest

from edgemtp.runtime import speculative
from edgemtp.runtime.draft_length import PROBE_AFTER, SMOOTHING, DraftLength, RecentDraftLengths
from edgemtp.runtime.drafting import Guess, HybridDrafter, PromptLookupDrafter, guess_kind, guess_options
from edgemtp.runtime.speculative import SpecStats, speculative_generate

from .test_speculative import FakeTarget, plain_greedy


def measured(costs: dict[int, float], k_max: int = 4) -> DraftLength:
    d = DraftLength(k_max)
    for w, s in costs.items():
        for _ in range(2):  # the first pass of a shape is not counted
            d.timed_verify(1, w, s)
    return d


def one(d: DraftLength, kind, limit: int, free: bool = False) -> int:
    """The length `d` drafts of the one guess on offer."""
    i, k = d.choose([(kind, limit, free)])
    assert i == 0
    return k


def test_a_plain_step_is_measured_before_anything_is_drafted():
    d = DraftLength(4)
    assert one(d, "lookup 3", 4, free=True) == 0
    d.timed_verify(1, 1, 0.9)  # the first pass of a shape is slow: left out
    assert d.verify_cost(1) is None and one(d, "lookup 3", 4, free=True) == 0
    d.timed_verify(1, 1, 0.5)
    assert d.verify_cost(1) == 0.5
    assert one(d, "lookup 3", 4, free=True) == 4  # one width known: wider passes look as cheap


def test_verify_cost_is_linear_between_and_beyond_measured_widths():
    d = measured({1: 1.0, 3: 2.0, 5: 2.5})
    assert d.verify_cost(3) == 2.0
    assert d.verify_cost(2) == pytest.approx(1.5) and d.verify_cost(4) == pytest.approx(2.25)
    assert d.verify_cost(7) == pytest.approx(3.0)  # the last segment extended
    noisy = measured({1: 1.0, 2: 0.8})  # noise can make a wider pass look cheaper
    assert noisy.verify_cost(5) == 0.8 and measured({3: 1.0, 4: 2.0}).verify_cost(1) == 1.0
    assert measured({1: 1.0, 2: 2.0, 3: 1.5}).verify_cost(5) == 1.5  # never below the widest measured pass
    d.timed_verify(1, 3, 3.0)
    assert d.verify_cost(3) == pytest.approx(2.3)  # a moving average
    d.timed_verify(2, 3, 4.0)  # a pass of two rows: the first of its shape, not counted
    d.timed_verify(2, 3, 4.0)  # then 2.0 a row
    assert d.verify_cost(3) == pytest.approx(2.3 - 0.3 * 0.3)


def test_a_drafters_step_is_timed_from_its_second_run():
    d = DraftLength(4)
    d.timed_draft("mtp", 2, 10.0)  # the first run: slow, left out
    assert "mtp" not in d.step
    d.timed_draft("mtp", 2, 1.0)
    d.timed_draft("mtp", 0, 5.0)  # nothing drafted: nothing to time
    assert d.step["mtp"] == 0.5
    d.timed_draft("mtp", 4, 4.0)
    assert d.step["mtp"] == pytest.approx(0.5 + SMOOTHING * (1.0 - 0.5))


def test_recent_draft_lengths_keeps_the_settings_used_last():
    recent = RecentDraftLengths(kept=3)
    first = recent.take("a", 4)
    assert first.k_max == 4 and recent.take("a", 4) is first
    for key in ("b", "c", "a", "d"):  # "a" used again: "b" is now the oldest
        recent.take(key, 2)
    assert list(recent) == ["c", "a", "d"] and recent["a"] is first


def test_choice_weighs_acceptance_against_the_cost_of_a_wider_pass():
    steep = measured({1: 1.0, 5: 3.0})  # each position half a step (an int4 target on this CPU)
    flat = measured({1: 1.0, 5: 1.08})  # about one step whatever the width (fp32)
    for _ in range(40):
        for d in (steep, flat):
            d.outcome("good", [1, 2, 3, 4], [1, 2, 3, 4])
            d.outcome("poor", [1, 2, 3, 4], [1, 5, 3, 4] if _ % 3 == 0 else [7])  # ~1/3 right at the first
    assert one(steep, "good", 4, free=True) == 4 and one(flat, "good", 4, free=True) == 4
    assert one(steep, "poor", 4, free=True) == 0  # 1.3 tokens are not worth a pass of 1.5 steps
    assert one(flat, "poor", 4, free=True) in (1, 2)  # ... but worth a pass of 1.02-1.04
    assert one(steep, "good", 2, free=True) == 2  # never past the limit
    # a drafter step of half a decode step makes the good kind's longer drafts not pay either
    for _ in range(2):  # a drafter's first run is not counted
        steep.timed_draft("good", 4, 4 * 0.5)
    assert one(steep, "good", 4) == 0 and one(steep, "good", 4, free=True) == 4


def test_outcomes_fade_so_the_text_can_change():
    d = measured({1: 1.0, 5: 3.0})
    for _ in range(50):
        d.outcome("lookup 1", [1, 2], [1, 2])
    assert d.acceptance("lookup 1")[0] > 0.95
    for _ in range(30):
        d.outcome("lookup 1", [1, 2], [3])
    assert d.acceptance("lookup 1")[0] < 0.3 < d.acceptance("lookup 1", optimistic=True)[0]
    assert d.acceptance("lookup 1")[1] > 0.7  # position 2 was not tried after a wrong first
    d.outcome("lookup 2", [1, 2, 3], [1, 2])  # the sequence ended: two tried, both right
    assert d.counts["lookup 2"][:, 1].tolist() == [1, 1, 0, 0]


def test_acceptance_and_counts_are_exact():
    """The counts each position keeps (the last position too) and the smoothed chances read from them:
    each position pulled toward the one before with a weight of 2 (even odds before the first), the
    optimistic one a standard error, sqrt(p (1 - p) / (tried + 3)), higher."""
    d = DraftLength(3)
    d.outcome("m", [1, 2, 3], [1, 2, 3])
    assert d.counts["m"].tolist() == [[1, 1], [1, 1], [1, 1]]
    d.outcome("m", [1, 2, 3, 4], [1, 5])  # longer than k_max: positions past it are not kept
    assert d.counts["m"].tolist() == [[1.95, 1.95], [0.95, 1.95], [0.95, 0.95]]
    d = DraftLength(3)
    d.outcome("m", [1, 2, 3], [1, 5])
    p0 = (1 + 2 * 0.5) / (1 + 2)
    p1 = (0 + 2 * p0) / (1 + 2)
    p2 = (0 + 2 * p1) / (0 + 2)
    assert d.acceptance("m") == pytest.approx([p0, p1, p2], abs=1e-12)
    bonus = [np.sqrt(p * (1 - p) / (tried + 3)) for p, tried in ((p0, 1), (p1, 1), (p2, 0))]
    assert d.acceptance("m", optimistic=True) == pytest.approx([p0 + bonus[0], p1 + bonus[1], p2 + bonus[2]],
                                                               abs=1e-12)


def test_no_longer_draft_than_adds_expected_tokens():
    """One width measured stands for every width, so a draft looks free to lengthen; its expected tokens stop
    growing once the chance of reaching a position rounds to nothing against them (at even odds, 1 + 1/2 +
    1/4 + ... reaches 2.0 in float64 at k = 53), and a position that adds nothing is not drafted: the
    shortest k of the best rate, not K = 64 (a pass 65 wide, costly once measured)."""
    assert one(measured({1: 1.0}, k_max=64), "lookup 1", 64, free=True) == 53


def test_one_unlucky_draft_does_not_stop_a_costly_drafter():
    """A costly drafter's guesses are scored only when drafted: its acceptance is taken one standard error
    higher, so one wrong first draft leaves it drafting; a free guess, scored every round, gets no such push."""
    d = measured({1: 1.0, 5: 3.0})
    d.outcome("guess", [1], [2])
    assert one(d, "guess", 1) == 1 and one(d, "guess", 1, free=True) == 0


def test_a_costly_drafter_that_stopped_drafting_tries_again():
    d = measured({1: 1.0, 5: 3.0})
    for _ in range(30):
        d.outcome("mtp", [1], [2])
    choices = [one(d, "mtp", 3) for _ in range(2 * PROBE_AFTER + 2)]
    assert choices.count(1) == 2 and choices.count(0) == 2 * PROBE_AFTER
    assert one(d, "mtp", 3, free=True) == 0  # a free guess is scored every round: no probe needed
    assert [one(d, "mtp", 3) for _ in range(5)] == [0] * 5
    for _ in range(60):  # drafting pays again: the declined guesses are forgotten once it drafts
        d.outcome("mtp", [1, 2], [1, 2])
    assert one(d, "mtp", 3) > 0
    for _ in range(60):
        d.outcome("mtp", [1], [2])
    assert [one(d, "mtp", 3) for _ in range(PROBE_AFTER + 1)] == [0] * PROBE_AFTER + [1]


def test_the_guess_that_pays_best_is_drafted():
    """Among the guesses on offer (the hybrid's lookup and MTP), the one with the most expected tokens per
    second; a plain step when none pays, with a costly kind still probing after PROBE_AFTER rounds."""
    d = measured({1: 1.0, 5: 3.0})  # each position half a step
    for _ in range(2):
        d.timed_draft("mtp", 2, 2 * 0.1)
    for _ in range(40):
        d.outcome("lookup 1", [1, 2], [7])  # a one-token repeat's copy is never right here
        d.outcome("lookup 3", [1, 2, 3, 4], [1, 2, 3, 4])
        d.outcome("mtp", [1, 2], [1, 2])
    short, long_repeat = ("lookup 1", 4, True), ("lookup 3", 4, True)
    assert d.choose([short, ("mtp", 2, False)]) == (1, 2)  # the repeat does not pay: MTP, not a plain step
    assert d.choose([long_repeat, ("mtp", 2, False)]) == (0, 4)  # 5 tokens for 3 steps beat 3 for 2.2
    assert d.choose([short, ("mtp", 0, False)]) == (0, 0)  # no room left for MTP: a plain step
    for _ in range(40):
        d.outcome("mtp", [1, 2], [7])
    choices = [d.choose([short, ("mtp", 2, False)]) for _ in range(PROBE_AFTER + 1)]
    assert choices[:-1] == [(0, 0)] * PROBE_AFTER and choices[-1] == (1, 1)


# ------------------------------------------------------------- rounds on a fake clock

class ClockedTarget(FakeTarget):
    """FakeTarget whose passes take `cost(width)` seconds of a fake clock."""

    def __init__(self, cost):
        super().__init__(capacity=200)
        self.cost, self.now = cost, 0.0

    def forward(self, ids, cache, rows=None, n_logits=1):
        self.now += self.cost(np.asarray(ids).shape[1])
        return super().forward(ids, cache, rows, n_logits)


class Oracle:
    """Guesses from the known plain output: right (`wrong` False) or with every token off by one."""

    def __init__(self, prompt, want, wrong, free=True):
        self.text, self.start, self.wrong, self.free = list(prompt) + want, len(prompt), wrong, free

    def kind(self, history):
        return Guess("oracle", self.free)

    def propose(self, history, k, ctx=None):
        nxt = self.text[len(history):len(history) + k]
        return [(t + 1) % FakeTarget.V if self.wrong else t for t in nxt], None


@pytest.mark.parametrize("free", [True, False])
def test_rounds_stop_drafting_wrong_guesses_on_a_costly_pass_and_keep_right_ones(monkeypatch, free):
    target = ClockedTarget(lambda width: 1.0 + 0.5 * (width - 1))
    monkeypatch.setattr(speculative, "time", SimpleNamespace(perf_counter=lambda: target.now))
    prompt = [1, 2, 3, 1, 2]
    want = plain_greedy(target, prompt, 120)
    for wrong in (True, False):
        stats = SpecStats()
        got = speculative_generate(target, Oracle(prompt, want, wrong, free), [prompt], 120, k=4,
                                   stats=stats, adaptive=True)
        assert got[0].tokens == want
        if wrong:  # a few rounds to learn, then plain steps (a costly drafter probes now and then)
            assert stats.accepted == 0 and stats.drafted <= (8 if free else 8 + 120 // PROBE_AFTER)
            assert stats.rounds >= 100
        else:
            assert stats.rounds <= 120 / 5 + 4 and stats.accepted == stats.drafted
    fixed = SpecStats()
    speculative_generate(target, Oracle(prompt, want, True, free), [prompt], 120, k=4, stats=fixed)
    assert fixed.drafted >= 4 * 100  # without it every round drafts its K


def test_rounds_draft_the_second_guess_on_offer_where_the_first_does_not_pay(monkeypatch):
    """A drafter offering a free guess that is always wrong and a costly one that is always right (as the
    hybrid offers a short repeat's copy and its MTP guess): after a few rounds the costly one drafts, not
    plain steps; the output is plain greedy's."""
    target = ClockedTarget(lambda width: 1.0 + 0.5 * (width - 1))
    monkeypatch.setattr(speculative, "time", SimpleNamespace(perf_counter=lambda: target.now))
    prompt = [1, 2, 3, 1, 2]
    want = plain_greedy(target, prompt, 120)
    wrong, right = Oracle(prompt, want, True), Oracle(prompt, want, False, free=False)

    class Both:
        def propose(self, history, k, ctx=None):
            raise AssertionError("an adaptive round asks the offered guesses' drafters")

        def options(self, history):
            return [(Guess("copy", True), wrong), (Guess("model", False), right)]

    stats = SpecStats()
    spec = speculative.Speculative(target, Both(), 4, adaptive=True)
    assert spec.generate([prompt], 120, stats=stats)[0].tokens == want
    assert stats.accepted == stats.drafted and stats.rounds <= 120 / 5 + 6
    copy = spec.lengths.counts["copy"]
    assert copy[0, 1] > 5 and copy[0, 0] == 0  # scored every round, never right


def test_a_sampled_draft_carries_the_q_of_the_drafter_that_made_it(monkeypatch):
    """Sampling with two guesses on offer: a drafted run from the free copy has no q (deterministic), one
    from the costly drafter its own q, row for row: acceptance divides by the q of the guess drafted."""
    from edgemtp.runtime.sampling import Sampling

    target = ClockedTarget(lambda width: 1.0)
    monkeypatch.setattr(speculative, "time", SimpleNamespace(perf_counter=lambda: target.now))

    class Copy:
        def propose(self, history, k, ctx=None):
            return [int(history[-1])] * k, None

    class Sampler:
        def propose(self, history, k, ctx=None):
            tokens = [int(t) for t in ctx.rng.integers(0, FakeTarget.V, size=k)]
            q = np.full((k, FakeTarget.V), 0.5 / (FakeTarget.V - 1))
            q[np.arange(k), tokens] = 0.5
            return tokens, q

    class Both:
        def options(self, history):
            return [(Guess("copy", True), Copy()), (Guess("sampler", False), Sampler())]

    spec = speculative.Speculative(target, Both(), 3, adaptive=True)
    seen, draft = [], spec._draft

    def recording(s, *args):
        tokens, q = draft(s, *args)
        seen.append((list(s.history), tokens, q))
        return tokens, q

    monkeypatch.setattr(spec, "_draft", recording)
    accepted, accept = [], speculative.accept_sampled

    def accepting(tokens, p, q, rng):
        accepted.append((list(tokens), q))
        return accept(tokens, p, q, rng)

    monkeypatch.setattr(speculative, "accept_sampled", accepting)
    spec.generate([[1, 2, 3]], 60, Sampling(temperature=1.0, seed=0))
    # one row: each round's acceptance got the tokens and the q its draft returned
    assert len(accepted) == len(seen)
    for (tokens, q), (_, drafted, want) in zip(accepted, seen):
        assert tokens == drafted and (q is None) == (want is None) and (q is None or np.array_equal(q, want))
    drafted = [(h, t, q) for h, t, q in seen if t]
    assert any(q is None for _, _, q in drafted) and any(q is not None for _, _, q in drafted)
    for history, tokens, q in drafted:
        if q is None:
            assert tokens == [history[-1]] * len(tokens)
        else:
            assert len(q) == len(tokens) and all(q[i, t] == 0.5 for i, t in enumerate(tokens))


def test_guess_kinds():
    """Lookup names its repeat length and is free; a drafter without `kind` makes one costly kind of guess; the
    hybrid offers its lookup guess where the text repeats, then its MTP guess capped at its mtp_k."""
    lookup = PromptLookupDrafter()
    assert guess_kind(lookup, [1, 2, 3, 9, 1, 2, 3]) == Guess("lookup 3", True)
    assert guess_kind(lookup, [1, 2, 3, 1]) == Guess("lookup 1", True) and guess_kind(lookup, [1, 2, 3]) is None

    class Plain:
        def propose(self, history, k, ctx=None):
            return [0] * k, None

    assert guess_kind(Plain(), [1, 2]) == Guess("Plain", False)
    plain = Plain()
    assert guess_options(plain, [1, 2]) == [(Guess("Plain", False), plain)] and guess_options(lookup, [1, 2]) == []
    hybrid = HybridDrafter(plain, mtp_k=2)
    assert guess_options(hybrid, [1, 2, 3]) == [(Guess("Plain", False, 2), plain)]
    assert guess_options(hybrid, [1, 2, 3, 1, 2]) == [(Guess("lookup 2", True), hybrid.lookup),
                                                      (Guess("Plain", False, 2), plain)]
    assert guess_kind(hybrid, [1, 2, 3, 1, 2]) == Guess("lookup 2", True)  # its first


def test_a_guess_cut_by_the_end_of_generation_counts_what_was_generated(monkeypatch):
    """Lookup guesses of 4 tokens when only 2 more are generated: the guesses still waiting are scored on
    the tokens there are, once the sequence stops."""
    target = ClockedTarget(lambda width: 1.0)
    monkeypatch.setattr(speculative, "time", SimpleNamespace(perf_counter=lambda: target.now))
    prompt = [1, 2, 3, 1, 2]
    want = plain_greedy(target, prompt, 3)
    spec = speculative.Speculative(target, Oracle(prompt, want + [0] * 8, wrong=False), 4, adaptive=True)
    assert spec.generate([prompt], 3)[0].tokens == want
    counts = spec.lengths.counts["oracle"]
    assert counts[:, 1].sum() > 0 and counts[2:, 1].sum() == 0  # never past the 2 tokens after a guess


def test_threads_sharing_a_draft_length_lose_no_update(monkeypatch):
    """Threads streaming on one engine with the same adaptive setting share one DraftLength (Engine._lengths; the
    README's thread contract): its read-then-write updates (a declined costly guess's count, a kind's acceptance
    counts) lost increments where a thread switch came between the read and the write (4 threads x 5,000 rounds:
    ~60 of 20,000 declines lost). Every update now counts: as many declines as rounds, and the acceptance counts
    those of the same outcomes told one by one."""
    import sys
    import threading

    from edgemtp.runtime import draft_length

    monkeypatch.setattr(draft_length, "PROBE_AFTER", 10**9)  # a declined guess's count, never reset by a probe

    def fresh() -> DraftLength:
        d = measured({1: 1.0})
        d.step["mtp"] = 1e9  # MTP drafting never pays: every round declines it
        return d

    shared, threads, rounds = fresh(), 4, 5000
    start = threading.Barrier(threads)

    def run():
        start.wait()
        for _ in range(rounds):
            shared.outcome("lookup", [1, 2, 3], [1, 2, 9])
            assert shared.choose([("mtp", 2, False)]) == (0, 0)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: lost updates show every run
    try:
        workers = [threading.Thread(target=run) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(switch)
    alone = fresh()
    for _ in range(threads * rounds):
        alone.outcome("lookup", [1, 2, 3], [1, 2, 9])
    assert shared.idle == {"mtp": threads * rounds}
    assert np.array_equal(shared.counts["lookup"], alone.counts["lookup"])
