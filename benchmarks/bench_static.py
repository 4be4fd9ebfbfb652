"""A static (NPU-shaped) bundle's speculative decoding on this CPU: each draft mode and K against plain
decoding of the same static bundle, the target graph's runs counted, and every output checked against
plain decoding of the dynamic bundle of the same model.

    python benchmarks/bench_static.py DYNAMIC_BUNDLE STATIC_BUNDLE [--threads 2] [--gen-tokens 64]
        [--runs "plain,hybrid:2,hybrid:4,hybrid:4:adaptive,mtp:2,lookup:2,lookup:4"]

A draft of up to W - 1 tokens verifies in one window (W: the static graph's verify window); a longer one
in two. One prompt, one run per mode in the order given: on these shared machines compare the modes of
one run, not runs of different days.
"""

from __future__ import annotations

import edgemtp  # noqa: F401  (first: OpenBLAS's threads must not spin after numpy calls; see edgemtp/__init__.py)

import argparse
import time
import warnings

from edgemtp.runtime.engine import Draft, Engine
from edgemtp.runtime.speculative import SpecStats
from edgemtp.errors import script_main

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dynamic")
    ap.add_argument("static")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", default="plain,hybrid:2,hybrid:4,hybrid:4:adaptive,mtp:2,lookup:2,lookup:4")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the MTP drafter beside a spinning target: not what is measured here
    dyn = Engine.load(args.dynamic, threads=args.threads)
    st = Engine.load(args.static, threads=args.threads, mtp=True)
    runs = [0]
    run = st.target.session.run_with_iobinding
    st.target.session.run_with_iobinding = lambda *a, **k: (runs.__setitem__(0, runs[0] + 1), run(*a, **k))[1]
    ids = dyn.encode(PROMPT)
    want = list(dyn.token_ids(ids, args.gen_tokens))
    print(f"static verify window W = {st.target.window}, {len(ids)}-token prompt, {args.gen_tokens} new tokens")
    base, specs = None, args.runs.split(",")
    for spec in specs:
        mode, *rest = spec.split(":")
        if mode in ("mtp", "hybrid") and not st.bundle.has_graph("drafter"):  # e.g. exported without --drafter
            print(f"{spec:20s} skipped: {args.static} has no MTP drafter")
            continue
        draft = None if mode == "plain" else Draft(mode, int(rest[0]), adaptive="adaptive" in rest)
        stats, runs[0], t0 = SpecStats(), 0, time.perf_counter()
        got = list(st.token_stream(ids, args.gen_tokens, draft=draft, stats=stats))
        speed = stats.decode_tokens / stats.decode_s
        base = base or speed  # the first of --runs: plain by default
        print(f"{spec:20s} {speed:6.1f} tokens/s ({speed / base:.2f}x {specs[0]})  graph runs {runs[0]:3d}  "
              f"rounds {stats.rounds:3d}  same tokens as dynamic plain: {got == want}  "
              f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    script_main(main)
