"""Two bundles of one model side by side, on what differs between export layouts (e.g. the transposed head
table of the fp32 default against `--no-gemv-head`): prefill, a drafter step, and end-to-end generation.

    python benchmarks/bench_bundles.py OLD NEW [--threads 2] [--repetitions 4] [--gen-tokens 96]

Every figure is taken in turns (OLD, NEW, then NEW, OLD, ...) and given as NEW / OLD: the median of the
per-turn ratios, since the bandwidth of these shared machines drifts by a third within minutes. Plain decode
against the bandwidth ceiling: benchmarks/bench_decode.py OLD --also NEW.
"""

from __future__ import annotations

import edgemtp  # noqa: F401  (first: OpenBLAS's threads must not spin after numpy calls; see edgemtp/__init__.py)

import argparse
import time
from pathlib import Path

import numpy as np

from edgemtp import bundle as bundle_mod
from edgemtp.runtime.drafter_session import DrafterSession
from edgemtp.runtime.engine import Draft, Engine
from edgemtp.errors import script_main

ROOT = Path(__file__).parent.parent
PROMPTS = {"code": (ROOT / "edgemtp" / "cli" / "build.py").read_text()[:2000],
           "prose": (ROOT / "README.md").read_text()[3000:5000]}


def turns(n: int, jobs: list) -> list[list[float]]:
    """Seconds of each job, n times each, taking turns in alternating order."""
    times = [[] for _ in jobs]
    for r in range(n):
        for i in (range(len(jobs)) if r % 2 == 0 else reversed(range(len(jobs)))):
            t0 = time.perf_counter()
            jobs[i]()
            times[i].append(time.perf_counter() - t0)
    return times


def ratio_line(label: str, old: list[float], new: list[float], unit=lambda t: f"{t * 1e3:.2f} ms") -> str:
    r = np.array(new) / np.array(old)
    return (f"{label:28s} OLD {unit(np.median(old)):>14s}  NEW {unit(np.median(new)):>14s}  "
            f"NEW/OLD time {np.median(r):.3f}")


def drafter_step(engine: Engine, threads: int):
    """One clustered-head draft step after a 128-token prefill, with a 64-token context (None: no drafter)."""
    b = engine.bundle
    if not b.has_graph("drafter"):
        return None
    d = DrafterSession.load(b, threads=threads)
    cache = engine.target.new_cache(1)
    _, hidden = engine.target.forward(np.arange(10, 138)[None], cache)
    recent = np.random.default_rng(0).integers(100, engine.target.contract.vocab_size, size=(1, 64))
    return lambda: d.step(np.array([[42]]), hidden[:, -1:], cache, slice(0, 1), False, recent)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=4, help="generations per bundle, mode and prompt")
    ap.add_argument("--gen-tokens", type=int, default=96)
    args = ap.parse_args()
    # mtp=True: the engines' threads stop spinning after each run, so neither takes the cores from the other
    engines = [Engine.load(p, threads=args.threads, verify=False, mtp=True) for p in (args.old, args.new)]
    ids = np.array([engines[0].encode(PROMPTS["code"])[:128]])

    def prefill(e):
        return lambda: e.target.forward(ids, e.target.new_cache(1))

    old, new = turns(30, [prefill(e) for e in engines])
    print(ratio_line("prefill, 128 tokens", old, new, lambda t: f"{128 / t:.0f} tokens/s"))
    steps = [drafter_step(e, args.threads) for e in engines]
    if all(steps):
        old, new = turns(400, steps)
        print(ratio_line("drafter step (64 recent)", old, new))
    del engines, steps
    # generation: one engine at a time (each as `generate` loads it), alternating
    modes = {"plain": None, "mtp K=2": Draft("mtp", k=2), "mtp K=4": Draft("mtp", k=4),
             "mtp adaptive": Draft("mtp", k=4, adaptive=True), "auto K=4": Draft("auto", k=4)}
    if not all(bundle_mod.load(p, verify=False).has_graph("drafter") for p in (args.old, args.new)):
        modes = {m: d for m, d in modes.items() if not m.startswith("mtp")}  # auto drafts by lookup then
    tps = {(p, m, d): [] for p in (0, 1) for m in modes for d in PROMPTS}
    for r in range(args.repetitions):
        for p in ((0, 1) if r % 2 == 0 else (1, 0)):
            e = Engine.load((args.old, args.new)[p], threads=args.threads)
            e.generate(PROMPTS["code"][:200], max_new_tokens=8)  # warm-up
            for domain, prompt in PROMPTS.items():
                for mode, draft in modes.items():
                    tps[(p, mode, domain)].append(e.generate(prompt, max_new_tokens=args.gen_tokens, draft=draft)
                                                  .stats.tokens_per_s)
            del e
    for mode in modes if args.repetitions else []:
        for domain in PROMPTS:
            old, new = np.array(tps[(0, mode, domain)]), np.array(tps[(1, mode, domain)])
            print(f"{mode + ', ' + domain:28s} OLD {np.median(old):6.1f} tokens/s  NEW {np.median(new):6.1f} tokens/s  "
                  f"NEW/OLD speed {np.median(new / old):.3f}")


if __name__ == "__main__":
    script_main(main)
