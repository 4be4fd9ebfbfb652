"""The `chat` command: a conversation with an instruction-tuned bundle, a message per input line."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import click

from ..errors import EdgemtpError
from .base import cli
from .run import (UnreadableInput, draft_options, load_engine, parse_chat_args, sampling_from, sampling_options,
                  speed_line, stdin_text, system_text)


@cli.command("chat")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="A system message that opens the conversation.")
@click.option("--chat-arg", "chat_arg", multiple=True, metavar="NAME=VALUE",
              help="A variable for the chat template, as apply_chat_template's keyword arguments (VALUE read as "
                   "JSON where it is; repeatable), e.g. enable_thinking=false for Qwen3's and SmolLM3's answers "
                   "without thinking.")
@click.option("--json", "as_json", is_flag=True,
              help="For programs: one JSON object per message on its own line (generate --json's, or {\"error\"}) "
                   "instead of streamed text.")
@sampling_options
@draft_options
def chat_cmd(bundle_dir, system, chat_arg, as_json, max_new_tokens, temperature, top_k, top_p, min_p,
             repetition_penalty, seed, provider, threads, packed_cache, draft_mode, draft_k, adaptive, draft_p_min,
             no_draft, drafter_provider):
    """Chat with an instruction-tuned bundle: each line read is a user's message, the reply streams back.

    The conversation goes through the model's chat template, and each turn runs only its new tokens (the
    engine keeps the conversation's KV cache: reuse_prefix). /reset starts over, /exit or the end of the
    input ends, /help lists the commands. A reply may hold newlines: a program reading the replies asks for
    --json, one line each."""
    from ..runtime.engine import new_stats
    from ..runtime.target import CapacityError

    sampling = sampling_from(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    # before the load: its warnings (a provider missing from the build) came before the mistake's error
    opening = [{"role": "system", "content": system_text(system)}] if system is not None else []
    engine, draft = load_engine(bundle_dir, max_new_tokens, provider, threads, draft_mode, draft_k, adaptive,
                                no_draft, drafter_provider, reuse_prefix=True, chat_args=parse_chat_args(chat_arg),
                                p_min=draft_p_min, packed_cache=packed_cache)
    hello = engine.encode(engine.chat_prompt([*opening, {"role": "user", "content": "Hello"}]))  # no template, ...
    if opening and len(hello) + 1 >= engine.capacity:  # ... one refusing --system, or no room after it
        raise EdgemtpError(f"--system: the conversation would open with {len(hello)} tokens, leaving no room in the "
                           f"bundle's KV capacity of {engine.capacity}")
    interactive = stdin_is_terminal()
    prompt = interactive and not as_json
    messages, unanswered, first = list(opening), 0, True
    while True:
        try:
            if prompt:  # in the try: a signal coming as soon as the prompt shows is one at the prompt
                click.echo("> ", nl=False)
            line = stdin_text(lambda f: f.readline(), "the input line")
        except (SystemExit, UnreadableInput):  # SIGTERM / SIGHUP at the prompt, or an input no line can come from
            if prompt:  # (nohup's, opened write-only): the chat ends, and the shell's prompt starts a line of its own
                end_line()
            raise
        except EdgemtpError as e:  # a line that is not UTF-8: the chat goes on with the next
            failed(e, as_json)
            unanswered += 1
            continue
        if prompt and not line.endswith("\n"):  # Ctrl-D: the terminal ends no line for it (nor for text
            end_line()  # typed before it, which the reply would follow on its line)
        if first:  # input from a file saved with a byte order mark: the mark is no text of the first message
            line, first = line.removeprefix("\ufeff"), False
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(opening)
            continue
        if line.strip() in ("/help", "/?"):
            click.echo(json.dumps({"help": CHAT_HELP}) if as_json else CHAT_HELP)
            continue
        if UNKNOWN_COMMAND.fullmatch(line.strip()):  # a mistyped command is no message for the model
            failed(f"unknown command {line.strip()} ({CHAT_HELP})", as_json)
            unanswered += 1
            continue
        if not line.strip():
            if as_json:  # a program reads a line for each message it wrote: else it would wait forever
                failed("an empty message: nothing to answer", as_json)
                unanswered += 1
            continue
        messages.append({"role": "user", "content": line.rstrip("\r\n")})  # \r: a line typed on Windows
        if as_json:  # the whole reply, then one line: a reply's own newlines do not split it
            try:
                gen = json_reply(engine, messages, max_new_tokens, sampling, draft, interactive)
            except CapacityError as e:
                messages.pop()
                failed(no_room(e, messages, opening), as_json)
                unanswered += 1
                continue
            click.echo(json.dumps(gen.to_json()))
            messages.append({"role": "assistant", "content": gen.text})
            continue
        stats, reply, stream = new_stats(draft), [], None
        try:
            stream = engine.stream(messages, max_new_tokens, sampling, draft, stats=stats)  # checks the turn's room
            for piece in stream:
                # before the echo: a signal inside it can come once its text is out, and the reply then is what
                # the screen shows (a Ctrl-C in the first piece's echo dropped the message, its text on screen)
                reply.append(piece)
                click.echo(piece, nl=False)
        except (KeyboardInterrupt, SystemExit) as e:
            # at a terminal Ctrl-C stops the reply, as in other chats, and the chat goes on; SIGTERM / SIGHUP, or a
            # program's SIGINT, end the chat, the reply so far with its line end, as generate's text (SIGHUP: the
            # terminal may be gone)
            if isinstance(e, SystemExit) or not interactive:
                if reply:
                    end_line()
                raise
            if stream is not None:  # the engine keeps the cache of what was generated (reuse_prefix) for the next turn
                stream.close()
            click.echo()
            if not reply:  # stopped before any of it showed: the turn is taken back (not an empty reply kept)
                messages.pop()
                click.echo("(reply stopped before it began: your message is dropped; /exit or Ctrl-D ends the chat)",
                           err=True)
                continue
            click.echo("(reply stopped: the conversation keeps it as it stands; /exit or Ctrl-D ends the chat)",
                       err=True)
            messages.append({"role": "assistant", "content": "".join(reply)})
            continue
        except CapacityError as e:
            messages.pop()
            failed(no_room(e, messages, opening), as_json)
            unanswered += 1
            continue
        click.echo()
        click.echo(speed_line(stats), err=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
    if unanswered and not interactive:  # a script feeding lines learns from the exit status that some failed
        raise EdgemtpError(f"{unanswered} message(s) of the input got no reply (each error is above)")


def json_reply(engine, messages: list, max_new_tokens: int, sampling, draft, interactive: bool):
    """engine.generate(messages, ...)'s Generation, except that at a terminal Ctrl-C ends the reply where it
    is, as in the plain chat: the reply then holds what was generated, stop_reason "interrupted" (the engine
    keeps its KV cache for the next turn)."""
    from ..runtime.engine import Generation, new_stats

    gen = Generation("", [], new_stats(draft))
    tokens = engine.token_stream(engine.encode(messages), max_new_tokens, sampling, draft, gen.stats)
    try:
        for token in tokens:
            gen.tokens.append(token)
    except KeyboardInterrupt:
        if not interactive:  # a program's SIGINT ends the chat
            raise
        tokens.close()
        gen.stats.stop_reason = "interrupted"
        if hasattr(gen.stats, "stop_reasons"):  # drafting's per-row reasons, which the closed stream set "closed"
            gen.stats.stop_reasons = ["interrupted"]
    gen.text = engine.decode(gen.tokens)
    return gen


CHAT_HELP = "/reset starts the conversation over, /exit or /quit ends it, /help says this"
# one word after a slash (/help, /clear): a command; a message may start with a slash otherwise ("/etc/hosts is
# empty, why?"), and goes to the model as typed
UNKNOWN_COMMAND = re.compile(r"/[A-Za-z?][\w-]*")


def no_room(error: Exception, messages: list, opening: list) -> str:
    """The error for a message the KV capacity cannot hold, with the way out when there is one."""
    earlier = len(messages) > len(opening)  # only then can /reset make room
    return f"{error}" + (": /reset starts the conversation over" if earlier else "")


def end_line() -> None:
    """Ends standard output's line on the way out of the chat; SIGHUP's terminal may be gone (EIO), and the
    exit goes on."""
    with contextlib.suppress(OSError):
        click.echo()


def failed(error, as_json: bool) -> None:
    """A chat message's error: on stderr, or with --json in the reply's place (one line per message)."""
    if as_json:
        click.echo(json.dumps({"error": str(error)}))
    else:
        click.echo(f"error: {error}", err=True)


def stdin_is_terminal() -> bool:
    """Whether a person types the chat's input (a test stands in for one by replacing this)."""
    return sys.stdin is not None and sys.stdin.isatty()
