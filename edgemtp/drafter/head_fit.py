"""Clustered-head tables fitted on a drafter's own draft states.

The two-stage head's centroids rank clusters by how likely they hold the argmax of the state they see.
Fitted on the target's final hidden states (what `edgemtp cluster` does by default), they rank a
drafter's states less well: the shipped Gemma 3 270M drafter's clustered head kept 97.3-99.7% of its
full head's tokens per round with target-fitted tables, 99.3-100% with tables fitted on its own states.

    states = draft_states(drafter_dir, target_dir, drafter_dir / "cache" / "train", positions=73728)
    fit_head(drafter_dir, target_dir)   # writes drafter_dir/head.safetensors

The states come from `train-drafter`'s cache of target passes (the windows it trained on): every draft
step (1..K) from every position whose step label is known, the vectors the head multiplies at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgemtpError

POSITIONS = 73_728  # draft states to fit on (the shipped head's count)


def cache_arrays(cache_dir: Path) -> dict:
    """The train cache `prepare()` wrote (ids, hidden, top_ids, ..., K/V), memory-mapped."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / "done.json").is_file():
        raise EdgemtpError(f"{cache_dir}: no finished train-drafter cache (expected done.json and the target "
                           "pass arrays; run `edgemtp train-drafter` for this drafter first)")
    from .cache import resumable_rows
    from .target_pass import cached
    arrays = cached(cache_dir)
    # a run stopped part-way leaves done.json counting its finished windows (the rest are zeros), or torn: none
    rows = resumable_rows(cache_dir / "done.json", None)
    windows = len(arrays["ids"]) if "ids" in arrays else 0
    if rows != windows or not windows:
        raise EdgemtpError(f"{cache_dir}: the train-drafter cache is unfinished ({rows:,} of {windows:,} windows "
                           "done); run the same `edgemtp train-drafter` again, which finishes it")
    return arrays


def draft_states(drafter_dir: Path, target_dir: Path, cache_dir: Path, positions: int = POSITIONS,
                 seed: int = 0, k: int = 4, progress=None) -> np.ndarray:
    """[n <= positions, Hb] float32: the drafter's states at draft steps 1..k, unrolled (as in training) on
    windows of the cache drawn at random, then subsampled to `positions` rows."""
    import torch

    from . import model as M
    from .loss import unroll
    from .target_pass import to_torch

    cache = cache_arrays(cache_dir)
    model = M.load(Path(drafter_dir)).float().eval()  # the saved fp16 weights: what the bundle will run
    emb = M.target_embedding(Path(target_dir)).float()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cache["ids"]))
    chunks, n = [], 0
    with torch.no_grad():
        # ~3x the positions asked for, so the subsample mixes windows rather than taking whole ones
        for row in order:
            if n >= 3 * positions:
                break
            for _, state, valid, _ in unroll(model, emb, to_torch(cache, slice(row, row + 1)), k):
                chunks.append(state[0][valid[0]].numpy().astype(np.float32))
                n += len(chunks[-1])
            if progress:
                progress(min(n, 3 * positions), 3 * positions, "drafter states on its training windows")
    states = np.concatenate(chunks)
    return states[np.sort(rng.choice(len(states), min(len(states), positions), replace=False))]


def fit_head(drafter_dir: Path, target_dir: Path, out_dir: Path | None = None, clusters: int = 2048,
             top_k: int = 32, positions: int = POSITIONS, seed: int = 0, progress=None,
             cache_dir: Path | None = None, overwrite: bool = True) -> Path:
    """Writes (out_dir or drafter_dir)/head.safetensors: the clustered head of the target's embedding,
    calibrated on the drafter's own states from `cache_dir` (default drafter_dir/cache/train). Returns the file.
    overwrite: False keeps one another run wrote there meanwhile (cluster_model)."""
    from ..calibration.head_report import check_head_dir, cluster_model

    check_head_dir(Path(out_dir or drafter_dir), "out_dir" if out_dir else "drafter_dir")  # before the states' minutes
    cache_dir = Path(drafter_dir) / "cache" / "train" if cache_dir is None else cache_dir
    states = draft_states(drafter_dir, target_dir, cache_dir, positions, seed, progress=progress)
    return cluster_model(target_dir, out_dir or drafter_dir, clusters, top_k, seed, progress, calibration=states,
                         source="drafter states", overwrite=overwrite)
