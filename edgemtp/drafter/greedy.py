"""Training windows on the target's own greedy path: a corpus prompt, then the target's greedy continuation.

A drafter is judged on the text the target itself generates. On corpus text, draft step k's label is known
only where the text happened to follow the target's greedy path for the k-1 tokens before it (about
half the positions for k = 2, far fewer for k = 4), and the text is human, not the target's (a small
base model's greedy text repeats itself much more). On a greedy continuation every step's label is known
and the text is the kind that gets drafted.

The target runs as an fp32 ONNX bundle exported into the work directory: the edgemtp runtime decodes a
batch several times faster than transformers does on a CPU, and its greedy tokens equal transformers'
(tests/test_golden.py, tests/test_drafter.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgemtpError
from .cache import fingerprint, resumable_rows, target_identity

Progress = Callable[[int, int, dict], None]


def continue_greedily(target_dir: Path, windows: np.ndarray, prompt_len: int, work: Path, batch: int = 32,
                      threads: int = 2, progress: Progress | None = None) -> np.ndarray:
    """windows [N, T] -> [N, T]: each row's first `prompt_len` tokens kept, the rest replaced by the
    target's greedy continuation of them. Resumable: finished rows are kept in `work` (for these windows
    and this prompt length only; other input starts afresh)."""
    n, T = windows.shape
    if not 1 <= prompt_len < T:
        raise EdgemtpError(f"--greedy-from {prompt_len}: must be between 1 and the window length - 1 ({T - 1})")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out_path, done_path = work / "windows.npy", work / "done.json"
    key = fingerprint(windows, prompt_len, target_identity(target_dir))
    done = resumable_rows(done_path, key)
    out = np.lib.format.open_memmap(out_path, mode="r+" if done else "w+", dtype=np.int64, shape=(n, T))
    if done < n:
        engine = _engine(Path(target_dir), work / "target-bundle", T, threads)
        for start in range(done, n, batch):
            out[start:start + batch] = continue_rows(engine, windows[start:start + batch], prompt_len)
            out.flush()
            done = min(n, start + batch)
            done_path.write_text(json.dumps({"rows": done, "input": key}))
            if progress:
                progress(done, n, {"phase": "greedy continuation"})
    return np.array(out)


def continue_rows(engine, rows: np.ndarray, prompt_len: int) -> np.ndarray:
    """One batch: prefill each row's prompt, then decode all rows together, argmax at every step."""
    seqs = np.array(rows, dtype=np.int64)
    n, T = seqs.shape
    cache = engine.target.new_cache(n)
    for b in range(n):  # the CPU attention kernel prefills one row at a time
        logits, _ = engine.target.forward(seqs[b:b + 1, :prompt_len], cache, rows=slice(b, b + 1))
        seqs[b, prompt_len] = int(logits[0, -1].argmax())
    for t in range(prompt_len + 1, T):
        logits, _ = engine.target.forward(seqs[:, t - 1:t], cache)
        seqs[:, t] = logits[:, -1].argmax(-1)
    return seqs


def _engine(target_dir: Path, bundle: Path, capacity: int, threads: int):
    from ..exporters import export
    from ..runtime.engine import Engine

    # exported afresh each time (seconds at 270M): an earlier run's may be for another window length
    export(target_dir, bundle, quant="fp32", capacity=capacity, overwrite=True, drafter=None)
    return Engine.load(bundle, threads=threads)
