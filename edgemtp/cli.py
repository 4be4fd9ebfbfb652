"""The `edgemtp` command: thin click commands that parse, call the library and print."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from .errors import ArgumentError, EdgemtpError


class _Command(click.Command):
    """A full disk met while writing a file object (no filename in the error) is named by the command's
    outputs: its -o path (quickstart: --workdir; profile: --plot / --trace), else standard output."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as e:
            if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            outs = [str(v) for k in ("out", "workdir", "plot_file", "trace") if (v := ctx.params.get(k))]
            where = " or ".join(outs + ["standard output"] * (ctx.command.name == "profile")) or "standard output"
            raise EdgemtpError(f"{where}: {e.strerror} while writing it") from None


class _Group(click.Group):
    """User mistakes become one line on stderr and exit status 2, never a traceback."""

    command_class = _Command

    def invoke(self, ctx):
        with warnings.catch_warnings():  # a library warning (e.g. a provider falling back) as one plain line
            warnings.showwarning = lambda message, *_a, **_k: click.echo(f"warning: {message}", err=True)
            try:
                return super().invoke(ctx)
            except EdgemtpError as e:
                click.echo(f"error: {e.cli_message() if isinstance(e, ArgumentError) else e}", err=True)
                sys.exit(2)
            except click.UsageError as e:  # click's own checks (an unknown flag or command, a bad choice)
                message = " ".join(e.format_message().split())  # "Did you mean ...?" comes on a second line
                where = e.ctx.command_path if e.ctx is not None else "edgemtp"
                click.echo(f"error: {message} (see '{where} --help')", err=True)
                sys.exit(2)
            except OSError as e:
                if e.filename is None or e.errno not in PATH_ERRORS:
                    raise  # not about a path the user gave (a bug: its traceback; EPIPE: click stops quietly)
                click.echo(f"error: {e.filename}: {e.strerror}", err=True)
                sys.exit(2)


# a path given that cannot be read or written: read-only, no permission, a file where a directory goes, full
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG}


@contextlib.contextmanager
def exit_on_sigterm():
    """SIGTERM (kill, a cancelled CI job) as an exit, so the `finally` blocks that delete a half-written
    bundle's temporary directory run: by default the process dies and leaves it behind. Only for the
    `edgemtp` command itself (main), and only over the default action: a program calling cli() keeps
    its own handling."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def leave(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        sys.exit(143)

    signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def writable_dir(out: Path, flag: str, shown: Path | None = None) -> None:
    """`out` is, or can be made, a directory this process may write into: checked before a long run.
    `shown`: the path the user gave, when `out` is its directory."""
    here = Path(out)
    out = shown if shown is not None else out
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise EdgemtpError(f"{flag} {out}: {here} is a file, not a directory")
    if not os.access(here, os.W_OK | os.X_OK):
        raise EdgemtpError(f"{flag} {out}: cannot write in {here}")


def _output(ctx, param, value: str) -> Path:
    """-o "" would be the current directory (Path("") is "."): refused rather than guessed."""
    if not value.strip():
        raise EdgemtpError("-o: give a path (an empty one would mean the current directory)")
    return Path(value)


@click.group(cls=_Group)
@click.version_option(package_name="edgemtp")
def cli():
    """Export LLMs to ONNX bundles and run them with multi-token-prediction speculative decoding."""


@contextlib.contextmanager
def progress_bar(desc: str, show_what: bool = False):
    """Yields a `progress(done, total, what)` callback drawing a rich bar on stderr (`what` joins the
    description when show_what).

    The bar appears at the first update, so input checks that fail first print only their error."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*cols, console=Console(stderr=True))
    task = None

    def update(done: int, total: int, what: str = "") -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(desc, total=total)
        bar.update(task, completed=done, total=total, description=f"{desc}: {what}" if show_what and what else desc)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


@cli.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(), callback=_output,
              help="Model directory to write (config.json, model.safetensors, tokenizer.json).")
def import_gguf_cmd(gguf_file: Path, out: Path):
    """Convert a GGUF file into a Hugging Face style model directory (dequantized to fp32)."""
    from .gguf_import import import_gguf

    with progress_bar(f"importing {gguf_file.name}") as progress:
        import_gguf(gguf_file, out, progress=progress)
    click.echo(f"wrote {out}")


