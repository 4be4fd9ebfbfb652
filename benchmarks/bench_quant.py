"""Quantized bundles vs fp32 in one run: size, decode speed and quality, each as a ratio to fp32.

    python benchmarks/bench_quant.py BUNDLE_FP32 --text-file F [--text-file G ...]
        [--quants int8,int4] [--threads 2] [--max-tokens 4096] [--window 512] [--keep DIR]

Quantizes BUNDLE_FP32 to each quant in a temporary directory (or DIR), then prints per quant:
target-graph size and its ratio to fp32; decode tokens/s and its ratio (same prompt, greedy,
64 new tokens after a 128-token prompt, best of 3; the engines take turns so that load from other jobs hits all alike);
perplexity and its change vs fp32, top-1 agreement and mean KL(fp32 || quant) over the text files.
The machine is shared: compare the ratios, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edgemtp.evaluate import evaluate
from edgemtp.exporters.quantize import quantize_bundle
from edgemtp.runtime.engine import Engine

NEW_TOKENS, PROMPT_TOKENS, REPEATS = 64, 128, 3


def graph_bytes(bundle: Path) -> int:
    return sum((bundle / f).stat().st_size for f in ("target.onnx", "target.onnx.data"))


def decode_speeds(bundles: dict[str, Path], prompt_text: str, threads: int) -> tuple[dict[str, float], str]:
    """Best-of-REPEATS decode tokens/s per bundle (the bundles taking turns), and how it was measured."""
    engines = {q: Engine.load(b, threads=threads, verify=False) for q, b in bundles.items()}
    first = next(iter(engines.values()))
    n_prompt = min(PROMPT_TOKENS, first.capacity // 2)  # tiny test bundles hold only a few dozen
    n_new = min(NEW_TOKENS, first.capacity - n_prompt - 1)
    prompt = first.decode(first.encode(prompt_text)[:n_prompt])
    for e in engines.values():
        e.generate(prompt, max_new_tokens=4)  # warm-up: first runs allocate
    best = dict.fromkeys(engines, 0.0)
    for _ in range(REPEATS):
        for q, e in engines.items():
            stats = e.generate(prompt, max_new_tokens=n_new).stats
            best[q] = max(best[q], stats.tokens_per_s)
    return best, (f"{n_new} new tokens after a {n_prompt}-token prompt, greedy, {threads} threads, "
                  f"best of {REPEATS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="fp32 bundle")
    ap.add_argument("--text-file", type=Path, action="append", required=True)
    ap.add_argument("--quants", default="int8,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens of text scored (per quant)")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--keep", type=Path, help="write the quantized bundles here instead of a temp dir")
    args = ap.parse_args()
    text = "\n\n".join(f.read_text(errors="replace") for f in args.text_file)
    with tempfile.TemporaryDirectory(prefix="bench_quant.") as tmp:
        root = args.keep or Path(tmp)
        bundles = {"fp32": args.bundle}
        for q in args.quants.split(","):
            t0 = time.perf_counter()
            bundles[q] = quantize_bundle(args.bundle, root / q, q, overwrite=True)
            print(f"quantized {q} in {time.perf_counter() - t0:.0f} s", flush=True)
        speed, how = decode_speeds(bundles, text, args.threads)
        quality = {q: evaluate(b, text, reference_bundle=args.bundle, window=args.window, threads=args.threads,
                               max_tokens=args.max_tokens, verify=False)
                   for q, b in bundles.items() if q != "fp32"}
        report(bundles, speed, how, quality, args)


def report(bundles: dict, speed: dict, how: str, quality: dict, args) -> None:
    size0, any_q = graph_bytes(bundles["fp32"]), next(iter(quality.values()), None)
    if any_q:
        print(f"\ntext: {', '.join(str(f) for f in args.text_file)}; {any_q['tokens']} tokens scored in "
              f"{any_q['windows']} windows of {any_q['window']}; decode: {how}")
    print("| quant | size MB | size/fp32 | decode tok/s | decode/fp32 | ppl | Δppl | top-1 | KL mean | KL p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for q, b in bundles.items():
        size = graph_bytes(b)
        r = quality.get(q)
        ppl = (f"{r['perplexity']:.3f} | {r['perplexity_delta_pct']:+.2f}% | {r['top1_agreement']:.4f} | "
               f"{r['kl_mean']:.5f} | {r['kl_p99']:.4f}") if r else \
            (f"{any_q['reference_perplexity']:.3f} | | | | " if any_q else " | | | | ")
        print(f"| {q} | {size / 1e6:.1f} | {size / size0:.3f} | {speed[q]:.1f} | {speed[q] / speed['fp32']:.2f}x "
              f"| {ppl} |")


if __name__ == "__main__":
    main()
