"""Token choice from logits: greedy, or temperature / top-k / top-p sampling with a seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import EdgemtpError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EdgemtpError(f"--temperature {self.temperature} must be a finite number >= 0")
        if self.top_k < 0:
            raise EdgemtpError(f"--top-k {self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise EdgemtpError(f"--top-p {self.top_p} must be in (0, 1]")
        if self.seed is not None and self.seed < 0:
            raise EdgemtpError(f"--seed {self.seed} must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def distribution(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """Probabilities [..., V] after temperature, top-k and top-p (float64, rows sum to 1)."""
    x = np.asarray(logits, np.float64) / s.temperature
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
