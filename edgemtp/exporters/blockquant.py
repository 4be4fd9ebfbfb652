"""Block quantization of weight rows in MatMulNBits' layout: round-to-nearest with a grid search, or GPTQ.

    packed, scales, zp = quantize_rows(w, bits=4, block_size=32, symmetric=False)   # w [N, K]

Rows are quantized along K in blocks of `block_size`: packed uint8 [N, kb, block_size*bits/8] (low
nibble first), scales fp32 [N, kb], zero points uint8 [N, ceil(kb*bits/8)] (None when symmetric: the
ops then assume 2^(bits-1)). Rows are independent, so a table of any height is done in row chunks
(`quantize_chunks`) and never needs to be in memory whole.

Grid per block: the plain one first (largest magnitude -> -2^(b-1), as ORT's own quantizer does; or
min/max -> 0/2^b-1), then a few more of which the block keeps the one of least squared error, weighted
per column by `importance` (mean squared activation of that input channel: llama.cpp's "imatrix" idea)
when given. With a `hessian` H = E[x x^T] of the inputs, GPTQ (Frantar et al. 2022) quantizes the
columns in order and spreads each column's rounding error over the columns not yet quantized, in
proportion to H^-1: the error that reaches the layer's output, not the weights', is what it minimises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

CHUNK_ELEMENTS = 1 << 23  # weights quantized at once: bounds the temporaries to a few hundred MB
GPTQ_BATCH = 128  # columns updated lazily together (GPTQ's "lazy batch")
GPTQ_DAMP = 0.01  # of the mean diagonal, added to H: keeps the inverse well conditioned

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def quantize_rows(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True, search: bool = True,
                  importance: np.ndarray | None = None, hessian: np.ndarray | None = None) -> Chunk:
    """w [N, K] -> (packed, scales, zero points or None), see the module docstring."""
    parts = list(quantize_chunks(lambda a, b: w[a:b], len(w), w.shape[1], bits, block_size, symmetric,
                                 search, importance, hessian))
    zp = None if symmetric else np.concatenate([p[2] for p in parts])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), zp


def quantize_chunks(read: Callable[[int, int], np.ndarray], n: int, k: int, bits: int, block_size: int,
                    symmetric: bool, search: bool = True, importance: np.ndarray | None = None,
                    hessian: np.ndarray | None = None) -> Iterator[Chunk]:
    """quantize_rows over rows read(start, stop) of an [n, k] matrix, one chunk of rows at a time."""
    kb = -(-k // block_size)
    imp = None if importance is None else _pad(np.asarray(importance, np.float32)[None], kb * block_size)[0]
    inv = None if hessian is None else _inverse_factor(hessian, kb * block_size)
    step = max(1, CHUNK_ELEMENTS // (kb * block_size))
    for start in range(0, n, step):
        w = _pad(np.asarray(read(start, min(start + step, n)), np.float32), kb * block_size)
        if inv is None:
            q, scale, zp = _round_blocks(w.reshape(len(w), kb, block_size), bits, symmetric, search, imp)
        else:
            q, scale, zp = _gptq(w, inv, bits, block_size, symmetric, search, imp)
        zp = None if symmetric else pack_zero_points(zp.astype(np.uint8), bits)
        yield _pack(q.astype(np.uint8), bits), scale.astype(np.float32), zp


def _pad(w: np.ndarray, width: int) -> np.ndarray:
    """Zero columns up to `width`: MatMulNBits reads whole blocks."""
    if w.shape[1] == width:
        return np.array(w, np.float32)
    out = np.zeros((len(w), width), np.float32)
    out[:, :w.shape[1]] = w
    return out


def _round_blocks(blocks: np.ndarray, bits: int, symmetric: bool, search: bool, imp: np.ndarray | None):
    """blocks [n, kb, bs] -> (levels [n, kb, bs], scales [n, kb], zero points [n, kb])."""
    scale, zp = _grid(blocks, bits, symmetric, search, None if imp is None else imp.reshape(blocks.shape[1:]))
    return _levels(blocks, scale, zp, bits), scale, zp


def _levels(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)[..., None]
    return np.clip(np.rint(blocks * inv) + zp[..., None], 0, (1 << bits) - 1)


def _grid(blocks: np.ndarray, bits: int, symmetric: bool, search: bool, imp: np.ndarray | None):
    """The (scale, zero point) [n, kb] of least (importance-weighted) squared error per block.

    A tie keeps the earlier candidate: the plain grid first (max magnitude -> -2^(b-1), or min/max ->
    0/2^b-1), then for 8 bits the +-(2^(b-1)-1) grid (llama.cpp's Q8_0 exactly), and for 4 bits
    narrower grids that clip the block's extremes to round its bulk more finely."""
    best = None
    for scale, zp in _candidates(blocks, bits, symmetric, search):
        err = np.square((_levels(blocks, scale, zp, bits) - zp[..., None]) * scale[..., None] - blocks)
        err = (err if imp is None else err * imp).sum(axis=-1)
        if best is None:
            best = [err, scale, zp]
            continue
        better = err < best[0]
        for slot, new in enumerate((err, scale, zp)):
            best[slot] = np.where(better, new, best[slot])
    return best[1], best[2]


def _candidates(blocks: np.ndarray, bits: int, symmetric: bool, search: bool = True):
    half, top = 1 << (bits - 1), (1 << bits) - 1
    shrink = (1.0, 1.0625, 1.125, 1.1875, 1.25, 1.375) if search and bits <= 4 else (1.0,)
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        m = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        zp = np.full(m.shape, half, np.float32)
        for f in shrink:
            yield m / (-half * f), zp
            if search:
                yield m / ((half - 1) * f), zp
        return
    lo, hi = np.minimum(blocks.min(axis=-1), 0), np.maximum(blocks.max(axis=-1), 0)
    for f in shrink:
        scale = (hi - lo) / (top * f)
        safe = np.where(scale == 0, 1, scale)
        for zp in (-lo / safe, top - hi / safe, (top - (hi + lo) / safe) / 2):
            yield scale, np.clip(np.rint(zp), 0, top)
            if f == 1.0:
                break  # unshrunk: the three anchors coincide


# ------------------------------------------------------------------------------------------- GPTQ

def _inverse_factor(hessian: np.ndarray, width: int) -> np.ndarray:
    """Upper Cholesky factor U of (H + damping)^-1 (H^-1 = U^T U), padded to `width` with identity."""
    k = len(hessian)
    h = np.eye(width, dtype=np.float64)
    h[:k, :k] = hessian
    diag = np.diag(h)[:k]
    dead = np.flatnonzero(diag <= 0)
    h[dead, dead] = 1.0  # an input channel that is always 0: its weights do not matter
    live = diag[diag > 0]
    h[np.diag_indices(width)] += GPTQ_DAMP * (float(live.mean()) if live.size else 1.0)
    return np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)


