"""Recall of the clustered head on Gemma 3 270M's own final hidden states, held-out code and prose.

For each way of building the head (C=2048 clusters of 128 tokens) and k in {8, 16, 32, 64}:
recall = fraction of held-out positions whose clustered argmax equals the full head's argmax,
mass = mean softmax probability held by the k selected clusters.

    kmeans       spherical balanced k-means of the embedding table alone; centroid = mean head row
    weighted     k-means in the hidden states' geometry, balancing that moves rarely predicted tokens
                 first, centroid = predicted-mass-weighted mean head row (no training)
    calibrated   weighted + centroids trained on the calibration hidden states (softmax classifier)
    refined      calibrated + often-predicted tokens swapped into the cluster the trained centroids
                 send their contexts to, centroids retrained

Hidden states come from benchmarks/head_data.py (cached under /tmp/headcal; run it first, it takes
~20-60 min on 2 cores). Usage: python benchmarks/head_recall.py [--cache DIR] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import head_data as hd
import numpy as np

from edgemtp.calibration import centroids as ce
from edgemtp.calibration.clustering import HeadTables, cluster_vocab
from edgemtp.calibration.head_report import TOP_KS, recall_figures

CLUSTERS = 2048
METHODS = ("kmeans", "weighted", "calibrated", "refined")


def calibration(cache: Path) -> dict[str, np.ndarray]:
    parts = [hd.load_split(d, "calib", cache) for d in ("code", "prose")]
    cal = {k: np.concatenate([p[k] for p in parts]) for k in ("hidden", "top_ids", "top_logits", "lse")}
    cal["top_probs"] = np.exp(cal["top_logits"] - cal["lse"][:, None]).astype(np.float32)
    return cal


def build(method: str, embed: np.ndarray, cal: dict, seed: int, built: dict) -> HeadTables:
    """The tables of `method` (later methods start from earlier ones, passed in `built`)."""
    ids, probs = cal["top_ids"][:, :64], cal["top_probs"][:, :64]
    if method == "kmeans":
        return cluster_vocab(embed, CLUSTERS, seed)
    if method == "weighted":
        mass = np.bincount(ids.ravel(), weights=probs.ravel(), minlength=len(embed))
        return ce.cluster_vocab_weighted(embed, CLUSTERS, ce.hidden_metric(cal["hidden"]),
                                         (mass + 0.01).astype(np.float32), seed)
    if method == "calibrated":
        t = built["weighted"]
        cols, w = ce.targets(ids, probs, t.cluster_of())
        return t.with_centroids(ce.train_centroids(cal["hidden"], cols, w, t.centroids, epochs=4, seed=seed))
    t = ce.refine_assignment(built["calibrated"], cal["hidden"], ids, probs)
    cols, w = ce.targets(ids, probs, t.cluster_of())
    return t.with_centroids(ce.train_centroids(cal["hidden"], cols, w, t.centroids, epochs=4, seed=seed))


def cached_build(method: str, embed, cal, seed: int, built: dict, cache: Path) -> tuple[HeadTables, float]:
    path = cache / f"tables_{method}_s{seed}_n{len(cal['hidden'])}.npz"
    if path.exists():
        z = np.load(path)
        return HeadTables(z["centroids"], z["token_ordering"], z["token_mask"]), float(z["cpu_s"])
    c0 = _cpu()
    t = build(method, embed, cal, seed, built)
    cpu = _cpu() - c0
    np.savez(path, centroids=t.centroids, token_ordering=t.token_ordering, token_mask=t.token_mask, cpu_s=cpu)
    return t, cpu


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=hd.CACHE)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    embed = np.ascontiguousarray(hd.embedding_table(args.cache))
    cal = calibration(args.cache)
    held = {d: hd.load_split(d, "heldout", args.cache) for d in ("code", "prose")}
    print(f"calibration positions {len(cal['hidden'])}, held-out "
          + ", ".join(f"{d} {len(v['hidden'])}" for d, v in held.items()))
    built, rows = {}, {}
    for method in METHODS:
        if method not in args.methods and not any(METHODS.index(m) > METHODS.index(method) for m in args.methods):
            continue
        t0 = time.time()
        built[method], cpu = cached_build(method, embed, cal, args.seed, built, args.cache)
        if method in args.methods:
            rows[method] = {d: recall_figures(v["hidden"], embed, built[method], TOP_KS, full=(v["argmax"], v["lse"]))
                            for d, v in held.items()}
            print(f"{method}: built in {cpu:.0f} s cpu (this run {time.time() - t0:.0f} s wall)", flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def print_table(rows: dict) -> None:
    head = " ".join(f"{'k=' + str(k):>13s}" for k in TOP_KS)
    print(f"\n{'method':11s} {'data':6s} {head}   (recall@1 / mass)")
    for method, by_data in rows.items():
        for data, fig in by_data.items():
            cells = " ".join(f"{fig['k'][k]['recall']:6.4f}/{fig['k'][k]['mass']:.3f}" for k in TOP_KS)
            print(f"{method:11s} {data:6s} {cells}")


if __name__ == "__main__":
    main()
