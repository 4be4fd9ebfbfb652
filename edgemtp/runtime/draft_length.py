"""Each round's draft length, from what drafting costs and earns on this device as generation runs.

A round that drafts k tokens pays for a verify pass k + 1 positions wide (and, with an MTP drafter, k
drafter steps) and emits 1 + (accepted drafts) tokens. What a wider pass costs depends on the device: on
a memory-bound fp32 target it costs about one decode step whatever its width, on an int4 target on this
CPU each extra position adds a fifth of a step (compute-bound MatMulNBits). What a draft earns depends on
the text and on the kind of guess: a prompt-lookup draft that copies after a 3-token repeat is accepted
far more often than one after a single-token match. So the round measures both (verify seconds by
width, drafter seconds per token, acceptance per kind of guess and position) and drafts the k that
maximises expected tokens per second, 0 (a plain step) when no k beats it.

Prompt lookup costs nothing to propose, so its guesses are made and scored every round, verified or
not: it keeps learning while it is not drafting. Where the drafter offers more than one guess (the
hybrid's lookup copy and MTP guess), the round drafts the one with the most expected tokens per second.
A costly drafter (MTP) that stopped drafting drafts one token after PROBE_AFTER declined guesses, to see
whether the text has changed.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence

import numpy as np

DECAY = 0.95  # each new outcome of a kind weighs its older ones down: a text changes as it goes
SMOOTHING = 0.3  # weight of a new time in its moving average
PROBE_AFTER = 16  # declined guesses (a row's round each; a batch's rows count apart) before a probe


class DraftLength:
    """Chooses k for one round; told what rounds cost and what guesses turned out to be.

    Threads streaming on one engine with the same setting share one (Engine._lengths): each call that reads and
    changes its tables holds `_lock`, which their read-then-write updates (a count read, one added, written back)
    needed: a thread switch between the read and the write lost the other thread's update (4 threads: ~1% of
    declined guesses' counts, and acceptance counts no order of the outcomes gives). Uncontended, ~0.1 us a call,
    a few calls a round."""

    def __init__(self, k_max: int):
        self.k_max = k_max
        self._lock = threading.Lock()
        self.verify: dict[int, float] = {}  # width -> seconds a pass takes per row in it
        self.passes_run: set[tuple[int, int]] = set()  # (rows, width): a shape's first pass is not counted
        self.drafters_run: set[Hashable] = set()  # kinds whose drafter ran: its first run is not counted
        self.step: dict[Hashable, float] = {}  # kind -> seconds a drafted token (a costly drafter)
        self.counts: dict[Hashable, np.ndarray] = {}  # kind -> [k_max, 2]: accepted, tried per position
        self.idle: dict[Hashable, int] = {}  # kind -> guesses declined in a row (a costly drafter)

    def choose(self, options: Sequence[tuple[Hashable, int, bool]]) -> tuple[int, int]:
        """Which guess on offer to draft and how much of it: `options` are (kind, limit, free) for each guess
        the drafter could make this round (free: proposing it costs nothing); returns (option, k) with k in
        0..its limit, k = 0 for a plain step. The hybrid drafter offers its lookup guess and its MTP guess,
        so a repeat too short to be worth drafting leaves the round to the MTP drafter, not a plain step."""
        with self._lock:
            return self._choose(options)

    def _choose(self, options: Sequence[tuple[Hashable, int, bool]]) -> tuple[int, int]:
        plain = self.verify_cost(1)
        if plain is None:  # no pass measured yet: a plain step, the yardstick, comes first
            return 0, 0
        best, best_i, best_k = 1.0 / plain, 0, 0
        for i, (kind, limit, free) in enumerate(options):
            k, rate = self._best_length(kind, min(limit, self.k_max), free)
            if rate > best:
                best, best_i, best_k = rate, i, k
        if best_k:
            self.idle[options[best_i][0]] = 0
            return best_i, best_k
        for i, (kind, limit, free) in enumerate(options):  # a plain step: costly kinds declined
            if not free and min(limit, self.k_max) > 0:
                self.idle[kind] = self.idle.get(kind, 0) + 1
                if self.idle[kind] > PROBE_AFTER:  # one token: the cheapest probe, and its position is the
                    self.idle[kind] = 0  # one that decides whether drafting pays at all
                    return i, 1
        return 0, 0

    def _best_length(self, kind: Hashable, limit: int, free: bool) -> tuple[int, float]:
        """(k, expected tokens per second) for the best k in 1..limit of a guess of `kind`; (0, 0) for none."""
        best, best_k = 0.0, 0
        tokens, survive = 1.0, 1.0
        p = self.acceptance(kind, optimistic=not free)
        for k in range(1, limit + 1):
            survive *= p[k - 1]
            tokens += survive
            seconds = self.verify_cost(k + 1) + (0.0 if free else k * self.step.get(kind, 0.0))
            if tokens / seconds > best:
                best, best_k = tokens / seconds, k
        return best_k, best

    def acceptance(self, kind: Hashable, optimistic: bool = False) -> np.ndarray:
        """[k_max] chance that draft position i is accepted given positions < i were: counts smoothed
        toward the position before's chance (even odds for the first), so a drafter right at its first
        positions is expected right at later ones it has not drafted yet, and drafts them to find out.

        optimistic: one standard error higher, for a costly drafter, whose guesses are scored only when
        drafted: few outcomes (one unlucky early draft) then do not stop a drafter that pays. A free
        guess is scored every round and needs no such push (it cost lookup ~3% in a trial)."""
        c = self.counts.get(kind, np.zeros((self.k_max, 2)))
        out, prior = np.empty(self.k_max), 0.5
        for i, (accepted, tried) in enumerate(c):
            prior = (accepted + 2.0 * prior) / (tried + 2.0)
            bonus = np.sqrt(prior * (1.0 - prior) / (tried + 3.0)) if optimistic else 0.0
            out[i] = min(1.0, prior + bonus)
        return out

    def verify_cost(self, width: int) -> float | None:
        """Seconds of a pass per row: measured, else linear in the width between (or beyond) the nearest measured
        widths; one measured width stands for every width (drafting looks cheap until measured)."""
        known = sorted(self.verify.items())
        if not known:
            return None
        exact = dict(known).get(width)
        if exact is not None:
            return exact
        if len(known) == 1:
            return known[0][1]
        # the segment of known widths around `width`, the first or last one beyond them; a wider pass never
        # costs less than the widest measured one, nor anything less than the cheapest (noise can slope down)
        i = min(max(int(np.searchsorted([w for w, _ in known], width)), 1), len(known) - 1)
        (w0, s0), (w1, s1) = known[i - 1], known[i]
        estimate = max(s0 + (s1 - s0) * (width - w0) / (w1 - w0), min(s for _, s in known))
        return max(estimate, known[-1][1]) if width > known[-1][0] else estimate

    def timed_verify(self, rows: int, width: int, seconds: float) -> None:
        """A pass over `rows` rows `width` positions wide took `seconds` (a batch's rows share it)."""
        with self._lock:
            self._timed_verify(rows, width, seconds)

    def _timed_verify(self, rows: int, width: int, seconds: float) -> None:
        if (rows, width) not in self.passes_run:  # a shape's first pass is slow (ONNX Runtime plans its memory):
            self.passes_run.add((rows, width))       # 1.1-1.4x
            return
        old, new = self.verify.get(width), max(seconds / rows, 1e-9)
        self.verify[width] = new if old is None else old + SMOOTHING * (new - old)

    def timed_draft(self, kind: Hashable, tokens: int, seconds: float) -> None:
        with self._lock:
            self._timed_draft(kind, tokens, seconds)

    def _timed_draft(self, kind: Hashable, tokens: int, seconds: float) -> None:
        if kind not in self.drafters_run:  # a drafter's first run is slow too
            self.drafters_run.add(kind)
            return
        if tokens:
            old, new = self.step.get(kind), seconds / tokens
            self.step[kind] = new if old is None else old + SMOOTHING * (new - old)

    def outcome(self, kind: Hashable, guess: Sequence[int], actual: Sequence[int]) -> None:
        """A guess against the tokens that followed: positions up to the first wrong one were tried,
        all but that one accepted. `actual` may be shorter than the guess (the sequence ended)."""
        with self._lock:
            self._outcome(kind, guess, actual)

    def _outcome(self, kind: Hashable, guess: Sequence[int], actual: Sequence[int]) -> None:
        c = self.counts.setdefault(kind, np.zeros((self.k_max, 2)))
        c *= DECAY
        for i, (g, a) in enumerate(zip(guess[:self.k_max], actual)):
            c[i, 1] += 1
            if g != a:
                return
            c[i, 0] += 1


class RecentDraftLengths(dict):
    """(mode, K, batch) -> DraftLength, kept from call to call (pass costs are this device's, and acceptance
    carries over, fading as the text changes), for the `kept` settings used last only: a server whose requests
    each set their own K and batch size kept one per setting for good (up to K x 2 floats per kind of guess
    each: 64 KB at K = 4,096). Oldest first, as the dict iterates."""

    def __init__(self, kept: int = 16):
        super().__init__()
        self.kept, self._lock = kept, threading.Lock()

    def take(self, key: Hashable, k: int) -> DraftLength:
        with self._lock:  # threads sharing an engine
            lengths = self.pop(key, None) or DraftLength(k)
            self[key] = lengths  # now the most recently used
            while len(self) > self.kept:
                del self[next(iter(self))]
        return lengths