def _gptq(w: np.ndarray, u: np.ndarray, bits: int, bs: int, symmetric: bool, search: bool,
          imp: np.ndarray | None):
    """w [n, K] (K a multiple of bs; updated in place) -> (levels [n, kb, bs], scales, zero points [n, kb]).

    Each block's grid is chosen when GPTQ reaches it, from the weights as the earlier columns' errors
    left them. Columns go in lazy batches (_batches): every block starts one, where every earlier batch's
    errors have reached the whole matrix."""
    n, k = w.shape
    kb = k // bs
    q = np.empty((n, k), np.float32)
    scales, zps = np.empty((n, kb), np.float32), np.empty((n, kb), np.float32)
    for i1, i2 in _batches(k, bs):
        w1, err = w[:, i1:i2], np.empty((n, i2 - i1), np.float32)
        for j in range(i2 - i1):
            col = i1 + j
            if col % bs == 0:
                block = w[:, col:col + bs][:, None, :]
                s, z = _grid(block, bits, symmetric, search, None if imp is None else imp[None, col:col + bs])
                scale, zp = s[:, 0], z[:, 0]
                scales[:, col // bs], zps[:, col // bs] = scale, zp
                inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
            level = np.clip(np.rint(w1[:, j] * inv) + zp, 0, (1 << bits) - 1)
            q[:, col] = level
            e = (w1[:, j] - (level - zp) * scale) / u[col, col]
            w1[:, j:] -= np.outer(e, u[col, col:i2])
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q.reshape(n, kb, bs), scales, zps


# ---------------------------------------------------------------------------------- (un)packing

def _batches(k: int, bs: int) -> list[tuple[int, int]]:
    """GPTQ's lazy batches over k columns with blocks of bs: whole blocks up to GPTQ_BATCH columns, or, for
    blocks wider than that (one block per row: --layer-op integer), GPTQ_BATCH columns at a time, cut at
    each block's end (one batch of the whole row took 3x as long: 5:48 against 1:59 for an int4 export)."""
    if bs <= GPTQ_BATCH:
        step = GPTQ_BATCH // bs * bs
        return [(i, min(i + step, k)) for i in range(0, k, step)]
    return [(i, min(i + GPTQ_BATCH, b + bs)) for b in range(0, k, bs) for i in range(b, b + bs, GPTQ_BATCH)]


def _pack(q: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """uint8 values < 2^bits packed along the last axis, low-order bits first."""
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.full(q.shape[:-1] + (1,), pad, np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [N, kb] in MatMulNBits' layout [N, ceil(kb * bits / 8)]."""
    return _pack(zp, bits, pad=1 << (bits - 1))  # an odd count padded as ORT does


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[N, bytes] -> [N, count] values (count -1: all), inverse of _pack."""
    q = packed if bits == 8 else np.stack([packed & 15, packed >> 4], axis=-1).reshape(len(packed), -1)
    return q if count < 0 else q[:, :count]


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, k: int
                    ) -> np.ndarray:
    """Inverse of quantize_rows (for tests and error measurement): -> [N, K] fp32."""
    n, kb = scales.shape
    q = unpack(packed.reshape(n, -1), bits, -1).reshape(n, kb, -1)
    z = np.full((n, kb), 1 << (bits - 1)) if zp is None else unpack(zp, bits, kb)
    return ((q.astype(np.float32) - z[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]
