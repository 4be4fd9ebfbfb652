"""Token choice from logits: greedy, or temperature / top-k / top-p / min-p sampling with a seeded generator,
after an optional repetition penalty over the tokens seen so far (transformers' generate semantics)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ArgumentError, EdgemtpError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; greedy decoding too

    def __post_init__(self):
        if not (is_finite(self.temperature) and self.temperature >= 0):
            raise ArgumentError("temperature", self.temperature, "must be a finite number >= 0")
        # top_k is never None (0 turns it off): int(None) raised a bare TypeError here
        for name, value in (("top_k", self.top_k), ("seed", self.seed)):
            if (value is not None or name == "top_k") and not is_whole(value):
                raise ArgumentError(name, value, "must be a whole number")
            if value is not None and value < 0:
                raise ArgumentError(name, value, "must be >= 0")
        if not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ArgumentError("top_p", self.top_p, "must be in (0, 1]")
        if not (is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise ArgumentError("min_p", self.min_p, "must be in [0, 1]")
        if not (is_finite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ArgumentError("repetition_penalty", self.repetition_penalty, "must be a finite number > 0")
        # the penalty scales float32 logits: one float32 rounds to 0 made a zero logit 0 / 0 = NaN (blamed on the
        # model), one it rounds to inf took 0 * inf in the branch np.where drops (a numpy warning)
        with np.errstate(over="ignore", under="ignore"):
            as_float32 = np.float32(self.repetition_penalty)
        if as_float32 == 0 or np.isinf(as_float32):
            raise ArgumentError("repetition_penalty", self.repetition_penalty,
                                "must be a number float32 holds (1.4e-45 to 3.4e38): the logits are float32")
        # numpy's whole numbers as Python's (frozen dataclass): -top_k of an unsigned one wrapped around, and
        # np.partition failed on it ("kth(=251) out of bounds") at the first sampled token
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        unused = [name for name, value, off in (("top_k", self.top_k, 0), ("top_p", self.top_p, 1),
                                                ("min_p", self.min_p, 0), ("seed", self.seed, None))
                  if value != off]
        if self.greedy and unused:  # as transformers' generate warns at do_sample=False: nothing in the output says so
            warnings.warn(f"Sampling: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect at "
                          "temperature 0 (greedy decoding); give a temperature above 0 to sample", UserWarning,
                          stacklevel=3)  # __post_init__ <- the dataclass's __init__ (code of its own) <- the app

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a token's logits depend on the tokens before it (the repetition penalty)."""
        return self.repetition_penalty != 1


class BadLogits(EdgemtpError):
    """Logits no token can be chosen from: NaN among them, or -inf at every id. `source`: whose logits; `where`:
    where generation was (at), for the message. `row`: which row of a block of logits (a verify pass's, a draft's
    steps) was the first bad one, which generation turns into a position; None where no block was named (one
    row's logits: an app's drafter that does not tag its steps with acceptance.in_row)."""

    def __init__(self, source: str = "the model", where: str = ""):
        self.source, self.where, self.row = source, where, None
        super().__init__(f"{source} gave logits that hold NaN or are -inf at every token{where}, so no token can be "
                         "chosen (a broken bundle, or a value that overflowed in its graph)")

    def at(self, position: int, token: int) -> "BadLogits":
        """The same error, naming the position in the sequence (prompt and reply, from 0) of the token its logits
        were to choose, and that token's place in the reply (from 1): where a long generation went wrong."""
        return BadLogits(self.source, f" for position {position} (token {token} of the reply)")

    def at_or_after(self, position: int, token: int) -> "BadLogits":
        """at(), for logits of a block whose row is unknown (row None) starting at that position."""
        return BadLogits(self.source, f" for position {position} or later (token {token} of the reply or later)")

    def __reduce__(self):  # rebuilt from its fields (args holds the message only): pickling, copy
        return type(self), (self.source, self.where)


def check_best(best, source: str = "the model") -> None:
    """Raises BadLogits unless `best`, the logit argmax or max found (of each row), is above -inf. Free: argmax
    and max give NaN's place whenever a row holds one, and -inf only where every logit is -inf. Unchecked,
    greedy decoding took argmax's answer (the first NaN's id, or token 0) and went on: a stream of wrong tokens.
    `source`: whose logits, for the message. The first bad row of a block (best [n]) is found only once one is known
    bad; one row's (best a scalar) names none: its caller knows which it is (acceptance.in_row)."""
    best = np.asarray(best)
    if not np.all(best > -np.inf):
        error = BadLogits(source)
        if best.ndim:
            error.row = int(np.flatnonzero(~(best.reshape(-1) > -np.inf))[0])
        raise error