def quant_options(f):
    """`export`'s int8/int4 options (edgemtp.exporters.quantize.scheme checks them; unset: the preset's)."""
    for opt in reversed([
        click.option("--block-size", type=int, default=None, help="Weight block size for every role (16, 32, ...)."),
        click.option("--symmetric/--asymmetric", default=None,
                     help="Blocks without / with zero points (default: 8-bit symmetric, 4-bit asymmetric)."),
        click.option("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy level (default 4)."),
        click.option("--layer-bits", type=int, default=None, help="Bits of the layers' weights: 4 or 8 (default 8)."),
        click.option("--keep-8bit", multiple=True, help="Weight-name pattern kept at 8 bits, e.g. '*down_proj*' "
                                                        "(repeatable; q/k/v and gate/up are joined weights, kept "
                                                        "whole when a pattern matches one part)."),
        click.option("--frequent-rows", type=int, default=None,
                     help="int4: head/table rows of the most frequent calibration tokens kept at 8 bits "
                          "(default 32768; 0: none)."),
        click.option("--gptq/--no-gptq", default=None, help="Round 4-bit weights with GPTQ on calibration "
                                                            "activations (int4 default: on)."),
        click.option("--two-pass", default=None, help="MatMulNBits activations in two int8 passes: none, head "
                                                      "or all (default; keeps speculative decoding exact)."),
        click.option("--layer-op", default=None,
                     help="8-bit layers as nbits (MatMulNBits, blocks of 32; default) or integer "
                          "(MatMulIntegerToFloat: int8 columns, activations in three 7-bit passes per row; "
                          "faster prefill and verify windows where ONNX Runtime runs it on AMX, for ~1 point of "
                          "top-1 agreement; --block-size, --symmetric, --accuracy-level and --two-pass then "
                          "apply to the head only)."),
        click.option("--head-op", default=None,
                     help="The logit head as nbits (MatMulNBits over the table; default) or integer "
                          "(MatMulIntegerToFloat over an int8 copy of the table, one scale per token, whose 8 "
                          "highest logits per position the table rescores: verify windows far cheaper where "
                          "ONNX Runtime runs it on AMX / VNNI; the bundle grows by vocab x hidden bytes; "
                          "--two-pass and --accuracy-level then apply to the layers only)."),
        click.option("--smooth", type=float, default=None, help="Activation smoothing alpha of the layers (0: off)."),
        click.option("--calibration", default=None, help="Calibration text: corpora (the offline corpora's "
                                                         "train split, default), a text file, or none."),
        click.option("--calibration-tokens", type=int, default=None, help="Tokens of activations to calibrate on "
                                                                          "(default 8192; qdq: 64 windows)."),
        click.option("--drafter-quant", default=None, help="int8 / int4 bundles: the drafter's own weights in fp32 "
                                                            "(default) or int8; its table is the target's."),
        click.option("--activation-bits", type=int, default=None, help="qdq: activation bits, 8 or 16 (default 16)."),
        click.option("--calibration-method", default=None, help="qdq: activation ranges by minmax (default), "
                                                                 "entropy or percentile."),
    ]):
        f = opt(f)
    return f


@cli.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(), callback=_output, help="Bundle directory.")
@click.option("--quant", default="fp32", show_default=True,
              help="Weight format: fp32, fp16, int8 or int4 (weight-only, MatMulNBits), or qdq (static QDQ "
                   "graph for NPUs; implies --static).")
@click.option("--max-context", "capacity", default=None, type=int,
              help="KV capacity (prompt + generated tokens) the bundle is built for (default: 4096, or the "
                   "model's max_position_embeddings if smaller).")
@click.option("--static", "static", is_flag=True,
              help="NPU-ready graph: batch 1, fixed shapes, standard ONNX ops only.")
@click.option("--verify-window", default=5, show_default=True, type=int,
              help="With --static: positions per call (draft K + 1; prefill runs in chunks of it).")
@click.option("--drafter", default="auto", show_default=True,
              help="MTP drafter directory (ours, or a Gemma 4 assistant checkpoint) to put in the bundle; "
                   "auto: the drafter shipped for this model, recognised by its weights (not for --quant qdq); "
                   "none: no drafter.")
@click.option("--draft-top-k", default=None, type=int,
              help="Clusters the drafter's two-stage head scores exactly (default: its head tables' own; "
                   "0: full head).")
@click.option("--draft-head-rows", default="auto", show_default=True,
              help="How the drafter's two-stage head scores its candidates: fp32 rows of the target's table, "
                   "or int8 (a copy of the table in cluster order: V x hidden more bytes, a faster draft step); "
                   "auto: int8 in a dynamic fp32 bundle, whose table is stored transposed (--gemv-head), "
                   "fp32 otherwise.")
@click.option("--draft-head-context", default=None, type=int,
              help="Recent tokens the drafter's two-stage head also scores exactly, besides its clusters' "
                   "(default: 64 for edgemtp's drafters, 0 for a Gemma 4 assistant; 0: none).")
