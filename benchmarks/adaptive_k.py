"""A fixed draft length against the adaptive one (`--adaptive`: each round drafts the length that pays by
measured verify / draft times and acceptance, runtime.draft_length), one bundle, in one run.

    python benchmarks/adaptive_k.py BUNDLE [--threads 2] [--gen-tokens 64] [--repetitions 2]
        [--modes lookup,mtp,hybrid] [--k 2,4]

Prints, per prompt (this repository's own code and README, CPython stdlib code, a story opening), plain
greedy tokens/s and each setting's as a ratio to it, the settings taking turns (the machines' speed
drifts within minutes), then the geometric mean of each column. A fixed setting drafts K every round
(lookup: on a repeat of 2+ tokens for an int8 / int4 CPU target, any repeat otherwise); an adaptive one
drafts at most K, lookup on any repeat.
"""

from __future__ import annotations

import edgemtp  # noqa: F401  (first: OpenBLAS's threads must not spin after numpy calls)

import argparse
import math
import statistics

from edgemtp.runtime.engine import Draft, Engine
from edgemtp.errors import script_main

from lookup_ngram import PROMPTS  # noqa: E402  (this directory: the same five prompts)


def settings(modes: list[str], ks: list[int]) -> dict[str, Draft | None]:
    out: dict[str, Draft | None] = {"plain": None}
    for mode in modes:
        for k in ks:
            out[f"{mode} K={k}"] = Draft(mode, k)
        out[f"{mode} adaptive K<={max(ks)}"] = Draft(mode, max(ks), adaptive=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--modes", default="lookup,mtp,hybrid")
    ap.add_argument("--k", default="2,4")
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=args.threads)
    modes = [m for m in args.modes.split(",") if m in ("lookup",) or engine.bundle.has_graph("drafter")]
    runs = settings(modes, [int(k) for k in args.k.split(",")])
    print(f"{args.bundle}: {engine.bundle.graph('target').quant}, {args.gen_tokens} greedy tokens, "
          f"{args.repetitions} turns")
    print("| prompt | plain tokens/s | " + " | ".join(s for s in runs if s != "plain") + " |")
    print("|---" * len(runs) + "|---|")
    ratios: dict[str, list[float]] = {s: [] for s in runs if s != "plain"}
    for name, text in PROMPTS.items():
        speeds: dict[str, list[float]] = {s: [] for s in runs}
        tokens = {}
        for rep in range(args.repetitions):
            for setting in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
                g = engine.generate(text, max_new_tokens=args.gen_tokens, draft=runs[setting])
                speeds[setting].append(g.stats.decode_tokens / g.stats.decode_s)
                tokens[setting] = g.tokens
        assert all(t == tokens["plain"] for t in tokens.values()), f"{name}: a setting changed the greedy tokens"
        plain = statistics.median(speeds["plain"])
        for s in ratios:
            ratios[s].append(statistics.median(speeds[s]) / plain)
        print(f"| {name} | {plain:.1f} | " + " | ".join(f"{ratios[s][-1]:.2f}x" for s in ratios) + " |", flush=True)
    print("| geometric mean | | " + " | ".join(f"{math.exp(statistics.mean(map(math.log, v))):.2f}x"
                                          for v in ratios.values()) + " |")


if __name__ == "__main__":
    script_main(main)