def is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """A number that is neither NaN nor infinite, as a float: math.isfinite raised OverflowError on a Python
    int beyond float's range (temperature=10**400), where a float would be inf."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def penalize(logits: np.ndarray, s: Sampling, seen: Sequence[int] = ()) -> np.ndarray:
    """logits [V] with the repetition penalty applied to every token id in `seen` (the prompt and the tokens
    generated before this position), as transformers' RepetitionPenaltyLogitsProcessor does: a positive logit
    divided by the penalty, a negative one multiplied, once per token however often it was seen. A copy when
    it changes anything; the logits themselves otherwise."""
    if not s.penalized or not len(seen):
        return logits
    x = np.array(logits, np.float32)  # the graph's dtype: the same rounding as transformers' float32 scores
    ids = np.asarray(seen, np.int64)
    picked = x[ids]  # read before writing: a repeated id gets the penalty once
    # a tiny penalty (1e-40) sends a positive logit to inf, as in transformers; numpy 1.x (pyproject's floor is
    # 1.26) casts such a penalty to float32 with an underflow, which a caller's np.seterr(all="raise") raised
    with np.errstate(over="ignore", under="ignore"):
        x[ids] = np.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
    return x


class Seen:
    """The distinct token ids of a stream's history (prompt and reply), added to token by token: what the
    repetition penalty reads (`ids`). Handing penalize the whole history converted it to an array at every step,
    1-2 ms a token at 32k tokens of history; this costs the distinct ids' count at most (the penalty is applied
    once per id however often it was seen, so the logits come out the same)."""

    def __init__(self, ids: Sequence[int] = ()):
        self._known: set[int] = set()
        self._ids, self._n = np.empty(64, np.int64), 0
        for token in ids:
            self.add(token)

    def add(self, token: int) -> None:
        token = int(token)
        if token in self._known:
            return
        self._known.add(token)
        if self._n == len(self._ids):  # doubled: a copy now and then, not one per token
            self._ids = np.concatenate([self._ids, np.empty_like(self._ids)])
        self._ids[self._n] = token
        self._n += 1

    @property
    def ids(self) -> np.ndarray:
        """[n] int64, the distinct ids in the order first seen (a view: later adds leave it as it is)."""
        return self._ids[:self._n]

    def plus(self, extra: Sequence[int]) -> np.ndarray:
        """ids and those of `extra` not among them (a draft's tokens before a verify position), the stream's own
        ids unchanged."""
        new = [t for t in dict.fromkeys(map(int, extra)) if t not in self._known]
        return np.concatenate([self.ids, np.asarray(new, np.int64)]) if new else self.ids


def as_seen(history: "Sequence[int] | Seen") -> Seen:
    """`history` as a Seen (built from a plain sequence: a caller outside the rounds, a test)."""
    return history if isinstance(history, Seen) else Seen(history)


def distribution(logits: np.ndarray, s: Sampling, seen: Sequence[int] = (),
                 out: np.ndarray | None = None, source: str = "the model") -> np.ndarray:
    """Probabilities [V] after the repetition penalty over `seen`, temperature, top-k, top-p and min-p (float64,
    summing to 1; logits [..., V] without a penalty). out: float64 zeros of that shape to write them into and
    return (a row of a drafter's [k, V] q, instead of a 2 MB row of its own copied there). source: whose logits,
    for BadLogits' message."""
    x = penalize(logits, s, seen)
    if np.ndim(x) == 1:  # a clustered MTP drafter's row: -inf but at its ~4,160 candidates of Gemma's 262,144
        finite = x != -np.inf
        if 0 < 2 * np.count_nonzero(finite) < len(x):  # computed over those alone: 1.3 ms a draft step before
            live = np.flatnonzero(finite)                 # (each pass over all 262,144), 0.2 after
            p = np.zeros(len(x)) if out is None else out
            p[live] = distribution(x[live], s, source=source)
            return p
    # one float64 copy, changed in place: a temporary per step (x - max, / T, exp, np.where, / sum) was a fresh
    # 2 MB array apiece, whose allocation and page faults made a distribution over Gemma 3's 262,144 logits
    # 1.2-6 ms (T 0.8, top-p 0.9, by the heap's state) against 1.0 in place
    if out is None:
        x = np.array(x, np.float64)
    else:
        np.copyto(out, x)
        x = out
    # the best logit subtracted before dividing: at a tiny temperature (5e-324) x / T overflows to inf, and
    # inf - inf would be NaN; (x - max) / T is 0 for the best and -inf or finite below it
    top = x.max(axis=-1, keepdims=True)
    check_best(top[..., 0], source)  # a block's rows named, one row's not
    if np.isposinf(top).any():  # logits a tiny repetition penalty sent past float32's range: inf - inf was NaN;
        x[...] = np.where(np.isposinf(x), 0.0, np.where(np.isposinf(top), -np.inf, x))  # they are the best, alike
        top = x.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):  # -inf below the best token is what such a temperature means
        x -= top
        x /= s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = np.partition(x, -s.top_k, axis=-1)[..., -s.top_k, None]
        x[x < kth] = -np.inf
    x -= x.max(axis=-1, keepdims=True)
    p = _exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    if s.top_p < 1.0:
        _top_p(p, s.top_p)
    if s.min_p > 0:  # after top-p, as transformers' MinPLogitsWarper: relative to the best token, kept at 1
        p[p < s.min_p * p.max(axis=-1, keepdims=True)] = 0.0
        p /= p.sum(axis=-1, keepdims=True)
    return p


def _exp(x: np.ndarray) -> np.ndarray:
    """exp(x), in place (x contiguous). Where most of x is -inf (a clustered drafter's logits: 4,160 candidates
    of 262,144; top-k), only the rest is computed: exp(-inf) is 0, but numpy took 3x as long over it as over
    numbers (Gemma 3 270M's drafter row: 0.89 ms against 0.37 this way)."""
    flat = x.reshape(-1)
    finite = flat != -np.inf
    if 2 * np.count_nonzero(finite) < len(flat):  # (counted first: the indices of a dense row, a fresh 2 MB
        live = np.flatnonzero(finite)              # array, cost their page faults, 2 ms against exp's 0.3)
        values = np.exp(flat[live])
        flat[:] = 0.0
        flat[live] = values
    else:
        np.exp(flat, out=flat)
    return x


def _top_p(p: np.ndarray, top_p: float) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always >= 1 token): the others
    of p [..., V] (contiguous) set to 0 in place, the rest renormalized."""
    for row in p.reshape(-1, p.shape[-1]):
        kept = nucleus(row, top_p)
        values = row[kept]
        row[:] = 0.0
        row[kept] = values
    p /= p.sum(axis=-1, keepdims=True)


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the smallest set of most likely tokens of p [V] whose mass reaches top_p: those whose mass
    before them, in order of falling probability (ties by id), is below top_p.

    Sorting all 262,144 probabilities took 25 ms a row, more than a decode step, and a verify pass needs
    a row per position. The nucleus is a few tokens to a few thousand, so only the tokens at least as
    likely as a threshold t are sorted, t falling 16x at a time from the best probability until their mass,
    less t, reaches top_p: every token left out (p < t) then has at least that much before it, however the
    sums round. The same positive ids as a full stable sort (np.argpartition, the other way to find the top
    tokens, took 12 ms on a row that top-k had filled with zeros); zero-probability tokens are never kept:
    keeping them changes nothing. Where rounding keeps the mass just short (top_p within an ulp or so of
    the total), the next pass sorts every positive token, at a full sort's cost, not many more passes."""
    positive = np.count_nonzero(p)
    t = float(p.max()) / 16
    while True:
        ids = np.flatnonzero(p >= t) if t > 0 else np.flatnonzero(p)
        if t > 0 and 4 * len(ids) >= positive:  # most tokens in: sort them all, once
            t = 0.0
            continue
        if t > 0 and p[ids].sum() - t < top_p:  # a pairwise sum: cheap, no sort yet
            t /= 16
            continue
        order = ids[np.argsort(-p[ids], kind="stable")]  # ids ascend: ties keep id order
        mass = np.cumsum(p[order])
        if t == 0 or mass[-1] - t >= top_p:
            return order[mass - p[order] < top_p]
        t = 0.0  # short by rounding: all positive tokens next


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator, seen: Sequence[int] = ()) -> int:
    """One token from logits [V]; `seen`: the tokens before it (prompt and generated), for the penalty."""
    if s.greedy:
        return greedy_token(penalize(logits, s, seen))
    return draw(distribution(logits, s, seen), rng)


