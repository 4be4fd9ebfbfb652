"""Commands that run a bundle: generate and info, and the prompt and option handling they share with chat.py
and measure.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import ArgumentError, EdgemtpError
from ..text_bytes import utf8_text
from .base import cli, loading_status


def sampling_options(f):
    for opt in reversed([
        click.option("--max-new-tokens", default=128, show_default=True, type=int,
                     help="Tokens to generate at most (generation also stops at a stop token or the KV capacity)."),
        click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy."),
        click.option("--top-k", default=0, show_default=True, type=int, help="0 keeps all tokens."),
        click.option("--top-p", default=1.0, show_default=True, type=float,
                     help="Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1]; "
                          "1 keeps all."),
        click.option("--min-p", default=0.0, show_default=True, type=float,
                     help="Min-p sampling: drop tokens less likely than this fraction of the most likely one, in "
                          "[0, 1]; 0 keeps all."),
        click.option("--repetition-penalty", default=1.0, show_default=True, type=float,
                     help="Divide the positive logits (multiply the negative ones) of every token already in the "
                          "prompt or the output by this, as transformers' repetition_penalty (> 0; 1 is off; "
                          "greedy decoding too)."),
        click.option("--seed", default=None, type=int, help="Seed for sampling (>= 0; default: a fresh one)."),
        click.option("--provider", default="cpu", show_default=True,
                     help="ONNX Runtime execution provider, its options after a ':' (ONNX Runtime's provider "
                          "options), e.g. openvino:device_type=NPU or qnn:htp_performance_mode=burst."),
        click.option("--threads", default=None, type=int,
                     help="Intra-op threads (default and 0: one per usable core)."),
        click.option("--packed-cache", default=None, type=click.Path(path_type=Path), metavar="DIR",
                     help="Keep the target's weights, packed as ONNX Runtime's CPU kernels read them, in a file "
                          "under DIR, built at the first run on this machine and mapped after: about 1 GB less "
                          "private memory for Gemma 3 270M fp32 and faster decode steps, for twice the target's "
                          "size on disk."),
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
                     help="Tokens drafted per round at most (hybrid: prompt lookup's; its MTP drafts at most 2; "
                          "0: plain decoding, as --no-draft). "
                          "A static bundle's default: at most its verify window - 1, what one pass verifies."),
        click.option("--adaptive", is_flag=True,
                     help="Draft, each round, the length (up to --draft-k, 0 for a plain step) that pays best by "
                          "this run's measured verify and draft times and acceptance (with --seed, a sampled "
                          "output then follows the timings too)."),
        click.option("--draft-p-min", default=0.0, show_default=True, type=float,
                     help="End a round's MTP draft after a token the drafter gave less than this probability, in "
                          "[0, 1) (as llama.cpp's); 0 drafts all of --draft-k."),
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
@click.option("--chat-arg", "chat_arg", multiple=True, metavar="NAME=VALUE",
              help="With --chat: a variable for the chat template, as apply_chat_template's keyword arguments "
                   "(VALUE read as JSON where it is: true, 3, \"x\"; else as text; repeatable), e.g. "
                   "enable_thinking=false for Qwen3's and SmolLM3's answers without thinking.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--stop", "stop", multiple=True,
              help="Stop where the generated text first holds this string, and end the output just before it "
                   "(repeatable; \\n, \\t, \\r and \\\\ stand for a newline, tab, carriage return and backslash).")
@sampling_options
@draft_options
def generate_cmd(bundle_dir, prompt, prompt_file, chat, system, chat_arg, as_json, stop, max_new_tokens, temperature,
                 top_k, top_p, min_p, repetition_penalty, seed, provider, threads, packed_cache, draft_mode, draft_k,
                 adaptive, draft_p_min, no_draft, drafter_provider):
    """Generate text from a bundle (streams to the terminal).

    Speculative decoding is on by default (--draft auto: prompt lookup and the bundle's MTP drafter, or
    lookup alone without one or for an int8 / int4 target on the CPU). Output is the same as --no-draft
    (greedy: token for token; sampling: in distribution)."""
    from ..runtime.engine import new_stats
    from ..runtime.stops import stop_strings

    request = read_prompt(prompt, prompt_file)
    if system is not None and not chat:
        raise EdgemtpError("--system applies to --chat prompts")
    if chat_arg and not chat:
        raise EdgemtpError("--chat-arg applies to --chat prompts")
    if system is not None:
        system = system_text(system)
    if chat:  # a message list: Engine.encode renders it with the bundle's chat template
        request = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": request}]
    stop = stop_strings([unescape(from_argv(s)) for s in stop])
    sampling = sampling_from(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    engine, draft = load_engine(bundle_dir, max_new_tokens, provider, threads, draft_mode, draft_k, adaptive,
                                no_draft, drafter_provider, chat_args=parse_chat_args(chat_arg), p_min=draft_p_min,
                                packed_cache=packed_cache)
    if chat:
        engine.chat_prompt(request)  # no template, or one refusing the messages: before any work
    if as_json:
        click.echo(json.dumps(engine.generate(request, max_new_tokens, sampling, draft, stop=stop).to_json()))
        return
    stats, shown = new_stats(draft), False
    try:
        for piece in engine.stream(request, max_new_tokens, sampling, draft, stats=stats, stop=stop):
            shown = True  # before the echo: a signal inside it can come once its text is out
            click.echo(piece, nl=False)
    except (KeyboardInterrupt, SystemExit) as e:
        # Ctrl-C, or SIGTERM / SIGHUP as exit_on_termination_signals's exit (`timeout`, kill): the text ends where
        # it got to, with its speed line (not click's "Aborted!"), and the command with the shell's status for it
        stats.stop_reason = "interrupted"
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            if shown:  # a line end for the text's line; before any text it was an empty line of its own
                click.echo()
            click.echo(speed_line(stats), err=True)
        sys.exit(e.code if isinstance(e, SystemExit) else 130)
    click.echo()
    click.echo(speed_line(stats), err=True)


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """A --stop value with \\n, \\t, \\r and \\\\ made the characters they name (a shell passes "\\n"
    as two characters); any other backslash stays as typed."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text)


