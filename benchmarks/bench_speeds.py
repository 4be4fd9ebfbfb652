"""Plain decode tokens/s of several bundles in one run, each as a ratio to the first.

    python benchmarks/bench_speeds.py FP32_BUNDLE INT4_BUNDLE [MORE ...] [--threads 2] [--runs 2]
        [--contexts 128,512,2048,4000]

64 greedy tokens after a 128-token code prompt, best of 3 per run, the engines taking turns so that load
from other jobs hits all alike (bench_quant.decode_speeds). With --contexts, also the median decode step
of each bundle with that many tokens in the cache (bench_decode.step_time), best over the runs, the
engines again taking turns. Compare the ratios: the machine is shared.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_decode import step_time
from bench_quant import decode_speeds

from edgemtp.runtime.engine import Engine
from edgemtp.errors import script_main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--contexts", default="", help="comma list: also time a decode step at these contexts")
    args = ap.parse_args()
    first = Engine.load(args.bundles[0], verify=False)
    prompt_ids = first.encode((Path(__file__).parent.parent / "edgemtp" / "cli" / "build.py").read_text())
    del first
    labels = {f"{i}:{b}": b for i, b in enumerate(args.bundles)}
    for run in range(args.runs):
        best, how = decode_speeds(labels, prompt_ids, args.threads)
        base = next(iter(best.values()))
        print(f"run {run + 1} ({how})")
        for label, tps in best.items():
            print(f"  {label.split(':', 1)[1]:40s} {tps:6.1f} tokens/s  {tps / base:.2f}x the first")
    contexts = [int(c) for c in args.contexts.split(",") if c]
    if contexts:
        engines = [Engine.load(b, threads=args.threads, verify=False, mtp=False) for b in args.bundles]  # as --no-draft
        best = {(i, c): float("inf") for i in range(len(engines)) for c in contexts}
        for _ in range(args.runs):
            for c in contexts:
                for i, engine in enumerate(engines):
                    best[i, c] = min(best[i, c], step_time(engine, c))
        print("decode step (ms) at context " + " / ".join(map(str, contexts)))
        for i, b in enumerate(args.bundles):
            print(f"  {str(b):40s} " + " / ".join(f"{best[i, c] * 1e3:.1f}" for c in contexts))


if __name__ == "__main__":
    script_main(main)
