"""The target's pass over the training windows (transformers), cached on disk: what the drafter learns from.

Per position: the post-final-norm hidden, the K/V of the drafter's target layers, and the target's top-k
next-token ids and logits (optionally over a shortlist of the vocabulary: the 262k-row head is the
costliest part of the pass). The cache is resumable and keyed on the windows, settings and target files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import holds, non_finite
from . import model as M
from .cache import fingerprint, resumable_rows, target_identity

Progress = Callable[[int, int, dict], None]


class TargetPass:
    """The target in transformers: ids [B, T] -> per-position hidden, drafter-layer K/V and top-k."""

    def __init__(self, target_dir: Path, cfg: M.DrafterConfig, shortlist: np.ndarray | None, topk: int = 32):
        import transformers
        from transformers.utils import logging as hf_logging

        # its "Loading weights" bar came before train-drafter's own; the switch is process-wide: put back after
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        self.model.eval()
        check_finite(self.model, Path(target_dir))
        self.cfg, self.topk, self.identity = cfg, topk, target_identity(target_dir)
        head = self.model.get_output_embeddings().weight.detach()
        self.rows = torch.from_numpy(shortlist) if shortlist is not None else None
        self.head = head[self.rows].contiguous() if self.rows is not None else head

    @torch.no_grad()
    def run(self, ids: np.ndarray) -> dict:
        from transformers import DynamicCache

        cache = DynamicCache()  # plain layers keep every position, sliding ones included
        out = self.model.model(input_ids=torch.from_numpy(ids), cache=cache, use_cache=True)
        h = out.last_hidden_state  # post-final-norm == hidden_states[-1] (checked in tests)
        logits = M.softcap(h @ self.head.T, self.cfg.final_logit_softcapping)
        top_logits, top = logits.topk(min(self.topk, logits.shape[-1]), dim=-1)
        if self.rows is not None:
            top = self.rows[top]
        res = {"ids": ids, "hidden": h.numpy(), "top_ids": top.numpy().astype(np.int32),
               "top_logits": top_logits.numpy()}
        for t, layer in self.cfg.target_kv.items():
            res[f"k.{t}"] = cache.layers[layer].keys.numpy()
            res[f"v.{t}"] = cache.layers[layer].values.numpy()
        return res


def check_finite(model, target_dir: Path) -> None:
    """Refuses a target whose weights hold NaN or inf, naming the tensor and its file: transformers loads them as
    they are, and the pass's NaN labels trained a drafter that never drafts. Checked in memory, as loaded."""
    from ..checkpoint import Checkpoint
    from ..errors import EdgemtpError

    for name, p in model.named_parameters():
        bad = non_finite(p.detach().numpy())
        if bad is not None:
            entry = Checkpoint(target_dir).entries.get(name)  # transformers' names are the checkpoint's
            where = f"{entry.file}: tensor '{entry.key}'" if entry is not None else f"{target_dir}: tensor '{name}'"
            raise EdgemtpError(f"{where} {holds(bad)}: a damaged or badly converted checkpoint (weights must be "
                               "finite numbers)")


_STORE = {"hidden": np.float16, "top_ids": np.int32, "top_logits": np.float16, "ids": np.int64}


def prepare(target: TargetPass, windows: np.ndarray, path: Path, batch: int = 4,
            progress: Progress | None = None) -> dict:
    """Cache `target.run` over windows [N, T] into `path`/*.npy (fp16); resumable (for the same windows;
    others start afresh), returns memmaps."""
    path.mkdir(parents=True, exist_ok=True)
    rows = None if target.rows is None else fingerprint(target.rows.numpy())
    done_file, key = path / "done.json", fingerprint(windows, target.topk, rows, target.identity)
    done = resumable_rows(done_file, key)
    arrays = None
    for start in range(0, len(windows), batch):
        if start + batch <= done:
            continue
        res = target.run(windows[start:start + batch])
        if arrays is None:
            arrays = _open(path, res, len(windows), "r+" if done else "w+")
        for name, a in res.items():
            arrays[name][start:start + len(a)] = a
        _flush(arrays)
        done_file.write_text(json.dumps({"rows": start + len(res["ids"]), "input": key}))
        if progress:
            progress(start + len(res["ids"]), len(windows), {"phase": "target pass"})
    return cached(path)


def cached(path: Path) -> dict:
    """A target-pass cache written by `prepare()`, memory-mapped: name -> array [N, ...]."""
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(Path(path).glob("*.npy"))}


def _open(path: Path, res: dict, n: int, mode: str) -> dict:
    return {name: np.lib.format.open_memmap(path / f"{name}.npy", mode=mode,
                                            dtype=_STORE.get(name, np.float16), shape=(n,) + a.shape[1:])
            for name, a in res.items()}


def _flush(arrays: dict) -> None:
    for a in arrays.values():
        a.flush()


def to_torch(cache: dict, rows) -> dict:
    return {k: torch.from_numpy(np.array(v[rows])).to(torch.int64 if k.endswith("ids") else torch.float32)
            for k, v in cache.items()}


def target_caches(target, train_ids, heldout_ids, cache_dir: Path, progress) -> dict:
    caches = {"train": prepare(target, train_ids, cache_dir / "train", progress=progress)}
    for name, ids in heldout_ids.items():
        caches[f"heldout.{name}"] = prepare(target, ids, cache_dir / f"heldout.{name}")
    return caches