def parse_chat_args(values: tuple[str, ...]) -> dict:
    """--chat-arg NAME=VALUE options as template variables: VALUE as JSON where it parses, else the text."""
    from ..runtime.chat import check_chat_args

    def not_json(constant: str):  # NaN, Infinity, -Infinity: Python's json takes them, JSON does not
        raise ValueError(constant)

    out, given = {}, {}
    for item in values:
        name, sep, text = utf8(item, f"--chat-arg {item!r}").partition("=")
        if not sep or not name.strip():
            raise EdgemtpError(f"--chat-arg {item!r}: give NAME=VALUE, e.g. enable_thinking=false")
        if name.strip() in given:  # the last won without a word: which one was meant is the user's to say
            raise EdgemtpError(f"--chat-arg {item!r} sets {name.strip()} again (after --chat-arg "
                               f"{given[name.strip()]!r}): give each name once")
        given[name.strip()] = item
        try:
            value = json.loads(text, parse_constant=not_json)
        except ValueError:
            value = text
        try:  # named as typed (ArgumentError's own message names a --chat-args flag there is not)
            check_chat_args({name.strip(): value})
        except ArgumentError as e:
            raise EdgemtpError(f"--chat-arg {item!r} {e.rule}") from None
        out[name.strip()] = value
    return out


def sampling_from(temperature, top_k, top_p, min_p, repetition_penalty, seed):
    """The Sampling of sampling_options' flags, with a warning for the flags greedy decoding ignores."""
    from ..runtime.sampling import Sampling

    with warnings.catch_warnings():  # Sampling's warning names its fields; the one below names the flags
        warnings.simplefilter("ignore", UserWarning)
        sampling = Sampling(temperature, top_k, top_p, seed, min_p, repetition_penalty)  # ArgumentError: the flag
    source = click.get_current_context().get_parameter_source
    unused = [f"--{n.replace('_', '-')}" for n in ("top_k", "top_p", "min_p", "seed")
              if source(n) == ParameterSource.COMMANDLINE]
    if temperature == 0 and unused:  # greedy decoding: said once, as the output itself shows no sign of it
        click.echo(f"warning: {' and '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect at "
                   "--temperature 0 (greedy decoding, the default); give a temperature above 0 to sample", err=True)
    return sampling


