"""What sampling costs next to greedy decoding, plain and drafting, one bundle, in one run.

    python benchmarks/bench_sampling.py BUNDLE [--threads 2] [--gen-tokens 48] [--repetitions 3]
        [--temperature 0.8] [--top-p 0.95] [--top-k 0]

A sampled token needs the target's distribution over the whole vocabulary (262,144 tokens for Gemma):
softmax, top-k, top-p and a draw, and a sampled verify pass one per position acceptance reads. Prints
tokens/s of each setting (plain, lookup K = 4, and hybrid K = 4 when the bundle has an MTP drafter),
greedy and sampled, the settings taking turns, as a ratio to plain greedy decoding. Session 29 (Gemma 3
270M fp32, Xeon VM): top-p had sorted the whole vocabulary, 25 ms a row; sampled plain decoding went from
15.0 to 22.9 tokens/s, sampled hybrid from 10.4 to 25.2 (docs/measurements.md).
"""

from __future__ import annotations

import edgemtp  # noqa: F401  (first: OpenBLAS's threads must not spin after numpy calls)

import argparse
import statistics

from edgemtp.runtime.engine import Draft, Engine
from edgemtp.runtime.sampling import Sampling

from lookup_ngram import PROMPTS  # noqa: E402  (this directory)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0)
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=args.threads)
    drafts = {"plain": None, "lookup K=4": Draft("lookup", 4)}
    if engine.bundle.has_graph("drafter"):
        drafts["hybrid K=4"] = Draft("hybrid", 4)
    sampled = Sampling(args.temperature, top_k=args.top_k, top_p=args.top_p, seed=0)
    runs = [(name, kind) for name in drafts for kind in ("greedy", "sampled")]
    prompt = PROMPTS["README"]
    speeds: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for rep in range(args.repetitions):
        for name, kind in (runs if rep % 2 == 0 else runs[::-1]):
            g = engine.generate(prompt, args.gen_tokens, sampled if kind == "sampled" else Sampling(),
                                draft=drafts[name])
            speeds[name, kind].append(g.stats.decode_tokens / g.stats.decode_s)
    base = statistics.median(speeds["plain", "greedy"])
    print(f"{args.bundle}: {engine.bundle.graph('target').quant}, {args.gen_tokens} tokens, temperature "
          f"{args.temperature} top-k {args.top_k} top-p {args.top_p}, {args.repetitions} turns")
    print("| setting | greedy tokens/s | sampled tokens/s | sampled ÷ plain greedy |")
    print("|---|---|---|---|")
    for name in drafts:
        greedy, sample = (statistics.median(speeds[name, kind]) for kind in ("greedy", "sampled"))
        print(f"| {name} | {greedy:.1f} | {sample:.1f} | {sample / base:.2f}x |")


if __name__ == "__main__":
    main()
