"""Greedy acceptance of an MTP drafter on held-out text: tokens per verify round and per draft position.

    python benchmarks/drafter_acceptance.py BUNDLE --drafter edgemtp/drafters/gemma3-270m [DRAFTER2 ...] \\
        [--heads full,32] [--prompts 8] [--skip 0] [--prompt-len 128] [--new 128] [--k 4] [--speculative 1] \\
        [--chunk 32] [--head-rows auto] [--json out.json]

BUNDLE: a target bundle. For each entry of --heads (full: the tied full head; a number k: the clustered
head keeping k clusters, from the drafter directory's head.safetensors) a drafter graph is written into
the bundle directory as drafter_<head>.onnx (sharing the target's embedding; the manifest is not touched),
scored on the same rounds, and its draft step timed at batch 1 beside the target's decode step. Several
--drafter directories are scored side by side on the same continuations, as mtp_<dir name>:<head>.
For each domain (code, docs, shakespeare; "prose" pools docs + shakespeare) the prompts are held-out
windows (data.py split). The target greedily continues each prompt (ONNX target, batched decode); then
greedy speculative decoding is replayed on that continuation: a round at committed length L drafts K tokens
with the ONNX drafter on the target's real cache rolled back to L (cache.lengths = L, exactly what the
runtime does after a rejection) and the target's hidden state at L-1; it accepts the longest prefix equal
to the continuation, emits it plus the target's own token, and the next round starts after them. For greedy
decoding this is the speculative algorithm's exact output (the verify pass's KV/hidden equal the sequential
ones up to float rounding). `--speculative N` also runs edgemtp.runtime.speculative on the first N prompts
of each domain as a cross-check. The n-gram prompt-lookup drafter is scored on the same rounds' contexts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS (see its docstring)
import numpy as np

from edgemtp import bundle as bundle_mod
from edgemtp.drafter import data as D
from edgemtp.drafter.export import write
from edgemtp.errors import EdgemtpError, script_main
from edgemtp.runtime.drafter_session import DrafterSession, recent_ids
from edgemtp.runtime.drafting import PromptLookupDrafter
from edgemtp.runtime.engine import Engine

DOMAINS = ("code", "docs", "shakespeare")


def prompts(engine: Engine, domain: str, n: int, length: int, skip: int = 0, seed: int = 1234) -> np.ndarray:
    """n held-out windows: the first n of a fixed order, or with `skip` the n after the first `skip` (a sample
    disjoint from the default one)."""
    bos = engine.bundle.model.get("bos_token_id")
    return D.windows(engine.tokenizer, D.documents(domain, "heldout"), length, skip + n, seed, bos, skip)


def greedy_continuation(engine: Engine, ids: np.ndarray, new: int):
    """Target greedy decoding of every row -> (cache holding all positions, sequences [n, P+new],
    hidden [n, P+new-1, Hb] at every processed position)."""
    n, P = ids.shape
    cache = engine.target.new_cache(n)
    seqs, hidden = [list(r) for r in ids], []
    for b in range(n):  # the CPU GQA takes one row at a time when prefilling
        logits, h = engine.target.forward(ids[b:b + 1], cache, rows=slice(b, b + 1))
        seqs[b].append(int(logits[0, -1].argmax()))
        hidden.append([h[0]])
    for _ in range(new - 1):
        logits, h = engine.target.forward(np.array([[s[-1]] for s in seqs]), cache)
        for b, s in enumerate(seqs):
            s.append(int(logits[b, -1].argmax()))
            hidden[b].append(h[b])
    return cache, np.array(seqs), np.stack([np.concatenate(h) for h in hidden])


def replay(drafter: DrafterSession, cache, seqs: np.ndarray, hidden: np.ndarray, P: int, k: int,
           lookup: PromptLookupDrafter | None = None) -> list[dict]:
    """Greedy speculative rounds on every row in lockstep -> per-round records (row, L, accepted, source).

    With `lookup` this is the hybrid drafter: prompt lookup's guess when it has one, the MTP draft otherwise."""
    n, total = seqs.shape
    L = np.full(n, P)
    rounds = []
    while (active := L + k + 1 <= total - 1).any():
        cache.lengths[:] = np.minimum(L, total - 1)  # a rollback: rows past L are masked, never read
        recent = recent_ids([s[:length + 1] for s, length in zip(seqs, cache.lengths)], max(drafter.context, 1))
        drafts, _ = drafter.draft(seqs[np.arange(n), cache.lengths], hidden[np.arange(n), cache.lengths - 1],
                                  cache, slice(0, n), k, full_logits=False, recent=recent)
        for b in np.flatnonzero(active):
            guess = lookup.propose(list(seqs[b, :L[b] + 1]), k)[0] if lookup else []
            d = np.asarray(guess) if len(guess) else drafts[b]
            truth = seqs[b, L[b] + 1:L[b] + 1 + len(d)]
            a = int(np.argmin(np.append(d == truth, False)))
            rounds.append({"row": int(b), "L": int(L[b]), "accepted": a, "source": "lookup" if len(guess) else "mtp"})
            L[b] += a + 1
    return rounds


