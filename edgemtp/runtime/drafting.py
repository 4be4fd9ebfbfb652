"""Drafters: cheap guesses of a sequence's next k tokens, for the target to verify in one pass.

A drafter sees one sequence at a time. `PromptLookupDrafter` needs nothing but the token ids; an MTP
drafter (DESIGN.md §2) also reads the target's last hidden state at the accepted index and the
target's KV cache, which the round hands over in a `DraftContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, NamedTuple, Protocol, Sequence

import numpy as np

from ..errors import EdgemtpError
from .kv_cache import KVCache
from .sampling import Sampling, Seen
from .session import runs_on_cpu


class Guess(NamedTuple):
    """What kind of guess a drafter would make next (see guess_kind)."""

    kind: Hashable
    free: bool  # proposing costs next to nothing: the guess can be made and scored every round
    most: int | None = None  # the most tokens this kind of guess drafts (None: any k asked for)


@dataclass
class DraftContext:
    """What the speculative round knows about a sequence when it asks for a draft.

    row: the sequence's row in `cache`.
    hidden: [H] the target's last hidden state at the position that produced `history[-1]` (the
        verify pass's hidden state at the accepted index, or the prefill's last position).
    cache: the target's KV cache. `cache.lengths[row]` positions are verified; `history[-1]` is not in
        it yet. Read it, never write it: drafted tokens never enter a KV cache.
    sampling, rng: for a drafter that samples its draft; it then returns the q it sampled from.
    p_min: an MTP drafter ends its draft after a token it gave less than this probability (Draft.p_min).
    seen: the distinct ids of history, which the rounds keep (sampling.Seen): a drafter applying the repetition
        penalty reads them, not the whole history (None: it builds them from history).
    """

    row: int
    hidden: np.ndarray | None
    cache: KVCache | None
    sampling: Sampling
    rng: np.random.Generator
    p_min: float = 0.0
    seen: Seen | None = None  # history's distinct ids, for the repetition penalty (None: read from history)


class Drafter(Protocol):
    def propose(self, history: Sequence[int], k: int,
                ctx: DraftContext | None = None) -> tuple[Sequence[int], np.ndarray | None]:
        """Up to k draft tokens following `history` (prompt + generated ids, oldest first).

        Returns (tokens [n], q [n, V] or None) with 0 <= n <= k. q[i] is the distribution tokens[i]
        was drawn from; None means a deterministic drafter (q one-hot at each token). n = 0: no
        guess (the round then takes a plain one-token step).

        A drafter choosing tokens step by step with edgemtp's sampling (pick, distribution) wraps step i's choice
        in acceptance.in_row(i, ...): a BadLogits then names the position that step drafted (untagged: the
        draft's first position "or later").

        A drafter may also have `kind(history) -> Guess | None`, what kind of guess it would make (see
        guess_kind); the adaptive draft length learns acceptance per kind. One that combines drafters has
        `options(history)` instead (see guess_options)."""
        ...


class NoDrafter:
    """Proposes nothing: every round is a plain one-token step (batched plain decoding)."""

    def propose(self, history: Sequence[int], k: int, ctx: DraftContext | None = None) -> tuple[list[int], None]:
        return [], None

    def kind(self, history: Sequence[int]) -> None:
        return None


class PromptLookupDrafter:
    """n-gram prompt lookup: find the most recent earlier occurrence of the sequence's last n tokens
    (n from max_ngram down to min_ngram) and propose the tokens that followed it.

    When that continuation runs into the end of the history it keeps copying from its own output
    (an overlapping LZ77-style copy), so a repeating pattern is extended to the full k tokens."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise EdgemtpError(f"prompt lookup n-gram sizes must satisfy 1 <= min ({min_ngram}) "
                               f"<= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, history: Sequence[int], k: int,
                ctx: DraftContext | None = None) -> tuple[list[int], None]:
        h = as_array(history)
        found = self.match(h)
        if found is None:
            return [], None
        n, start = found
        return continuation(h, start + n, k), None

    def match(self, history: Sequence[int]) -> tuple[int, int] | None:
        """(n, start) of the longest repeat of the history's last n tokens (the most recent one), or None."""
        h = as_array(history)
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            start = last_match(h, n)
            if start is not None:
                return n, start
        return None

    def kind(self, history: Sequence[int]) -> Guess | None:
        """See guess_kind: a copy after an n-token repeat, free to propose."""
        found = self.match(history)
        return None if found is None else Guess(f"lookup {found[0]}", True)


class TokenIds(list):
    """A list of token ids (a sequence's history) that keeps them as an int64 array too, for prompt lookup's
    search: converting the whole list every round took 0.5 ms at 32k ids (Gemma 3 270M's history on the 2-core
    Xeon), twice a round with an adaptive hybrid, which asks for its guess's kind before drafting it. `array`
    copies only the ids appended since its last call (the rounds only append); any other change makes the next
    call copy them all into a new array, so one given before keeps its ids."""

    def __init__(self, ids: Sequence[int] = ()):
        super().__init__(ids)
        self._array, self._n = np.asarray(self, np.int64), len(self)

    def array(self) -> np.ndarray:
        """[len] int64, the ids."""
        n = len(self)
        if n > len(self._array):  # doubled: a copy now and then, not one per round
            grown = np.empty(max(2 * len(self._array), n), np.int64)
            grown[:self._n] = self._array[:self._n]
            self._array = grown
        if n > self._n:
            self._array[self._n:n] = np.asarray(self[self._n:n], np.int64)
            self._n = n
        return self._array[:n]

    def _changed(self) -> None:
        """Ids changed in place: array() starts again from none (set one, then pop and append, left it stale)."""
        self._array, self._n = np.empty(0, np.int64), 0


