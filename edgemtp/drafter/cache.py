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


def target_identity(target_dir: Path) -> str:
    """Which target a cache of its outputs was computed with: its config.json's and weight files' names,
    sizes and modification times. Another model in the same place (or the same one edited or copied)
    starts the caches afresh; hashing gigabytes of weights on every run would cost more than it saves."""
    files = [Path(target_dir) / "config.json", *sorted(Path(target_dir).glob("*.safetensors"))]
    stats = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def resumable_rows(done_path: Path, key: str) -> int:
    """Rows already finished in a cache written for the input `key` (0 when absent or for other input)."""
    if not done_path.is_file():
        return 0
    done = json.loads(done_path.read_text(encoding="utf-8"))
    return int(done["rows"]) if done.get("input") == key else 0
