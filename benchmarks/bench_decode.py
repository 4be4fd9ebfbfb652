"""Prefill and decode speed of a bundle, decode step time vs context, and the bandwidth ceiling.

    python benchmarks/bench_decode.py BUNDLE [--threads 2] [--contexts 128,512,2048] [--rounds 7]
                                             [--pairs 150] [--huge-pages] [--small-folios] [--also OTHER_BUNDLE]
                                             [--packed-cache DIR]

Decode vs the ceiling is measured two ways. Rounds: a 64-token generation, then the bandwidth. Pairs: single
decode steps, each beside a bandwidth probe; the bandwidth of a shared machine drifts by a third within
minutes, so the ratio of each step to the probe run right beside it is the precise one (median of pairs).
`--huge-pages`: also loads the target with its weights on 2 MB pages (runtime/hugepages.py), `--small-folios`:
also a copy of the bundle cached in 4 KB folios and read through ONNX Runtime's own mappings
(head_huge_pages=False): the head table as decode steps read it before session 41, against the default's
mapping on 2 MB pages (runtime/head_pages.py), `--also B`:
another bundle of the same model (e.g. exported with --gemv-head), `--packed-cache DIR`: also the bundle loaded with
its packed weights mapped from a copy under DIR (runtime/packed_cache.py; built first if missing); their steps join
the same pairs, and
each prints its ratio to the ceiling and its paired speed-up over the first. The ceiling is the fastest of
the probe's three kernels (runtime/bandwidth.py) over all pairs, a step's bytes its weights and the KV cache
its attention reads at its context (bandwidth.decode_bytes; the weights alone are printed beside).
Decode step time should grow only as attention does: the cache is updated in place, never copied.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS (see its docstring)
import numpy as np

from edgemtp.runtime.bandwidth import BandwidthProbe, decode_bytes, kv_read_bytes, measure_bandwidth
from edgemtp.runtime.engine import Engine
from edgemtp.runtime.head_pages import pmd_mapped
from edgemtp.errors import script_main


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


def paired_ratios(engines: list[Engine], probe: BandwidthProbe, pairs: int) -> tuple[list, np.ndarray, list, list]:
    """Per engine, each decode step's speed over the ceiling the probe measured right beside it; the probe's
    kernels' bandwidths; per engine, each step's seconds and bytes.

    A step is what plain decoding does per token: one forward pass and the argmax of the logits. The
    engines' steps and the probe take turns (in rotating order), so all see the same machine. The probe's
    three kernels each read the weight once per pair; the ceiling is the one fastest over all pairs (taking
    the fastest of each pair's three would favour the probe by the noise alone). A step's bytes are the
    weights and the KV cache at its context (decode_bytes)."""
    caches = []
    for engine in engines:
        cache = engine.target.new_cache(1)
        engine.target.forward(np.arange(10, 138)[None], cache)  # a 128-token context, as the rounds have
        caches.append(cache)
    steps = [[] for _ in engines]
    nbytes = [[] for _ in engines]  # per step
    weights = [decode_bytes(e.bundle) for e in engines]  # + the KV read at each step's context
    slots = [e.bundle.target_contract.kv for e in engines]
    probes = []  # [pairs, kernels]: seconds per byte
    token = np.array([[42]])
    for i in range(pairs):
        jobs = list(range(len(engines))) + [None]
        jobs = jobs[i % len(jobs):] + jobs[:i % len(jobs)]
        for j in jobs:
            if j is None:
                probes.append(np.array(probe.times()) / probe.nbytes)
                continue
            if caches[j].lengths[0] >= 128 + 64:  # stay at the rounds' contexts (128 to 192 tokens)
                caches[j].lengths[:] = 128
            nbytes[j].append(weights[j] + kv_read_bytes(slots[j], int(caches[j].lengths[0])))
            t0 = time.perf_counter()
            logits, _ = engines[j].target.forward(token, caches[j])
            int(np.argmax(logits[0, -1]))
            steps[j].append(time.perf_counter() - t0)
    probes = np.array(probes)
    ceiling = probes[:, np.argmin(np.median(probes, axis=0))]
    # the ceiling's time for a step's bytes over the step's; and each kernel's median bytes/s
    steps, nbytes = [np.array(s) for s in steps], [np.array(n) for n in nbytes]
    return [ceiling * n / s for n, s in zip(nbytes, steps)], 1 / np.median(probes, axis=0), steps, nbytes


def small_folio_copy(bundle: Path, root: Path) -> Path:
    """A copy of the bundle whose target data file the page cache holds in 4 KB folios (read back page by page
    in random order after the copy is written and dropped; a sequential read or mapping made 37-94% of it 2 MB
    folios on the Xeon VM's ext4, depending on the read): what ONNX Runtime's own mappings read the head table
    from before session 41 unless the cache happened to hold it in 2 MB folios."""
    out = root / bundle.name
    shutil.copytree(bundle, out)
    with open(out / "target.onnx.data", "rb") as f:
        os.fsync(f.fileno())  # written back, so that the drop below drops every page
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        m.madvise(mmap.MADV_RANDOM)  # no readahead: each fault reads its own 4 KB
        pages = np.frombuffer(m, np.uint8)[::mmap.PAGESIZE]
        for i in np.random.default_rng(0).permutation(len(pages)).tolist():
            pages[i]
        del pages
        m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--rounds", type=int, default=7, help="decode runs, each followed by a bandwidth measurement")
    ap.add_argument("--pairs", type=int, default=150, help="decode steps, each beside a bandwidth probe")
    ap.add_argument("--huge-pages", action="store_true", help="also the target on 2 MB pages, side by side")
    ap.add_argument("--small-folios", action="store_true",
                    help="also a copy cached in 4 KB folios, its head through ONNX Runtime's mappings")
    ap.add_argument("--also", type=Path, action="append", default=[], help="another bundle of the model, side by side")
    ap.add_argument("--packed-cache", type=Path, help="also the bundle with its packed weights mapped from a copy here")
    ap.add_argument("--prompt-file", type=Path, default=Path(__file__).parent.parent / "edgemtp" / "cli" / "build.py")
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=args.threads, verify=False, mtp=False)  # plain decoding, as --no-draft
    ids = engine.encode(args.prompt_file.read_text())[:128]
    engine.generate(engine.decode(ids[:16]), max_new_tokens=4)  # warm-up
    # Each round decodes, then measures the bandwidth right away: on a shared machine the bandwidth drifts
    # by a third within minutes, so only a ratio taken side by side means anything (median of the rounds).
    weights = decode_bytes(engine.bundle)
    nbytes = decode_bytes(engine.bundle, len(ids) + 32)  # the mean context of a 64-token generation
    runs, ratios, ceilings = [], [], []
    for _ in range(args.rounds):
        stats = engine.generate(engine.decode(ids), max_new_tokens=64).stats
        bw = measure_bandwidth(args.threads, repeats=5)
        runs.append(stats)
        ceilings.append(bw / nbytes)
        ratios.append(stats.tokens_per_s / ceilings[-1])
    pp = max(s.prefill_tokens_per_s for s in runs)
    tg = [s.tokens_per_s for s in runs]
    print(f"threads={args.threads} prompt={runs[0].prefill_tokens} tokens, {args.rounds} rounds")
    print(f"prefill {pp:8.1f} tokens/s")
    print(f"decode  {np.median(tg):8.1f} tokens/s (rounds {min(tg):.1f}-{max(tg):.1f}), weights {weights / 1e9:.3f} GB "
          f"+ KV read {(nbytes - weights) / 1e6:.1f} MB per token, ceiling {np.median(ceilings):.1f} tokens/s "
          f"(rounds {min(ceilings):.1f}-{max(ceilings):.1f})")
    print(f"decode = {np.median(ratios):.0%} of the ceiling measured right after it (median; rounds "
          f"{min(ratios):.0%}-{max(ratios):.0%}; {np.median(ratios) * weights / nbytes:.0%} counting the weights only)")
    # the paired engines stop spinning after each run, so none takes the cores from another or the probe
    pages = [False, True] if args.huge_pages else [False]
    variants = [(b, huge, True, None) for b in [args.bundle, *args.also] for huge in pages]
    scratch = tempfile.TemporaryDirectory(dir=args.bundle.parent) if args.small_folios else None
    if scratch:
        variants.append((small_folio_copy(args.bundle, Path(scratch.name)), False, False, None))
    if args.packed_cache:
        variants.append((args.bundle, False, True, args.packed_cache))
    paired, labels = [], []
    for bundle, huge, head, packed in variants:
        paired.append(Engine.load(bundle, threads=args.threads, verify=False, mtp=True, huge_pages=huge,
                                  head_huge_pages=head, packed_cache=packed))
        labels.append(f"{bundle.name}{', 2 MB pages' if huge else ''}{', packed cache' if packed else ''}"
                      f"{'' if head else ' (a copy in 4 KB folios, the head through ONNX Runtime)'}")
    for label, e in zip(labels, paired):
        for table in (e.head_tables.tables.values() if e.head_tables else ()):
            view = table.numpy()
            on_huge = pmd_mapped(view.ctypes.data, view.ctypes.data + view.nbytes)
            print(f"{label}: head table {on_huge >> 20} of {view.nbytes >> 20} MB on 2 MB pages")
    ratios, kernels, steps, sizes = paired_ratios(paired, BandwidthProbe(args.threads), args.pairs)
    print("probe (median of pairs): " + ", ".join(f"{name} {bw / 1e9:.1f} GB/s" for name, bw in
                                                  zip(("ORT Gemm", "ORT GEMV", "numpy GEMV"), kernels)))
    for label, r, n, e in zip(labels, ratios, sizes, paired):
        weights_only = r * decode_bytes(e.bundle) / n
        print(f"decode step = {np.median(r):.1%} of the ceiling measured beside it ({label}; median of {len(r)} "
              f"pairs, quartiles {np.percentile(r, 25):.1%}-{np.percentile(r, 75):.1%}; "
              f"{np.median(weights_only):.1%} counting the weights only)")
    for label, s in zip(labels[1:], steps[1:]):
        speedup = steps[0] / s  # the engines step through the same contexts, pair by pair
        print(f"{label}: decode steps {np.median(speedup):.3f}x as fast as {labels[0]}'s (median of pairs; "
              f"mean {speedup.mean():.3f} +- {speedup.std() / np.sqrt(len(speedup)):.3f})")
    del paired
    if scratch:
        scratch.cleanup()
    base = None
    for ctx in [int(c) for c in args.contexts.split(",")]:
        if ctx + 1 > engine.capacity:
            print(f"context {ctx}: skipped (bundle capacity {engine.capacity})")
            continue
        t = step_time(engine, ctx)
        base = base or t
        print(f"context {ctx:5d}: decode step {t * 1e3:7.2f} ms  ({t / base:.2f}x the first context)")


if __name__ == "__main__":
    script_main(main)