def rows_from(start: int, rounds: list[dict]) -> list[dict]:
    """A chunk's rounds with their rows numbered among all the domain's prompts."""
    return [{**r, "row": r["row"] + start} for r in rounds]


def lookup_rounds(seqs: np.ndarray, P: int, k: int) -> list[int]:
    """Accepted drafts per round for prompt lookup, replayed the same way."""
    out, lookup = [], PromptLookupDrafter()
    for s in seqs:
        L = P
        while L + k + 1 <= len(s) - 1:
            d, _ = lookup.propose(list(s[:L + 1]), k)
            truth = s[L + 1:L + 1 + len(d)]
            a = int(np.argmin(np.append(np.asarray(d) == truth, False))) if len(d) else 0
            out.append(a)
            L += a + 1
    return out


def summary(accepted: list[int], k: int) -> dict:
    a = np.asarray(accepted)
    reach = [(a >= i).mean() for i in range(1, k + 1)]  # P(draft position i accepted)
    cond = [reach[0]] + [reach[i] / reach[i - 1] if reach[i - 1] else 0.0 for i in range(1, k)]
    return {"rounds": len(a), "tokens_per_round": round(float(a.mean() + 1), 3),
            "accepted_per_round": round(float(a.mean()), 3),
            "acceptance_by_position": [round(float(r), 3) for r in reach],
            "conditional_acceptance": [round(float(c), 3) for c in cond]}


def per_prompt(rounds: list[dict], n: int) -> np.ndarray:
    """[n] tokens per round of each prompt's own rounds."""
    acc = np.array([r["accepted"] for r in rounds], float)
    row = np.array([r["row"] for r in rounds])
    return np.array([acc[row == b].mean() + 1 for b in range(n)])


def paired(per_row: dict, domains: list[str]) -> dict:
    """Each drafter head against the first one, per domain: mean per-prompt difference in tokens per round
    and its standard error (prompts paired: the same continuation for both; None from a single prompt)."""
    first, out = next(iter(per_row)), {}
    for head in list(per_row)[1:]:
        out[f"{head} - {first}"] = {}
        for d in domains:
            diff = per_row[head][d] - per_row[first][d]
            se = round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 3) if len(diff) > 1 else None
            out[f"{head} - {first}"][d] = {"mean": round(float(diff.mean()), 3), "se": se}
    return out


def speculative_check(engine: Engine, drafter: DrafterSession, ids: np.ndarray, new: int, k: int) -> dict:
    from edgemtp.runtime.speculative import Speculative, SpecStats

    stats = SpecStats()
    Speculative(engine.target, drafter, k=k).generate([list(r) for r in ids], max_new_tokens=new, stats=stats)
    return {"rounds": stats.rounds, "tokens_per_round": round(stats.tokens_per_round, 3),
            "acceptance_by_position": [round(x, 3) for x in stats.acceptance_by_position],
            "draft_s": round(stats.draft_s, 1), "verify_s": round(stats.verify_s, 1)}


