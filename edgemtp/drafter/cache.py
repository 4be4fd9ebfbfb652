"""Resumable per-window caches (greedy continuations, the target pass): which input a cache was written
for, and how many of its rows are finished. A cache written for other input starts afresh, so a rerun
with other data in the same directory never trains on stale rows."""

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


def resumable_rows(done_path: Path, key: str) -> int:
    """Rows already finished in a cache written for the input `key` (0 when absent or for other input)."""
    if not done_path.is_file():
        return 0
    done = json.loads(done_path.read_text())
    return int(done["rows"]) if done.get("input") == key else 0
