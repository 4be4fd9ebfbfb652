"""Resumable per-window caches (greedy continuations, the target pass): which input a cache was written
for, and how many of its rows are finished. A cache written for other input (other windows, settings or
target model) starts afresh, so a rerun with other data in the same directory never trains on stale rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def fingerprint(windows: np.ndarray, *extra) -> str:
    """What a cache of per-window results was computed from (the ids and any settings)."""
    h = hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes())
    h.update(json.dumps([list(windows.shape), *extra]).encode())
    return h.hexdigest()[:16]


SAMPLE = 4096  # bytes read at each tensor's start, middle and end in target_identity


def target_identity(target_dir: Path) -> str:
    """Which target a cache of its outputs was computed with, by content: config.json, tokenizer.json, and
    each weight file's size, header (names, dtypes, shapes) and every tensor's first, middle and last 4 KB
    (a small tensor, such as a norm's weights, whole). Re-importing the same model (new files, same bytes)
    keeps the caches; another model, the same one fine-tuned (even only its norms, or a merged LoRA on two
    projections), or another tokenizer starts them afresh. The 64 samples spread over each file used before
    would miss a LoRA merged into Gemma 3 270M's q/v projections ~1 time in 40 (5.5% of its bytes); hashing
    every byte on each run would cost more than the caches save (a few GB for E2B). An edit inside one
    large tensor that misses its three samples is still not seen."""
    from ..checkpoint import INDEX, read_header, weight_files

    h, d = hashlib.sha256(), Path(target_dir)
    for name in ("config.json", "tokenizer.json", INDEX):
        if (d / name).is_file():
            h.update(name.encode() + (d / name).read_bytes())
    for f in weight_files(d)[0]:  # the files the target is read from: not an earlier download's stale shards
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as stream:
            h.update(stream.read(int.from_bytes(stream.read(8), "little")))  # the header, as stored
            for e in sorted(read_header(f).values(), key=lambda e: e.start):
                for at in dict.fromkeys((e.start, (e.start + e.end) // 2, max(e.start, e.end - SAMPLE))):
                    stream.seek(at)
                    h.update(stream.read(min(SAMPLE, e.end - at)))
    return h.hexdigest()[:16]


def resumable_rows(done_path: Path, key: str | None) -> int:
    """Rows already finished in a cache written for the input `key` (None: for any input); 0 when done.json is
    absent, torn or for other input."""
    if not done_path.is_file():
        return 0
    try:
        done = json.loads(done_path.read_text(encoding="utf-8"))
        return int(done["rows"]) if key is None or done.get("input") == key else 0
    except (ValueError, TypeError, KeyError, AttributeError):  # torn: Ctrl-C or a crash between the file's
        return 0  # truncation and its write (empty, or half of it); the rows are computed afresh
