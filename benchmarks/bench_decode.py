"""Prefill and decode speed of a bundle, decode step time vs context, and the bandwidth ceiling.

    python benchmarks/bench_decode.py BUNDLE [--threads 2] [--contexts 128,512,2048] [--rounds 7]

Decode step time should grow only as attention does: the cache is updated in place, never copied.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from edgemtp.runtime.bandwidth import measure_bandwidth
from edgemtp.runtime.engine import Engine


def step_time(engine: Engine, context: int, steps: int = 16) -> float:
    """Median seconds of one decode step with `context` tokens already in the cache."""
    cache = engine.target.new_cache(1)
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, size=(1, context))
    for start in range(0, context, 512):  # chunked prefill keeps activations small
        engine.target.forward(ids[:, start:start + 512], cache)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.target.forward(np.array([[42]]), cache)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def weight_bytes(bundle: Path) -> int:
    """Bytes a decode step reads: every weight once (the tied embedding is read whole by the head)."""
    return (bundle / "target.onnx.data").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--rounds", type=int, default=7, help="decode runs, each followed by a bandwidth measurement")
    ap.add_argument("--prompt-file", type=Path, default=Path(__file__).parent.parent / "edgemtp" / "cli.py")
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=args.threads, verify=False, mtp=False)  # plain decoding, as --no-draft
    ids = engine.encode(args.prompt_file.read_text())[:128]
    engine.generate(engine.decode(ids[:16]), max_new_tokens=4)  # warm-up
    # Each round decodes, then measures the bandwidth right away: on a shared machine the bandwidth drifts
    # by a third within minutes, so only a ratio taken side by side means anything (median of the rounds).
    nbytes = weight_bytes(args.bundle)
    runs, ratios, ceilings = [], [], []
    for _ in range(args.rounds):
        stats = engine.generate(engine.decode(ids), max_new_tokens=64).stats
        bw = measure_bandwidth(args.threads, repeats=3)
        runs.append(stats)
        ceilings.append(bw / nbytes)
        ratios.append(stats.tokens_per_s / ceilings[-1])
    pp = max(s.prefill_tokens_per_s for s in runs)
    tg = [s.tokens_per_s for s in runs]
    print(f"threads={args.threads} prompt={runs[0].prefill_tokens} tokens, {args.rounds} rounds")
    print(f"prefill {pp:8.1f} tokens/s")
    print(f"decode  {np.median(tg):8.1f} tokens/s (rounds {min(tg):.1f}-{max(tg):.1f}), weights {nbytes / 1e9:.2f} GB, "
          f"ceiling {np.median(ceilings):.1f} tokens/s (rounds {min(ceilings):.1f}-{max(ceilings):.1f})")
    print(f"decode = {np.median(ratios):.0%} of the ceiling measured right after it (median; rounds "
          f"{min(ratios):.0%}-{max(ratios):.0%})")
    base = None
    for ctx in [int(c) for c in args.contexts.split(",")]:
        if ctx + 1 > engine.capacity:
            print(f"context {ctx}: skipped (bundle capacity {engine.capacity})")
            continue
        t = step_time(engine, ctx)
        base = base or t
        print(f"context {ctx:5d}: decode step {t * 1e3:7.2f} ms  ({t / base:.2f}x the first context)")


if __name__ == "__main__":
    main()
