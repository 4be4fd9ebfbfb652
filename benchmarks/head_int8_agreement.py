"""Does the clustered head with int8 rows pick the same token as with fp32 rows? On real hidden states.

Gemma 3 270M's own held-out final hidden states (benchmarks/head_data.py; run it first, `--bundle
FP32_BUNDLE` makes it quick) go one position at a time (as a drafter step does: the int8 path quantizes
h per call) through two standalone head graphs built from the same head tables: fp32 rows, and int8 rows
(`head.clustered_graph(..., int8_ordering=...)`, what `edgemtp export --draft-head-rows int8` builds).
Prints, per domain, recall@1 of each against the full head's argmax and the positions where they differ.

    python benchmarks/head_int8_agreement.py [HEAD_FILE_OR_DIR] [--positions 8192] [--top-k 32] [--cache DIR]

HEAD defaults to the shipped drafter's tables (edgemtp/drafters/gemma3-270m).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgemtp.calibration.head_report import load_head
from edgemtp.exporters import builder
from edgemtp.exporters import head as H
from edgemtp.errors import script_main
from head_data import CACHE, load_split

SHIPPED = Path(__file__).resolve().parent.parent / "edgemtp" / "drafters" / "gemma3-270m"
EMBED = "embed"


def sessions(tables, embed: np.ndarray, top_k: int, tmp: Path) -> dict[str, ort.InferenceSession]:
    shape = H.ClusteredShape(len(embed), embed.shape[1], tables.centroids.shape[0], top_k)
    weights = {EMBED: embed, "centroids": tables.centroids, "token_ordering": tables.token_ordering,
               "token_mask": tables.token_mask}
    out = {}
    for name, ordering in (("fp32 rows", None), ("int8 rows", tables.token_ordering)):
        path = tmp / f"{name.replace(' ', '_')}.onnx"
        builder.save(H.clustered_graph(shape, EMBED, int8_ordering=ordering), path, weights.__getitem__)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        out[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("head", type=Path, nargs="?", default=SHIPPED)
    ap.add_argument("--positions", type=int, default=8192, help="held-out positions per domain")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    # the hidden states first: without them (head_data.py not run) that is what to say, not embed.npy's absence
    held = {domain: load_split(domain, "heldout", args.cache) for domain in ("code", "prose")}
    tables, _ = load_head(args.head)
    embed = np.load(args.cache / "embed.npy", mmap_mode="r")
    with tempfile.TemporaryDirectory(prefix="head_int8_") as tmp:
        heads = sessions(tables, embed, args.top_k, Path(tmp))
        for domain, data in held.items():
            hidden, argmax = data["hidden"][:args.positions], data["argmax"][:args.positions]
            picks = {name: np.array([s.run([H.TOKEN_IDS], {H.INPUT: hidden[i:i + 1].astype(np.float32)})[0][0, 0]
                                     for i in range(len(hidden))]) for name, s in heads.items()}
            recall = ", ".join(f"{name} {np.mean(p == argmax):.4f}" for name, p in picks.items())
            differ = int(np.sum(picks["fp32 rows"] != picks["int8 rows"]))
            print(f"{domain}: {len(hidden)} positions, k = {args.top_k}: recall@1 {recall}; "
                  f"int8 and fp32 rows pick different tokens at {differ} positions")


if __name__ == "__main__":
    script_main(main)
