"""The distillation loss: the drafter unrolled K steps from every position of a window at once, each step's
label the target's greedy token where the text followed the target's greedy path (see train.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from . import model as M
from .target_pass import to_torch

if TYPE_CHECKING:
    from .train import TrainSpec


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