def _changing(name: str):
    def method(self, *args, **kwargs):
        self._changed()
        return getattr(list, name)(self, *args, **kwargs)
    return method


for _name in ("__setitem__", "__delitem__", "__imul__", "insert", "pop", "remove", "clear", "sort", "reverse"):
    setattr(TokenIds, _name, _changing(_name))


def as_array(history: Sequence[int]) -> np.ndarray:
    """`history` as an int64 array: a TokenIds' own, kept as it grows; anything else converted."""
    return history.array() if isinstance(history, TokenIds) else np.asarray(history, np.int64)


class HybridDrafter:
    """Prompt lookup when the history repeats itself (its last `min_ngram`+ tokens occurred before), the MTP
    drafter otherwise: a copy of earlier text is a long, cheap and usually right guess where it exists,
    and the MTP drafter covers the rest. Under an adaptive draft length it offers both guesses (`options`)
    and the round drafts the one that pays best: MTP too where a short repeat's copy does not pay.

    The MTP drafter drafts at most `mtp_k` tokens (lookup up to k): each MTP step costs a drafter run and a
    wider verify, and its later drafts are rarely accepted. Measured on Gemma 3 270M fp32, greedy, K = 4 / 6
    (docs/measurements.md): code 2.13x / 2.15x plain decoding with MTP drafting all K, 2.24x / 2.48x with
    mtp_k = 2; prose 1.87x / 1.67x -> 1.98x / 1.88x; prompt lookup alone 2.37x / 2.38x and 1.87x / 1.78x. At
    K = 4, mtp_k 1 / 2 / 3 gave code 2.24x / 2.24x / 2.21x, prose 1.95x / 1.98x / 1.93x."""

    def __init__(self, mtp: Drafter, min_ngram: int = 2, max_ngram: int = 3, mtp_k: int = 2):
        self.mtp, self.lookup, self.mtp_k = mtp, PromptLookupDrafter(max_ngram, min_ngram), mtp_k

    def propose(self, history: Sequence[int], k: int, ctx: DraftContext | None = None):
        tokens, q = self.lookup.propose(history, k, ctx)
        if len(tokens):
            return tokens, q
        return self.mtp.propose(history, min(k, self.mtp_k), ctx)

    def options(self, history: Sequence[int]) -> list[tuple[Guess, Drafter]]:
        """See guess_options: lookup's guess where the history repeats itself, then the MTP drafter's
        (mtp_k at most), each with the drafter that makes it."""
        out = []
        lookup = self.lookup.kind(history)
        if lookup is not None:
            out.append((lookup, self.lookup))
        mtp = guess_kind(self.mtp, history)
        if mtp is not None:
            out.append((mtp._replace(most=min(mtp.most or self.mtp_k, self.mtp_k)), self.mtp))
        return out


def guess_kind(drafter: Drafter, history: Sequence[int]) -> Guess | None:
    """The kind of guess `drafter` would make after `history`, None when it would make none.

    Acceptance is learnt per kind (runtime.draft_length); a free guess can be made and scored every
    round, drafted or not. A drafter without a `kind` method makes one costly kind of guess; one with
    `options` (a combination of drafters), its first."""
    kind, options = getattr(drafter, "kind", None), getattr(drafter, "options", None)
    if kind is None and options is not None:
        offered = options(history)
        return offered[0][0] if offered else None
    return kind(history) if kind is not None else Guess(type(drafter).__name__, False)


def guess_options(drafter: Drafter, history: Sequence[int]) -> list[tuple[Guess, Drafter]]:
    """The guesses `drafter` could make after `history`, in its order of preference, each with the drafter
    that makes it: a drafter combining others (HybridDrafter.options) offers each of theirs, so an adaptive
    round can draft the one that pays; any other drafter offers its one kind (guess_kind), or none."""
    options = getattr(drafter, "options", None)
    if options is not None:
        return options(history)
    guess = guess_kind(drafter, history)
    return [] if guess is None else [(guess, drafter)]


def last_match(h: np.ndarray, n: int) -> int | None:
    """Start of the most recent occurrence of h[-n:] in h that is not the suffix itself, or None."""
    if n < 1 or len(h) <= n:
        return None
    # starts 0 .. len-n-1 (always followed by a token), compared one offset at a time: n whole-array compares,
    # 3-7 us against sliding_window_view(...).all(axis=1)'s 19-23 (a 90-token history; every round, up to 3 n's)
    starts = len(h) - n
    hit = h[:starts] == h[-n]
    for j in range(1, n):
        hit &= h[j:starts + j] == h[j - n]
    hits = np.flatnonzero(hit)
    return int(hits[-1]) if hits.size else None


def continuation(h: np.ndarray, src: int, k: int) -> list[int]:
    """k tokens copied from h[src:], continuing from the copy itself past the end of h (src < len(h))."""
    out: list[int] = []
    for j in range(k):
        i = src + j
        out.append(int(h[i]) if i < len(h) else out[i - len(h)])
    return out


def cpu_quantized(bundle, provider: str = "cpu") -> bool:
    """An int8 / int4 target on the CPU provider: its MatMulNBits passes are compute-bound, so a verify
    window costs a decode step per ~3-4 positions instead of about one step whatever its width."""
    return runs_on_cpu(provider) and bundle.graph("target").quant in ("int8", "int4")


def auto_mode(bundle, provider: str = "cpu") -> str:
    """What --draft auto means for this bundle: hybrid with an MTP drafter, else lookup; lookup too for
    an int8 / int4 target on the CPU provider (see Engine.drafter)."""
    return "hybrid" if bundle.has_graph("drafter") and not cpu_quantized(bundle, provider) else "lookup"
