"""Token choice from logits: greedy, or temperature / top-k / top-p sampling with a seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        if not (is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ArgumentError("temperature", self.temperature, "must be a finite number >= 0")
        for name, value in (("top_k", self.top_k), ("seed", self.seed)):
            if value is not None and not is_whole(value):
                raise ArgumentError(name, value, "must be a whole number")
            if value is not None and value < 0:
                raise ArgumentError(name, value, "must be >= 0")
        if not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ArgumentError("top_p", self.top_p, "must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def distribution(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """Probabilities [..., V] after temperature, top-k and top-p (float64, rows sum to 1)."""
    x = np.asarray(logits, np.float64)
    # the best logit subtracted before dividing: at a tiny temperature (5e-324) x / T overflows to inf, and
    # inf - inf would be NaN; (x - max) / T is 0 for the best and -inf or finite below it
    with np.errstate(over="ignore"):  # -inf below the best token is what such a temperature means
        x = (x - x.max(axis=-1, keepdims=True)) / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = np.partition(x, -s.top_k, axis=-1)[..., -s.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if s.top_p < 1.0:
        p = _top_p(p, s.top_p)
    return p


def _top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always >= 1 token)."""
    order = np.argsort(-p, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=-1)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each token
    keep_sorted = before < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    p = np.where(keep, p, 0.0)
    return p / p.sum(axis=-1, keepdims=True)


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """One token from logits [V]."""
    if s.greedy:
        return int(np.argmax(logits))
    p = distribution(logits, s)
    return int(rng.choice(p.shape[-1], p=p))
