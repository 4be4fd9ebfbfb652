"""Decode speed with the target's small passes reusing their IOBinding (the default) vs binding afresh.

    python benchmarks/bench_bindings.py BUNDLE [--threads 2] [--rounds 7] [--new 64] [--draft none|hybrid]

The two modes take turns in one process (edgemtp.runtime.target.REUSED_PASS_MAX 16 vs 0), each round
generating from the same 128-token prompt; prints tokens/s per mode (median, range) and the median of the
rounds' ratios. Also the Python time around one decode step's session run, per mode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS (see its docstring)
import numpy as np

import edgemtp.runtime.target as T
from edgemtp.runtime.engine import Draft, Engine
from edgemtp.errors import script_main

MODES = {"reused": 16, "fresh": 0}


def python_overhead(engine: Engine, steps: int = 40) -> float:
    """Median seconds per decode step spent outside session.run_with_iobinding."""
    session = engine.target.session
    run, inside = session.run_with_iobinding, []

    def timed(io, *args):
        t0 = time.perf_counter()
        run(io, *args)
        inside.append(time.perf_counter() - t0)

    session.run_with_iobinding = timed
    try:
        cache, total = engine.target.new_cache(1), []
        engine.target.forward(np.arange(100, 228)[None], cache)
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.target.forward(np.array([[42]]), cache)
            total.append(time.perf_counter() - t0)
    finally:
        session.run_with_iobinding = run
    return float(np.median(np.array(total[1:]) - np.array(inside[2:])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--draft", default="none", help="none (plain decoding) or a --draft mode, K = 4")
    ap.add_argument("--prompt-file", type=Path, default=Path(__file__).parent.parent / "edgemtp" / "cli" / "build.py")
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=args.threads, mtp=args.draft in ("mtp", "hybrid", "auto"))
    prompt = engine.decode(engine.encode(args.prompt_file.read_text())[:128])
    draft = None if args.draft == "none" else Draft(args.draft, 4)
    speeds = {m: [] for m in MODES}
    overhead = {}
    for mode, limit in MODES.items():
        T.REUSED_PASS_MAX = limit
        overhead[mode] = python_overhead(engine)
        engine.generate(prompt, max_new_tokens=8, draft=draft)  # warm-up
    for _ in range(args.rounds):
        for mode, limit in MODES.items():
            T.REUSED_PASS_MAX = limit
            speeds[mode].append(engine.generate(prompt, max_new_tokens=args.new, draft=draft).stats.tokens_per_s)
    T.REUSED_PASS_MAX = MODES["reused"]
    print(f"threads={args.threads} draft={args.draft} {args.new} tokens x {args.rounds} rounds")
    for mode, v in speeds.items():
        print(f"{mode:7s} {np.median(v):6.2f} tokens/s ({min(v):.2f}-{max(v):.2f}); python around a decode "
              f"step's run {overhead[mode] * 1e3:.3f} ms")
    ratio = np.array(speeds["reused"]) / np.array(speeds["fresh"])
    print(f"reused / fresh: {np.median(ratio):.3f}x (median of the rounds; {ratio.min():.3f}-{ratio.max():.3f})")


if __name__ == "__main__":
    script_main(main)
