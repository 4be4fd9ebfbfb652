"""Rendering `edgemtp profile` results (table / json / csv / md), the per-op trace and the plot."""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import EdgemtpError
from ..scratch import as_open_makes, hidden_prefix

CONFIG = ("draft_k", "batch", "prompt_tokens", "gen_tokens", "provider", "drafter", "head", "adaptive", "draft_p_min")
COLUMNS = [*CONFIG, "pp t/s", "tg t/s",
           "ttft ms", "accept", "tok/round", "draft ms", "verify ms", "other ms", "peak rss MiB"]


def _cells(r: dict) -> list[str]:
    head = [_text(r.get(k, "")) for k in CONFIG]
    if r["skipped"]:
        return head + [f"skipped: {r['skipped']}"] + [""] * (len(COLUMNS) - len(head) - 1)
    split = r["split_ms_per_round"]
    return head + [mean_and_spread(r["pp_tokens_per_s"]), mean_and_spread(r["tg_tokens_per_s"]),
                   f"{1e3 * r['ttft_s']['mean']:.0f}", f"{r['acceptance_rate']:.2f}", f"{r['tokens_per_round']:.2f}",
                   f"{split['draft']:.1f}", f"{split['verify']:.1f}", f"{split['other']:.1f}",
                   f"{r['peak_rss_mb']:.0f}"]


def mean_and_spread(m: dict) -> str:
    """"mean ± std", or the mean alone after one run (std null: no spread was measured)."""
    return f"{m['mean']:.1f}" if m["std"] is None else f"{m['mean']:.1f} ± {m['std']:.1f}"


def _text(value) -> str:
    return ("yes" if value else "") if isinstance(value, bool) else str(value)


CSV_MEASURES = ("pp_tokens_per_s_mean", "pp_tokens_per_s_std", "tg_tokens_per_s_mean", "tg_tokens_per_s_std",
                "ttft_s_mean", "acceptance_rate", "tokens_per_round", "draft_ms", "verify_ms", "other_ms",
                "peak_rss_mb")


