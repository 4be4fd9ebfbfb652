"""Quantized bundles vs fp32 in one run: size, decode speed and quality, each as a ratio to fp32.

    python benchmarks/bench_quant.py FP32_BUNDLE [--quants int8,int4] [--variant LABEL=QUANT:JSON ...]
        [--domains code,prose] [--tokens 4096] [--text-file F ...] [--threads 2] [--keep DIR]

Quantizes FP32_BUNDLE to each quant (preset options) and each --variant (e.g.
`int4-nofreq=int4:{"frequent_rows": 0}`: quantize_bundle's keywords as JSON; "calibration": null for
none) in a temporary directory (or DIR; the default calibration on the corpora's train split is made
once and shared by every variant), then prints per bundle: target-graph size and its ratio to fp32;
decode tokens/s and its ratio (64 new tokens after a 128-token prompt, greedy, best of 3; the engines
take turns so that load from other jobs hits all alike); and per text: perplexity change vs fp32,
top-1 agreement and mean KL(fp32 || quant).

Texts: the held-out split (edgemtp.drafter.data, by path hash; never the train split the quantizer
calibrates on) of each --domains entry, `--tokens` tokens each: code = CPython stdlib source, prose =
half Python docs reST, half Shakespeare; or --text-file files. Every text is cut into 512-token
windows (BOS first, fresh KV cache each) and every position is scored; the fp32 reference runs once
per window piece and all bundles are scored against it. The machine is shared: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS (see its docstring)
import numpy as np

from edgemtp.evaluate import kl_divergence, text_windows
from edgemtp.exporters.quantize import quantize_bundle
from edgemtp.runtime.engine import Engine
from edgemtp.errors import script_main

NEW_TOKENS, PROMPT_TOKENS, REPEATS, WINDOW, STEP = 64, 128, 3, 512, 64


def graph_bytes(bundle: Path) -> int:
    return sum((bundle / f).stat().st_size for f in ("target.onnx", "target.onnx.data"))


def heldout_ids(tokenizer, domain: str, n: int) -> list[int]:
    """The first n tokens of the domain's held-out documents (sorted by path); prose: half docs, half
    Shakespeare."""
    from edgemtp.drafter import data as D

    if domain == "prose":
        return heldout_ids(tokenizer, "docs", n // 2) + heldout_ids(tokenizer, "shakespeare", n - n // 2)
    ids: list[int] = []
    for d in sorted(D.documents(domain, "heldout"), key=lambda d: d.rel):
        ids += tokenizer.encode(D.read(d), add_special_tokens=False).ids
        if len(ids) >= n:
            break
    return ids[:n]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(engines: dict[str, Engine], ref: Engine, ids: list[int]) -> dict[str, dict]:
    """Perplexity change, top-1 agreement and KL of each engine against `ref` over ids' windows."""
    tally = {q: {"nll": [], "agree": [], "kl": []} for q in engines}
    ref_nll = []
    for win in text_windows(ids, min(WINDOW, ref.capacity), ref.bundle.model.get("bos_token_id")):
        win = np.asarray(win, np.int64)
        caches = {q: e.target.new_cache(1) for q, e in {**engines, "_ref": ref}.items()}
        for start in range(0, len(win) - 1, STEP):
            piece = win[None, start:start + STEP]
            targets = win[start + 1:start + 1 + piece.shape[1]]
            rows = np.arange(len(targets))
            def fwd(e, cache):
                return log_softmax(e.target.forward(piece, cache, n_logits=piece.shape[1])[0][0])[:len(targets)]
            p = fwd(ref, caches["_ref"])
            ref_nll.extend(-p[rows, targets])
            for q, e in engines.items():
                lq = fwd(e, caches[q])
                tally[q]["nll"].extend(-lq[rows, targets])
                tally[q]["agree"].extend(p.argmax(-1) == lq.argmax(-1))
                tally[q]["kl"].extend(kl_divergence(p, lq))
    base = math.exp(float(np.mean(ref_nll)))
    return {q: {"tokens": len(ref_nll), "reference_perplexity": base,
                "perplexity_delta_pct": 100.0 * (math.exp(float(np.mean(t["nll"]))) / base - 1.0),
                "top1_agreement": float(np.mean(t["agree"])), "kl_mean": float(np.mean(t["kl"]))}
            for q, t in tally.items()}