def load_engine(bundle_dir, max_new_tokens, provider, threads, draft_mode, draft_k, adaptive, no_draft,
                drafter_provider, reuse_prefix: bool = False, chat_args: dict | None = None, p_min: float = 0.0,
                packed_cache: Path | None = None):
    """(engine, draft) for generate's and chat's options, each checked before any work."""
    from .. import bundle as bundle_mod
    from ..runtime.engine import Draft, Engine, check_mtp_drafter
    from ..runtime.requests import check_max_new_tokens
    from ..runtime.session import resolve_provider

    source = click.get_current_context().get_parameter_source
    if no_draft:
        drafting = ("draft_mode", "draft_k", "adaptive", "draft_p_min", "drafter_provider")
        given = [f"--{n.replace('_mode', '').replace('_', '-')}" for n in drafting
                 if source(n) == ParameterSource.COMMANDLINE]
        if given:
            raise EdgemtpError(f"--no-draft and {given[0]}: drafting is either off or configured, not both")
    draft = None if no_draft else Draft(draft_mode, draft_k, adaptive, p_min)
    if adaptive and draft_k == 0:
        raise EdgemtpError("--adaptive with --draft-k 0: adaptive drafting chooses up to --draft-k tokens a round")
    if draft_k == 0 and not no_draft:  # plain decoding, as --no-draft: the drafter and its options would go unused
        given = [f"--{n.replace('_mode', '').replace('_', '-')}" for n in ("draft_mode", "draft_p_min",
                                                                            "drafter_provider")
                 if source(n) == ParameterSource.COMMANDLINE]
        if given:
            raise EdgemtpError(f"--draft-k 0 and {given[0]}: K = 0 drafts nothing (plain decoding, as --no-draft)")
        draft = None  # nor is the MTP drafter loaded, nor the target's threads set to sleep for it
    check_max_new_tokens(max_new_tokens)  # the API's check: its CLI message names --max-new-tokens
    mtp = None if draft is not None and draft.mode == "auto" else draft is not None and draft.mode in ("mtp", "hybrid")
    if mtp:  # said before the load, whose warnings (a provider missing from the build) would come first
        resolve_provider(provider, warn=False)  # a mistyped --provider is still the one named
        check_mtp_drafter(bundle_mod.load(Path(bundle_dir), verify=False))
    with loading_status(Path(bundle_dir).name):
        engine = Engine.load(bundle_dir, provider=provider, threads=threads, drafter_provider=drafter_provider,
                             mtp=mtp, reuse_prefix=reuse_prefix, chat_args=chat_args or None,
                             packed_cache=packed_cache)
        if draft is not None:
            engine.drafter(draft.mode)  # a bad --draft fails before any work
    for flag, given in (("--drafter-provider", drafter_provider is not None), ("--draft-p-min", p_min > 0)):
        if draft is not None and given:
            unused_mtp_flag(engine, draft.mode, flag)
    given_k = source("draft_k") == ParameterSource.COMMANDLINE
    if draft is not None and engine.static and not given_k:  # the default K fits a static bundle's window:
        # a longer draft verifies in several passes (Gemma 3 270M, W = 3, hybrid: 42.6 tokens/s at K = 2, 29.2 at 4)
        # (W = 1: plain decoding; K = 1 verified each draft in a second pass, slower than plain)
        k = min(draft.k, engine.target.window - 1)
        asked = [f"--{n.replace('_mode', '')}" for n in ("draft_mode", "adaptive")
                 if source(n) == ParameterSource.COMMANDLINE]
        if not k and asked:  # dropped silently, the run looked like drafting that did not pay
            click.echo(f"warning: {' and '.join(asked)} {'has' if len(asked) == 1 else 'have'} no effect: the static "
                       "bundle's verify window of 1 position leaves no room for a draft (--draft-k N verifies "
                       "drafts in passes of their own)", err=True)
        draft = Draft(draft.mode, k, adaptive, draft.p_min) if k else None
    return engine, draft


def unused_mtp_flag(engine, mode: str, flag: str) -> None:
    """Says that `flag` (--drafter-provider, --draft-p-min) does nothing where the drafting runs no MTP drafter:
    lookup, or auto on a bundle without one or on a quantized CPU target (else the flag is taken silently)."""
    from ..runtime.engine import auto_mode

    resolved = auto_mode(engine.bundle, engine.provider) if mode == "auto" else mode
    if resolved == "lookup":
        click.echo(f"warning: {flag} has no effect: the drafting (lookup) uses no MTP drafter", err=True)