@click.option("--gemv-head/--no-gemv-head", default=None,
              help="fp32: store the LM head table transposed, for ONNX Runtime's matrix-vector kernel on "
                   "one-position passes (plain decode steps ~5% faster on Gemma 3 270M). Default: on for "
                   "dynamic fp32 bundles unless the drafter reads the table's rows (a Gemma 4 assistant, or "
                   "--draft-head-rows fp32); forced on, such a drafter's [V, hidden] table is kept as well.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
@quant_options
def export_cmd(model_dir: Path, out: Path, quant: str, capacity: int, static: bool, verify_window: int,
               drafter: str, draft_top_k: int | None, draft_head_rows: str, draft_head_context: int | None,
               gemv_head: bool | None, overwrite: bool, **quant_opts):
    """Export MODEL_DIR (config.json + *.safetensors + tokenizer.json) to an ONNX bundle."""
    from .exporters import AUTO, export, load_config, resolve_capacity

    if capacity is not None:
        resolve_capacity(capacity, load_config(model_dir)[0], limit=True)
    given = click.get_current_context().get_parameter_source("verify_window") == ParameterSource.COMMANDLINE
    if given and not (static or quant == "qdq"):
        raise EdgemtpError(f"--verify-window {verify_window} applies to a static graph: add --static")
    chosen = None if drafter == "none" else AUTO if drafter == "auto" else Path(drafter)
    if isinstance(chosen, Path) and not (chosen / "config.json").is_file():
        raise EdgemtpError(f"--drafter {drafter}: no config.json there (a drafter directory, auto or none)")
    options = {k: v for k, v in quant_opts.items() if v not in (None, ())}
    if options.get("calibration") == "none":
        options["calibration"] = None
    with progress_bar("exporting", show_what=True) as progress:
        export(model_dir, out, quant=quant, capacity=capacity, overwrite=overwrite, progress=progress,
               static_window=verify_window if static or quant == "qdq" else None, drafter=chosen,
               drafter_top_k=draft_top_k, drafter_head_rows=draft_head_rows,
               drafter_head_context=draft_head_context, quant_options=options,
               gemv_head=AUTO if gemv_head is None else gemv_head)
    click.echo(f"wrote {out}")


def sampling_options(f):
    for opt in reversed([
        click.option("--max-new-tokens", default=128, show_default=True, type=int,
                     help="Tokens to generate at most (generation also stops at a stop token or the KV capacity)."),
        click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy."),
        click.option("--top-k", default=0, show_default=True, type=int, help="0 keeps all tokens."),
        click.option("--top-p", default=1.0, show_default=True, type=float,
                     help="Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1]; "
                          "1 keeps all."),
        click.option("--seed", default=None, type=int, help="Seed for sampling (>= 0; default: a fresh one)."),
        click.option("--provider", default="cpu", show_default=True, help="ONNX Runtime execution provider."),
        click.option("--threads", default=None, type=int, help="Intra-op threads (default: all cores)."),
    ]):
        f = opt(f)
    return f


def draft_options(f):
    for opt in reversed([
        click.option("--draft", "draft_mode", default="auto", show_default=True,
                     type=click.Choice(["auto", "mtp", "hybrid", "lookup"]),
                     help="Drafter: mtp (the bundle's MTP drafter), lookup (prompt lookup), hybrid (lookup "
                          "where the text repeats, MTP elsewhere); auto: hybrid with a drafter, else lookup, "
                          "and lookup for an int8 / int4 target on the CPU."),
        click.option("--draft-k", default=4, show_default=True, type=int,
                     help="Tokens drafted per round at most (hybrid: prompt lookup's; its MTP drafts at most 2)."),
        click.option("--adaptive", is_flag=True,
                     help="Draft, each round, the length (up to --draft-k, 0 for a plain step) that pays best by "
                          "this run's measured verify and draft times and acceptance (with --seed, a sampled "
                          "output then follows the timings too)."),
        click.option("--no-draft", is_flag=True, help="Plain decoding, one target pass per token."),
        click.option("--drafter-provider", default=None,
                     help="Execution provider for the MTP drafter (default: --provider's), e.g. cpu while "
                          "the target runs on an NPU."),
    ]):
        f = opt(f)
    return f


@cli.command("generate")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", default=None, type=click.Path(path_type=Path),
              help="Read the prompt from a file (-: standard input).")
@click.option("--chat", is_flag=True,
              help="The prompt is a user's message: format it with the model's chat template (instruction-tuned "
                   "models; needs jinja2: pip install 'edgemtp[chat]').")
@click.option("--system", default=None, help="With --chat: a system message before the user's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--stop", "stop", multiple=True,
              help="Stop where the generated text first holds this string, and end the output just before it "
                   "(repeatable; \\n, \\t, \\r and \\\\ stand for a newline, tab, carriage return and backslash).")
