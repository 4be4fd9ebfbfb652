"""Commands that measure: profile (plain decoding vs each drafter on this device), evaluate (perplexity,
agreement with a reference bundle) and quickstart."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from pathlib import Path

import click
from click.core import ParameterSource

from .. import scratch
from ..errors import EdgemtpError
from .base import cli, needs_exporter, progress_bar, writable_dir
from .run import read_prompt, speed_line


def int_list(flag: str, value: str) -> list[int]:
    if not value.strip():
        raise EdgemtpError(f"{flag} is empty")
    try:
        return [int(v) for v in value.split(",")]  # an empty item ("1,,2", "1,2,") is a typo, not skipped
    except ValueError:
        raise EdgemtpError(f"{flag} {value!r} must be comma-separated integers, e.g. 0,2,4") from None


@cli.command("profile")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", default="128,512", show_default=True, help="Comma list of prompt lengths.")
@click.option("--gen-tokens", default=128, show_default=True, type=int,
              help="Tokens generated per run (at least 2: the first comes from the prefill).")
@click.option("--repetitions", default=5, show_default=True, type=int,
              help="Timed runs per row (after one warm-up run).")
@click.option("--draft-k", default="0,2,4,6", show_default=True, help="Comma list of K; 0 is plain decoding.")
@click.option("--batch", default="1", show_default=True, help="Comma list of batch sizes (prompts at once).")
@click.option("--provider", default="cpu", show_default=True,
              help="Execution provider of the rows, its options after a ':' as generate's (a row is skipped when "
                   "this onnxruntime lacks it).")
@click.option("--threads", default=None, type=int, help="Intra-op threads (default and 0: one per usable core).")
@click.option("--draft", "drafter", default="auto", show_default=True,
              help="Comma list of drafters: lookup, mtp, hybrid; auto is generate's default.")
@click.option("--head", default="auto", show_default=True,
              help="MTP drafter heads to compare: clustered, full (auto: every head the bundle has).")
@click.option("--drafter-provider", default=None, help="Execution provider for the MTP drafter.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json", "csv", "md"]),
              help="Output: a table, one JSON object (schema_version 2, see README), CSV or a Markdown table.")
@click.option("--trace", default=None, type=click.Path(path_type=Path), help="Write ORT's per-op Chrome trace.")
@click.option("--plot", "plot_file", default=None, type=click.Path(path_type=Path),
              help="Write a plot: a .png file (or another format matplotlib writes: .pdf, .svg...).")
@click.option("--text-file", default=None, type=click.Path(path_type=Path),
              help="Prompt text (default: code; -: standard input).")
@click.option("--fast-verify", is_flag=True,
              help="Batched verify graph with its own packed weights (faster, more memory), which only rows of "
                   "--batch above 1 run.")
@click.option("--adaptive", is_flag=True,
              help="Also a row per drafter drafting adaptively (as generate --adaptive), up to the largest K.")
@click.option("--draft-p-min", default=0.0, show_default=True, type=float,
              help="The MTP and hybrid rows' --draft-p-min (as generate's).")
@click.option("--packed-cache", default=None, type=click.Path(path_type=Path), metavar="DIR",
              help="Every row's target (and --trace's) from the packed cache under DIR, as generate's: run with and "
                   "without it to see what it buys on this device.")
def profile_cmd(bundle_dir, prompt_tokens, gen_tokens, repetitions, draft_k, batch, provider, threads, drafter,
                head, drafter_provider, fmt, trace, plot_file, text_file, fast_verify, adaptive, draft_p_min,
                packed_cache):
    """Latency profile of a bundle on this device: plain decoding vs each drafter (lookup, MTP, hybrid)
    at each K, side by side."""
    from ..runtime import profile as prof
    from ..runtime import profile_report as report
    from ..runtime.requests import Draft
    from ..runtime.session import check_threads, resolve_provider

    if repetitions < 1:
        raise EdgemtpError(f"--repetitions {repetitions} must be at least 1")
    if gen_tokens < 2:  # the first token comes from the prefill: decoding speed needs a second
        raise EdgemtpError(f"--gen-tokens {gen_tokens} must be at least 2 (the first token comes from the prefill)")
    check_threads(threads)  # also before the bandwidth probe, which runs even when every row is skipped
    Draft(p_min=draft_p_min)  # a bad --draft-p-min named, as generate's
    for flag, values, least in (("--prompt-tokens", prompt_tokens, 1), ("--batch", batch, 1),
                                ("--draft-k", draft_k, 0)):
        bad = [v for v in int_list(flag, values) if v < least]
        if bad:
            raise EdgemtpError(f"{flag} {bad[0]} must be at least {least}")
    # unknown names before the flags' conflicts: a misspelt drafter is the more basic mistake
    for flag, values, known in (("--draft", drafter, ("auto", "lookup", "mtp", "hybrid")),
                                ("--head", head, ("auto", "clustered", "full"))):
        bad = [v.strip() for v in values.split(",") if v.strip() not in known]
        if bad:
            raise EdgemtpError(f"{flag} {bad[0]!r} is unknown (choose from {', '.join(known)})")
    if adaptive and not any(int_list("--draft-k", draft_k)):
        raise EdgemtpError(f"--adaptive with --draft-k {draft_k}: adaptive rows draft up to the largest K, and there "
                           "is none above 0")
    given = click.get_current_context().get_parameter_source("drafter") == ParameterSource.COMMANDLINE
    if given and not any(int_list("--draft-k", draft_k)):  # as generate's --draft-k 0 beside --draft
        raise EdgemtpError(f"--draft {drafter} with --draft-k {draft_k}: plain rows only, which draft nothing")
    resolve_provider(provider, warn=False)  # a known provider this build lacks: its rows say so ("skipped")
    # the outputs are written after the run: the prompt text read first would be lost to the trace or plot
    # (the text's name, or the file a link there names)
    read = () if text_file is None or str(text_file) == "-" else (_where(text_file), Path(os.path.realpath(text_file)))
    for flag, path in (("--plot", plot_file), ("--trace", trace)):
        if path is not None and path.is_dir():  # matplotlib would write DIR.png beside it
            raise EdgemtpError(f"{flag} {path}: is a directory (give a file name in it)")
        if path is not None:
            writable_dir(path.parent, flag, shown=path)  # before the run, which takes minutes
        if path is not None and not path.parent.is_dir():
            raise EdgemtpError(f"{flag} {path}: no such directory {path.parent}")
        if path is not None and path.exists() and _bundle_file(bundle_dir, path):
            raise EdgemtpError(f"{flag} {path}: is a file of the bundle {bundle_dir} (write it elsewhere)")
        if path is not None and _where(path) in read:
            raise EdgemtpError(f"{flag} {path}: is --text-file's (write it elsewhere)")
    if plot_file is not None and trace is not None and _where(plot_file) == _where(trace):
        raise EdgemtpError(f"--plot {plot_file}: is --trace's too (give each its own file)")
    if plot_file is not None and importlib.util.find_spec("matplotlib") is None:
        raise EdgemtpError("--plot needs matplotlib: pip install 'edgemtp[plot]'")
    if plot_file is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()  # else it would add .png, or fail after the run
        if plot_file.suffix.lower().lstrip(".") not in kinds:
            raise EdgemtpError(f"--plot {plot_file}: give a file name ending in one of "
                               f"{', '.join('.' + k for k in sorted(kinds))}")
    text = read_prompt(None, text_file, "--text-file") if text_file else None
    with progress_bar("profiling") as progress:
        result = prof.profile(bundle_dir, int_list("--prompt-tokens", prompt_tokens), gen_tokens, repetitions,
                              int_list("--draft-k", draft_k), int_list("--batch", batch), provider, threads,
                              drafter, text, progress, head, drafter_provider, fast_verify, adaptive, draft_p_min,
                              reset_peak=True,  # its own process: no caller's peak to keep
                              packed_cache=packed_cache)
    rendered = report.render(result, fmt, prof.speedups(result))
    click.echo(rendered, nl=not rendered.endswith("\n"))
    if all(r["skipped"] for r in result["rows"]):  # the table says why; a script should not read it as a run
        raise EdgemtpError("no row ran: every row was skipped (the table gives each row's reason)")
    if trace:
        click.echo(report.write_trace(lambda prefix: _traced_engine(bundle_dir, provider, threads, prefix,
                                                                    packed_cache),
                                      lambda e: e.generate("def main():", max_new_tokens=16), trace), err=True)
    if plot_file:
        report.plot(result, plot_file)


def _where(path: Path) -> Path:
    """The file `path` names, by whatever route to its directory (a link named `path` is itself the file an
    output replaces, as _bundle_file says)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _bundle_file(bundle_dir: Path, path: Path) -> bool:
    """Whether writing `path` would replace a file of the bundle (its manifest or one it lists), which the run
    reads: the trace written over tokenizer.json left a bundle that no longer loaded. The output is renamed into
    place, so it replaces the name its directory holds: a link named `path` is replaced, not what it points to."""
    from ..bundle import MANIFEST, load

    where = Path(os.path.realpath(path.parent)) / path.name
    b = load(bundle_dir, verify=False)  # the run's first step: a bundle that does not load is named as it would be
    return any(Path(os.path.realpath((b.dir / rel).parent)) / Path(rel).name == where
               for rel in (MANIFEST, *b.manifest["files"]))


