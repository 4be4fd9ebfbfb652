"""Sliding layers with several KV heads (Gemma 4 E4B, Gemma 3 4B and up): a decode step with the window's copy
(kv_cache's shadows) against the same step over the whole buffers, as every bundle of such a model ran before.

    python benchmarks/window_copies.py [--workdir /tmp/window_copies] [--layers 10] [--kv-heads 2]
        [--contexts 512,2048,8192] [--pairs 10] [--quant fp32|int8|int4] [--bundle B]

Without --bundle it writes an E2B-bodied checkpoint of random weights (benchmarks/e2b_scale.py's shapes, with
E4B's 2 KV heads on its layers, `--layers` of them, a 16,384-token vocabulary) and exports it in fp32 with the
KV capacity the longest context needs (`--quant int4`: weight-only int4, uncalibrated: where the weights
read less, the cache's share of a step is larger). At each context the two kinds of step alternate in pairs on one cache
(blocks of 4 steps of each kind, each step rolled back, so both read the same context; a block's first step
untimed: it fills the copies again), and the ratio of the medians is printed: the
machine's speed drifts, so only steps taken side by side compare. The tokens are the same either way (the
parity tests check the logits; this prints the largest difference it saw)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS
import numpy as np

from edgemtp.errors import EdgemtpError, script_main
from edgemtp.runtime.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from e2b_scale import e2b_config, write_checkpoint  # noqa: E402


def make_bundle(workdir: Path, layers: int, kv_heads: int, capacity: int, quant: str) -> Path:
    hf = {**e2b_config(layers, 16_384), "num_key_value_heads": kv_heads}
    model = workdir / "model"
    if model.exists():
        shutil.rmtree(model)
    write_checkpoint(model, hf)
    bundle = workdir / "bundle"
    subprocess.run([sys.executable, "-m", "edgemtp", "export", str(model), "-o", str(bundle), "--overwrite",
                    "--max-context", str(capacity), "--quant", quant,
                    *(["--calibration", "none"] if quant in ("int8", "int4") else [])], check=True)
    return bundle


def paired_steps(engine: Engine, context: int, pairs: int) -> tuple[float, float, float]:
    """(median step with the copies, median step over the whole buffers, largest logit difference) at `context`."""
    target = engine.target
    cache = target.new_cache(1)
    ids = np.random.default_rng(0).integers(3, min(1000, target.contract.vocab_size), size=(1, context))
    for start in range(0, context, 512):
        target.forward(ids[:, start:start + 512], cache)
    fits = cache.window_fits  # the shadows' room check: False binds the whole buffers
    times: dict[bool, list[float]] = {True: [], False: []}
    logits: dict[bool, np.ndarray] = {}
    for _ in range(pairs):
        for copies in (True, False):
            cache.window_fits = fits if copies else (lambda offset, end: False)
            for i in range(4):  # the first step of a block after the other kind fills the copies again: untimed
                t0 = time.perf_counter()
                logits[copies], _ = target.forward(ids[:, -1:], cache)
                if i:
                    times[copies].append(time.perf_counter() - t0)
                cache.rollback(0, context)
    return float(np.median(times[True])), float(np.median(times[False])), float(np.abs(logits[True] -
                                                                                       logits[False]).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/window_copies"))
    ap.add_argument("--bundle", type=Path, help="a bundle to time instead of a random E2B-bodied one")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--quant", default="fp32", help="the random model's export: fp32, int8 or int4")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    # at least 3 windows (512 each): the cache makes copies only where 1.5 windows are at most half its capacity
    bundle = args.bundle or make_bundle(args.workdir, args.layers, args.kv_heads, max(max(contexts) + 64, 3 * 512),
                                         args.quant)
    engine = Engine.load(bundle)
    slots, capacity = engine.target.contract.kv, engine.target.contract.capacity
    if not any(s.window and s.num_heads > 1 for s in slots):  # one KV head: the window is read in place
        raise EdgemtpError(f"{bundle}: no sliding layer with several KV heads, so no window copies: its one-row "
                           "passes read the window in place (kv_cache.shadow_plan), and there is nothing to compare")
    if engine.target.new_cache(1).unviewable:  # both kinds of step would bind the whole buffers
        raise EdgemtpError(f"{bundle}: its cache makes no window copies at a capacity of {capacity:,} (1.5 windows "
                           f"of {engine.target.contract.sliding_window:,} are over half of it: kv_cache.shadow_plan), "
                           "so there is nothing to compare")
    print(f"{bundle}: {sum(1 for s in slots if s.window and s.num_heads > 1)} of {len(slots)} KV-owning layers "
          f"slide with several KV heads (window {engine.target.contract.sliding_window})")
    for context in contexts:
        copies, whole, diff = paired_steps(engine, context, args.pairs)
        print(f"context {context:6d}: step {copies * 1e3:7.2f} ms with the window's copies, {whole * 1e3:7.2f} ms "
              f"over the whole buffers: {whole / copies:.2f}x (logits {diff:.1e} apart)")


if __name__ == "__main__":
    script_main(main)