@sampling_options
@draft_options
def generate_cmd(bundle_dir, prompt, prompt_file, chat, system, as_json, stop, max_new_tokens, temperature, top_k, top_p, seed,
                 provider, threads, draft_mode, draft_k, adaptive, no_draft, drafter_provider):
    """Generate text from a bundle (streams to the terminal).

    Speculative decoding is on by default (--draft auto: prompt lookup and the bundle's MTP drafter, or
    lookup alone without one or for an int8 / int4 target on the CPU). Output is the same as --no-draft
    (greedy: token for token; sampling: in distribution)."""
    from .runtime.engine import new_stats
    from .runtime.stops import stop_strings

    request = read_prompt(prompt, prompt_file)
    if system is not None and not chat:
        raise EdgemtpError("--system applies to --chat prompts")
    if system is not None:
        utf8(system, "--system")
    if chat:  # a message list: Engine.encode renders it with the bundle's chat template
        request = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": request}]
    stop = stop_strings([unescape(s) for s in stop])
    engine, sampling, draft = load_engine(bundle_dir, max_new_tokens, temperature, top_k, top_p, seed, provider,
                                          threads, draft_mode, draft_k, adaptive, no_draft, drafter_provider)
    if chat:
        engine.chat_prompt(request)  # no template, or one refusing the messages: before any work
    if as_json:
        click.echo(json.dumps(engine.generate(request, max_new_tokens, sampling, draft, stop=stop).to_json()))
        return
    stats = new_stats(draft)
    for piece in engine.stream(request, max_new_tokens, sampling, draft, stats=stats, stop=stop):
        click.echo(piece, nl=False)
    click.echo()
    click.echo(speed_line(stats), err=True)


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """A --stop value with \\n, \\t, \\r and \\\\ made the characters they name (a shell passes "\\n"
    as two characters); any other backslash stays as typed."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text)


def load_engine(bundle_dir, max_new_tokens, temperature, top_k, top_p, seed, provider, threads, draft_mode, draft_k,
                adaptive, no_draft, drafter_provider, reuse_prefix: bool = False):
    """(engine, sampling, draft) for generate's and chat's options, each checked before any work."""
    from .runtime.engine import Draft, Engine
    from .runtime.sampling import Sampling

    sampling = Sampling(temperature, top_k, top_p, seed)
    if no_draft:
        given = [f"--{n.replace('_mode', '').replace('_', '-')}" for n in ("draft_mode", "draft_k", "adaptive")
                 if click.get_current_context().get_parameter_source(n) == ParameterSource.COMMANDLINE]
        if given:
            raise EdgemtpError(f"--no-draft and {given[0]}: drafting is either off or configured, not both")
    draft = None if no_draft else Draft(draft_mode, draft_k, adaptive)
    if adaptive and draft_k == 0:
        raise EdgemtpError("--adaptive with --draft-k 0: adaptive drafting chooses up to --draft-k tokens a round")
    if max_new_tokens < 1:
        raise EdgemtpError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    mtp = None if draft is not None and draft.mode == "auto" else draft is not None and draft.mode in ("mtp", "hybrid")
    engine = Engine.load(bundle_dir, provider=provider, threads=threads, drafter_provider=drafter_provider, mtp=mtp,
                         reuse_prefix=reuse_prefix)
    if draft is not None:
        engine.drafter(draft.mode)  # a bad --draft fails before any work
    return engine, sampling, draft


@cli.command("chat")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="A system message that opens the conversation.")
@sampling_options
@draft_options
def chat_cmd(bundle_dir, system, max_new_tokens, temperature, top_k, top_p, seed, provider, threads, draft_mode,
             draft_k, adaptive, no_draft, drafter_provider):
    """Chat with an instruction-tuned bundle: each line read is a user's message, the reply streams back.

    The conversation goes through the model's chat template, and each turn runs only its new tokens (the
    engine keeps the conversation's KV cache: reuse_prefix). /reset starts over, /exit or the end of the
    input ends."""
    from .runtime.engine import new_stats
    from .runtime.target import CapacityError

    engine, sampling, draft = load_engine(bundle_dir, max_new_tokens, temperature, top_k, top_p, seed, provider,
                                          threads, draft_mode, draft_k, adaptive, no_draft, drafter_provider,
                                          reuse_prefix=True)
    opening = [{"role": "system", "content": utf8(system, "--system")}] if system is not None else []
    hello = engine.encode(engine.chat_prompt([*opening, {"role": "user", "content": "Hello"}]))  # no template, ...
    if opening and len(hello) + 1 >= engine.capacity:  # ... one refusing --system, or no room after it
        raise EdgemtpError(f"--system: the conversation would open with {len(hello)} tokens, leaving no room in the "
                           f"bundle's KV capacity of {engine.capacity}")
    interactive = sys.stdin.isatty()
    messages, unanswered = list(opening), 0
    while True:
        if interactive:
            click.echo("> ", nl=False)
        try:
            line = stdin_text(lambda f: f.readline(), "the input line")
        except EdgemtpError as e:
            click.echo(f"error: {e}", err=True)
            unanswered += 1
            continue
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(opening)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stats, reply = new_stats(draft), []
        try:
            for piece in engine.stream(messages, max_new_tokens, sampling, draft, stats=stats):
                click.echo(piece, nl=False)
                reply.append(piece)
        except CapacityError as e:
            messages.pop()
            earlier = len(messages) > len(opening)  # only then can /reset make room
            click.echo(f"error: {e}" + (": /reset starts the conversation over" if earlier else ""), err=True)
            unanswered += 1
            continue
        click.echo()
        click.echo(speed_line(stats), err=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
    if unanswered and not interactive:  # a script feeding lines learns from the exit status that some failed
        raise EdgemtpError(f"{unanswered} message(s) of the input got no reply (each error is above)")


def read_prompt(prompt: str | None, prompt_file: Path | None, file_flag: str = "--prompt-file") -> str:
    if (prompt is None) == (prompt_file is None):
        raise EdgemtpError("give exactly one of --prompt or --prompt-file")
    if prompt_file is not None and str(prompt_file) == "-":  # the usual spelling of standard input
        return _has_text(stdin_text(lambda f: f.read(), file_flag + " -"), f"{file_flag} -: standard input")
    if prompt_file is not None:
        try:
            text = prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or type(e).__name__
            raise EdgemtpError(f"{file_flag} {prompt_file}: cannot read ({why})") from None
        return _has_text(text, f"{file_flag} {prompt_file}: the file")
    return utf8(prompt, "--prompt")


def _has_text(text: str, what: str) -> str:
    if not text.strip():
        raise EdgemtpError(f"{what} is {'empty' if not text else 'only whitespace'}")
    return text


def stdin_text(read, flag: str) -> str:
    """`read(stream)` of standard input as text, bytes that are not UTF-8 named by `flag`: read as bytes, since
    a text stdin in a strict UTF-8 locale raises UnicodeDecodeError from the read itself."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a stream of text only (an app's or a test's)
        return utf8(read(sys.stdin), flag)
    try:
        return read(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise EdgemtpError(f"{flag}: not valid UTF-8 text") from None


def utf8(text: str, flag: str) -> str:
    """`text` from the command line or stdin: bytes that are not UTF-8 arrive as lone surrogates, which the
    tokenizer refuses with a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgemtpError(f"{flag}: not valid UTF-8 text") from None
    return text


def speed_line(stats) -> str:
    cached = f" ({stats.cached_tokens} more cached)" if stats.cached_tokens else ""
    line = (f"[prefill {stats.prefill_tokens} tokens{cached} at {stats.prefill_tokens_per_s:.1f} tok/s; "
            f"decode {stats.decode_tokens} tokens at {stats.tokens_per_s:.1f} tok/s")
    if getattr(stats, "rounds", 0):
        line += (f"; {stats.rounds} rounds, {stats.mean_accepted_per_round + 1:.2f} tokens/round, "
                 f"acceptance {stats.acceptance_rate:.0%}")
    return line + f"; {stats.stop_reason}]"


@cli.command("evaluate")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--text-file", required=True, type=click.Path(path_type=Path), help="Text to score.")
@click.option("--reference", default=None, type=click.Path(path_type=Path),
              help="Reference bundle (e.g. the fp32 export) for top-1 agreement and KL divergence.")
@click.option("--max-tokens", default=None, type=int, help="Score at most this many tokens of the text (>= 2).")
@click.option("--threads", default=None, type=int, help="Intra-op threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_cmd(bundle_dir, text_file, reference, max_tokens, threads, as_json):
    """Perplexity of a bundle on a text; with --reference, top-1 agreement and KL divergence."""
    from .evaluate import evaluate

    if max_tokens is not None and max_tokens < 2:
        raise EdgemtpError(f"--max-tokens {max_tokens} must be at least 2 (perplexity scores the tokens after "
                           "the first)")
    text = read_prompt(None, text_file, "--text-file")
    result = evaluate(bundle_dir, text, reference, threads=threads, max_tokens=max_tokens)
    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        click.echo(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")


@cli.command("cluster")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(), callback=_output,
              help="Directory for head.safetensors (centroids, token_ordering, token_mask).")
@click.option("--clusters", default=2048, show_default=True, type=int, help="k-means clusters of the vocabulary.")
@click.option("--top-k", default=32, show_default=True, type=int, help="Clusters scored exactly per step.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the k-means initialisation.")
@click.option("--calibration", default=None, type=click.Path(path_type=Path),
              help="Final hidden states [N, d] (.npy/.npz) to learn centroids from (much higher recall).")
@click.option("--report", "report_hidden", default=None, type=click.Path(path_type=Path),
              help="Held-out hidden states (.npy/.npz): print recall and softmax mass for k in 8,16,32,64, "
                   "and the full vs clustered head (fp32 and int8 rows) timed on them.")
@click.option("--positions", default=None, type=int,
              help="Calibration positions collected from the offline corpora when no --calibration is given "
                   "(default 32768; more: higher held-out recall, longer run), or drafter states with --drafter "
                   "(default 73728).")
@click.option("--drafter", "drafter_dir", default=None, type=click.Path(path_type=Path),
              help="Calibrate on this drafter's own states (a train-drafter output directory, with its cache/) "
                   "instead of MODEL_DIR's final hidden states: tables for that drafter's head.")
def cluster_cmd(model_dir, out, clusters, top_k, seed, calibration, report_hidden, positions, drafter_dir):
    """Build the two-stage (clustered) logit head of MODEL_DIR by k-means over its vocabulary."""
    from .calibration.head_report import POSITIONS, cluster_model, recall_report

    if positions is not None and (positions < 512 or calibration is not None):
        raise EdgemtpError(f"--positions {positions}: " + ("at least 512" if positions < 512 else
                                                           "applies only without --calibration"))
    if drafter_dir is not None and calibration is not None:
        raise EdgemtpError("--drafter and --calibration: give one source of calibration states")
    for flag, path in (("--calibration", calibration), ("--report", report_hidden)):
        if path is not None and not path.is_file():
            raise EdgemtpError(f"{flag} {path}: no such file (expected hidden states in .npy / .npz)")
    if seed < 0:
        raise EdgemtpError(f"--seed {seed} must be 0 or more")
    writable_dir(out, "-o")  # before k-means, which takes minutes
    with progress_bar("clustering the vocabulary", show_what=drafter_dir is not None) as progress:
        if drafter_dir is not None:
            if importlib.util.find_spec("torch") is None:  # the drafter runs in torch, as in training
                raise EdgemtpError("--drafter needs torch: pip install 'edgemtp[train]'")
            from .drafter import head_fit
            path = head_fit.fit_head(drafter_dir, model_dir, out, clusters, top_k, positions or head_fit.POSITIONS,
                                     seed, progress)
        else:
            path = cluster_model(model_dir, out, clusters, top_k, seed, progress, calibration,
                                 positions=positions or POSITIONS)
    click.echo(f"wrote {path}")
    if report_hidden:
        click.echo(json.dumps(recall_report(model_dir, path, report_hidden, speed=True), indent=2))


@cli.command("train-drafter")
@click.argument("target_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(), callback=_output,
              help="Drafter directory (config.json, model.safetensors, checkpoint.pt, train.log, cache/).")
@click.option("--data", default="code=256,docs=160,shakespeare=96", show_default=True,
              help="Training windows per offline corpus (domain=count, comma-separated); domain=START:STOP "
                   "takes the windows domain=STOP draws beyond the first START (fresh windows for --init).")
@click.option("--heldout", default="code=3,docs=2,shakespeare=1", show_default=True,
              help="Held-out windows per corpus, for the acceptance shown while training.")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Tokens per window.")
@click.option("--greedy-from", default=0, show_default=True, type=int,
              help="P > 0: keep each window's first P tokens and replace the rest by the target's own greedy "
                   "continuation (the text a drafter is judged on; every draft step's label is known on it).")
@click.option("--steps", default=400, show_default=True, type=int)
@click.option("--batch", default=4, show_default=True, type=int, help="Windows per step.")
@click.option("--lr", default=1.5e-3, show_default=True, type=float)
@click.option("--draft-k", default=4, show_default=True, type=int, help="Draft steps unrolled in training.")
@click.option("--hidden", default=256, show_default=True, type=int, help="Drafter width.")
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--intermediate", default=None, type=int,
              help="MLP units per drafter layer (default 1024). With --init, a larger value widens that "
                   "drafter's MLPs (same drafts to start with; the new units are trained).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT/checkpoint.pt.")
@click.option("--threads", default=1, show_default=True, type=int,
              help="torch threads for training (the target pass uses at least 2).")
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Start from this drafter's weights (e.g. a shipped drafter, to train it on more data).")
@click.option("--eval-every", default=60, show_default=True, type=int, help="Steps between held-out evaluations.")
@click.option("--head-clusters", default=None, type=int,
              help="After training, fit the clustered head's tables (head.safetensors) on the drafter's own "
                   "states, with this many clusters; 0: none (--init's tables are carried over). Default: 2048 "
                   "for vocabularies of 65,536 tokens or more, else 0.")
@click.option("--head-top-k", default=32, show_default=True, type=int, help="Clusters the fitted head scores exactly.")
@click.option("--accept-weight", default=0.0, show_default=True, type=float,
              help="0..1: share of the loss weighted by what each draft is worth to tokens per round (how "
                   "likely a round starts at its position and its earlier drafts are accepted, times what the "
                   "later drafts add) rather than uniformly over positions.")
def train_drafter_cmd(target_dir, out, data, heldout, seq_len, greedy_from, steps, batch, lr, draft_k, hidden,
                      layers, intermediate, seed, resume, threads, init, eval_every, head_clusters, head_top_k,
                      accept_weight):
    """Distill an MTP drafter for TARGET_DIR (needs the `train` extra: torch, transformers).

    Labels are the target's own greedy predictions; the held-out acceptance (tokens per verify round at
    K = --draft-k) is printed as it trains. The target pass over the corpora is cached in OUTPUT/cache."""
    try:
        from .drafter.train import DataSpec, TrainSpec, train_drafter
    except ImportError as e:
        raise EdgemtpError(f"train-drafter needs torch and transformers: pip install 'edgemtp[train]' ({e})") from None
    if seed < 0:
        raise EdgemtpError(f"--seed {seed} must be 0 or more")
    for flag, value in (("--steps", steps), ("--batch", batch), ("--seq-len", seq_len), ("--draft-k", draft_k),
                        ("--hidden", hidden), ("--layers", layers), ("--threads", threads),
                        ("--eval-every", eval_every), ("--intermediate", intermediate)):
        if value is not None and value < 1:
            raise EdgemtpError(f"{flag} {value} must be at least 1")
    spec = DataSpec(seq_len=seq_len, train=domain_counts("--data", data, ranges=True),
                    heldout=domain_counts("--heldout", heldout), seed=seed, greedy_from=greedy_from)
    if greedy_from and not 1 <= greedy_from < seq_len:
        raise EdgemtpError(f"--greedy-from {greedy_from}: must be between 1 and --seq-len - 1 ({seq_len - 1})")
    if init is not None and not (init / "config.json").is_file():
        raise EdgemtpError(f"--init {init}: not a drafter directory (no config.json)")
    if not (math.isfinite(lr) and lr > 0):
        raise EdgemtpError(f"--lr {lr} must be a positive number")
    if not 0.0 <= accept_weight <= 1.0:
        raise EdgemtpError(f"--accept-weight {accept_weight}: must be between 0 and 1")
    train = TrainSpec(k=draft_k, batch=batch, lr=lr, eval_every=eval_every, accept_weight=accept_weight)
    with progress_bar("drafter", show_what=True) as progress:
        def show(step: int, total: int, record: dict) -> None:
            phase = record.get("phase")
            progress(step, total, f"loss {record['loss']:.3f}" if "loss" in record else
                     f"head tables: {record['what']}" if phase == "head" else
                     "target pass over the corpora (cached)" if phase == "target pass" else
                     "target's greedy continuations (cached)" if phase == "greedy continuation" else "training")
            if record.get("phase") == "eval":
                tpr = ", ".join(f"{k} {v['tokens_per_round']:.2f}" for k, v in record.items()
                                if isinstance(v, dict) and "tokens_per_round" in v)
                click.echo(f"step {step}: held-out tokens/round {tpr}", err=True)

        shape = dict(hidden=hidden, num_layers=layers)
        if intermediate is not None:
            shape["intermediate"] = intermediate
        report = train_drafter(target_dir, out, spec, steps=steps, seed=seed, resume=resume, progress=show,
                               shape=shape, spec=train, threads=threads, init=init, head_clusters=head_clusters,
                               head_top_k=head_top_k)
    click.echo(json.dumps({"heldout": report["heldout"], "train_s": report["train_s"]}))
    click.echo(f"wrote {out}")


def domain_counts(flag: str, value: str, ranges: bool = False) -> dict:
    """domain=N,... -> {domain: N}; with `ranges`, domain=START:STOP too -> {domain: [START, STOP]}."""
    from .drafter.data import DOMAINS

    out, windows = {}, 0
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, _, count = part.partition("=")
        start, colon, stop = count.partition(":") if ranges and ":" in count else ("0", "", count)
        if name not in DOMAINS or not (start.isdigit() and stop.isdigit()) or (colon and int(start) >= int(stop)):
            form = "domain=count or domain=start:stop (start < stop)" if ranges else "domain=count"
            raise EdgemtpError(f"{flag} {part!r}: expected {form} with domain one of {', '.join(DOMAINS)}")
        out[name] = [int(start), int(stop)] if colon else int(stop)
        windows += int(stop) - int(start)
    if not windows:
        raise EdgemtpError(f"{flag} {value!r} selects no windows")
    return out


def int_list(flag: str, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise EdgemtpError(f"{flag} {value!r} must be comma-separated integers, e.g. 0,2,4") from None
    if not out:
        raise EdgemtpError(f"{flag} is empty")
    return out


@cli.command("profile")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", default="128,512", show_default=True, help="Comma list of prompt lengths.")
@click.option("--gen-tokens", default=128, show_default=True, type=int, help="Tokens generated per run.")
@click.option("--repetitions", default=5, show_default=True, type=int,
              help="Timed runs per row (after one warm-up run).")
@click.option("--draft-k", default="0,2,4,6", show_default=True, help="Comma list of K; 0 is plain decoding.")
@click.option("--batch", default="1", show_default=True, help="Comma list of batch sizes (prompts at once).")
@click.option("--provider", default="cpu", show_default=True,
              help="Execution provider of the rows (a row is skipped when this onnxruntime lacks it).")
@click.option("--threads", default=None, type=int, help="Intra-op threads (default: all cores).")
@click.option("--draft", "drafter", default="auto", show_default=True,
              help="Comma list of drafters: lookup, mtp, hybrid; auto is generate's default.")
@click.option("--head", default="auto", show_default=True,
              help="MTP drafter heads to compare: clustered, full (auto: every head the bundle has).")
@click.option("--drafter-provider", default=None, help="Execution provider for the MTP drafter.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json", "csv", "md"]))
@click.option("--trace", default=None, type=click.Path(path_type=Path), help="Write ORT's per-op Chrome trace.")
@click.option("--plot", "plot_file", default=None, type=click.Path(path_type=Path),
              help="Write a plot: a .png file (or another format matplotlib writes: .pdf, .svg...).")
@click.option("--text-file", default=None, type=click.Path(path_type=Path), help="Prompt text (default: code).")
@click.option("--fast-verify", is_flag=True,
              help="Batched verify graph with its own packed weights (faster at --batch > 1, more memory).")
@click.option("--adaptive", is_flag=True,
              help="Also a row per drafter drafting adaptively (as generate --adaptive), up to the largest K.")
def profile_cmd(bundle_dir, prompt_tokens, gen_tokens, repetitions, draft_k, batch, provider, threads, drafter,
                head, drafter_provider, fmt, trace, plot_file, text_file, fast_verify, adaptive):
    """Latency profile of a bundle on this device: plain decoding vs each drafter (lookup, MTP, hybrid)
    at each K, side by side."""
    from .runtime import profile as prof
    from .runtime import profile_report as report
    from .runtime.session import resolve_provider

    if repetitions < 1:
        raise EdgemtpError(f"--repetitions {repetitions} must be at least 1")
    if gen_tokens < 1:
        raise EdgemtpError(f"--gen-tokens {gen_tokens} must be at least 1")
    for flag, values, least in (("--prompt-tokens", prompt_tokens, 1), ("--batch", batch, 1),
                                ("--draft-k", draft_k, 0)):
        bad = [v for v in int_list(flag, values) if v < least]
        if bad:
            raise EdgemtpError(f"{flag} {bad[0]} must be at least {least}")
    if adaptive and not any(int_list("--draft-k", draft_k)):
        raise EdgemtpError(f"--adaptive with --draft-k {draft_k}: adaptive rows draft up to the largest K, and there "
                           "is none above 0")
    for flag, values, known in (("--draft", drafter, ("auto", "lookup", "mtp", "hybrid")),
                                ("--head", head, ("auto", "clustered", "full"))):
        bad = [v.strip() for v in values.split(",") if v.strip() not in known]
        if bad:
            raise EdgemtpError(f"{flag} {bad[0]!r} is unknown (choose from {', '.join(known)})")
    with warnings.catch_warnings():  # a known provider this build lacks: its rows say so ("skipped")
        warnings.simplefilter("ignore")
        resolve_provider(provider)
    for flag, path in (("--plot", plot_file), ("--trace", trace)):
        if path is not None and path.is_dir():  # matplotlib would write DIR.png beside it
            raise EdgemtpError(f"{flag} {path}: is a directory (give a file name in it)")
        if path is not None:
            writable_dir(path.parent, flag, shown=path)  # before the run, which takes minutes
        if path is not None and not path.parent.is_dir():
            raise EdgemtpError(f"{flag} {path}: no such directory {path.parent}")
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
                              drafter, text, progress, head, drafter_provider, fast_verify, adaptive)
    click.echo(report.render(result, fmt, prof.speedups(result)))
    if all(r["skipped"] for r in result["rows"]):  # the table says why; a script should not read it as a run
        raise EdgemtpError("no row ran: every row was skipped (the table gives each row's reason)")
    if trace:
        click.echo(report.write_trace(lambda prefix: _traced_engine(bundle_dir, provider, threads, prefix),
                                      lambda e: e.generate("def main():", max_new_tokens=16), trace), err=True)
    if plot_file:
        report.plot(result, plot_file)


def _traced_engine(bundle_dir, provider, threads, prefix):
    from .runtime.engine import Engine
    from .runtime.session import make_session
    from .runtime.target import Target

    engine = Engine.load(bundle_dir, provider=provider, threads=threads, verify=False)
    path = engine.bundle.graph("target").path
    engine.target = Target(make_session(path, provider, threads, profile_prefix=prefix), engine.target.contract)
    return engine


@cli.command("quickstart")
@click.option("--workdir", default=Path.home() / ".cache" / "edgemtp", type=click.Path(path_type=Path),
              show_default=True, help="Where the imported model and the bundle go.")
@click.option("--prompt", default="def fibonacci(n):", show_default=True, help="Prompt of both generations.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Tokens each generation makes.")
def quickstart_cmd(workdir: Path, prompt: str, max_new_tokens: int):
    """Import the default model (Gemma 3 270M), export a bundle with its shipped MTP drafter, generate
    plainly and speculatively, and print both speeds."""
    from . import bundle as bundle_mod
    from .exporters import AUTO, export
    from .gguf_import import default_gguf_path, import_gguf
    from .runtime.engine import Draft, Engine, new_stats

    if max_new_tokens < 1:
        raise EdgemtpError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if workdir.exists() and not workdir.is_dir():
        raise EdgemtpError(f"--workdir {workdir}: is a file, not a directory")
    model_dir, bundle_dir = workdir / "gemma3-270m", workdir / "gemma3-270m.bundle"
    imported = (model_dir / "config.json").is_file()
    fresh = (bundle_dir / "edgemtp.json").is_file() and bundle_mod.load(bundle_dir, verify=False).has_graph("drafter")
    if not (imported and fresh):  # e.g. a read-only home: named here, not as a path deep inside it
        writable_dir(workdir, "--workdir")  # (a ready workdir may be read-only: nothing is written then)
    if not imported:
        gguf = default_gguf_path()
        with progress_bar("importing Gemma 3 270M") as progress:
            import_gguf(gguf, model_dir, progress=progress)
    if not fresh:  # none yet, or one exported before the drafter shipped
        with progress_bar("exporting the bundle", show_what=True) as progress:
            export(model_dir, bundle_dir, progress=progress, drafter=AUTO, overwrite=True)
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


def main():
    # ONNX Runtime 1.29+ sends usage telemetry from Linux and macOS too, and on a read-only home prints a
    # warning about it to every command's stderr. The command turns it off unless the user set the variable
    # (read when onnxruntime loads: nothing has imported it yet); an app embedding the runtime decides itself.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    with exit_on_sigterm():
        cli(prog_name="edgemtp")


if __name__ == "__main__":
    main()
