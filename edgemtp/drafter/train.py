"""Distillation of an MTP drafter from its target: labels are the target's own greedy predictions.

    train_drafter("models/gemma3-270m", "runs/g3-drafter", steps=400)

1. `prepare()` runs the target (transformers, teacher-forced on corpus windows) once and caches, per
   position t: the post-final-norm hidden h_t, the K/V of the drafter's target layers, and the target's
   top-k next-token ids + logits (argmax g_t = top-1). Optionally over a shortlist of the vocabulary (the
   tokens occurring in the corpora): the 262k-row head is the costliest part of the target pass.
2. `unroll()` drafts from every position p of a window at once: step 1 reads (x_p, h_{p-1}, cache < p),
   step k feeds the drafter its own state from step k-1 with token x_{p+k-1}, all at query position p.
   Step k's label is g_{p+k-1}, valid only where the text followed the target's greedy path
   (x_{p+j} == g_{p+j-1} for j < k): exactly the cases where step k's draft can be accepted.
   The loss is a cross-entropy against the target's top-k distribution, restricted to those k tokens
   plus shared negatives (no 262k softmax per position), plus a small regression of the state onto h.
3. Checkpoints (model + optimizer + step) every `ckpt_every` steps; `resume=True` continues one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import TextConfig
from ..errors import EdgemtpError
from . import model as M
from .cache import fingerprint, resumable_rows

Progress = Callable[[int, int, dict], None]


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


class TargetPass:
    """The target in transformers: ids [B, T] -> per-position hidden, drafter-layer K/V and top-k."""

    def __init__(self, target_dir: Path, cfg: M.DrafterConfig, shortlist: np.ndarray | None, topk: int = 32):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
        self.cfg, self.topk = cfg, topk
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


_STORE = {"hidden": np.float16, "top_ids": np.int32, "top_logits": np.float16, "ids": np.int64}


def prepare(target: TargetPass, windows: np.ndarray, path: Path, batch: int = 4,
            progress: Progress | None = None) -> dict:
    """Cache `target.run` over windows [N, T] into `path`/*.npy (fp16); resumable (for the same windows;
    others start afresh), returns memmaps."""
    path.mkdir(parents=True, exist_ok=True)
    rows = None if target.rows is None else fingerprint(target.rows.numpy())
    done_file, key = path / "done.json", fingerprint(windows, target.topk, rows)
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


def shifted(a: torch.Tensor, s: int, fill=0) -> torch.Tensor:
    """a [B, T, ...] -> [B, T-1, ...] with out[:, i] = a[:, i + s] (fill past the end); s >= 1."""
    pad = torch.full((a.shape[0], s - 1) + tuple(a.shape[2:]), fill, dtype=a.dtype)
    return torch.cat([a[:, s:], pad], dim=1)


def at(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx [B, P'] of a [B, P, ...] along the query axis."""
    return torch.gather(a, 1, idx.view(idx.shape + (1,) * (a.dim() - 2)).expand(idx.shape + a.shape[2:]))


def label_known(ids: torch.Tensor, g: torch.Tensor, k: int) -> list[torch.Tensor]:
    """known[s-1] [B, T-1]: step s's label g_{p+s-1} is the target's greedy continuation, i.e. the text
    followed the greedy path (x_{p+j} == g_{p+j-1}, j < s) and p+s-1 is inside the window."""
    T = ids.shape[1]
    agree = torch.cat([ids[:, 1:] == g[:, :-1], torch.zeros_like(ids[:, :1], dtype=torch.bool)], 1)  # x_{t+1}==g_t
    known, ok = [], torch.ones(ids.shape[0], T - 1, dtype=torch.bool)
    for s in range(1, k + 1):
        if s > 1:
            ok = ok & shifted(agree, s - 1, False)
        known.append(ok & (torch.arange(T - 1) + s <= T - 1))
    return known


def unroll(model: M.MTPDrafter, emb: torch.Tensor, b: dict, k: int):
    """Drafts from every position p = 1..T-1 of windows b at once (query index i = p - 1).

    Yields (step, state [B, P', Hb], valid [B, P'], idx [B, P']): after step 1 only the queries whose label
    is still known are carried on (compaction; deeper steps are mostly invalid), idx maps them back."""
    cfg = model.cfg
    ids = b["ids"]
    B, T = ids.shape
    kv = {t: (b[f"k.{t}"], b[f"v.{t}"]) for t in cfg.target_kv}
    full = M.make_view(cfg, kv, torch.arange(1, T).expand(B, T - 1), T)
    known = label_known(ids, b["top_ids"][..., 0], k)
    idx, state = torch.arange(T - 1).expand(B, T - 1), b["hidden"][:, :-1]
    for step in range(1, k + 1):
        valid = at(known[step - 1], idx)
        if step > 1:
            n = int(valid.sum(1).max())
            if n == 0:
                return
            keep = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :n]
            idx, state, valid = at(idx, keep), at(state, keep), at(valid, keep)
        view = M.TargetView(kv, {t: torch.gather(v, 2, idx[:, None, :, None].expand(B, 1, idx.shape[1], T))
                                 for t, v in full.bias.items()},
                            {t: at(v, idx) for t, v in full.cos.items()}, {t: at(v, idx) for t, v in full.sin.items()})
        state = model.step(emb[at(shifted(ids, step), idx)] * cfg.embed_scale, state, view)
        yield step, state, valid, idx


def loss_fn(model, emb, b: dict, spec: TrainSpec, negatives: torch.Tensor) -> tuple[torch.Tensor, dict]:
    terms, stats = [], {}  # per step: (per-position loss, P(label), batch row, position)
    for step, state, valid, idx in unroll(model, emb, b, spec.k):
        if not valid.any():
            continue
        s = state[valid]  # [n, Hb]
        own = at(shifted(b["top_ids"], step), idx)[valid][:, :spec.loss_topk]  # [n, kt]
        target = torch.softmax(at(shifted(b["top_logits"], step), idx)[valid][:, :spec.loss_topk], -1)
        own_logits = M.softcap(torch.einsum("nh,nkh->nk", s, emb[own]), model.cfg.final_logit_softcapping)
        neg = model.logits(s, emb[negatives])
        neg = neg.masked_fill((own.unsqueeze(-1) == negatives).any(1), torch.finfo(neg.dtype).min)
        logq = torch.log_softmax(torch.cat([own_logits, neg], -1), -1)[:, :own.shape[1]]
        ce = -(target * logq).sum(-1)
        h = at(shifted(b["hidden"], step), idx)[valid]
        mse = ((s - h) ** 2 / (h.pow(2).mean(0, keepdim=True) + 1e-3)).mean(-1)
        rows = torch.nonzero(valid)[:, 0]
        terms.append((ce + spec.hidden_weight * mse, logq[:, 0].detach().exp(), rows, idx[valid]))
        stats[f"ce{step}"] = float(ce.detach().mean())
    if not terms:
        return torch.zeros(()), stats
    weights = [torch.ones_like(t[1]) for t in terms]
    if spec.accept_weight:
        worth = round_weights([t[1:] for t in terms], b["ids"].shape)
        weights = [(1 - spec.accept_weight) + spec.accept_weight * w for w in worth]
    total = sum((w * t[0]).sum() for w, t in zip(weights, terms))
    return total / sum(w.sum() for w in weights), stats


def round_weights(steps: list, shape: tuple) -> list[torch.Tensor]:
    """What each step's draft is worth to tokens per round, per position, from the drafter's own
    probability of the right token at every step: steps[k-1] = (P(label) [n], batch row [n], position [n]).

    A round drafting from p accepts 1 + sum_k prod_{j<=k} P_j tokens on average; its derivative in P_k is
    prod_{j<k} P_j (the draft is only reached after k-1 right ones) times 1 + sum_{m>k} prod_{k<j<=m} P_j
    (what a right draft k lets the later ones add). Times the chance that a round starts at p at all
    (`round_starts`: replayed rounds start right after a rejection, where drafting is hardest). Normalised
    to mean 1 over the batch's terms."""
    B, T = shape
    k = len(steps)
    p = torch.zeros(k, B, T - 1)
    for i, (prob, rows, pos) in enumerate(steps):
        p[i, rows, pos] = prob
    reach = torch.cumprod(torch.cat([torch.ones(1, B, T - 1), p[:-1]]), 0)  # prod_{j<k} P_j
    future = torch.ones(k, B, T - 1)
    for i in range(k - 2, -1, -1):
        future[i] = 1 + p[i + 1] * future[i + 1]
    worth = reach * future * round_starts(p)
    out = [worth[i, rows, pos] for i, (_, rows, pos) in enumerate(steps)]
    mean = torch.cat(out).mean().clamp(min=1e-6)
    return [w / mean for w in out]


def round_starts(p: torch.Tensor) -> torch.Tensor:
    """p [k, B, n] (P(draft step right) per position) -> [B, n]: the chance that greedy speculative
    decoding over the window starts a round at each position (a round from i that accepts m drafts hands
    over to i + m + 1), starting with a round at position 0."""
    k, B, n = p.shape
    reach = torch.cumprod(p, 0)
    exact = torch.cat([torch.ones(1, B, n), reach]) - torch.cat([reach, torch.zeros(1, B, n)])  # m = 0..k
    start = torch.zeros(B, n + k + 1)
    start[:, 0] = 1
    for i in range(n):
        start[:, i + 1:i + k + 2] += start[:, i:i + 1] * exact[:, :, i].T
    return start[:, :n]


def sample_negatives(b: dict, n: int, vocab: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """Shared negatives: half drawn from the batch's target top-k tokens (plausible here), half uniform."""
    seen = torch.unique(b["top_ids"])
    hard = seen[torch.randperm(len(seen), generator=gen)[:n // 2]]
    easy = torch.from_numpy(vocab)[torch.randint(len(vocab), (n - len(hard),), generator=gen)]
    return torch.unique(torch.cat([hard, easy]))


@torch.no_grad()
def acceptance(model: M.MTPDrafter, emb: torch.Tensor, cache: dict, k: int, rows: np.ndarray | None = None,
               chunk: int = 512) -> dict:
    """Estimated greedy acceptance on teacher-forced windows (argmax over `rows` of the head, or all):
    rate[k] = P(draft k right | drafts < k right), over the positions where step k's label is known."""
    head = emb if rows is None else emb[torch.from_numpy(rows)]
    right, asked = torch.zeros(k), torch.zeros(k)
    for i in range(len(cache["ids"])):
        b = to_torch(cache, slice(i, i + 1))
        so_far = torch.ones(b["ids"].shape[1] - 1, dtype=torch.bool)  # drafts before this step all right
        for step, state, valid, idx in unroll(model, emb, b, k):
            s, valid, idx = state[0], valid[0], idx[0]
            pick = torch.cat([model.logits(s[j:j + chunk], head).argmax(-1) for j in range(0, len(s), chunk)])
            if rows is not None:
                pick = torch.from_numpy(rows)[pick]
            hit = pick == shifted(b["top_ids"][..., 0], step)[0][idx]
            before = so_far[idx] & valid
            asked[step - 1] += int(before.sum())
            right[step - 1] += int((before & hit).sum())
            so_far = torch.zeros_like(so_far)
            so_far[idx[before & hit]] = True
    rate = (right / asked.clamp(min=1)).tolist()
    depth = np.cumprod(rate)
    return {"rate": [round(r, 4) for r in rate], "tokens_per_round": round(1 + float(depth.sum()), 3),
            "positions": int(asked[0])}


def _schedule(step: int, steps: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, steps - spec.warmup)
    return float(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))


def batch_rows(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Rows of step `step`: epoch e is a fixed permutation seeded by (seed, e), so resume is exact."""
    per_epoch = max(1, n // batch)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return np.sort(perm[i * batch:(i + 1) * batch])


def build_windows(target_dir: Path, cfg: TextConfig, spec: DataSpec) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """(train windows [N, T], {domain: held-out windows}, head shortlist or None) from the corpora."""
    from tokenizers import Tokenizer

    from . import data as D

    tok = Tokenizer.from_file(str(Path(target_dir) / "tokenizer.json"))

    def take(split: str, counts: dict, seed: int) -> dict:
        return {d: D.windows(tok, D.documents(d, split), spec.seq_len, stop, seed + i, cfg.bos_token_id, start)
                for i, (d, (start, stop)) in enumerate(sorted((d, window_range(n)) for d, n in counts.items()))
                if stop > start}

    train = np.concatenate(list(take("train", spec.train, spec.seed).values()))
    heldout = take("heldout", spec.heldout, spec.seed + 100)
    used = sorted(d for counts in (spec.train, spec.heldout) for d, n in counts.items() if n != 0)
    return train, heldout, D.vocabulary(tok, tuple(dict.fromkeys(used))) if spec.shortlist else None


def window_range(n) -> tuple[int, int]:
    """A DataSpec count: N (the first N windows) or [start, stop]."""
    return (0, int(n)) if isinstance(n, int) else (int(n[0]), int(n[1]))


def train_drafter(target_dir: Path, out_dir: Path, data: DataSpec | dict = DataSpec(), steps: int = 360,
                  seed: int = 0, resume: bool = False, progress: Progress | None = None,
                  shape: dict | None = None, spec: TrainSpec = TrainSpec(), threads: int = 1,
                  stop_at: int | None = None, init: Path | None = None,
                  label_threads: int = 2, head_clusters: int | None = None, head_top_k: int = 32) -> dict:
    """Trains a drafter for the target in `target_dir` (an HF model directory); writes `out_dir`/config.json
    + model.safetensors (fp16), checkpoint.pt, train.log (JSON lines). Returns the final report.

    data: a DataSpec (corpus windows) or {"train": ids [N, T], "heldout": {name: ids [n, T]}, "vocab": ids|None}.
    shape: DrafterConfig.for_target keywords (hidden, intermediate, num_layers, num_heads).
    stop_at: checkpoint and return None after this step (as an interruption would; resume=True continues).
    init: a drafter directory whose weights start the training (a fresh optimizer and
    schedule: fine-tuning a drafter on more data); its shape wins over `shape`, except that a larger
    `shape["intermediate"]` widens its MLPs first (model.widen_mlp: same function, new units to train).
    head_clusters: after training, fit clustered-head tables (C clusters, `head_top_k` scored) on the
    drafter's own states (head_fit.py) into out_dir/head.safetensors; 0: none (after --init, that
    drafter's tables are carried over); None: 2048 for vocabularies of 65,536 tokens or more, else 0.
    label_threads: torch threads for the target pass (one window batch is a few large matmuls: 2 threads
    labelled 370 tokens/s on an idle 2-core machine).
    threads: torch intra-op threads for training. 1 by default: on a shared 2-core machine two OpenMP threads made a
    training step 4-9x slower (each small op waits for the second thread to be scheduled); on an idle machine
    2 threads were 1.85x faster (2.2 vs 4.0 s a step for the Gemma 3 270M drafter)."""
    from ..exporters import load_config
    from ..exporters.gemma3 import drafter_kv

    target_dir, out_dir = Path(target_dir), Path(out_dir)
    tcfg, _ = load_config(target_dir)
    cfg = M.DrafterConfig.for_target(tcfg, drafter_kv(tcfg), **(shape or {}))
    start_from = None
    if init is not None:
        start_from = M.load(Path(init))
        if start_from.cfg.target_kv != cfg.target_kv or start_from.cfg.vocab_size != cfg.vocab_size:
            raise EdgemtpError(f"--init {init}: a drafter for another target")
        wider = (shape or {}).get("intermediate")
        if wider is not None and wider != start_from.cfg.intermediate:
            if wider < start_from.cfg.intermediate:
                raise EdgemtpError(f"--intermediate {wider}: --init {init} has {start_from.cfg.intermediate} "
                                   "MLP units; a drafter can be widened, not narrowed")
            start_from = M.widen_mlp(start_from, wider, seed)
        cfg = start_from.cfg
    if head_clusters is None:
        head_clusters = 2048 if cfg.vocab_size >= 65_536 else 0
    if head_clusters:  # checked before hours of training, not after
        from ..calibration.clustering import check_sizes
        check_sizes(cfg.vocab_size, head_clusters, head_top_k, flag="--head-")
    out_dir.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves no directory
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    train_ids, heldout_ids, vocab = _windows(target_dir, tcfg, data, out_dir / "cache", progress)
    torch.set_num_threads(max(threads, label_threads))  # the target pass: big matmuls, no per-op stalls
    target = TargetPass(target_dir, cfg, vocab)
    caches = _caches(target, train_ids, heldout_ids, out_dir / "cache", progress)
    emb = target.model.get_input_embeddings().weight.detach()
    del target
    torch.set_num_threads(threads)
    prep_s = time.time() - t0
    vocab = vocab if vocab is not None else np.arange(cfg.vocab_size)
    model, opt, start, earlier_s = _model_and_optimizer(cfg, spec, out_dir / "checkpoint.pt", resume)
    if start_from is not None and start == 0:
        model.load_state_dict(start_from.state_dict())
    log = _Log(out_dir / "train.log", progress, steps)
    if start == 0:
        log.write(0, {"phase": "eval", **_evaluate(model, emb, caches, spec, vocab)})
    t1 = time.time() - earlier_s  # a resumed run counts the training time before the interruption too
    for step in range(start, steps):
        stats = _train_step(model, opt, emb, caches["train"], step, steps, spec, vocab, seed)
        log.write(step + 1, {"phase": "train", **stats, "s": round(time.time() - t1, 1)})
        if (step + 1) % spec.ckpt_every == 0 or step + 1 in (steps, stop_at):
            _checkpoint(model, opt, step + 1, time.time() - t1, out_dir / "checkpoint.pt")
        if step + 1 == stop_at:
            return None
        if (step + 1) % spec.eval_every == 0 and step + 1 < steps:
            log.write(step + 1, {"phase": "eval", **_evaluate(model, emb, caches, spec, vocab)})
    final = _evaluate(model, emb, caches, spec, vocab)
    log.write(steps, {"phase": "eval", **final})
    report = {"steps": steps, "seed": seed, "prepare_s": round(prep_s, 1), "train_s": round(time.time() - t1, 1),
              "train_positions": int(np.prod(caches["train"]["ids"].shape)), "heldout": final,
              "data": asdict(data) if isinstance(data, DataSpec) else "arrays", "spec": asdict(spec)}
    if init is not None:  # provenance: the run this one started from, with its own record (and so on back)
        earlier = json.loads((Path(init) / "config.json").read_text()).get("training")
        report["init"] = {"from": str(init), "training": earlier}
    M.save(model, out_dir, extra={"training": report})
    if head_clusters:
        from .head_fit import fit_head
        fit_head(out_dir, target_dir, clusters=head_clusters, top_k=head_top_k, seed=seed,
                 progress=(lambda d, n, what="": progress(d, n, {"phase": "head", "what": what})) if progress else None)
    _complete(out_dir, target_dir, init)
    return report


def _complete(out_dir: Path, target_dir: Path, init: Path | None) -> None:
    """What makes `out_dir` a drafter directory by itself: the target's fingerprint (how `edgemtp export`
    recognises the target) and, after --init, that drafter's clustered-head tables (same vocabulary and
    hidden size, checked at export) unless some were fitted or written here already."""
    import shutil

    from . import write_fingerprint
    from .export import HEAD_FILE

    write_fingerprint(out_dir, target_dir)
    if init is not None and (Path(init) / HEAD_FILE).is_file() and not (out_dir / HEAD_FILE).exists():
        shutil.copy2(Path(init) / HEAD_FILE, out_dir / HEAD_FILE)


def _windows(target_dir, tcfg, data, cache_dir: Path, progress: Progress | None = None):
    if isinstance(data, dict):
        return data["train"], data["heldout"], data.get("vocab")
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_dir / "windows.npz"
    if key.is_file() and json.loads(str(np.load(key)["spec"])) == asdict(data):
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
    np.savez(key, spec=json.dumps(asdict(data)), train=train, vocab=vocab if vocab is not None else np.zeros(0),
             **{f"heldout.{k}": v for k, v in held.items()})
    return train, held, vocab


def _caches(target, train_ids, heldout_ids, cache_dir: Path, progress) -> dict:
    caches = {"train": prepare(target, train_ids, cache_dir / "train", progress=progress)}
    for name, ids in heldout_ids.items():
        caches[f"heldout.{name}"] = prepare(target, ids, cache_dir / f"heldout.{name}")
    return caches


def _model_and_optimizer(cfg, spec: TrainSpec, ckpt: Path, resume: bool):
    model = M.MTPDrafter(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    start, train_s = 0, 0.0
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, train_s = int(state["step"]), float(state.get("train_s", 0.0))
    elif resume:
        raise EdgemtpError(f"{ckpt}: no checkpoint to resume from")
    return model, opt, start, train_s


def _checkpoint(model, opt, step: int, train_s: float, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "train_s": train_s}, tmp)
    tmp.replace(path)


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


class _Log:
    def __init__(self, path: Path, progress: Progress | None, steps: int):
        self.path, self.progress, self.steps = path, progress, steps

    def write(self, step: int, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 1), **record}) + "\n")
        if self.progress:
            self.progress(step, self.steps, record)