def greedy_token(logits: np.ndarray) -> int:
    """argmax of logits [V], refused (BadLogits) where it is no token's logit: NaN, or -inf everywhere."""
    best = int(np.argmax(logits))
    check_best(logits[best])
    return best


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from p [V]: what rng.choice(V, p=p) draws (the same numbers from the same generator),
    without its checks of p, which took half its 1.3 ms over 262,144 probabilities. Logits that overflowed
    (NaN) still fail, as they did in rng.choice, rather than draw token 0.

    Only the nonzero probabilities are summed where they are few (top-p, top-k, a clustered drafter's q): the
    running sum is the same at each of them (adding 0 changes no sum), and the token drawn is always one of
    them, so the draw is the same, for ~0.1 ms instead of the full cumsum's 0.9 (262,144 float64)."""
    nonzero = p != 0  # NaN too
    if 2 * np.count_nonzero(nonzero) < len(p):
        ids = np.flatnonzero(nonzero)
        cdf = np.cumsum(p[ids], dtype=np.float64)
    else:
        ids, cdf = None, np.cumsum(p, dtype=np.float64)
    if not (len(cdf) and np.isfinite(cdf[-1]) and cdf[-1] > 0):
        raise ValueError(f"probabilities sum to {cdf[-1] if len(cdf) else 0.0} (NaN or infinite logits?)")
    cdf /= cdf[-1]
    i = int(cdf.searchsorted(rng.random(), side="right"))
    if ids is None:
        return min(i, len(p) - 1)
    return int(ids[i]) if i < len(ids) else len(p) - 1
