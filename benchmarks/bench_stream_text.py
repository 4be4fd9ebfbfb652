"""What Engine.stream's text costs a token, as generations grow: the newest tokens decoded against all of them.

    python benchmarks/bench_stream_text.py TOKENIZER_JSON [--lengths 500,1000,2000,4000] [--repetitions 3]

Feeds the ids of this repository's README (and docs, for length) one by one, as a stream's generated tokens
come, to runtime.detokenizer.IncrementalDecoder and to a decode of every id so far (what stream did before
session 32), and prints the cost of a token at the end of each length, side by side, as a ratio. Session 32
(Gemma 3 270M's tokenizer, Xeon VM): 0.86 ms a token at 4,000 tokens decoding all of them, a few percent of
an int4 decode step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from edgemtp.checkpoint import open_tokenizer
from edgemtp.runtime.detokenizer import IncrementalDecoder, decode_text
from edgemtp.errors import script_main

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer", type=Path, help="a tokenizer.json (a bundle's)")
    ap.add_argument("--lengths", default="500,1000,2000,4000")
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    tok = open_tokenizer(args.tokenizer)
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "measurements.md").read_text()
    ids = tok.encode(text, add_special_tokens=False).ids
    window = 50  # tokens timed at the end of each length
    print(f"{'tokens':>7} {'incremental ms/token':>21} {'whole text ms/token':>20} {'ratio':>7}")
    for n in map(int, args.lengths.split(",")):
        if n > len(ids):
            raise SystemExit(f"--lengths: {n} is more than the {len(ids)} tokens of the text")
        if n < window:  # ids[:n - window] would be nearly the whole text, and no token would be timed
            raise SystemExit(f"--lengths: {n} is fewer than the {window} tokens timed at the end of each length")
        inc_t, whole_t = [], []
        for _ in range(args.repetitions):
            inc = IncrementalDecoder(lambda i: decode_text(tok, i))
            for t in ids[:n - window]:
                inc.add(t)
            t0 = time.perf_counter()
            for t in ids[n - window:n]:
                inc.add(t)
            inc_t.append((time.perf_counter() - t0) / window)
            t0 = time.perf_counter()
            for k in range(n - window + 1, n + 1):
                decode_text(tok, ids[:k])
            whole_t.append((time.perf_counter() - t0) / window)
        a, b = statistics.median(inc_t), statistics.median(whole_t)
        print(f"{n:7d} {a * 1e3:21.4f} {b * 1e3:20.4f} {b / a:6.0f}x")


if __name__ == "__main__":
    script_main(main)