def _traced_engine(bundle_dir, provider, threads, prefix, packed_cache=None):
    from ..runtime.engine import Engine
    from ..runtime.packed_cache import packed_target
    from ..runtime.session import make_session
    from ..runtime.target import Target

    engine = Engine.load(bundle_dir, provider=provider, threads=threads, verify=False, packed_cache=packed_cache)
    # the traced session runs the graph the rows ran: with a packed cache, the copy the load just built or found
    path = (engine.bundle.graph("target").path if packed_cache is None else
            packed_target(engine.bundle, packed_cache, provider, threads))
    engine.target = Target(make_session(path, provider, threads, profile_prefix=prefix), engine.target.contract)
    return engine


def default_workdir() -> Path:
    """quickstart's --workdir when none is given, worked out only then: a service account in a container may
    have no home directory (Path.home() raises), and every command, not just quickstart, failed at import."""
    from ..verified import cache_dir

    if (cache := cache_dir()) is None:
        raise EdgemtpError("--workdir: no home directory to put ~/.cache/edgemtp in (give --workdir)")
    return cache


@cli.command("quickstart")
@click.option("--workdir", default=default_workdir, type=click.Path(path_type=Path),
              show_default="$XDG_CACHE_HOME/edgemtp, else ~/.cache/edgemtp",
              help="Where the imported model and the bundle go.")
