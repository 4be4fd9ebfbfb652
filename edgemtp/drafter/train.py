"""Distillation of an MTP drafter from its target: labels are the target's own greedy predictions.

    train_drafter("models/gemma3-270m", "runs/g3-drafter", steps=400)

1. `target_pass.prepare()` runs the target (transformers, teacher-forced on corpus windows) once and caches, per
   position t: the post-final-norm hidden h_t, the K/V of the drafter's target layers, and the target's
   top-k next-token ids + logits (argmax g_t = top-1). Optionally over a shortlist of the vocabulary (the
   tokens occurring in the corpora): the 262k-row head is the costliest part of the target pass.
2. `loss.unroll()` drafts from every position p of a window at once: step 1 reads (x_p, h_{p-1}, cache < p),
   step k feeds the drafter its own state from step k-1 with token x_{p+k-1}, all at query position p.
   Step k's label is g_{p+k-1}, valid only where the text followed the target's greedy path
   (x_{p+j} == g_{p+j-1} for j < k): exactly the cases where step k's draft can be accepted.
   The loss is a cross-entropy against the target's top-k distribution, restricted to those k tokens
   plus shared negatives (no 262k softmax per position), plus a small regression of the state onto h.
3. Checkpoints (model + optimizer + step) every `ckpt_every` steps; `resume=True` continues one
   (run_files.py: the checks that it is this run's, train.log, the finished drafter moved in whole).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import TextConfig
from ..errors import ArgumentError, EdgemtpError
from ..runtime.sampling import is_finite, is_number, is_whole
from ..scratch import parents_made
from . import EMBEDDING
from . import model as M
from . import run_files as R
from .cache import target_identity
from .loss import acceptance, loss_fn, sample_negatives
from .target_pass import TargetPass, target_caches, to_torch

Progress = Callable[[int, int, dict], None]
# what a drafter for the same target shares with it: --init checks these
TARGET_FIELDS = ("vocab_size", "backbone_hidden", "num_kv_heads", "head_dim", "target_kv")
# how the target's tensors the drafter reads are to be read (its KV's RoPE and window, its embedding's scale, its
# head's softcap): after --init, this target's, whichever target the --init drafter was trained for
TARGET_CONVENTIONS = ("rope", "sliding_window", "attention_scale", "embed_scale", "final_logit_softcapping",
                      "target_model_type")


@dataclass(frozen=True)
class DataSpec:
    """Corpus windows (see data.py): counts per domain, each window [BOS] + seq_len-1 tokens. A train count
    may be a range [start, stop]: the windows a count of `stop` draws less those a count of `start` draws."""

    seq_len: int = 256
    train: dict = field(default_factory=lambda: {"code": 256, "docs": 160, "shakespeare": 96})
    heldout: dict = field(default_factory=lambda: {"code": 3, "docs": 2, "shakespeare": 1})
    shortlist: bool = True  # target head over the corpus vocabulary only
    seed: int = 0
    greedy_from: int = 0  # P > 0: tokens P.. of every window are the target's greedy continuation (greedy.py)


@dataclass(frozen=True)
class TrainSpec:
    k: int = 4  # draft steps unrolled
    batch: int = 8  # windows per step
    lr: float = 1.5e-3
    warmup: int = 30
    weight_decay: float = 0.01
    loss_topk: int = 16  # target tokens per position in the restricted softmax
    negatives: int = 2048  # shared per batch: half from the batch's top-k tokens, half uniform
    hidden_weight: float = 0.1  # state regression onto the target's hidden
    # 0..1: share of each draft step's loss weighted by what it is worth to tokens per round (see
    # `round_weights`) instead of uniformly over positions
    accept_weight: float = 0.0
    ckpt_every: int = 20
    eval_every: int = 60


def _schedule(step: int, steps: int, spec: TrainSpec) -> float:
    """The learning rate's factor: a linear warm-up, then a cosine down to 10%. A run shorter than two warm-ups
    warms up over its first half: one of 20 steps stayed below --lr all through the 30-step warm-up. (Runs of 60
    steps or more, every recipe in drafters/README.md, keep the 30.)"""
    warmup = min(spec.warmup, max(1, steps // 2))
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return float(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))


def batch_rows(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Rows of step `step`: epoch e is a fixed permutation seeded by (seed, e), so resume is exact."""
    per_epoch = max(1, n // batch)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return np.sort(perm[i * batch:(i + 1) * batch])


def build_windows(target_dir: Path, cfg: TextConfig, spec: DataSpec) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """(train windows [N, T], {domain: held-out windows}, head shortlist or None) from the corpora."""
    from ..checkpoint import open_tokenizer
    from . import data as D

    tok = open_tokenizer(Path(target_dir) / "tokenizer.json")

    def take(split: str, counts: dict, seed: int) -> dict:
        out = {}
        for d, (start, stop) in sorted((d, window_range(n)) for d, n in counts.items()):
            if stop <= start:
                continue
            try:  # each domain's seed is its own (its place in DOMAINS), not its place in this --data:
                # `code=...,shakespeare=5000` and a later `shakespeare=5000:10000` draw from one order
                out[d] = D.windows(tok, D.documents(d, split), spec.seq_len, stop, seed + D.DOMAINS.index(d),
                                   cfg.bos_token_id, start)
            except EdgemtpError as e:  # in words right from Python (data=DataSpec(...)) and the CLI (--data) alike
                kind = "training" if split == "train" else "held-out"
                raise EdgemtpError(f"the {kind} windows of {d} ({spec.seq_len} tokens each): {e}") from None
        return out

    train = np.concatenate(list(take("train", spec.train, spec.seed).values()))
    heldout = take("heldout", spec.heldout, spec.seed + 100)
    used = sorted(d for counts in (spec.train, spec.heldout) for d, n in counts.items() if n != 0)
    return train, heldout, D.vocabulary(tok, tuple(dict.fromkeys(used))) if spec.shortlist else None


def window_range(n) -> tuple[int, int]:
    """A DataSpec count: N (the first N windows) or [start, stop]."""
    return (0, int(n)) if isinstance(n, int) else (int(n[0]), int(n[1]))


def _keeps_torch_state(fn):
    """Runs `fn` on torch's global settings as it sets them (its threads, its seed) and gives them back as they
    were when it returns: an app or notebook that trains a drafter keeps its own thread count (not the training's
    1) and its generator's sequence (not one reseeded with the training's seed)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            with torch.random.fork_rng(devices=[]):  # the CPU generator; the drafter trains on the CPU
                return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return run


@_keeps_torch_state
def train_drafter(target_dir: Path, out_dir: Path, data: DataSpec | dict = DataSpec(), steps: int = 360,
                  seed: int = 0, resume: bool = False, progress: Progress | None = None,
                  shape: dict | None = None, spec: TrainSpec = TrainSpec(), threads: int = 1,
                  stop_at: int | None = None, init: Path | None = None, label_threads: int = 2,
                  head_clusters: int | None = None, head_top_k: int | None = None) -> dict | None:
    """Trains a drafter for the target in `target_dir` (an HF model directory); writes `out_dir`/config.json
    + model.safetensors (fp16), checkpoint.pt, train.log (JSON lines). Returns the final report.

    data: a DataSpec (corpus windows) or {"train": ids [N, T], "heldout": {name: ids [n, T]}, "vocab": ids|None}.
    shape: DrafterConfig.for_target keywords (hidden, intermediate, num_layers, num_heads).
    stop_at: checkpoint and return None after this step (as an interruption would; resume=True continues).
    init: a drafter directory whose weights start the training (a fresh optimizer and
    schedule: fine-tuning a drafter on more data); its shape wins over `shape`, except that a larger
    `shape["intermediate"]` widens its MLPs first (model.widen_mlp: same function, new units to train); the
    target's conventions (TARGET_CONVENTIONS: RoPE, window, scales) are this target's.
    head_clusters: after training, fit clustered-head tables (C clusters, `head_top_k` scored) on the
    drafter's own states (head_fit.py) into out_dir/head.safetensors (head_top_k: default 32, refused when none is
    fitted); 0: none (after --init, that drafter's tables are carried over); None: 2048 for vocabularies of 65,536
    tokens or more, else 0.
    label_threads: torch threads for the target pass (one window batch is a few large matmuls: 2 threads
    labelled 370 tokens/s on an idle 2-core machine).
    threads: torch intra-op threads for training. 1 by default: on a shared 2-core machine two OpenMP threads made a
    training step 4-9x slower (each small op waits for the second thread to be scheduled); on an idle machine
    2 threads were 1.85x faster (2.2 vs 4.0 s a step for the Gemma 3 270M drafter)."""
    from ..checkpoint import Checkpoint
    from ..exporters import load_config
    from ..exporters.gemma3 import drafter_kv

    data, spec, steps, seed = check_values(data, steps, seed, shape, spec, threads, label_threads, stop_at)
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    R.check_output(out_dir)  # before any work: it would replace a model's weights
    window = data.seq_len if isinstance(data, DataSpec) else np.shape(data["train"])[1]
    if spec.k >= window:  # step k is scored at positions with k tokens after them: deeper ones failed in the loss
        raise ArgumentError("spec.k", spec.k, f"must be below the window length, {window} (a window of {window} "
                            f"tokens scores at most {window - 1} draft steps)", "--draft-k")
    tcfg, _ = load_config(target_dir)
    if tcfg.model_type == "gemma4_text":  # its layer types have their own head dims; our drafter reads one shape
        raise EdgemtpError(f"{target_dir}: no drafter is trained for model_type 'gemma4_text': "
                           "Gemma 4 ships its own MTP drafter (a gemma4_assistant checkpoint): export the bundle "
                           "with that checkpoint's directory as its drafter")
    ckpt = Checkpoint(target_dir)
    if EMBEDDING not in ckpt:  # a missing or damaged weight file, before the corpora
        raise EdgemtpError(f"{target_dir}: no '{EMBEDDING}' tensor (the drafter reads the target's embedding)")
    ckpt.check_finite()  # before the windows too (minutes on the corpora): TargetPass's own check comes after them
    cfg = M.DrafterConfig.for_target(tcfg, drafter_kv(tcfg), **(shape or {}))
    start_from = init_record = None
    if init is not None:  # read now: fine-tuning in place (--init DIR -o DIR) replaces DIR's files at the end
        start_from, init_record = _starting_drafter(Path(init), cfg, (shape or {}).get("intermediate"), seed)
        cfg = replace(start_from.cfg, **{f: getattr(cfg, f) for f in TARGET_CONVENTIONS})
    head_clusters, head_top_k = _head_plan(cfg.vocab_size, head_clusters, head_top_k)
    run = R.run_record(seed, data, spec, cfg)
    state = R.resume_state(out_dir / "checkpoint.pt", run, cfg, steps) if resume else None  # before the target pass
    made = not out_dir.exists()
    with contextlib.ExitStack() as held:
        # after the checks: a refused run leaves no directory, nor those made above it (once out_dir holds a cache,
        # they stay with it)
        with parents_made(out_dir):
            out_dir.mkdir(exist_ok=True)
            held.enter_context(R.only_run(out_dir))  # until the drafter is in place
            torch.set_num_threads(threads)
            torch.manual_seed(seed)
            t0 = time.time()
            try:
                train_ids, heldout_ids, vocab = _windows(target_dir, tcfg, data, out_dir / "cache", progress)
            except EdgemtpError:  # a corpus not installed (docs: python3.11-doc) refuses the run too
                if made:
                    shutil.rmtree(out_dir, ignore_errors=True)
                raise
        torch.set_num_threads(max(threads, label_threads))  # the target pass: big matmuls, no per-op stalls
        target = TargetPass(target_dir, cfg, vocab)
        caches = target_caches(target, train_ids, heldout_ids, out_dir / "cache", progress)
        emb = target.model.get_input_embeddings().weight.detach()
        del target
        torch.set_num_threads(threads)
        prep_s = time.time() - t0
        vocab = vocab if vocab is not None else np.arange(cfg.vocab_size)
        model, opt, start, earlier_s = _model_and_optimizer(cfg, spec, state)
        if start_from is not None and start == 0:
            model.load_state_dict(start_from.state_dict())
        log = R.Log(out_dir / "train.log", progress, steps, start, resume)
        if start == 0:
            log.write(0, {"phase": "eval", **_evaluate(model, emb, caches, spec, vocab)})
        t1 = time.time() - earlier_s  # a resumed run counts the training time before the interruption too
        for step in range(start, steps):
            stats = _train_step(model, opt, emb, caches["train"], step, steps, spec, vocab, seed)
            log.write(step + 1, {"phase": "train", **stats, "s": round(time.time() - t1, 1)})
            if (step + 1) % spec.ckpt_every == 0 or step + 1 in (steps, stop_at):
                R.save_checkpoint(model, opt, step + 1, time.time() - t1, out_dir / "checkpoint.pt", run)
            if step + 1 == stop_at:
                return None
            if (step + 1) % spec.eval_every == 0 and step + 1 < steps:
                log.write(step + 1, {"phase": "eval", **_evaluate(model, emb, caches, spec, vocab)})
        final = _evaluate(model, emb, caches, spec, vocab)
        log.write(steps, {"phase": "eval", **final})
        # threads: the weights depend on them (torch sums in another order on another number of threads)
        report = {"steps": steps, "seed": seed, "threads": threads, "prepare_s": round(prep_s, 1),
                  "train_s": round(time.time() - t1, 1),
                  "train_positions": int(np.prod(caches["train"]["ids"].shape)), "heldout": final,
                  "data": asdict(data) if isinstance(data, DataSpec) else "arrays", "spec": asdict(spec)}
        if init is not None:  # provenance: the run this one started from, with its own record (and so on back)
            report["init"] = {"from": str(init), "training": init_record}
        head = (head_clusters, head_top_k) if head_clusters else None
        _write_drafter(model, report, out_dir, target_dir, init, head, seed, progress)
        return report


SEEDS = 2**32  # the head's k-means (scikit-learn) takes seeds below it only, and would say so after the training
SHAPE_FLAGS = {"hidden": "--hidden", "intermediate": "--intermediate", "num_layers": "--layers", "num_heads": None}
# TrainSpec's whole-number fields: (the least value, the CLI's flag or None)
SPEC_WHOLE = {"k": (1, "--draft-k"), "batch": (1, "--batch"), "warmup": (0, None), "loss_topk": (1, None),
              "negatives": (1, None), "ckpt_every": (1, None), "eval_every": (1, "--eval-every")}


def check_values(data, steps, seed, shape, spec, threads, label_threads, stop_at):
    """train_drafter's arguments' values, checked before any file is read; the CLI's flags reach them here too, so
    a refusal names the argument as the caller wrote it (ArgumentError: spec.batch=0 from Python, --batch 0 from
    the CLI). Returns (data, spec, steps, seed) with numpy's whole numbers as Python's: the run's record is JSON."""
    from .data import DOMAINS

    def whole(name, value, least=1, flag=None, most=None):
        if not is_whole(value):
            raise ArgumentError(name, value, "must be a whole number", flag)
        if most is not None and not least <= value <= most:
            raise ArgumentError(name, value, f"must be between {least} and {most}", flag)
        if value < least:
            raise ArgumentError(name, value, f"must be at least {least}", flag)
        return int(value)

    steps, seed = whole("steps", steps), whole("seed", seed, 0, most=SEEDS - 1)
    whole("threads", threads)
    whole("label_threads", label_threads)
    if stop_at is not None:
        whole("stop_at", stop_at)
    if not isinstance(spec, TrainSpec):
        raise ArgumentError("spec", spec, "must be a TrainSpec")
    spec = replace(spec, **{f: whole(f"spec.{f}", getattr(spec, f), least, flag)
                            for f, (least, flag) in SPEC_WHOLE.items()})
    if not (is_finite(spec.lr) and spec.lr > 0):
        raise ArgumentError("spec.lr", spec.lr, "must be a positive number", "--lr")
    if not (is_number(spec.accept_weight) and 0 <= spec.accept_weight <= 1):  # NaN too
        raise ArgumentError("spec.accept_weight", spec.accept_weight, "must be between 0 and 1", "--accept-weight")
    for f in ("weight_decay", "hidden_weight"):
        if not (is_finite(getattr(spec, f)) and getattr(spec, f) >= 0):
            raise ArgumentError(f"spec.{f}", getattr(spec, f), "must be a finite number >= 0")
    if shape is not None and not isinstance(shape, dict):
        raise ArgumentError("shape", shape, f"must be a dict with keys among {', '.join(SHAPE_FLAGS)}")
    for key, value in (shape or {}).items():
        if key not in SHAPE_FLAGS:  # DrafterConfig.for_target's TypeError named a keyword
            raise ArgumentError("shape", shape, f"has an unknown key {key!r} (known: {', '.join(SHAPE_FLAGS)})")
        if not (key == "num_heads" and value is None):
            whole(f"shape[{key!r}]", value, flag=SHAPE_FLAGS[key])
    if isinstance(data, dict):  # windows given as arrays
        train = data.get("train")
        if np.ndim(train) != 2 or np.shape(train)[0] < 1 or np.shape(train)[1] < 2:
            raise ArgumentError("data['train']", train, "must be token ids [windows, tokens]: at least 1 window of "
                                "at least 2 tokens")
        return data, spec, steps, seed
    if not isinstance(data, DataSpec):
        raise ArgumentError("data", data, "must be a DataSpec or a dict of token id arrays")
    if is_whole(data.seq_len) and data.seq_len < 2:
        raise ArgumentError("data.seq_len", data.seq_len, "must be at least 2 (a token and the one it predicts)",
                            "--seq-len")
    seq_len = whole("data.seq_len", data.seq_len, 2, "--seq-len")
    greedy_from = data.greedy_from
    if not (is_whole(greedy_from) and (greedy_from == 0 or 1 <= greedy_from < seq_len)):
        raise ArgumentError("data.greedy_from", greedy_from, f"must be between 1 and the window length less 1 "
                            f"({seq_len - 1}), or 0 for none", "--greedy-from")
    for split in ("train", "heldout"):
        counts = getattr(data, split)
        flag = "--data" if split == "train" else "--heldout"
        if not isinstance(counts, dict):
            raise ArgumentError(f"data.{split}", counts, "must be a dict of window counts by corpus", flag)
        for d, n in counts.items():
            if d not in DOMAINS:
                raise ArgumentError(f"data.{split}", counts, f"names an unknown corpus {d!r} (choose from "
                                    f"{', '.join(DOMAINS)})", flag)
            ranged = split == "train" and isinstance(n, (list, tuple)) and len(n) == 2
            if not (is_whole(n) and n >= 0 or ranged and all(map(is_whole, n)) and 0 <= n[0] < n[1]):
                form = "a count N >= 0 or a range [START, STOP] (START < STOP)" if split == "train" else "a count >= 0"
                raise ArgumentError(f"data.{split}", counts, f"gives {d} a count that is not {form}", flag)
    if not any(window_range(n)[1] > window_range(n)[0] for n in data.train.values()):
        raise ArgumentError("data.train", data.train, "selects no windows", "--data")
    data = replace(data, seq_len=seq_len, greedy_from=int(greedy_from),
                   seed=whole("data.seed", data.seed, 0, "--seed", SEEDS - 1),
                   **{split: {d: int(n) if is_whole(n) else [int(n[0]), int(n[1])]
                              for d, n in getattr(data, split).items()} for split in ("train", "heldout")})
    return data, spec, steps, seed


def _write_drafter(model, report: dict, out_dir: Path, target_dir: Path, init: Path | None,
                   head: tuple[int, int] | None, seed: int, progress: Progress | None) -> None:
    """The trained drafter into `out_dir`, with its head tables fitted (head: clusters, top_k) unless None.
    Its files are made aside and moved in with config.json last: a run killed while fitting the head leaves no
    directory that `edgemtp export --drafter` would take for a finished drafter."""
    staging = R.fresh_staging(out_dir)
    try:
        M.save(model, staging, extra={"training": report})
        if head:
            from .head_fit import fit_head
            fit_head(staging, target_dir, clusters=head[0], top_k=head[1], seed=seed,
                     progress=(lambda d, n, what="": progress(d, n, {"phase": "head", "what": what})) if progress
                     else None, cache_dir=out_dir / "cache" / "train")
        R.complete(staging, target_dir, init)
        R.publish(staging, out_dir)
    except BaseException:  # an error or Ctrl-C: the half-made drafter does not stay beside the output
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _starting_drafter(init: Path, cfg: M.DrafterConfig, wider: int | None, seed: int):
    """init: (the drafter that starts the training, its config.json's training record), refused when made for
    another target; widened first to `wider` MLP units (shape["intermediate"]) if that is more than it has. The
    refusals name the arguments as the caller wrote them (ArgumentError): init=, --init from the CLI."""
    start_from = M.load(init)
    record = json.loads((init / "config.json").read_text(encoding="utf-8")).get("training")
    other = [f for f in TARGET_FIELDS if getattr(start_from.cfg, f) != getattr(cfg, f)]
    given = os.fspath(init)  # the path as text: a pathlib.Path's repr named the class
    if other:
        raise ArgumentError("init", given, f"is a drafter for another target (its {other[0]} "
                            f"{getattr(start_from.cfg, other[0])!r}, this target's {getattr(cfg, other[0])!r})")
    if wider is not None and wider != start_from.cfg.intermediate:
        if wider < start_from.cfg.intermediate:
            raise ArgumentError("shape['intermediate']", wider, f"is fewer than the {start_from.cfg.intermediate} "
                                f"MLP units of the drafter it starts from ({given}): a drafter can be widened, "
                                "not narrowed", "--intermediate")
        start_from = M.widen_mlp(start_from, wider, seed)
    return start_from, record


def _head_plan(vocab: int, clusters: int | None, top_k: int | None) -> tuple[int, int]:
    """(head_clusters, head_top_k) with their defaults, checked before hours of training, not after."""
    if clusters is None:
        clusters = 2048 if vocab >= 65_536 else 0
    if top_k is not None and not clusters:  # it would be ignored: no head is fitted to score with it
        raise ArgumentError("head_top_k", top_k, f"applies to the clustered head this run fits, and it fits none "
                            f"({clusters} head clusters; the default fits one for vocabularies of 65,536 tokens "
                            "or more)")
    top_k = 32 if top_k is None else top_k
    if clusters:
        from ..calibration.clustering import check_sizes
        check_sizes(vocab, clusters, top_k, prefix="head_")
    return clusters, top_k


def _windows(target_dir, tcfg, data, cache_dir: Path, progress: Progress | None = None):
    if isinstance(data, dict):
        return data["train"], data["heldout"], data.get("vocab")
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_dir / "windows.npz"
    spec = json.dumps({**asdict(data), "target": target_identity(target_dir)})  # greedy rows are the target's
    if key.is_file() and _stored_spec(key) == spec:
        z = np.load(key)
        held = {k[len("heldout."):]: z[k] for k in z.files if k.startswith("heldout.")}
        return z["train"], held, (z["vocab"] if data.shortlist else None)
    train, held, vocab = build_windows(target_dir, tcfg, data)
    if data.greedy_from:
        from .greedy import continue_greedily

        train = continue_greedily(target_dir, train, data.greedy_from, cache_dir / "greedy.train", progress=progress)
        held = {d: continue_greedily(target_dir, w, data.greedy_from, cache_dir / f"greedy.heldout.{d}")
                for d, w in held.items()}
        if vocab is not None:  # the target's own tokens join the head shortlist
            vocab = np.union1d(vocab, np.concatenate([train.ravel()] + [w.ravel() for w in held.values()]))
    partial = key.with_name("windows.partial.npz")  # renamed when whole: a killed write is not read later
    try:
        np.savez(partial, spec=spec, train=train, vocab=vocab if vocab is not None else np.zeros(0),
                 **{f"heldout.{k}": v for k, v in held.items()})
        partial.replace(key)
    except BaseException:  # a full disk, Ctrl-C: no half-written file stays in the cache
        partial.unlink(missing_ok=True)
        raise
    return train, held, vocab


def _stored_spec(path: Path) -> str | None:
    try:
        # opened here: np.load gives its file to NpzFile before reading the zip, and left a damaged one's open
        with open(path, "rb") as f:
            return str(np.load(f)["spec"])
    except Exception:  # a damaged or foreign file: made afresh
        return None


def _model_and_optimizer(cfg, spec: TrainSpec, state: dict | None):
    """A fresh drafter and optimizer, or (`state`: a checkpoint _resume_state checked) the run's at its step."""
    model = M.MTPDrafter(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    if state is None:
        return model, opt, 0, 0.0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return model, opt, int(state["step"]), float(state.get("train_s", 0.0))


def _train_step(model, opt, emb, cache, step: int, steps: int, spec: TrainSpec, vocab, seed: int) -> dict:
    model.train()
    b = to_torch(cache, batch_rows(step, len(cache["ids"]), spec.batch, seed))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    for g in opt.param_groups:
        g["lr"] = float(spec.lr * _schedule(step, steps, spec))
    loss, stats = loss_fn(model, emb, b, spec, sample_negatives(b, spec.negatives, vocab, gen))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {"loss": round(float(loss.detach()), 4), "grad_norm": round(float(norm), 3),
            **{k: round(v, 3) for k, v in stats.items()}}


def _evaluate(model, emb, caches: dict, spec: TrainSpec, vocab) -> dict:
    model.eval()
    rows = None if len(vocab) == model.cfg.vocab_size else vocab
    return {name[len("heldout."):]: acceptance(model, emb, c, spec.k, rows)
            for name, c in caches.items() if name.startswith("heldout.")}


