"""edgemtp against onnxruntime-genai on the same machine, side by side: prefill and plain greedy decode.

    pip install onnxruntime-genai==0.11.4       # its runtime, over the onnxruntime edgemtp already uses
    # its model builder wants transformers 4 (0.11.4; later versions break on Gemma 3's rope config), so
    # build its model in a venv of its own, from the model directory the bundle was exported from:
    python -m venv /tmp/og && /tmp/og/bin/pip install torch==2.13.0 "transformers<5" onnx-ir \
        onnxruntime-genai==0.11.4
    /tmp/og/bin/python -m onnxruntime_genai.models.builder -i MODEL_DIR -o OG_MODEL -p fp32 -e cpu
    python benchmarks/vs_ortgenai.py BUNDLE OG_MODEL [--threads 2] [--rounds 5] [--new 64]
    python benchmarks/vs_ortgenai.py INT4_BUNDLE OG_INT4_MODEL --reference FP32_BUNDLE [--tokens 1024]

The issue's reference figures for onnxruntime-genai (fp32 decode 22.6 tokens/s "at the memory-bandwidth
ceiling", int4 72.9, prefill ~350) were measured on another machine; this prints what it does here, beside
edgemtp. Both engines get the same 128 prompt token ids and the same thread count and decode greedily
without drafting; each round runs onnxruntime-genai and then edgemtp, so a machine whose speed drifts moves
both, and the ratio is taken round by round. It also counts how many generated tokens agree (two fp32
graphs of one checkpoint should agree on all of them).

With --reference (an fp32 bundle of the same checkpoint), it then scores both quantized models against it,
teacher-forced, on bench_quant's held-out texts (code, prose; --tokens tokens each): perplexity change,
top-1 agreement and mean KL(fp32 || quant), as bench_quant prints them for edgemtp's own quantizations.
The speed of an int4 model says little without that: fewer bits read per token is faster and worse.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS
import numpy as np

from edgemtp.errors import script_main
from edgemtp.runtime.engine import Engine
from edgemtp.runtime.stats import Stats


def genai_round(model, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    """(prefill tokens/s, decode tokens/s, tokens) of one greedy run of onnxruntime-genai."""
    gen = GenaiTarget(model, len(ids) + new).new_cache(1)
    t0 = time.perf_counter()
    gen.append_tokens(np.array([ids], np.int32))  # the prompt's forward pass
    tokens = []
    for i in range(new):
        gen.generate_next_token()  # the first call samples the prompt's logits; each later one runs a decode step
        tokens.append(int(gen.get_next_tokens()[0]))
        if i == 0:  # the first token sampled ends the prefill, as edgemtp's prefill_s (runtime/stats.py)
            now = time.perf_counter()
            prefill, t0 = len(ids) / (now - t0), now
    return prefill, (new - 1) / (time.perf_counter() - t0), tokens


def edgemtp_round(engine: Engine, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    stats = Stats()
    tokens = list(engine.token_ids(ids, new, stats=stats))  # plain greedy decoding of these very ids
    return stats.prefill_tokens_per_s, stats.tokens_per_s, tokens


class GenaiTarget:
    """onnxruntime-genai behind the two calls bench_quant.score makes of an engine's target: a fresh
    cache (here a generator) per window, and the logits of every position of a piece appended to it."""

    def __init__(self, model, capacity: int):
        self.model, self.capacity = model, capacity

    def new_cache(self, batch: int):
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.capacity, do_sample=False)
        return og.Generator(self.model, params)

    def forward(self, piece: np.ndarray, gen, n_logits: int):
        gen.append_tokens(piece.astype(np.int32))
        logits = np.asarray(gen.get_output("logits"), np.float32)  # [1, len(piece), vocab]
        return (logits[:, -n_logits:],)


class GenaiEngine:
    def __init__(self, model, capacity: int):
        self.target = GenaiTarget(model, capacity)


def quality(engine: Engine, model, reference: Path, tokens: int, threads: int) -> None:
    from bench_quant import heldout_ids, score  # benchmarks/ is on sys.path when this runs as a script

    ref = Engine.load(reference, threads=threads)
    print(f"quality against {reference}, teacher-forced over {tokens} held-out tokens per domain:")
    print(f"{'domain':8s} {'engine':18s} {'ppl change':>10s} {'top-1 agree':>11s} {'KL mean':>8s}")
    for domain in ("code", "prose"):
        ids = heldout_ids(ref.tokenizer, domain, tokens)
        rows = score({"onnxruntime-genai": GenaiEngine(model, ref.capacity), "edgemtp": engine}, ref, ids)
        for name, r in rows.items():
            print(f"{domain:8s} {name:18s} {r['perplexity_delta_pct']:+9.1f}% {r['top1_agreement']:11.4f} "
                  f"{r['kl_mean']:8.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("genai_model", type=Path, help="a model directory built by onnxruntime-genai's builder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per round")
    ap.add_argument("--prompt-file", type=Path, default=Path(__file__).parent.parent / "edgemtp" / "cli" / "build.py")
    ap.add_argument("--reference", type=Path, help="an fp32 bundle: also score both models' quality against it")
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens per domain for --reference")
    args = ap.parse_args()
    if args.new < 2:  # the decode rate is over the tokens after the first
        ap.error(f"--new {args.new}: must be at least 2")
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise SystemExit("onnxruntime-genai is not installed: pip install onnxruntime-genai==0.11.4")
    if not (args.genai_model / "genai_config.json").is_file():
        raise SystemExit(f"{args.genai_model}: no genai_config.json (build it with onnxruntime_genai.models.builder)")
    config = og.Config(str(args.genai_model))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    # mtp=False: plain decoding, as --no-draft loads it (a bundle with an MTP drafter would otherwise keep the
    # target's threads from spin-waiting, which slows plain decode steps)
    engine = Engine.load(args.bundle, threads=args.threads, mtp=False)
    ids = engine.encode(args.prompt_file.read_text())[:128]
    print(f"threads={args.threads} prompt={len(ids)} tokens, {args.new} new tokens, {args.rounds} rounds "
          f"(onnxruntime-genai {og.__version__}, then edgemtp, in each)")
    genai_round(model, ids, 8)  # warm both: first runs fault the weights in
    edgemtp_round(engine, ids, 8)
    rows = []
    for r in range(args.rounds):
        g, e = genai_round(model, ids, args.new), edgemtp_round(engine, ids, args.new)
        agree = next((i for i, (a, b) in enumerate(zip(g[2], e[2])) if a != b), len(g[2]))
        rows.append((g[0], g[1], e[0], e[1], agree))
        print(f"round {r + 1}: onnxruntime-genai prefill {g[0]:6.0f} decode {g[1]:5.1f} tokens/s | "
              f"edgemtp prefill {e[0]:6.0f} decode {e[1]:5.1f} | decode {e[1] / g[1]:.3f}x, "
              f"prefill {e[0] / g[0]:.2f}x | tokens agree for the first {agree} of {len(g[2])}")
    a = np.array(rows)
    print(f"median: onnxruntime-genai prefill {np.median(a[:, 0]):.0f} decode {np.median(a[:, 1]):.1f} tokens/s; "
          f"edgemtp prefill {np.median(a[:, 2]):.0f} decode {np.median(a[:, 3]):.1f}; edgemtp decodes "
          f"{np.median(a[:, 3] / a[:, 1]):.3f}x and prefills {np.median(a[:, 2] / a[:, 0]):.2f}x as fast "
          f"(median of per-round ratios); tokens agree for the first {int(a[:, 4].min())}+ in every round")
    if args.reference:
        quality(engine, model, args.reference, args.tokens, args.threads)


if __name__ == "__main__":
    script_main(main)
