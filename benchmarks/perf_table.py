"""The README's performance table in one run: decode tokens/s with drafting ÷ without, same bundle.

    python benchmarks/perf_table.py BUNDLE [--threads 2] [--draft-k 0,2,4,6] [--batch 1,4]
        [--gen-tokens 128] [--repetitions 3] [--draft auto,mtp,lookup,hybrid] [--head auto|clustered|full]
        [--fast-verify]

Prompts are held-out code (CPython stdlib source) and prose (python docs reST / Shakespeare), split
by path hash exactly as the drafter's training data is (edgemtp.drafter.data). Greedy decoding.
Prints a markdown table: per domain, batch and K, tg tokens/s (mean ± std), the ratio to K = 0 measured
in the same run, tokens per round (a draft and its verification) and acceptance; then the bandwidth ceiling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgemtp.drafter import data
from edgemtp.errors import EdgemtpError, script_main
from edgemtp.runtime import profile as prof
from edgemtp.runtime.profile_report import ceiling_line, mean_and_spread


def heldout_text(domain: str, max_chars: int = 200_000) -> str:
    docs = data.documents(domain, "heldout")
    text, n = [], 0
    for d in sorted(docs, key=lambda d: d.rel):
        t = data.read(d)
        text.append(t)
        n += len(t)
        if n > max_chars:
            break
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-k", default="0,2,4,6")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--draft", default="auto", help="comma list: auto, mtp, hybrid, lookup")
    ap.add_argument("--head", default="clustered", help="MTP drafter heads: clustered, full or auto (both)")
    ap.add_argument("--domains", default="code,prose")
    ap.add_argument("--fast-verify", action="store_true", help="batched verify graph with its own packed weights")
    args = ap.parse_args()
    ks = [int(k) for k in args.draft_k.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    try:  # every domain's text before any measuring: a missing corpus (prose's docs) fails at once
        texts = {domain: heldout_text(domain) for domain in args.domains.split(",")}
    except EdgemtpError as e:
        raise SystemExit(f"--domains: {e}")
    print("| domain | batch | drafter | K | tg tokens/s | × no draft | tokens/round | acceptance "
          "| draft / verify / other ms per round |")
    print("|---|---|---|---|---|---|---|---|---|")
    result = None
    for domain, text in texts.items():
        result = prof.profile(args.bundle, (args.prompt_tokens,), args.gen_tokens, args.repetitions, ks,
                              batches, "cpu", args.threads, args.draft, text, head=args.head,
                              fast_verify=args.fast_verify, reset_peak=True)  # its own process, as the command
        base = {r["batch"]: r["tg_tokens_per_s"]["mean"] for r in result["rows"]
                if not r["skipped"] and r["draft_k"] == 0}
        for r in result["rows"]:
            mode = r["drafter"] + (f" ({r['head']} head)" if r["head"] and r["drafter"] != "lookup" else "")
            if r["skipped"]:
                print(f"| {domain} | {r['batch']} | {mode} | {r['draft_k']} | skipped: {r['skipped']} | | | | |")
                continue
            tg, split = r["tg_tokens_per_s"], r["split_ms_per_round"]
            # no K = 0 row in this batch (--draft-k without 0, or its row skipped): nothing to divide by
            ratio = f"{tg['mean'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
            print(f"| {domain} | {r['batch']} | {mode} | {r['draft_k']} | {mean_and_spread(tg)} | "
                  f"{ratio} | {r['tokens_per_round']:.2f} | {r['acceptance_rate']:.2f} | "
                  f"{split['draft']:.1f} / {split['verify']:.1f} / {split['other']:.1f} |", flush=True)
    if result:
        print()
        print(ceiling_line(result))


if __name__ == "__main__":
    script_main(main)