def read_prompt(prompt: str | None, prompt_file: Path | None, file_flag: str = "--prompt-file") -> str:
    if (prompt is None) == (prompt_file is None):
        raise EdgemtpError("give exactly one of --prompt or --prompt-file")
    if prompt_file is not None:
        if str(prompt_file) == "-":  # the usual spelling of standard input
            text, what = stdin_text(lambda f: f.read(), file_flag + " -"), f"{file_flag} -: standard input"
        else:
            try:
                data = prompt_file.read_bytes()
            except OSError as e:
                raise EdgemtpError(f"{file_flag} {prompt_file}: cannot read ({e.strerror or type(e).__name__})") \
                    from None
            text, what = utf8_text(data, f"{file_flag} {prompt_file}"), f"{file_flag} {prompt_file}: the file"
        # no byte order mark (Notepad, PowerShell's -Encoding utf8 write one), else a U+FEFF token, and universal
        # newlines (\r\n and \r as \n): the same text piped or named, from any editor, is the same prompt
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        return _has_text(text, what)
    # as a file's: an empty --prompt would generate from <bos> alone (a tokenizer without one: "no tokens")
    return _has_text(utf8(prompt, "--prompt"), "--prompt")


def system_text(system: str) -> str:
    """--system's message: UTF-8, and not empty. "" is no way to ask for no system message: Gemma 3's template
    opens the user's turn with a blank line for it, others write an empty system turn."""
    text = utf8(system, "--system")
    if not text.strip():
        raise EdgemtpError(f"--system is {'empty' if not text else 'only whitespace'} (leave it out for a "
                           "conversation without one)")
    return text


def _has_text(text: str, what: str) -> str:
    if not text.strip():
        raise EdgemtpError(f"{what} is {'empty' if not text else 'only whitespace'}")
    return text


class UnreadableInput(EdgemtpError):
    """Standard input cannot be read at all (not one bad line of it): no more input will come."""


def stdin_text(read, flag: str) -> str:
    """`read(stream)` of standard input as text, bytes that are not UTF-8 named by `flag`: read as bytes, since
    a text stdin in a strict UTF-8 locale raises UnicodeDecodeError from the read itself."""
    if sys.stdin is None:  # started with it closed (a service, pythonw on Windows): read as at its end
        return ""
    raw = getattr(sys.stdin, "buffer", None)
    try:
        data = read(sys.stdin if raw is None else raw)  # no buffer: a stream of text only (an app's or a test's)
    except OSError as e:
        # `nohup` started at a terminal gives the command a standard input opened write-only, whose read fails
        # (EBADF): a traceback, where a file named by the flag that cannot be read is one error line
        raise UnreadableInput(f"{flag}: cannot read standard input ({e.strerror or type(e).__name__})") from None
    return utf8(data, flag) if raw is None else utf8_text(data, flag)


def utf8(text: str, flag: str) -> str:
    """`text` from the command line or stdin: bytes that are not UTF-8 arrive as lone surrogates, which the
    tokenizer refuses with a traceback."""
    text = from_argv(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgemtpError(f"{flag}: not valid UTF-8 text") from None
    return text


def from_argv(text: str) -> str:
    """A command-line argument as the UTF-8 text its bytes spell: in the C locale without UTF-8 mode
    (PYTHONUTF8=0) Python decodes the command line as ASCII, and each byte of an é as a lone surrogate. Text
    without surrogates is as the locale read it (a Latin-1 locale's é is its one byte); bytes that are not
    UTF-8 stay surrogates, for the caller to refuse."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text


def speed_line(stats) -> str:
    cached = f" ({stats.cached_tokens} more cached)" if stats.cached_tokens else ""
    line = (f"[prefill {stats.prefill_tokens} tokens{cached} at {stats.prefill_tokens_per_s:.1f} tok/s; "
            f"decode {stats.decode_tokens} tokens at {stats.tokens_per_s:.1f} tok/s")
    if getattr(stats, "rounds", 0):
        line += (f"; {stats.rounds} rounds, {stats.tokens_per_round:.2f} tokens/round, "
                 f"acceptance {stats.acceptance_rate:.0%}")
    return line + f"; {stats.stop_reason}]"


@cli.command("info")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-verify", is_flag=True, help="Check the files' sizes only, not their sha256 (a moment "
                                                "instead of a read of every byte).")
def info_cmd(bundle_dir, as_json, no_verify):
    """What a bundle holds: model, KV capacity and cache size, each graph's quantization and size, the
    drafter's head. Checks the bundle as loading it does (every file's sha256 unless --no-verify)."""
    from .. import bundle as bundle_mod
    from ..bundle_info import describe, text

    info = describe(bundle_mod.load(bundle_dir, verify=not no_verify))
    click.echo(json.dumps({**info, "verified": not no_verify}) if as_json else text(info, not no_verify))
