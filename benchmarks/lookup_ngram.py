"""Prompt lookup's shortest match (min_ngram) against plain decoding, one bundle, in one run.

    python benchmarks/lookup_ngram.py BUNDLE [--threads 2] [--gen-tokens 64] [--repetitions 3]

Lookup drafts the tokens that followed the most recent earlier occurrence of the history's last n tokens
(n from 3 down to min_ngram). A single-token match (min_ngram 1) drafts often and is often wrong: cheap on
an fp32 target, whose verify window costs about one decode step whatever its width, costly on an int4
target on the CPU, whose MatMulNBits passes grow with the window. Prints, per prompt (this repository's
own code and README, CPython stdlib code, a story opening), plain tokens/s and each setting's greedy
tokens/s as a ratio to it, the settings taking turns. The runtime drafts on 2+ tokens for quantized CPU
targets, on any match otherwise (Engine.drafter).
"""

from __future__ import annotations

import edgemtp  # noqa: F401  (first: OpenBLAS's threads must not spin after numpy calls)

import argparse
import inspect
import json.decoder
import statistics
from pathlib import Path

from edgemtp.runtime.drafting import NoDrafter, PromptLookupDrafter
from edgemtp.runtime.engine import Engine
from edgemtp.runtime.sampling import Sampling
from edgemtp.runtime.speculative import Speculative, SpecStats
from edgemtp.errors import script_main

ROOT = Path(__file__).parent.parent
PROMPTS = {"build.py": (ROOT / "edgemtp" / "cli" / "build.py").read_text()[:2000],
           "README": (ROOT / "README.md").read_text()[3000:5000],
           "inspect.py": Path(inspect.__file__).read_text()[:2000],
           "json": Path(json.decoder.__file__).read_text()[:2000],
           "story": "Once upon a time, in a small village by the sea, there lived an old fisherman who"}
SETTINGS = {"plain": (None, 0), "min 1, K 4": (1, 4), "min 2, K 4": (2, 4), "min 3, K 4": (3, 4), "min 2, K 2": (2, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=args.threads, mtp=False)  # threads spin: no MTP drafter
    print("| prompt | plain tokens/s | " + " | ".join(s for s in SETTINGS if s != "plain") + " |")
    print("|---" * len(SETTINGS) + "|---|")
    for name, text in PROMPTS.items():
        ids, speeds = engine.encode(text), {s: [] for s in SETTINGS}
        for rep in range(args.repetitions):
            for setting in (list(SETTINGS) if rep % 2 == 0 else list(reversed(SETTINGS))):
                least, k = SETTINGS[setting]
                drafter = NoDrafter() if least is None else PromptLookupDrafter(max(3, least), least)
                stats = SpecStats()
                Speculative(engine.target, drafter, k).generate([ids], args.gen_tokens, Sampling(), engine.stop_ids,
                                                                stats)
                speeds[setting].append(stats.decode_tokens / stats.decode_s)
        plain = statistics.median(speeds["plain"])
        cells = [f"{statistics.median(v) / plain:.2f}x" for s, v in speeds.items() if s != "plain"]
        print(f"| {name} | {plain:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    script_main(main)
