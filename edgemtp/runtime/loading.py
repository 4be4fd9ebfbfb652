"""Engine.load's work: a bundle directory to an Engine (its checks, the tokenizer, the target's session and graph
wrapper, the chat template), and what a closed engine keeps in their place (Closed). Apart from engine.py, which
keeps Engine.load's signature and docstring (the arguments are described there), to keep each under DESIGN.md's ~400
lines.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer

from .. import bundle as bundle_mod
from ..errors import EdgemtpError, SwitchError
from .chat import ChatTemplate, check_chat_args
from .head_pages import HeadTables
from .packed_cache import check_packed_cache, packed_target
from .heap import release_freed_memory
from .requests import check_load_args
from .session import ORT_MIN_INT4, check_onnxruntime, make_session, resolve_provider, runs_on_cpu
from .static_target import StaticTarget, is_static
from .target import Target, verify_loader


def load_engine(cls, bundle_dir: str | Path, provider: str, threads: int | None, verify: bool,
                drafter_provider: str | None, mtp: bool | None, fast_verify: bool, huge_pages: bool,
                reuse_prefix: bool, chat_args: dict | None, head_huge_pages: bool, packed_cache=None):
    """Engine.load (see there): `cls` is the Engine class it was called on."""
    from .drafting import auto_mode

    check_load_args(bundle_dir, provider, threads, drafter_provider, verify=verify, mtp=mtp,
                     fast_verify=fast_verify, huge_pages=huge_pages, reuse_prefix=reuse_prefix,
                     head_huge_pages=head_huge_pages)
    check_packed_cache(packed_cache, provider)
    chat_args = check_chat_args(chat_args) if chat_args is not None else {}
    b = bundle_mod.load(Path(bundle_dir), verify=verify)
    check_onnxruntime()  # before the int4 floor: the one every bundle needs is named first
    if b.graph("target").quant == "int4":
        check_onnxruntime(ORT_MIN_INT4, f"{b.dir}, an int4 bundle,", " (older ones read its embedding table wrong)")
    if chat_args and b.chat is None:  # variables for a template there is not: said before any work
        raise EdgemtpError(f"{b.dir}: chat_args (--chat-arg) set chat template variables, and the bundle has no "
                           "chat template")
    check_fast_verify(b, fast_verify)
    if drafter_provider is not None:  # a typo fails before any work; the fallback warns once, at its load
        # (not by ignoring warnings meanwhile: the filters are the process's, an app's other threads' too)
        resolve_provider(drafter_provider, "drafter_provider", warn=False)
    if mtp is None:
        mtp = auto_mode(b, provider) == "hybrid"
    try:
        tok = Tokenizer.from_file(str(b.tokenizer_path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise EdgemtpError(f"{b.tokenizer_path}: not a valid tokenizer.json ({e})") from None
    release_freed_memory()  # its parse's JSON tree, before the session's memory piles on top (runtime/heap.py)
    # not beside a packed cache, whose copy maps the table for the target: a second mapping would be read whole at
    # load (640 MB more RSS for Gemma 3 270M) for the drafter, which reads a few of its columns a step
    tables = HeadTables.load(b) if head_huge_pages and runs_on_cpu(provider) and packed_cache is None else None
    target_path = b.graph("target").path if packed_cache is None else packed_target(b, packed_cache, provider, threads)
    session = make_session(target_path, provider, threads, spin=not mtp, huge_pages=huge_pages,
                           initializers=tables and tables.initializers("target"))
    contract = b.graph("target").contract
    if is_static(contract):
        try:
            target = StaticTarget(session, contract)
        except EdgemtpError as e:  # its check of the graph's inputs does not know the file: name it
            raise EdgemtpError(f"{b.graph('target').path}: {e}") from None
    else:  # bundle.load checked the graph against its contract
        target = Target(session, b.target_contract,
                        verify_loader(b, provider, threads, mtp, fast_verify, huge_pages and fast_verify, tables))
    engine = cls(b, target, tok)
    engine.head_tables = tables
    if b.chat is not None:
        path, special = b.chat
        try:
            engine.chat_template = ChatTemplate(path.read_text(encoding="utf-8"), special, str(path), chat_args)
        except UnicodeDecodeError:
            raise EdgemtpError(f"{path}: not UTF-8 text") from None

    # the files read since bundle.load checked them (the tokenizer, the head table, the target's graph, the chat
    # template) must be those it checked: `export --overwrite` renaming a new bundle into place meanwhile gave a
    # target graph of the new bundle over the old one's head table and manifest, which generated tokens neither
    # model gives. Refused ("load it again"), also where the rename came after every read (the engine was whole)
    b.check_unchanged()
    engine.threads, engine.provider = threads, provider
    engine.drafter_provider = drafter_provider or provider
    engine.fast_verify = fast_verify
    engine.kept.enabled = reuse_prefix
    engine.target_spins = not mtp
    release_freed_memory()  # what building the session freed
    return engine


def check_fast_verify(b, fast_verify: bool) -> None:
    """Engine.load's and profile's `fast_verify` against bundle `b`: asked for on a bundle without the batched verify
    graph it would change nothing, so it is refused. Profile checks too, before any row: where every row is
    skipped no engine loads."""
    if fast_verify and not b.has_graph("verify"):
        raise SwitchError("fast_verify", True, f"needs a batched verify graph, and {b.dir} has none (it verifies "
                          "with its target graph)")


class Closed:
    """What Engine.close leaves in place of the target and the kept cache: any use of them is one clear error,
    not an AttributeError on None from somewhere inside a generation."""

    def __getattr__(self, name: str):
        raise EdgemtpError(CLOSED)

    def __setattr__(self, name: str, value) -> None:  # `engine.reuse_prefix = False` was stored here silently
        raise EdgemtpError(CLOSED)


CLOSED = "the engine was closed (Engine.close, or the end of its with block): load it again"


class Stream(Iterator):
    """A generator an engine gave out (stream, token_stream, token_ids), which Engine.close ends: left open (read
    in part, not closed), its frame held the target's and the drafter's sessions until it was collected, and a
    drafting one went on generating on the closed engine. Once ended so, its next use says the engine was closed.

    One thread at a time runs the generator (`_running`, never waited for): a second reader is refused, and a
    close from another thread while a read runs is left to that reader, which gets its pass's token and ends at
    its next read. A close says so (`_closing`, `_ended`) before it runs the generator's ending, so that a read
    coming meanwhile sees why it cannot run: the stream ended, not a second reader."""

    def __init__(self, gen: Iterator, inner: "Stream | None" = None):
        # inner: the token stream a text stream reads (Engine.stream), which its close closes too
        self._gen, self._inner, self._ended, self._closing = gen, inner, False, False
        self._running = threading.Lock()

    def __next__(self):
        if not self._running.acquire(blocking=False):
            if self._ended:
                raise EdgemtpError(CLOSED)
            if self._closing:  # another thread is ending it now
                raise StopIteration
            raise EdgemtpError("the stream is being read by another thread: read a stream from one thread at a "
                               "time")
        try:
            if self._ended:  # ended while another thread's read ran it (Engine.close): its frame lets go of the
                self._gen.close()  # cache and the sessions now, not when the app drops the stream
                raise EdgemtpError(CLOSED)
            if self._closing:  # closed from another thread while this one read: closed now, between passes
                self._gen.close()
                raise StopIteration
            return next(self._gen)
        finally:
            self._running.release()

    def close(self) -> None:
        self._closing = True
        if self._inner is not None:  # said now, not when this stream's generator closes it: a text stream holding
            # its pass's piece back (half a character, a stop string's start) read its token stream's next pass,
            # which raised "the engine was closed" where Engine.close came meanwhile (and ran after the close)
            self._inner._closing = True
        self._run_ending()

    def end(self) -> None:
        # finished, or closed (by its reader; or by another thread mid-pass, the reader's next read ending it): it
        # stops as a generator does, not with an error
        if self._closing or (inspect.isgenerator(self._gen) and self._gen.gi_frame is None):
            return
        self._ended = True
        if self._inner is not None:  # as close(): a reader mid-pass holding its piece back reads its token stream's
            # end, not "the engine was closed" (the held piece lost), and this stream says so at the next read
            self._inner._closing = True
            self._inner._run_ending()  # a text stream never read: its _pieces never got to close the token stream
        self._run_ending()  # what it ran is kept as a reader's close keeps it (reuse_prefix)

    def _run_ending(self) -> None:
        """Closes the generator now, unless another thread runs it: that thread's read ends it after its pass (and
        lets go of the engine then)."""
        if self._running.acquire(blocking=False):
            try:
                self._gen.close()
            finally:
                self._running.release()


class Streams:
    """The streams an engine gave out that are still referenced (weakly: a dropped one goes as before)."""

    def __init__(self):
        self._live, self._lock = weakref.WeakSet(), threading.Lock()
        self._ended = False

    def add(self, gen: Iterator, inner: Stream | None = None) -> Stream:
        stream = Stream(gen, inner)
        with self._lock:
            # refused once end_all ran: a drafting stream given after it and read before close let go of the
            # target took the kept cache, and its rounds, which hold the target, ran to the end on a closed engine
            if self._ended:
                raise EdgemtpError(CLOSED)
            self._live.add(stream)
        return stream

    def end_all(self) -> None:
        with self._lock:
            self._ended = True
            live = list(self._live)
        # text streams first: their end says how their token streams end (ended first, a token stream would raise
        # "the engine was closed" in a read its text stream's end left to end quietly)
        for stream in sorted(live, key=lambda s: s._inner is None):
            stream.end()