def decode_speeds(bundles: dict[str, Path], prompt_ids: list[int], threads: int) -> tuple[dict[str, float], str]:
    """Best-of-REPEATS decode tokens/s per bundle (the bundles taking turns), and how it was measured."""
    engines = {q: Engine.load(b, threads=threads, verify=False, mtp=False) for q, b in bundles.items()}  # as --no-draft
    first = next(iter(engines.values()))
    n_prompt = min(PROMPT_TOKENS, first.capacity // 2, len(prompt_ids))  # tiny test bundles hold only a few dozen
    n_new = min(NEW_TOKENS, first.capacity - n_prompt - 1)
    prompt = first.decode(prompt_ids[:n_prompt])
    for e in engines.values():
        e.generate(prompt, max_new_tokens=4)  # warm-up: first runs allocate
    best = dict.fromkeys(engines, 0.0)
    for _ in range(REPEATS):
        for q, e in engines.items():  # plain decoding (no draft): the target's own speed
            best[q] = max(best[q], e.generate(prompt, max_new_tokens=n_new).stats.tokens_per_s)
    return best, (f"{n_new} new tokens after a {n_prompt}-token prompt, greedy, plain decoding, {threads} threads, "
                  f"best of {REPEATS}")


def shared_calibration(fp32: Path, work: Path):
    """One calibration (token order, activation statistics with every second moment) for all variants."""
    from edgemtp import bundle as bundle_mod
    from edgemtp.calibration.activations import CORPORA
    from edgemtp.exporters.quantize import CALIBRATION_TOKENS, calibrate, scheme

    t0 = time.perf_counter()
    b = bundle_mod.load(fp32, verify=False)
    work.mkdir(parents=True, exist_ok=True)
    calib = calibrate(b, b.graph("target").path, scheme("int8", gptq=True), CORPORA, CALIBRATION_TOKENS, work / "x",
                      None)
    print(f"calibrated on {calib.source} in {time.perf_counter() - t0:.0f} s", flush=True)
    return calib


def variants(args) -> dict[str, tuple[str, dict]]:
    out = {q: (q, {}) for q in args.quants.split(",") if q}
    for v in args.variant:
        label, _, spec = v.partition("=")
        quant, _, options = spec.partition(":")
        out[label] = (quant, json.loads(options or "{}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="fp32 bundle")
    ap.add_argument("--quants", default="int8,int4")
    ap.add_argument("--variant", action="append", default=[], help="LABEL=QUANT:{json options}")
    ap.add_argument("--domains", default="code,prose")
    ap.add_argument("--text-file", type=Path, action="append", default=[])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens scored per text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--keep", type=Path, help="write the quantized bundles here instead of a temp dir")
    args = ap.parse_args()
    ref = Engine.load(args.bundle, threads=args.threads, verify=False)
    texts = {d: heldout_ids(ref.tokenizer, d, args.tokens) for d in args.domains.split(",") if d}
    texts.update({f.name: ref.tokenizer.encode(f.read_text(errors="replace"), add_special_tokens=False).ids[
        :args.tokens] for f in args.text_file})
    with tempfile.TemporaryDirectory(prefix="bench_quant.") as tmp:
        root = args.keep or Path(tmp)
        bundles, calib = {}, None
        for label, (quant, options) in variants(args).items():
            t0 = time.perf_counter()
            shown = options  # what the variant asked for, before the shared calibration joins
            if "calibration" not in options:  # the default (corpora) calibration: made once, shared
                calib = calib or shared_calibration(args.bundle, root)
                options = {**options, "calibration": calib}
            bundles[label] = quantize_bundle(args.bundle, root / label, quant, overwrite=True, **options)
            print(f"quantized {label} ({quant} {shown}) in {time.perf_counter() - t0:.0f} s", flush=True)
        speed, how = ({}, "not measured") if args.no_speed else \
            decode_speeds({"fp32": args.bundle, **bundles}, next(iter(texts.values())), args.threads)
        engines = {q: Engine.load(b, threads=args.threads, verify=False) for q, b in bundles.items()}
        quality = {name: score(engines, ref, ids) for name, ids in texts.items()}
        report(args.bundle, bundles, speed, how, quality)


def report(fp32: Path, bundles: dict, speed: dict, how: str, quality: dict) -> None:
    size0 = graph_bytes(fp32)
    names = list(quality)
    first = {n: next(iter(q.values())) for n, q in quality.items()}
    texts = ", ".join(f"{n} ({r['tokens']} tokens, fp32 ppl {r['reference_perplexity']:.3f})" for n, r in first.items())
    print(f"\ntexts: {texts}; windows of {WINDOW}; decode: {how}")
    head = " | ".join(f"top-1 {n} | Δppl {n} | KL {n}" for n in names)
    print(f"| bundle | size MB | size/fp32 | decode tok/s | decode/fp32 | {head} |")
    print("|---" * (5 + 3 * len(names)) + "|")
    s0 = speed.get("fp32")
    print(f"| fp32 | {size0 / 1e6:.1f} | 1.000 | {f'{s0:.1f}' if s0 else '-'} | 1.00x |" + " |" * (3 * len(names)))
    for q, b in bundles.items():
        size = graph_bytes(b)
        cells = " | ".join(f"{quality[n][q]['top1_agreement']:.4f} | {quality[n][q]['perplexity_delta_pct']:+.2f}% | "
                           f"{quality[n][q]['kl_mean']:.4f}" for n in names)
        sp = f"{speed[q]:.1f} | {speed[q] / s0:.2f}x" if s0 else "- | -"
        print(f"| {q} | {size / 1e6:.1f} | {size / size0:.3f} | {sp} | {cells} |")


if __name__ == "__main__":
    script_main(main)