def step_ms(fn, reps: int = 30) -> float:
    """Median wall time of fn() in ms after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e3 * float(np.median(times)), 2)


def timings(engine: Engine, drafters: dict, ids: np.ndarray) -> dict:
    """Batch-1 step times at context len(ids): target decode step and each drafter's draft step."""
    cache = engine.target.new_cache(1)
    _, h = engine.target.forward(ids[None], cache)
    L = int(cache.lengths[0])

    def target_step():
        engine.target.forward(ids[None, -1:], cache)
        cache.lengths[0] = L  # roll back: every timed step sees the same context

    out = {"target_step_ms": step_ms(target_step)}
    tok, hid = ids[-1:], h[0, -1:]
    for name, d in drafters.items():
        out[f"drafter_{name}_step_ms"] = step_ms(lambda: d.draft(tok, hid, cache, slice(0, 1), 1, full_logits=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--drafter", type=Path, nargs="+", default=[Path("edgemtp/drafters/gemma3-270m")])
    ap.add_argument("--heads", default="full", help="comma list: full and/or clustered top-k values, e.g. full,32; "
                                                    "K+W: top-k K with the W most recent tokens as candidates too "
                                                    "(e.g. 32+64); bundle: the bundle's own drafter graph")
    ap.add_argument("--head-rows", default="auto", help="clustered heads' candidate rows: fp32, int8, or auto: int8 "
                    "when the bundle's target keeps only its transposed head table (a default fp32 export, whose "
                    "drafter then scores int8 rows), else fp32")
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--skip", type=int, default=0, help="take the prompts after the first SKIP of the fixed order: "
                    "--skip 128 --prompts 128 is a sample disjoint from --prompts 128")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=32, help="prompts continued and replayed at a time: the KV cache "
                    "of a chunk is rows x the bundle's capacity (128 rows held ~20 GB with a 4096 capacity)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speculative", type=int, default=0, help="also run the real loop on N prompts per domain")
    ap.add_argument("--hybrid", default="", help="comma list of min n-gram sizes: also score the hybrid drafter "
                    "(prompt lookup when an n-gram of at least that size repeats, MTP otherwise)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:  # every domain's corpus before any measuring: a missing one (docs' reST sources) fails at once
        for domain in args.domains.split(","):
            D.documents(domain, "heldout")
    except EdgemtpError as e:
        raise SystemExit(f"--domains: {e}")
    hybrid = [int(n) for n in args.hybrid.split(",") if n]
    engine = Engine.load(args.bundle, threads=args.threads, verify=False)
    b = bundle_mod.load(args.bundle, verify=False)
    target, rows = b.graph("target").path, args.head_rows
    if rows == "auto":  # as `edgemtp export` chooses: fp32 rows gathered as columns of a transposed table are slow
        gemv = b.manifest["graphs"]["target"].get("gemv_head")
        rows = "int8" if gemv and not gemv.get("kept_table") else "fp32"
    drafters = {}
    for d in args.drafter:
        for head in args.heads.split(","):
            label = head if len(args.drafter) == 1 else f"{d.name}:{head}"
            if head == "bundle":  # the bundle's own drafter graph as exported (e.g. a quantized bundle's)
                drafters[label] = DrafterSession.load(b, threads=args.threads)
                continue
            top_k, _, context = head.partition("+")
            entry = write(args.bundle, d, target, top_k=0 if head == "full" else int(top_k), context=int(context or 0),
                          name=f"drafter_{label.replace(':', '_').replace('+', '_')}.onnx",
                          head_rows="fp32" if head == "full" else rows)
            drafters[label] = DrafterSession.open(args.bundle / entry["file"], entry["contract"], threads=args.threads)
    report, pooled = {"args": {k: str(v) for k, v in vars(args).items()}}, {h: {} for h in drafters}
    per_row = {h: {} for h in drafters}
    for domain in args.domains.split(","):
        t0 = time.time()
        ids = prompts(engine, domain, args.prompts, args.prompt_len, args.skip)
        seqs, rounds, mixed, replay_s = [], {h: [] for h in drafters}, {}, {h: 0.0 for h in drafters}
        for start in range(0, len(ids), args.chunk):  # each chunk's cache is freed before the next is made
            chunk = ids[start:start + args.chunk]
            cache, chunk_seqs, hidden = greedy_continuation(engine, chunk, args.new)
            seqs.append(chunk_seqs)
            for head, drafter in drafters.items():
                t1 = time.time()
                rounds[head] += rows_from(start, replay(drafter, cache, chunk_seqs, hidden, args.prompt_len, args.k))
                replay_s[head] += time.time() - t1
                for n in hybrid:
                    lookup = PromptLookupDrafter(3, n)
                    mixed.setdefault((head, n), []).extend(
                        rows_from(start, replay(drafter, cache, chunk_seqs, hidden, args.prompt_len, args.k, lookup)))
            del cache, hidden
        seqs = np.concatenate(seqs)
        report[domain] = {"generate_s": round(time.time() - t0 - sum(replay_s.values()), 1),
                          "prompt_lookup": summary(lookup_rounds(seqs, args.prompt_len, args.k), args.k)}
        for head, drafter in drafters.items():
            acc = [r["accepted"] for r in rounds[head]]
            pooled[head][domain] = acc
            per_row[head][domain] = per_prompt(rounds[head], len(ids))
            report[domain][f"mtp_{head}"] = {**summary(acc, args.k), "replay_s": round(replay_s[head], 1)}
            for n in hybrid:
                pooled.setdefault(f"{head}_hybrid{n}", {})[domain] = [r["accepted"] for r in mixed[head, n]]
                report[domain][f"mtp_{head}_hybrid{n}"] = {
                    **summary([r["accepted"] for r in mixed[head, n]], args.k),
                    "lookup_rounds": round(float(np.mean([r["source"] == "lookup" for r in mixed[head, n]])), 3)}
            if args.speculative:  # the real loop on the first rows, next to the replay of the same rows
                same = [r["accepted"] for r in rounds[head] if r["row"] < args.speculative]
                report[domain][f"mtp_{head}"]["speculative_check"] = {
                    "runtime": speculative_check(engine, drafter, ids[:args.speculative], args.new, args.k),
                    "replay_same_rows": summary(same, args.k)}
        print(domain, json.dumps(report[domain]), flush=True)
    prose = [d for d in ("docs", "shakespeare") if d in report]
    if prose:  # no line (nor key) at all where no prose domain was asked for
        report["prose"] = {f"mtp_{h}": summary([a for d in prose for a in pooled[h][d]], args.k) for h in pooled}
        print("prose", json.dumps(report["prose"]))
    if len(drafters) > 1:  # per-prompt differences: the prompts vary far more than the drafters (heads) do
        report["paired"] = paired(per_row, args.domains.split(","))
        print("paired", json.dumps(report["paired"]))
    report["timing"] = timings(engine, drafters, prompts(engine, "code", 1, args.prompt_len)[0])
    print("timing", json.dumps(report["timing"]))
    for head in drafters:  # the relative figure the issue asks for: clustered vs full tokens/round
        full = head[:head.rfind(":") + 1] + "full"  # the same drafter's full head ("full" or "DIR:full")
        if not head.endswith("full") and full in drafters:
            report[f"ratio_{head}_vs_full"] = {
                d: round(report[d][f"mtp_{head}"]["tokens_per_round"] / report[d][f"mtp_{full}"]["tokens_per_round"], 4)
                for d in args.domains.split(",")}
            print(f"ratio_{head}_vs_full", json.dumps(report[f"ratio_{head}_vs_full"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    script_main(main)