@click.option("--prompt", default="def fibonacci(n):", show_default=True, help="Prompt of both generations.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Tokens each generation makes.")
def quickstart_cmd(workdir: Path, prompt: str, max_new_tokens: int):
    """Import the default model (Gemma 3 270M), export a bundle with its shipped MTP drafter, generate
    plainly and speculatively, and print both speeds."""
    needs_exporter("quickstart", "default-model")  # the extra with the model too: one install, not two
    from ..runtime.engine import Draft, Engine, new_stats
    from ..runtime.requests import check_max_new_tokens

    check_max_new_tokens(max_new_tokens)  # the API's check: its CLI message names --max-new-tokens
    prompt = read_prompt(prompt, None)  # as generate's: not empty, UTF-8; before the import and export
    model_dir, bundle_dir = workdir / "gemma3-270m", workdir / "gemma3-270m.bundle"
    if not all(made(model_dir, bundle_dir)):  # e.g. a read-only home: named here, not as a path deep inside it
        writable_dir(workdir, "--workdir")  # (a ready workdir may be read-only: nothing is written then)
        with one_quickstart(workdir):
            import_and_export(model_dir, bundle_dir)
    runs = (("plain decoding", None), ("speculative (MTP drafter + prompt lookup, K=4)", Draft("auto", 4)))
    for label, draft in runs:
        # each on the engine `edgemtp generate` loads for it (its threads spin between runs for plain
        # decoding, sleep while an MTP drafter takes turns), so the two speeds are what generate gives
        engine = Engine.load(bundle_dir, verify=False, mtp=draft is not None)
        stats = new_stats(draft)
        click.echo(f"--- {label}\n{prompt}", nl=False)
        for piece in engine.stream(prompt, max_new_tokens, stats=stats, draft=draft):
            click.echo(piece, nl=False)
        click.echo()
        click.echo(speed_line(stats))
        del engine  # freed before the next one loads


def made(model_dir: Path, bundle_dir: Path) -> tuple[bool, bool]:
    """Whether quickstart's model is imported, and its bundle exported with a drafter."""
    from .. import bundle as bundle_mod

    fresh = (bundle_dir / "edgemtp.json").is_file() and bundle_mod.load(bundle_dir, verify=False).has_graph("drafter")
    return (model_dir / "config.json").is_file(), fresh


def import_and_export(model_dir: Path, bundle_dir: Path) -> None:
    """quickstart's model and bundle, those not made yet (checked again here: the run this one waited for
    may have made them)."""
    from ..exporters import AUTO, export
    from ..gguf_import import default_gguf_path, import_gguf

    imported, fresh = made(model_dir, bundle_dir)
    if not imported:
        gguf = default_gguf_path()
        with progress_bar("importing Gemma 3 270M", show_what=True) as progress:
            import_gguf(gguf, model_dir, progress=progress)
    if not fresh:  # none yet, or one exported before the drafter shipped
        with progress_bar("exporting the bundle", show_what=True) as progress:
            export(model_dir, bundle_dir, progress=progress, drafter=AUTO, overwrite=True)


