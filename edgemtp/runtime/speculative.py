"""Speculative decoding: draft K tokens, verify them in one target pass, keep what the target agrees with.

A round for one sequence whose cache holds L verified positions and whose last emitted token t is not
in the cache yet:

    draft d0..d(K-1) -> target forward over [t, d0..d(K-1)] (K+1 positions, cache L -> L+K+1)
    -> greedy_choices() (greedy) or accept_sampled() (rejection sampling; runtime/acceptance.py)
    -> a accepted drafts
    -> commit: roll the cache back to L+1+a -> emit d0..d(a-1) + the target's own next token.

No extra target forward after a rejection: the verify pass already wrote the KV of [t, d0..d(a-1)]
and produced the hidden state and logits at the accepted index (DESIGN.md §2).

Batches: rows are prefilled one by one, then every round verifies all unfinished rows. Drafts are
padded to a common width by repeating the row's last token; padded positions are cut from the logits
before acceptance and rolled out of the cache, so they never change a result (the attention is causal:
padding only follows the real positions). A target whose graph takes several rows x several new
positions in one pass (`Target.multi_row_verify`: the "rows" KV update of Gemma 3 / Llama / Qwen2
bundles) verifies runs of rows together (finished rows between them ride along, rolled back after).
ONNX Runtime's CPU GroupQueryAttention (Gemma 4 bundles) refuses batch > 1 with more than one new
position and a past ("batch_size must be 1 when sequence_length > 1 and past context is given",
onnxruntime 1.32): there drafted rows are verified one row at a time, and rounds where no row drafted
run as one batched one-token step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ..errors import EdgemtpError
from .acceptance import RowDistributions, accept_sampled, greedy_choices
from .draft_length import DraftLength
from .drafting import DraftContext, Drafter, TokenIds, guess_options
from .requests import check_request
from .sampling import BadLogits, Sampling, Seen, pick
from .stats import STREAM_CLOSED, Stats
from .stops import Stops
from .kv_cache import KVCache, check_fits
from .target import Target, prefill


@dataclass
class SpecStats(Stats):
    rounds: int = 0  # target passes after the prefill, counted per sequence
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0  # acceptance, sampling, bookkeeping
    stop_reasons: list[str] = field(default_factory=list)
    drafted_at: list[int] = field(default_factory=list)  # per draft position, summed over sequences
    accepted_at: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per round. Not mean_accepted_per_round + 1: when a stop lands inside an accepted run,
        the drafts after it count as accepted (the target took them) but are not emitted."""
        return self.decode_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """P(draft position i accepted | drafted), the per-position acceptance vLLM reports."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at + [0] * len(self.drafted_at),
                                                   self.drafted_at)]

    def to_json(self) -> dict:
        return {**super().to_json(), "acceptance_rate": self.acceptance_rate,
                "mean_accepted_per_round": self.mean_accepted_per_round, "tokens_per_round": self.tokens_per_round,
                "acceptance_by_position": self.acceptance_by_position}


@dataclass
class SeqResult:
    tokens: list[int]
    stop_reason: str = ""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=list)  # [i]: rounds that drafted a token at position i
    accepted_at: list[int] = field(default_factory=list)  # [i]: rounds that accepted position i


@dataclass
class _Seq:
    row: int
    history: TokenIds  # prompt + emitted, appended to only; history[-1] is not in the cache yet
    rng: np.random.Generator
    hidden: np.ndarray | None = None  # [H] target hidden state at the position that produced history[-1]
    out: SeqResult = field(default_factory=lambda: SeqResult([]))
    guesses: list = field(default_factory=list)  # (len(history) then, tokens, kind): scored once known
    seen: Seen | None = None  # history's distinct ids, kept as it grows: with a repetition penalty only


_NO_DRAFT: tuple[list[int], None] = ([], None)


class Speculative:
    """Speculative generation with a target and a drafter.

    k: draft length per round; with `adaptive` the most, each round then drafting the length that
    maximises expected tokens per second by measured verify and draft times and acceptance
    (runtime.draft_length), 0 when a plain step does better.
    lengths: an adaptive draft length's earlier measurements to go on from (Engine keeps one per setting).
    batched_verify: verify several rows in one target pass (see the module docstring); None: when the
    target can (`multi_row_verify`).
    p_min: an MTP drafter's draft ends after a token it gave less than this probability (Draft.p_min)."""

    def __init__(self, target: Target, drafter: Drafter, k: int = 4, *, adaptive: bool = False,
                 batched_verify: bool | None = None, lengths: DraftLength | None = None, p_min: float = 0.0):
        if k < 0:
            raise ValueError(f"draft length k={k} must be >= 0")
        # a round drafts at most the cache's room - 1 tokens: a larger K (--draft-k 10**20) drafts the same, but
        # the adaptive length keeps tables K long (an --adaptive K of 10**11 asked for 1.5 TB)
        self.target, self.drafter, self.k = target, drafter, min(k, target.contract.capacity)
        if batched_verify is None:
            batched_verify = bool(getattr(target, "multi_row_verify", False))
        self.batched_verify, self.p_min = batched_verify, p_min
        self.lengths = (lengths or DraftLength(self.k)) if adaptive else None  # capped K: its tables are K long

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
                 sampling: Sampling = Sampling(), stop_ids: Iterable[int] | Stops = (),
                 stats: SpecStats | None = None) -> list[SeqResult]:
        results = [SeqResult([]) for _ in prompts]
        for _row, _tokens in self.stream(prompts, max_new_tokens, sampling, stop_ids, stats, results):
            pass
        return results

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
               sampling: Sampling = Sampling(), stop_ids: Iterable[int] | Stops = (),
               stats: SpecStats | None = None, results: list[SeqResult] | None = None,
               cache: KVCache | None = None, cached: int = 0):
        """Yields (row, new tokens) as each round emits them; `results` receives the per-row results.
        `stop_ids`: stop token ids, or a Stops (stop tokens and stop strings). `cache`: one prompt's cache
        that already holds its first `cached` positions (Engine's reuse_prefix); the prefill runs the rest."""
        capacity = self.target.contract.capacity
        for p in prompts:
            check_request(list(p), max_new_tokens, capacity, self.target.contract.vocab_size)
        stats = stats if stats is not None else SpecStats()
        stops = stop_ids if isinstance(stop_ids, Stops) else Stops(stop_ids)
        if cache is None:
            check_fits(self.target.contract.kv, capacity, [len(p) for p in prompts], max_new_tokens)
            cache, cached = self.target.new_cache(len(prompts)), 0
        t0 = time.perf_counter()
        seqs = [self._prefill(b, list(p), cache, sampling, _rng(sampling.seed, b, len(prompts)), cached)
                for b, p in enumerate(prompts)]
        results = results if results is not None else [SeqResult([]) for _ in prompts]
        for s, r in zip(seqs, results):
            s.out = r
            r.tokens.append(s.history[-1])
        for s in seqs:
            s.out.stop_reason = stops.reason(s.out.tokens)
            self._finish_check(s, max_new_tokens, cache)
        stats.prefill_tokens += sum(len(p) for p in prompts) - cached
        stats.cached_tokens += cached
        stats.prefill_s += time.perf_counter() - t0
        base = (stats.rounds, stats.drafted, stats.accepted, list(stats.drafted_at), list(stats.accepted_at))
        decode_before = stats.decode_s  # added to, as the counts: decode_tokens / decode_s over the same calls
        try:
            # before the first tokens are given, as plain decoding's clock: the reader's time on them is between
            # tokens, which decode_s includes (started after, a drafting stream left it out)
            t1 = time.perf_counter()
            for s in seqs:
                yield s.row, list(s.out.tokens)
            while active := [s for s in seqs if not s.out.stop_reason]:
                before = {s.row: len(s.out.tokens) for s in active}
                self._round(active, cache, sampling, stops, max_new_tokens, stats)
                stats.decode_s = decode_before + time.perf_counter() - t1
                # counted round by round, as decode_s: a stream's reader sees tokens_per_s as it goes (it read 0
                # until the end), and a stream left early still counts what it gave
                stats.decode_tokens += sum(len(s.out.tokens) - before[s.row] for s in active)
                _tally(stats, base, seqs)
                for s in active:
                    yield s.row, s.out.tokens[before[s.row]:]
        except GeneratorExit:  # the app closed the stream (or the engine): rows it cut short say so
            for s in seqs:
                s.out.stop_reason = s.out.stop_reason or STREAM_CLOSED
            raise
        finally:
            _tally(stats, base, seqs)
            stats.stop_reasons = [s.out.stop_reason for s in seqs]
            stats.stop_reason = "; ".join(dict.fromkeys(stats.stop_reasons))

    def _prefill(self, b: int, prompt: list[int], cache: KVCache, sampling: Sampling,
                 rng: np.random.Generator, cached: int = 0) -> _Seq:
        logits, hidden = prefill(self.target, prompt[cached:], cache, b)
        s = _Seq(b, TokenIds(prompt), rng, hidden[0, -1], seen=Seen(prompt) if sampling.penalized else None)
        try:
            s.history.append(pick(logits[0, -1], sampling, rng, () if s.seen is None else s.seen.ids))
        except BadLogits as e:
            raise e.at(len(prompt), 1) from None
        if s.seen is not None:
            s.seen.add(s.history[-1])
        return s

    def _round(self, active: list[_Seq], cache: KVCache, sampling: Sampling, stops: Stops,
               max_new: int, stats: SpecStats) -> None:
        """draft -> verify -> accept -> commit, for every unfinished sequence."""
        t0 = time.perf_counter()
        drafts = {s.row: _located(s, self._draft, s, cache, sampling, max_new) for s in active}
        t1 = time.perf_counter()
        start = {s.row: int(cache.lengths[s.row]) for s in active}
        verified = self._verify(cache, {s.row: np.array([s.history[-1], *drafts[s.row][0]]) for s in active})
        stats.draft_s += t1 - t0
        stats.verify_s += time.perf_counter() - t1
        for s in active:
            tokens, q = drafts[s.row]
            logits, hidden = verified[s.row]  # [n+1, V], [n+1, H]: padding already cut
            a, nxt = _located(s, _accept, logits, sampling, s, tokens, q)
            cache.rollback(s.row, start[s.row] + 1 + a)  # keep [t, d0..d(a-1)]
            s.hidden = hidden[a]
            self._record(s, len(tokens), a)
            self._emit(s, [*tokens[:a], nxt], stops)
            self._finish_check(s, max_new, cache)
            if self.lengths is not None:
                self._score_guesses(s)

    def _draft(self, s: _Seq, cache: KVCache, sampling: Sampling, max_new: int) -> tuple[list[int], np.ndarray | None]:
        # a round emits up to k+1 tokens and its verify writes k+1 positions
        limit = min(self.k, max_new - len(s.out.tokens) - 1, cache.room(s.row) - 1)
        if limit <= 0:
            return _NO_DRAFT
        ctx = DraftContext(s.row, s.hidden, cache, sampling, s.rng, self.p_min, s.seen)
        if self.lengths is None:
            return self._propose(self.drafter, s, limit, ctx)
        options = guess_options(self.drafter, s.history)
        made = []  # free guesses are made whole and scored later, whatever part of them is drafted
        for guess, drafter in options:
            made.append(self._propose(drafter, s, min(self.k, guess.most or self.k), ctx) if guess.free else None)
            if guess.free and made[-1][0]:
                s.guesses.append((len(s.history), made[-1][0], guess.kind))
        i, k = self.lengths.choose([(g.kind, min(limit, g.most or limit), g.free) for g, _ in options])
        if k == 0:
            return _NO_DRAFT
        guess, drafter = options[i]
        if made[i] is not None:
            tokens, q = made[i]
        else:
            t0 = time.perf_counter()
            tokens, q = self._propose(drafter, s, k, ctx)
            self.lengths.timed_draft(guess.kind, len(tokens), time.perf_counter() - t0)
            if tokens:
                s.guesses.append((len(s.history), tokens, guess.kind))
        return tokens[:k], (None if q is None else q[:k])

    def _propose(self, drafter: Drafter, s: _Seq, k: int, ctx: DraftContext) -> tuple[list[int], np.ndarray | None]:
        tokens, q = drafter.propose(s.history, k, ctx)
        tokens = [int(t) for t in tokens[:k]]
        if any(not 0 <= t < self.target.contract.vocab_size for t in tokens):
            raise EdgemtpError(f"{type(drafter).__name__} proposed {tokens}: outside the target's "
                               f"vocabulary of {self.target.contract.vocab_size}")
        return tokens, (None if q is None else np.asarray(q)[:len(tokens)])

    def _verify(self, cache: KVCache, ids: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Target forward over each row's [t, drafts]: -> {row: (logits [S_row, V], hidden [S_row, H])}."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for rows in self._passes(cache, ids):
            width, t0 = self._width(rows, ids), time.perf_counter()
            out.update(self._forward(cache, rows, ids, width))
            if self.lengths is not None:
                self.lengths.timed_verify(rows[-1] - rows[0] + 1, width, time.perf_counter() - t0)
        return out

    def _passes(self, cache: KVCache, ids: dict[int, np.ndarray]) -> list[list[int]]:
        """Rows grouped into target passes: a run of rows shares one when one position each (or batched_verify)
        and every row it covers has the room for the common width. Where the target runs a pass's rows in one
        graph run (`one_run_for_rows`), the run may span finished rows, which ride along (see _forward): on Gemma 3
        270M a step of two one-row passes took 2.2x one pass over three rows, and a batch of 3 whose middle row
        stopped first decoded the other two 1.5x faster for it (2-core box, noisy). A pass carries at most as many
        finished rows as running ones: each costs a row's work, and two one-row steps took 150 ms where a 16-row
        step took 186 (5-position verify passes with fast_verify: 186-208 ms, where an 8-row pass took 356)."""
        spans = bool(getattr(self.target, "one_run_for_rows", False))
        passes: list[list[int]] = []
        for r in sorted(ids):
            group = passes[-1] + [r] if passes and (spans or passes[-1][-1] == r - 1) else None
            width = self._width(group, ids) if group else 0
            if group and (width == 1 or self.batched_verify) and r - group[0] + 1 <= 2 * len(group) and \
                    width <= min(cache.room(g) for g in range(group[0], r + 1)):
                passes[-1] = group
            else:
                passes.append([r])
        return passes

    def _width(self, rows: list[int], ids: dict[int, np.ndarray]) -> int:
        # a static-shape target pads each window of its own (runtime/static_target.py): padding a verify
        # to k + 1 here made a K + 1 wider than the window run two passes for a draft that fits in one
        return max(len(ids[r]) for r in rows)

    def _forward(self, cache: KVCache, rows: list[int], ids: dict[int, np.ndarray], width: int) -> dict:
        """One target pass over rows[0]..rows[-1], each of `rows` padded to `width` with its last token.

        Padded positions are cut here and rolled out of the cache by the commit: always rejected. A finished
        row between them (not in `ids`) is fed token 0 and rolled back here: its cache is never read again."""
        first, last = rows[0], rows[-1]
        # filled by hand: np.pad and np.stack took 12 us a round
        batch = np.zeros((last - first + 1, width), np.int64)
        for r in rows:
            batch[r - first, :len(ids[r])] = ids[r]
            batch[r - first, len(ids[r]):] = ids[r][-1]
        lengths = cache.lengths[first:last + 1].copy()
        logits, hidden = self.target.forward(batch, cache, rows=slice(first, last + 1), n_logits=width)
        for r in range(first, last + 1):
            if r not in ids:
                cache.rollback(r, int(lengths[r - first]))
        return {r: (logits[r - first, :len(ids[r])], hidden[r - first, :len(ids[r])]) for r in rows}

    def _record(self, s: _Seq, drafted: int, accepted: int) -> None:
        s.out.rounds += 1
        s.out.drafted += drafted
        s.out.accepted += accepted
        _count_positions(s.out.drafted_at, drafted)
        _count_positions(s.out.accepted_at, accepted)

    def _score_guesses(self, s: _Seq) -> None:
        """Tell the draft length model how the row's guesses fared, as far as the tokens since tell."""
        waiting = []
        for start, tokens, kind in s.guesses:
            actual = s.history[start:start + len(tokens)]
            if s.out.stop_reason or len(actual) == len(tokens) or actual != tokens[:len(actual)]:
                self.lengths.outcome(kind, tokens, actual)
            else:
                waiting.append((start, tokens, kind))
        s.guesses = waiting

    @staticmethod
    def _emit(s: _Seq, run: list[int], stops: Stops) -> None:
        """Appends the round's tokens up to the first that stops the row (a stop token, or the end of a
        stop string): the rest of an accepted run is dropped."""
        for token in run:
            s.history.append(token)
            if s.seen is not None:
                s.seen.add(token)
            s.out.tokens.append(token)
            if reason := stops.reason(s.out.tokens):
                s.out.stop_reason = reason
                return

    @staticmethod
    def _finish_check(s: _Seq, max_new: int, cache: KVCache) -> None:
        if s.out.stop_reason:  # set by stops
            return
        if len(s.out.tokens) >= max_new:
            s.out.stop_reason = "max new tokens"
        elif cache.room(s.row) < 1:  # the last emitted token has no place left in the cache
            s.out.stop_reason = "KV capacity reached"


def _accept(logits: np.ndarray, sampling: Sampling, s: _Seq, tokens: list[int], q: np.ndarray | None
            ) -> tuple[int, int]:
    """(accepted drafts, next token) of a row's verify logits [n+1, V] for its drafts `tokens` (q: their
    distributions when sampled)."""
    history = s.history if s.seen is None else s.seen  # the penalty's distinct ids, where kept
    if sampling.greedy:
        choice = greedy_choices(logits, sampling, history, tokens)  # up to the first rejection
        return len(choice) - 1, int(choice[-1])
    return accept_sampled(tokens, RowDistributions(logits, sampling, history, tokens), q, s.rng)


def _located(s: _Seq, run, *args):
    """run(*args) for row `s`, whose BadLogits from row i of a block (a verify pass's i-th position, a draft's
    i-th step) becomes one that names the position of the token those logits were to choose: the row's history
    ends with the token whose logits are the block's first. One with no row (an app's drafter that does not tag
    its steps) is placed at the block's first position or later: naming step 0's position was a guess."""
    try:
        return run(*args)
    except BadLogits as e:
        if e.row is None:
            raise e.at_or_after(len(s.history), len(s.out.tokens) + 1) from None
        raise e.at(len(s.history) + e.row, len(s.out.tokens) + e.row + 1) from None


def _tally(stats: SpecStats, base: tuple, seqs: list[_Seq]) -> None:
    """The rows' drafting so far into `stats`, on top of `base` (its rounds, drafted, accepted, drafted_at and
    accepted_at before this call): after every round, as decode_tokens. Totalled only at the end, a stream
    left early (a chat reply stopped by Ctrl-C) reported its tokens with no rounds, drafts or acceptance."""
    rounds, drafted, accepted, drafted_at, accepted_at = base
    stats.rounds = rounds + sum(s.out.rounds for s in seqs)
    stats.drafted = drafted + sum(s.out.drafted for s in seqs)
    stats.accepted = accepted + sum(s.out.accepted for s in seqs)
    stats.drafted_at, stats.accepted_at = list(drafted_at), list(accepted_at)
    for s in seqs:
        _add(stats.drafted_at, s.out.drafted_at)
        _add(stats.accepted_at, s.out.accepted_at)
    stats.other_s = stats.decode_s - stats.draft_s - stats.verify_s


def _count_positions(counts: list[int], n: int) -> None:
    counts.extend([0] * (n - len(counts)))
    for i in range(n):
        counts[i] += 1


def _add(into: list[int], counts: list[int]) -> None:
    into.extend([0] * (len(counts) - len(into)))
    for i, n in enumerate(counts):
        into[i] += n


def speculative_generate(target: Target, drafter: Drafter, prompt_ids_list: Sequence[Sequence[int]],
                         max_new_tokens: int = 128, sampling: Sampling = Sampling(), k: int = 4,
                         stop_ids: Iterable[int] = (), stats: SpecStats | None = None,
                         **options) -> list[SeqResult]:
    """Generates for each prompt; `options` go to `Speculative` (adaptive, batched_verify)."""
    return Speculative(target, drafter, k, **options).generate(prompt_ids_list, max_new_tokens, sampling,
                                                               stop_ids, stats)


def _rng(seed: int | None, row: int, batch: int) -> np.random.Generator:
    """Batch of one: the generator Engine.token_ids uses; otherwise an independent stream per row."""
    if batch == 1:
        return np.random.default_rng(seed)
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(batch)[row])
