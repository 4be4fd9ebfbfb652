"""What a process holds to load a bundle and generate with it, and how long the load takes; beside another
checkout of edgemtp with --baseline.

    python benchmarks/bench_memory.py BUNDLE [BUNDLE ...] [--baseline SRC_DIR] [--rounds 3]
                                      [--draft auto|none] [--tokens 32]

Each run is a fresh interpreter: Engine.load, then a generation of --tokens tokens (drafting as --draft
says; auto loads the MTP drafter where `edgemtp generate` would). It prints the peak resident memory
(VmHWM), and after the generation the resident anonymous memory (the process's own; the rest is the
bundle's page cache, which the kernel can drop and which counts a transposed fp32 head twice) and the
whole RSS. `--baseline DIR`: a checkout of edgemtp (e.g. `git worktree add DIR OLD_COMMIT`) run the same
way, in turns with this one, round by round; medians and their ratio.

Session 39 (Xeon VM, against 32333a4, which parsed the tokenizer after building the target's session,
left the parse's freed ~190 MB resident (runtime/heap.py) and imported onnx to check the graphs
(onnx_wire.py)), Gemma 3 270M generating 32 tokens as `generate` does, medians of 3: int4 peak RSS 623 vs
856 MB (0.73x), anonymous after 452 vs 656 MB, Engine.load 1.55 vs 1.89 s (0.82x); fp32 peak 3,181 vs
3,293 MB (0.97x), Engine.load 2.34 vs 3.12 s (0.75x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
from pathlib import Path

from edgemtp.errors import script_main

ROOT = Path(__file__).resolve().parent.parent
# Read here, not imported from edgemtp: with --baseline the child runs an older checkout's edgemtp.
STATUS = """
def status_mb():
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f
                if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:"))}
"""
CHILD = STATUS + """
import json, sys, time
import edgemtp
from edgemtp.runtime.engine import Engine
from edgemtp.runtime.requests import Draft
t0 = time.perf_counter()
engine = Engine.load(sys.argv[1], threads=2, verify=False)
load_s = time.perf_counter() - t0
draft = None if sys.argv[3] == "none" else Draft(sys.argv[3])
engine.generate("def fibonacci(n):", max_new_tokens=int(sys.argv[2]), draft=draft)
print(json.dumps({**status_mb(), "load_s": load_s, "source": edgemtp.__file__}))
"""


def run(source: Path, bundle: Path, tokens: int, draft: str) -> dict:
    source, bundle = Path(source).resolve(), Path(bundle).resolve()  # the child runs in `source`, not here
    env = {**os.environ, "PYTHONPATH": str(source)}
    r = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(tokens), draft], capture_output=True,
                       text=True, env=env, cwd=source)
    if r.returncode:
        raise SystemExit(f"{bundle} with {source}: the run failed:\n{r.stderr}")
    out = json.loads(r.stdout.splitlines()[-1])
    if not Path(out["source"]).resolve().is_relative_to(source.resolve()):
        raise SystemExit(f"{source}: the run imported edgemtp from {out['source']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--baseline", type=Path, help="another checkout of edgemtp, run the same way in turns")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--draft", default="auto", help="auto (as generate) or none (plain decoding)")
    args = ap.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("reads /proc/self/status: Linux only")
    if args.baseline and not (args.baseline / "edgemtp" / "__init__.py").is_file():
        raise SystemExit(f"--baseline: {args.baseline} is not a checkout of edgemtp")
    sources = [ROOT] + ([args.baseline] if args.baseline else [])
    print(f"{'bundle':<20} {'':<28} {'this':>8}" + (f" {'baseline':>9} {'ratio':>7}" if args.baseline else ""))
    for bundle in args.bundles:
        runs: list[list[dict]] = [[] for _ in sources]
        for i in range(args.rounds):
            for j in (range(len(sources)) if i % 2 == 0 else reversed(range(len(sources)))):
                runs[j].append(run(sources[j], bundle, args.tokens, args.draft))
        for key, label, scale in (("VmHWM", "peak RSS, MB", 1), ("RssAnon", "anonymous after, MB", 1),
                                  ("VmRSS", "RSS after, MB", 1), ("load_s", "Engine.load, ms", 1000)):
            values = [statistics.median(r[key] for r in rs) * scale for rs in runs]
            row = f"{bundle.name:<20} {label:<28} {values[0]:8.0f}"
            if args.baseline:
                row += f" {values[1]:9.0f} {values[0] / values[1]:7.3f}"
            print(row)


if __name__ == "__main__":
    script_main(main)
