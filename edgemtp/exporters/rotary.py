"""Rotary position embedding: the inverse frequencies of every RoPE kind a checkpoint names (default,
linear, llama3, YaRN, LongRoPE's short factors, Gemma 4's proportional), the cos/sin tables the graphs
rotate with, and the rotation itself.

Shapes in docstrings: B batch, S new positions, N heads, D head dim, R rotated dims of a head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import Rope
from .builder import FLOAT, GraphBuilder


def inv_freq(rope: Rope, head_dim: int) -> np.ndarray:
    """Inverse frequencies of the rotated half-dims, after the checkpoint's RoPE scaling."""
    if rope.kind == "proportional":
        return _proportional_inv_freq(rope, head_dim)
    rot = int(head_dim * rope.fraction)
    inv = 1.0 / (rope.theta ** (np.arange(0, rot, 2, dtype=np.int64).astype(np.float32) / rot))
    if rope.kind == "longrope":  # within the original length: the short factors (phi3.py)
        inv = 1.0 / (np.asarray(rope.ext_factors, np.float32) * (1.0 / inv))
    elif rope.kind == "yarn":
        inv = _yarn_blend(inv, rope, rot)
    elif rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        inv = _llama3_scale(inv, rope)
    elif rope.kind != "default":
        raise ValueError(f"rope_type {rope.kind!r} is not supported")
    return inv.astype(np.float32)


def _proportional_inv_freq(rope: Rope, head_dim: int) -> np.ndarray:
    """Gemma 4's partial RoPE: D/2 frequencies, the first `fraction * D/2` of them base^(-2j/D) (the
    exponent's denominator is the whole head dim), the rest 0 (cos 1, sin 0: those pairs pass through).

    Rotating the whole head with these tables pairs dims (i, i + D/2), as transformers does; rotating only
    the first R dims would pair (i, i + R/2) instead."""
    angles = int(rope.fraction * head_dim // 2)
    rotated = 1.0 / (rope.theta ** (np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = np.concatenate([rotated, np.zeros(head_dim // 2 - angles, np.float32)])
    return (inv / np.float32(rope.factor)).astype(np.float32)


def _yarn_blend(inv: np.ndarray, r: Rope, dim: int) -> np.ndarray:
    """YaRN's frequencies: the fast-turning pairs kept, the slow ones divided by the factor, a linear ramp
    between, whose ends are the pairs turning beta_fast and beta_slow times over the original length."""
    def pair(rotations: float) -> float:  # the pair index that turns `rotations` times
        return dim * math.log(r.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = pair(r.beta_fast), pair(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = 1 - ramp  # 1: the pair keeps its frequency (extrapolation)
    return (inv / np.float32(r.factor)) * (1 - keep) + inv * keep


def _llama3_scale(inv: np.ndarray, r: Rope) -> np.ndarray:
    low_wavelen = r.original_max_positions / r.low_freq_factor
    high_wavelen = r.original_max_positions / r.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / r.factor, inv)
    smooth = (r.original_max_positions / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    mid = (1 - smooth) * scaled / r.factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_mid, mid, scaled)


@dataclass(frozen=True)
class RopeTables:
    cos: str  # [B, S, 1, R/2]
    sin: str
    rotated: int  # R: how many leading dims of each head rotate


def rope_tables(b: GraphBuilder, rope: Rope, head_dim: int, position_ids: str) -> RopeTables:
    """cos/sin of positions x inverse frequencies, computed once and shared by the layers of a type."""
    inv = inv_freq(rope, head_dim)
    pos = b.op("Unsqueeze", b.op("Cast", position_ids, to=FLOAT), b.const([-1], np.int64))
    freqs = b.op("Unsqueeze", b.op("Mul", pos, b.const(inv)), b.const([2], np.int64))
    cos, sin = b.op("Cos", freqs), b.op("Sin", freqs)
    if rope.scale != 1.0:  # longrope's attention factor
        cos, sin = (b.op("Mul", t, b.const(np.float32(rope.scale))) for t in (cos, sin))
    return RopeTables(cos, sin, 2 * len(inv))


@dataclass(frozen=True)
class RopeCache:
    """cos/sin of every position the KV cache can hold, [capacity, R/2], for GroupQueryAttention to rotate
    q and k itself (do_rotary) instead of apply_rope's 8 small ops per tensor and layer. With add_norm this
    halved the ops of a Gemma 3 270M decode step (706 -> 372) and made it 3-6% faster."""

    cos: str
    sin: str


def rope_cache(b: GraphBuilder, rope: Rope, head_dim: int, capacity: int) -> RopeCache:
    """The tables rope_tables computes per run, for all positions at once (the same float32 maths), in the
    external data file (GraphBuilder.table): a step reads a row of each."""
    cos, sin = cos_sin(rope, head_dim, capacity)
    return RopeCache(b.table(cos, hint="rope_cos"), b.table(sin, hint="rope_sin"))


def cos_sin(rope: Rope, head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [positions, R/2] in float32, as rope_tables computes them (times longrope's attention factor)."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq(rope, head_dim)[None, :]
    scale = np.float32(rope.scale)
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)


def gqa_rotates(rope: Rope, head_dim: int) -> bool:
    """Whether GroupQueryAttention can rotate q and k itself: ONNX Runtime 1.32 refuses do_rotary unless
    the head size is a multiple of 16 and the cos/sin width (R/2) a multiple of 8."""
    half = len(inv_freq(rope, head_dim))
    return head_dim % 16 == 0 and half % 8 == 0 and half <= head_dim // 2


def apply_rope(b: GraphBuilder, x: str, t: RopeTables, head_dim: int) -> str:
    """x [B, S, N, D]: rotate-half RoPE on the first R dims; the remaining D - R dims pass through."""
    half = t.rotated // 2
    parts = [half, half] + ([head_dim - t.rotated] if t.rotated < head_dim else [])
    pieces = b.op("Split", x, b.const(parts, np.int64), axis=-1, n_out=len(parts))
    x1, x2 = pieces[0], pieces[1]
    out1 = b.op("Sub", b.op("Mul", x1, t.cos), b.op("Mul", x2, t.sin))
    out2 = b.op("Add", b.op("Mul", x2, t.cos), b.op("Mul", x1, t.sin))
    return b.op("Concat", out1, out2, *pieces[2:], axis=-1)
