"""A packed cache (Engine.load(packed_cache=DIR), runtime/packed_cache.py) against the default load: memory, load
time, disk and plain decoding speed, side by side in one run.

    python benchmarks/bench_packed.py BUNDLE [--cache DIR] [--threads 2] [--pairs 30] [--new 48]

Memory and load time: each way loaded in a fresh process (the first packed load builds the copy: a fresh --cache,
the default, times the build), anonymous memory and RSS after load, and RSS after generating 16 tokens. Speed:
the two engines in one process take turns, in ABBA order, each generating --new greedy tokens (plain decoding)
after a code prompt; the ratio of each pair's decode times is the figure (the machine is shared: a pair's two
runs see the same load).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS
import numpy as np

from edgemtp.errors import script_main
from edgemtp.runtime.engine import Engine

LOAD = """
import json, re, sys, time
from edgemtp.runtime.engine import Engine
t = time.perf_counter()
engine = Engine.load(sys.argv[1], threads=int(sys.argv[3]), mtp=False, packed_cache=sys.argv[2] or None)
load_s = time.perf_counter() - t
def mb():
    with open("/proc/self/smaps_rollup") as f:
        text = f.read()
    return [int(re.search(rf"^{k}:\\s+(\\d+)", text, re.M).group(1)) / 1024 for k in ("Rss", "Anonymous")]
loaded = mb()
engine.generate("def main():", max_new_tokens=16)
print(json.dumps({"load_s": load_s, "rss": loaded[0], "anon": loaded[1], "rss_gen": mb()[0]}))
"""


def load_in_process(bundle: Path, cache: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, str(bundle), cache, str(threads)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def disk_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--cache", type=Path, help="the packed cache (default: a new one, removed at the end)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--new", type=int, default=48, help="tokens generated per run")
    ap.add_argument("--prompt-file", type=Path, default=Path(__file__).parent.parent / "edgemtp" / "cli" / "build.py")
    args = ap.parse_args()
    scratch = None if args.cache else tempfile.TemporaryDirectory(dir=args.bundle.parent, prefix=".bench-packed-")
    cache = args.cache or Path(scratch.name)
    rows = [("default load", load_in_process(args.bundle, "", args.threads)),
            ("packed cache, first", load_in_process(args.bundle, str(cache), args.threads)),
            ("packed cache, again", load_in_process(args.bundle, str(cache), args.threads))]
    for label, r in rows:
        print(f"{label:20s} load {r['load_s']:6.2f} s   anonymous {r['anon']:7,.0f} MB   RSS {r['rss']:7,.0f} MB, "
              f"{r['rss_gen']:7,.0f} MB after 16 tokens")
    print(f"packed cache on disk: {disk_bytes(cache) / 1e9:.2f} GB (the bundle's target: "
          f"{sum(p.stat().st_size for p in args.bundle.glob('target.onnx*')) / 1e9:.2f} GB)")

    engines = {"default": Engine.load(args.bundle, threads=args.threads, mtp=False),
               "packed": Engine.load(args.bundle, threads=args.threads, mtp=False, packed_cache=cache)}
    prompt = engines["default"].decode(engines["default"].encode(args.prompt_file.read_text())[:128])
    step = {name: [] for name in engines}
    tokens = {}
    for i in range(args.pairs + 1):
        for name in (list(engines) if i % 2 else list(engines)[::-1]):
            g = engines[name].generate(prompt, max_new_tokens=args.new)
            tokens[name] = g.tokens
            if i:  # the first pair warms both
                step[name].append(g.stats.decode_s / g.stats.decode_tokens)
    ratio = np.array(step["default"]) / np.array(step["packed"])
    print(f"decode step: default {np.median(step['default']) * 1e3:.2f} ms, packed cache "
          f"{np.median(step['packed']) * 1e3:.2f} ms; packed cache {np.median(ratio):.3f}x as fast (median of "
          f"{len(ratio)} pairs, quartiles {np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f})")
    print(f"same tokens: {tokens['default'] == tokens['packed']}")
    if scratch:
        scratch.cleanup()


if __name__ == "__main__":
    script_main(main)