@contextlib.contextmanager
def one_quickstart(workdir: Path):
    """Held while quickstart imports and exports into `workdir` (an advisory lock on it, which the kernel drops
    when the process dies): a second run waits, then uses what the first made. Two at once both imported the
    model, the slower failing on the other's directory, and both exported the bundle with overwrite, replacing
    the one the other run was loading. Without flock (Windows, a file system without it) they run unguarded.
    A run that fails (Ctrl-C) before it wrote anything removes the `workdir` it made (scratch.made_and_locked)."""
    with scratch.made_and_locked(workdir, waiting=lambda: click.echo(
            f"--workdir {workdir}: waits for another quickstart run to import and export the model there", err=True)):
        yield


@cli.command("evaluate")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--text-file", required=True, type=click.Path(path_type=Path), help="Text to score (-: standard input).")
@click.option("--reference", default=None, type=click.Path(path_type=Path),
              help="Reference bundle (e.g. the fp32 export) for top-1 agreement and KL divergence.")
@click.option("--max-tokens", default=None, type=int, help="Take only the text's first N tokens (the BOS not counted).")
@click.option("--threads", default=None, type=int, help="Intra-op threads (default and 0: one per usable core).")
@click.option("--provider", default="cpu", show_default=True,
              help="Execution provider of both bundles, its options after a ':' as generate's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_cmd(bundle_dir, text_file, reference, max_tokens, threads, provider, as_json):
    """Perplexity of a bundle on a text; with --reference, top-1 agreement and KL divergence.

    The text is tokenized once and cut into consecutive windows (no overlap) of min(512, the bundles' KV
    capacity) tokens, BOS included: each starts with the BOS where the tokenizer puts one before a text, and
    is scored from a fresh cache. Every token with a token before it in its window is scored (without a BOS,
    a window's first is not); both bundles see the same windows. The NLL and KLs are in nats per scored token,
    the KL being KL(reference || bundle) (the reference's distribution first); the README lists the fields."""
    from ..evaluate import evaluate, finite_or_none

    if max_tokens is not None and max_tokens < 1:
        raise EdgemtpError(f"--max-tokens {max_tokens} must be at least 1")
    text = read_prompt(None, text_file, "--text-file")
    with progress_bar("evaluating") as progress:
        result = evaluate(bundle_dir, text, reference, threads=threads, max_tokens=max_tokens,
                          text_name=f"--text-file {text_file}", provider=provider, progress=progress)
    if as_json:
        click.echo(json.dumps(finite_or_none(result)))
        return
    for key, value in result.items():
        click.echo(f"{key:24s} {_number(key, value, result)}" if isinstance(value, float) else f"{key:24s} {value}")


OVERFLOW = "past a float's range"
PERPLEXITY_NLL = {"perplexity": "nll", "reference_perplexity": "reference_nll"}


def _not_finite_why(key: str, result: dict) -> str | None:
    """Why a figure is not finite (--json's null), said on its line: the first of each kind (a perplexity = exp(its
    nll) follows the nll where that is infinite; the KL's median, p99 and max its mean). 'Infinite' only where it is:
    a finite NLL above ~709 overflows exp too. A NaN is only the delta against an infinite reference NLL."""
    nll, ref_nll = result.get("nll"), result.get("reference_nll")
    if key == "nll":
        return "the bundle gave a token of the text probability 0: a -inf logit"
    if key == "reference_nll":
        return "the reference gave a token of the text probability 0: a -inf logit"
    if key in PERPLEXITY_NLL:
        return None if result[PERPLEXITY_NLL[key]] == math.inf else f"exp of an NLL above ~709: {OVERFLOW}"
    if key == "perplexity_delta_pct":
        if ref_nll == math.inf:
            return "both perplexities are infinite" if nll == math.inf else "the reference's perplexity is infinite"
        return None if nll == math.inf else f"the NLLs differ by over ~709: {OVERFLOW}"
    if key == "kl_mean":
        return "the bundle gave probability 0 to a token the reference did not"
    return None


def _number(key: str, value: float, result: dict) -> str:
    """Four decimals, or four significant digits below 0.01: an int8 bundle's KLs (~1e-5) showed as 0.0000. A
    figure that is not finite is inf, or undefined for a NaN, with why on its kind's first line."""
    if not math.isfinite(value):
        shown = "inf" if value == math.inf else "undefined"
        why = _not_finite_why(key, result)
        return f"{shown} ({why})" if why else shown
    return f"{value:.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.4g}"