def _csv(rows: list[dict]) -> str:
    """One number per cell (means and deviations apart), for a spreadsheet or pandas; `skipped` holds the
    reason of a row that did not run, whose measures are empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")  # csv's default \r\n is for files opened on Windows
    w.writerow([*CONFIG, "skipped", *CSV_MEASURES])
    for r in rows:
        # booleans as the json format writes them (Python's True / False otherwise)
        head = [json.dumps(v) if isinstance(v := r.get(k, ""), bool) else v for k in CONFIG]
        if r["skipped"]:
            w.writerow(head + [r["skipped"]] + [""] * len(CSV_MEASURES))
            continue
        split = r["split_ms_per_round"]
        w.writerow(head + [""] + [r["pp_tokens_per_s"]["mean"], r["pp_tokens_per_s"]["std"],
                                  r["tg_tokens_per_s"]["mean"], r["tg_tokens_per_s"]["std"], r["ttft_s"]["mean"],
                                  r["acceptance_rate"], r["tokens_per_round"], split["draft"], split["verify"],
                                  split["other"], r["peak_rss_mb"]])
    return buf.getvalue()


def ceiling_line(result: dict) -> str:
    c = result["ceiling"]
    return (f"bandwidth ceiling of plain decoding: {c['tg_tokens_per_s']:.1f} tokens/s "
            f"({c['weight_bytes'] / 1e9:.2f} GB of weights per token at {c['bandwidth_gb_s']:.1f} GB/s)"
            + _with_cache(c.get("by_prompt_tokens", []))
            + f"; bundle {result['bundle_bytes'] / 1e9:.2f} GB" + _peak_note(result))


def _with_cache(by_prompt: list[dict]) -> str:
    """The ceiling at each prompt length, the KV cache the steps read counted too (none in a result that
    ran no prompt length)."""
    if not by_prompt:
        return ""
    return ", with the KV cache read: " + ", ".join(
        f"{c['tg_tokens_per_s']:.1f} at prompt {c['prompt_tokens']}" for c in by_prompt)


def _peak_note(result: dict) -> str:
    if result.get("peak_rss", "row") == "row":
        return ""
    return "; peak rss MiB is the process's peak so far, not each row's (not reset: this system cannot, or the " \
           "caller of profile() did not ask to)"


def render(result: dict, fmt: str, speedups: list[dict]) -> str:
    rows = [_cells(r) for r in result["rows"]]
    if fmt == "json":
        return json.dumps({**result, "speedups": speedups}, indent=2)
    if fmt == "csv":
        return _csv(result["rows"])
    if fmt == "md":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        # a provider's options (and a skip reason naming them) may hold "|", which split the row's cells
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
        return "\n".join(lines + ["", ceiling_line(result), "", _speedup_text(speedups)])
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not str: rich reads a str as markup and emoji codes, and cells hold what the user typed (a provider's
    # options, a skip reason naming them): "[/]" in one was a MarkupError traceback, "[bold]" vanished
    table = Table(*COLUMNS)
    for r in rows:
        table.add_row(*map(Text, r))
    buf = io.StringIO()
    console = Console(file=buf, width=220)
    console.print(table)
    console.print(Text(ceiling_line(result)))
    console.print(Text(_speedup_text(speedups)))
    return buf.getvalue()


def _speedup_text(speedups: list[dict]) -> str:
    if not speedups:
        return ""
    parts = [f"{_mode(s)} k={s['draft_k']} (batch {s['batch']}, prompt {s['prompt_tokens']}): {s['speedup']:.2f}x"
             for s in speedups]
    best = max(speedups, key=lambda s: s["speedup"])
    verdict = (f"best: {_mode(best)} k={best['draft_k']} at {best['speedup']:.2f}x" if best["speedup"] > 1
               else "drafting does not pay off here (break-even not reached)")
    return "tg speedup vs no draft: " + "; ".join(parts) + f" — {verdict}"


def _mode(s: dict) -> str:
    head = f"/{s['head']}" if s.get("head") else ""
    return s.get("drafter", "") + head + (" adaptive" if s.get("adaptive") else "")


def write_trace(engine_factory, run, out: Path, top: int = 15) -> str:
    """Runs `run(engine)` with ONNX Runtime's profiler on; writes the Chrome trace to `out` and
    returns a top-N ops table (total ms by op type)."""
    # beside `out`, which the command checked writable: a read-only container may have no temporary directory
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".edgemtp-trace-") as tmp:
        engine = engine_factory(str(Path(tmp) / "ort"))
        try:
            run(engine)
            produced = engine.target.session.end_profiling()
        finally:  # its sessions and mappings now, also when the run fails, not at the garbage collector's pleasure
            engine.close()
        events = json.loads(Path(produced).read_text(encoding="utf-8"))
        into_place(out, lambda path: shutil.copyfile(produced, path))
    by_op = collections.Counter()
    calls = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    total = sum(by_op.values()) or 1
    lines = [f"{'op':28s} {'total ms':>10s} {'calls':>7s} {'share':>6s}"]
    lines += [f"{op:28s} {us / 1e3:10.1f} {calls[op]:7d} {us / total:6.1%}" for op, us in by_op.most_common(top)]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    """tokens/s against K, and acceptance per draft position at the largest K."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgemtpError("--plot needs matplotlib: pip install 'edgemtp[plot]'") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ok = [r for r in result["rows"] if not r["skipped"]]
    for key in sorted({(r["batch"], r["prompt_tokens"]) for r in ok}):
        mine = [r for r in ok if (r["batch"], r["prompt_tokens"]) == key]
        plain = [r for r in mine if r["draft_k"] == 0]
        # the drafters that ran at this prompt and batch: the modes of every row drew lines of the plain point
        # alone, named for drafters that did not run here
        for mode in sorted({_mode(r) for r in mine if r["draft_k"]}) or ["none"]:
            rs = plain + sorted((r for r in mine if r["draft_k"] and _mode(r) == mode), key=lambda r: r["draft_k"])
            a.errorbar([r["draft_k"] for r in rs], [r["tg_tokens_per_s"]["mean"] for r in rs],
                       yerr=[_nan_if_none(r["tg_tokens_per_s"]["std"]) for r in rs], marker="o",
                       label=f"{mode}, batch {key[0]}, prompt {key[1]}")
    a.axhline(result["ceiling"]["tg_tokens_per_s"], ls="--", c="gray", label="plain-decoding ceiling")
    a.set(xlabel="draft K", ylabel="generation tokens/s", title="Speed vs draft length")
    a.legend(fontsize=8)
    drafted = [r for r in ok if r["acceptance_by_position"]]
    if drafted:
        r = max(drafted, key=lambda r: r["draft_k"])
        pos = range(1, len(r["acceptance_by_position"]) + 1)
        b.bar(list(pos), r["acceptance_by_position"])
        b.set(xlabel="draft position", ylabel="acceptance", ylim=(0, 1),
              title=f"Acceptance per position (K={r['draft_k']})")
    fig.tight_layout()
    into_place(out, lambda path: fig.savefig(path, dpi=100))


def _nan_if_none(std: float | None) -> float:
    return float("nan") if std is None else std  # matplotlib draws no bar for NaN (None it refuses)


def into_place(out: Path, write) -> None:
    """`write(path)` into a temporary file beside `out`, then renamed to it: a kill or a full disk midway leaves
    whatever `out` was (it left a partial file)."""
    out, prefix = Path(out), hidden_prefix(out)
    # the suffix: the format (matplotlib's). One too long for the name's 255 bytes with the prefix and mkstemp's 8
    # characters ('run.1-...': all after an early dot) is no format: left out, it failed 'File name too long'
    suffix = out.suffix if len(os.fsencode(prefix + out.suffix)) + 8 <= 255 else ""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        as_open_makes(Path(tmp))  # mkstemp's 0600
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
