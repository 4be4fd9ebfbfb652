"""What sampling costs next to greedy decoding, plain and drafting, one bundle, in one run.

    python benchmarks/bench_sampling.py BUNDLE [--threads 2] [--gen-tokens 48] [--repetitions 3]
        [--temperature 0.8] [--top-p 0.95] [--top-k 0] [--min-p 0] [--repetition-penalty 1] [--prompts README]
        [--draft-p-min 0,0.2,0.3]

A sampled token needs the target's distribution over the whole vocabulary (262,144 tokens for Gemma):
softmax, top-k, top-p and a draw, and a sampled verify pass one per position acceptance reads. Prints
tokens/s of each setting (plain, lookup K = 4, and hybrid and MTP K = 4 when the bundle has an MTP drafter),
greedy and sampled, the settings taking turns, as a ratio to plain greedy decoding. With a repetition penalty
(which the sampled settings take too) a third column: greedy decoding with the penalty alone. Session 29 (Gemma 3
270M fp32, Xeon VM): top-p had sorted the whole vocabulary, 25 ms a row; sampled plain decoding went from
15.0 to 22.9 tokens/s, sampled hybrid from 10.4 to 25.2 (docs/measurements.md). --draft-p-min: a hybrid and an
MTP row at each Draft.p_min listed (the MTP draft ends after a token the drafter gave less than it), taking turns
with the others.
"""

from __future__ import annotations

import edgemtp  # noqa: F401  (first: OpenBLAS's threads must not spin after numpy calls)

import argparse
import statistics

from edgemtp.errors import EdgemtpError, script_main
from edgemtp.runtime.engine import Draft, Engine
from edgemtp.runtime.sampling import Sampling

from lookup_ngram import PROMPTS  # noqa: E402  (this directory)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--prompts", default="README",
                    help=f"comma list of lookup_ngram's prompts ({', '.join(PROMPTS)}) or all; the ratios are "
                         "geometric means over them of each prompt's ratio")
    ap.add_argument("--draft-p-min", default="0", help="comma list of Draft.p_min: hybrid and MTP rows at each")
    args = ap.parse_args()
    try:
        p_mins = [Draft("mtp", 4, p_min=float(v)).p_min for v in args.draft_p_min.split(",")]
    except (ValueError, EdgemtpError) as e:
        ap.error(f"--draft-p-min {args.draft_p_min}: {e}")
    names = list(PROMPTS) if args.prompts == "all" else args.prompts.split(",")
    if unknown := [n for n in names if n not in PROMPTS]:
        ap.error(f"--prompts: no prompt {unknown[0]!r} (one of {', '.join(PROMPTS)}, or all)")
    engine = Engine.load(args.bundle, threads=args.threads)
    drafts = {"plain": None, "lookup K=4": Draft("lookup", 4)}
    for p_min in p_mins if engine.bundle.has_graph("drafter") else ():
        named = f" p_min {p_min:g}" if p_min else ""
        drafts |= {f"hybrid K=4{named}": Draft("hybrid", 4, p_min=p_min),
                   f"MTP K=4{named}": Draft("mtp", 4, p_min=p_min)}
    sampled = Sampling(args.temperature, top_k=args.top_k, top_p=args.top_p, seed=0, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty)
    settings = {"greedy": Sampling(), "sampled": sampled}
    if args.repetition_penalty != 1:
        settings["penalised greedy"] = Sampling(repetition_penalty=args.repetition_penalty)
    runs = [(name, kind) for name in drafts for kind in settings]
    speeds: dict[tuple[str, str, str], list[float]] = {(p, *run): [] for p in names for run in runs}
    for rep in range(args.repetitions):
        for p in names:
            for name, kind in (runs if rep % 2 == 0 else runs[::-1]):
                g = engine.generate(PROMPTS[p], args.gen_tokens, settings[kind], draft=drafts[name])
                speeds[p, name, kind].append(g.stats.decode_tokens / g.stats.decode_s)
    print(f"{args.bundle}: {engine.bundle.graph('target').quant}, {args.gen_tokens} tokens, temperature "
          f"{args.temperature} top-k {args.top_k} top-p {args.top_p} min-p {args.min_p} repetition penalty "
          f"{args.repetition_penalty}, {args.repetitions} turns, prompts {', '.join(names)}")
    print("| setting | " + " | ".join(f"{kind} tokens/s | {kind} ÷ plain greedy" for kind in settings) + " |")
    print("|---|" + "---|---|" * len(settings))
    for name in drafts:
        cells = []
        for kind in settings:
            medians = {p: statistics.median(speeds[p, name, kind]) for p in names}
            ratio = statistics.geometric_mean(medians[p] / statistics.median(speeds[p, "plain", "greedy"])
                                              for p in names)
            cells.append(f"{statistics.mean(medians.values()):.1f} | {ratio:.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    script_main(main)
