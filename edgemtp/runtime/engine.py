"""The embeddable API: `Engine.load(bundle).generate(prompt)` / `.stream(prompt)`."""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Generator, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from .. import bundle as bundle_mod
from ..errors import ArgumentError, EdgemtpError, app_stacklevel
from .chat import is_chat
from .detokenizer import IncrementalDecoder, decode_text, is_dropped
from .draft_length import RecentDraftLengths
from .drafting import auto_mode, cpu_quantized
from .heap import release_freed_memory
from .kept_cache import KeptCache
from .loading import CLOSED, Closed, Streams, load_engine
from .sampling import BadLogits, Sampling, Seen, is_bool, pick
from .session import intra_op_threads, physical_cores, runs_on_cpu
from .stats import STREAM_CLOSED, Stats, copy_plain_stats
from .stops import Stops, stop_strings
from .requests import (DRAFT_MODES, Draft, check_ids, check_kinds, check_max_new_tokens, check_request, check_text,
                       new_stats)
from .static_target import StaticTarget
from .target import Target, prefill


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stats: Stats = field(default_factory=Stats)

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "stats": self.stats.to_json()}


# adaptive draft lengths an engine keeps (Engine._lengths): one per (mode, K, batch) setting in use
DRAFT_SETTINGS_KEPT = 16


def check_mtp_drafter(bundle) -> None:
    """Drafting mtp / hybrid needs the bundle's MTP drafter: say so, and how to draft without it."""
    if not bundle.has_graph("drafter"):
        how = "a --quant qdq bundle has none" if bundle.graph("target").quant == "qdq" else \
            "or export the bundle with --drafter"
        raise EdgemtpError(f"{bundle.dir}: bundle has no MTP drafter (draft by lookup; {how})")


class Engine:
    """A loaded bundle: generate / stream / generate_batch (README, "From Python").

    Threads: one engine serves several at once, each call with its own KV cache (a lone call's tokens); the
    graphs loaded on first use are loaded once. A stream is read by one thread at a time: a second reader while a
    read runs gets an EdgemtpError saying so. stream.close() or close() from another thread while a read runs
    leaves that read its token; the stream ends at its next read."""

    def __init__(self, bundle: bundle_mod.Bundle, target: Target, tokenizer: Tokenizer):
        self.bundle, self.target, self.tokenizer = bundle, target, tokenizer
        self.stop_ids = frozenset(bundle.model.get("eos_token_ids") or ())
        self.threads = None
        self.provider = self.drafter_provider = "cpu"
        self._drafters = {}  # graph name -> MTP drafter session, loaded on first use
        self._drafters_lock = threading.Lock()  # threads drafting together load it once
        # (mode, K, batch) -> the adaptive draft length's measurements, for the settings used last
        self._draft_lengths = RecentDraftLengths(DRAFT_SETTINGS_KEPT)
        self.fast_verify = False
        self.head_tables = None  # head_pages.HeadTables: the head table the sessions read, on 2 MB pages (see load)
        self.target_spins = False  # its threads spin-wait between runs (Engine.load's mtp False)
        self._spins_lock = threading.Lock()  # threads drafting together on such a target warn once between them
        self.chat_template = None  # chat.ChatTemplate: the model's, when its bundle has one
        self.kept = KeptCache(target)  # the cache the last one-prompt generation left, with reuse_prefix
        self._streams = Streams()  # the generators given out, which close() ends
        self._pid = os.getpid()  # the process whose thread pools the sessions have (see _check_process)

    @classmethod
    def load(cls, bundle_dir: str | Path, provider: str = "cpu", threads: int | None = None,
             verify: bool = True, drafter_provider: str | None = None, mtp: bool | None = None,
             fast_verify: bool = False, huge_pages: bool = False, reuse_prefix: bool = False,
             chat_args: dict | None = None, head_huge_pages: bool = True,
             packed_cache: str | Path | None = None) -> "Engine":
        """provider: the execution provider, its options after a ':' (ONNX Runtime's provider options), e.g.
        "openvino:device_type=NPU". drafter_provider: where the MTP drafter runs (default: the target's
        provider), e.g. the target on an NPU and the drafter on the CPU. `mtp`: whether generation will draft
        with the MTP drafter (None: what --draft auto does for this bundle, so False for an int8 / int4 bundle
        on the CPU); then the target's threads do not spin-wait between runs, which would steal the drafter's CPU (see
        session.make_session); drafting with it on an engine loaded without warns once. `fast_verify`: the
        batched verify graph (speculative decoding of several prompts at once) keeps its own packed copy of
        the weights: ~1.6x faster verify passes for about the fp32 weights' size in memory (measured on Gemma 3
        270M: 84 vs 133 ms for 4 rows x 5 positions, +1.07 GB); without it the verify graph reads the target's
        memory-mapped weights (+7 MB of its own; the layers' pages of the data file, ~380 MB, then count in RSS).
        `huge_pages`: the target's weights on 2 MB pages (runtime/hugepages.py):
        decode steps ~2% faster for 0.6-3 s more at load (Gemma 3 270M fp32, row-major head; the default
        transposed head is read from the data file's mapping, and gained 0-0.4%), for long-running processes.
        `reuse_prefix`: a one-prompt generation (generate_batch's too) keeps its KV cache, and the next one whose prompt
        starts with the same tokens (a chat's next turn, which repeats the conversation so far) runs only the rest of it
        (stats.cached_tokens counts what it skipped); the cache's memory stays held between calls. Off by default so
        that repeated prompts measure their whole prefill. `chat_args`: variables for the chat template, as
        apply_chat_template's keyword arguments (e.g. {"enable_thinking": False}: Qwen3's and SmolLM3's thinking off).
        `head_huge_pages`: an fp32 bundle's head table, which every decode step reads whole, is read through a mapping
        of the data file on 2 MB pages (Linux, on the CPU; runtime/head_pages.py): decode steps up to 1.18x as fast
        (1.00-1.06x where the page cache already held it in large folios), the table mapped once (a lower RSS); False:
        through ONNX Runtime's own mappings, on whatever pages the page cache gives.
        `packed_cache`: a directory where the target's weights, packed as ONNX Runtime's CPU kernels read them, are
        kept in a file built at the first load on this machine (~10 s, 2.15 GB for Gemma 3 270M fp32) and mapped at
        every load after: ~1 GB less private memory and decode steps 1.02-1.13x as fast (runtime/packed_cache.py);
        the copy maps the head table itself (head_huge_pages then applies to nothing)."""
        return load_engine(cls, bundle_dir, provider, threads, verify, drafter_provider, mtp, fast_verify, huge_pages,
                           reuse_prefix, chat_args, head_huge_pages, packed_cache)

    def close(self) -> None:
        """Lets go of the sessions, the kept KV cache, the tokenizer and the weights' mappings now (an app switching
        models), not whenever the engine is collected; the engine is unusable after. `with Engine.load(...) as engine:`
        closes it at the end of the block. A stream it gave that is still open ends (its next use raises)."""
        self._streams.end_all()
        self.target = self.kept = Closed()  # first: a drafter loading in another thread checks it once stored
        self.tokenizer = Closed()  # Gemma 3's: 77 MB, held by a closed engine the app still names
        self._drafters.clear()
        self.head_tables = None
        release_freed_memory()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def reuse_prefix(self) -> bool:
        """See load (settable, as when it was a plain attribute)."""
        return self.kept.enabled

    @reuse_prefix.setter
    def reuse_prefix(self, on: bool) -> None:
        if not is_bool(on):  # as Engine.load: a truthy string ("no") turned keeping on
            raise ArgumentError("reuse_prefix", on, "must be True or False")
        self.kept.enabled = bool(on)  # first: a generation keeping its cache meanwhile checks it after storing
        if not on:  # the cache kept so far is let go: the next generation ran over it (cached_tokens > 0, its
            self.kept.held = None  # prefill not measured whole), and its memory stayed held until then

    @property
    def static(self) -> bool:
        """A static-shape (NPU) target: every call runs its fixed verify window."""
        return isinstance(self.target, StaticTarget)

    @property
    def capacity(self) -> int:
        return self.target.contract.capacity

    def encode(self, prompt: str | list[dict]) -> list[int]:
        """Token ids of `prompt`: text (with the tokenizer's own special tokens, e.g. <bos>), or chat messages
        ([{"role": "user", "content": "..."}, ...]) as the bundle's chat template writes them, ending with the
        opening of the assistant's turn; the template writes the special tokens it wants itself. Empty text is
        those special tokens alone, so generate("") samples text from nothing on a model with a <bos> (the
        CLI refuses an empty --prompt as a likely mistake) and is refused as an empty prompt on one without."""
        return self._encode(prompt, "prompt")

    def _encode(self, prompt: str | list[dict], name: str) -> list[int]:
        """encode, naming a wrong prompt `name` (a batch's "prompts[2]")."""
        if is_chat(prompt):
            ids = self.tokenizer.encode(check_text(self._chat_text(prompt, name), name), add_special_tokens=False).ids
        elif not isinstance(prompt, str):
            raise ArgumentError(name, prompt, "must be text or a list of chat messages")
        else:
            ids = self.tokenizer.encode(check_text(prompt, name)).ids
        return self.check_tokenizer_ids(ids, name)

    def check_tokenizer_ids(self, ids: list[int], name: str) -> list[int]:
        """`ids`, which the bundle's tokenizer gave for `name`, checked against the model's vocabulary: a
        tokenizer.json that is not its model's (a bundle from someone else) is named, not the caller's ids."""
        vocab = self.target.contract.vocab_size
        if ids and max(ids) >= vocab:
            raise EdgemtpError(f"{self.bundle.tokenizer_path}: encodes {name} with the token id {max(ids)} "
                               f"({self.tokenizer.id_to_token(max(ids))!r}), beyond the model's vocabulary of {vocab} "
                               "(the tokenizer does not match the model)")
        return ids

    def chat_prompt(self, messages: list[dict]) -> str:
        """The text the model reads for chat `messages` (its chat template, as transformers' apply_chat_template
        with add_generation_prompt=True renders it)."""
        return self._chat_text(messages, "messages")

    def _chat_text(self, messages: list[dict], name: str) -> str:
        from .chat import check_messages

        check_messages(messages, name)  # a list that is not messages is named as such, template or not
        if self.chat_template is None:
            raise EdgemtpError(f"{self.bundle.dir}: the bundle has no chat template (its model directory had no "
                               "chat_template.jinja or tokenizer_config.json chat_template); give the prompt as text")
        return self.chat_template.render(messages)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, a character they end inside as one U+FFFD (detokenizer.decode_text)."""
        check_ids("ids", ids, self.target.contract.vocab_size)
        return self._text(ids)

    def _text(self, ids: list[int]) -> str:
        """decode without the check: for the model's own ids, decoded once per token while streaming."""
        return decode_text(self.tokenizer, ids)

    def stops(self, stop=None) -> Stops:
        """The model's stop tokens and the stop strings `stop` (a string or a list of them). A stop string that is
        a special token ("<|im_end|>", which transformers' stop_strings match) stops at that token: the text,
        where stop strings are looked for, leaves special tokens out. One holding a special token among other
        text ("<|im_end|>\n<|im_start|>user") is refused: that text never holds it, and matching it on the
        tokens instead would leave no place in the text to cut it at."""
        strings = stop_strings(stop)
        ids = [self.tokenizer.token_to_id(s) for s in strings]
        special = [i for i in ids if i is not None and is_dropped(self.tokenizer, i)]
        for s, i in zip(strings, ids):
            if i not in special:
                # the tokenizer finds special tokens in a text as it does in a prompt
                held = [t for t in self.tokenizer.encode(s, add_special_tokens=False).ids
                        if is_dropped(self.tokenizer, t)]
                if held:
                    token = self.tokenizer.id_to_token(held[0])
                    raise ArgumentError("stop", s, f"holds the special token {token!r}, which the generated text "
                                        f"leaves out, so it would never match (a stop string of {token!r} alone "
                                        "stops at that token)")
        # the call's text is decoded with the tokenizer it started with: a pass another thread's close let finish
        # still gets its text after close let go of the engine's (generate_batch, a stream's held-back piece)
        return Stops(self.stop_ids, strings, functools.partial(decode_text, self.tokenizer), special)

    def _check_process(self) -> None:
        """Warns once in a process forked after this engine was loaded (a pre-fork server: gunicorn --preload):
        ONNX Runtime's intra-op thread pool does not survive a fork, and the sessions then run every op on the
        calling thread; the tokens are right, but Gemma 3 270M's plain decoding ran 1.9x slower with --threads 2."""
        if self._pid == os.getpid():
            return
        loaded, self._pid = self._pid, os.getpid()
        # the threads the sessions were made with: the default is ONNX Runtime's one per physical core where the
        # process may use the whole machine (one core of 2 hyper-threads: one thread, no pool to lose)
        threads = intra_op_threads(self.threads) or physical_cores(set(range(os.cpu_count() or 1)))
        if threads > 1:
            warnings.warn(f"this engine was loaded in process {loaded} and runs in process {self._pid}, forked from "
                          "it: ONNX Runtime's thread pools do not survive a fork, so its graphs run on one thread "
                          f"here ({threads} asked); load the engine after the fork (gunicorn: without --preload), or "
                          "before it with threads=1",
                          RuntimeWarning, stacklevel=app_stacklevel())

    def token_ids(self, prompt_ids: list[int], max_new_tokens: int = 128, sampling: Sampling = Sampling(),
                  stats: Stats | None = None, *, stop=None) -> Iterator[int]:
        """Yields generated token ids one by one (plain decoding, batch 1); `stop`: stop strings (see
        generate); `stats`, if given, is reset and filled as generation goes. Arguments are checked at the
        call, not at the first token (an app's streaming response fails before it starts)."""
        self._check_process()
        check_kinds(sampling, None, stats)
        stops = self.stops(stop)
        prompt_ids = check_request(prompt_ids, max_new_tokens, self.capacity, self.target.contract.vocab_size)
        if stats is not None:  # here, not at the first token: a stream closed before one kept an earlier call's
            stats.reset()
        return self._streams.add(self._plain(prompt_ids, max_new_tokens, sampling, stats, stops))

    def _plain(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, stats: Stats | None,
               stops: Stops) -> Iterator[int]:
        stats = stats if stats is not None else Stats()  # reset by token_ids
        rng = np.random.default_rng(sampling.seed)
        cache, cached = self.kept.take(prompt_ids)
        generated = []
        seen = Seen(prompt_ids) if sampling.penalized else None  # the repetition penalty's: distinct ids
        with self.kept.keeping(cache, prompt_ids, generated):  # the prefill too: Ctrl-C in it keeps what was cached
            t0 = time.perf_counter()
            logits, _ = prefill(self.target, prompt_ids[cached:], cache)
            stats.prefill_tokens, stats.prefill_s = len(prompt_ids) - cached, time.perf_counter() - t0
            stats.cached_tokens = cached
            for i in range(max_new_tokens):
                try:
                    token = pick(logits[0, -1], sampling, rng, () if seen is None else seen.ids)
                except BadLogits as e:  # where in a long generation (free: no check added, a handler only)
                    raise e.at(len(prompt_ids) + i, i + 1) from None
                generated.append(token)
                if seen is not None:
                    seen.add(token)
                # known before the token is given: a reader that closes the stream after its last token (as
                # drafting's rounds, which set it before giving theirs) gets why it ended, not "closed"
                reason = (stops.reason(generated) or ("max new tokens" if i + 1 == max_new_tokens else "")
                          or ("KV capacity reached" if cache.room(0) < 1 else ""))
                # the clocks split where drafting's do (Stats): the first token, sampled from the prefill's logits,
                # ends prefill_s (its time to first token); each later one's pass and sampling are in decode_s
                now = time.perf_counter()
                if i == 0:
                    stats.prefill_s, t0 = now - t0, now
                else:
                    stats.decode_tokens, stats.decode_s = i, now - t0
                try:
                    yield token
                except GeneratorExit:  # the app closed the stream (or the engine): say so, not ""
                    stats.stop_reason = reason or STREAM_CLOSED
                    raise
                if reason:
                    stats.stop_reason = reason
                    break
                logits, _ = self.target.forward(np.array([[token]]), cache)

    def drafter(self, mode: str = "auto", graph: str = "drafter", adaptive: bool = False):
        """The drafter for `mode`: mtp (the bundle's MTP drafter), lookup (prompt lookup), hybrid (prompt
        lookup where the text repeats itself, MTP elsewhere; adaptive: whichever pays) or auto (hybrid when
        the bundle has an MTP drafter, else lookup). Hybrid is the default because it drafted the most tokens
        per round on every held-out domain we measured (docs/measurements.md, "Speculative decoding"); but auto
        is lookup for an int8 / int4 target on the CPU provider, where MatMulNBits' cost grows with the rows
        of a verify window: MTP drafting measured 1.09x plain decoding at K = 2, hybrid 1.36x, lookup 1.44x at
        K = 4 (int4 Gemma 3 270M, session 28).
        `graph`: which drafter graph of the bundle (drafter_full_head: the same drafter with its full head,
        for comparison). `adaptive`: the rounds choose their draft length (runtime.draft_length), which
        learns per match length whether a lookup draft pays: lookup (and hybrid's lookup) then drafts on any
        match."""
        from .drafting import HybridDrafter, PromptLookupDrafter

        if mode not in DRAFT_MODES:
            raise ArgumentError("Draft.mode", mode, f"is unknown (choose from {', '.join(DRAFT_MODES)})", "--draft")
        if mode == "lookup" or (mode == "auto" and auto_mode(self.bundle, self.provider) == "lookup"):
            # where a wrong draft costs a wide verify (a quantized target on the CPU), only a repeat of 2+
            # tokens drafts: Gemma 3 270M int4, K = 4, five prompts (benchmarks/lookup_ngram.py), 0.86-1.96x
            # plain against 0.66-1.81x drafting on single-token matches too, better on each; fp32's cheap
            # verify gains from every match: 1.13-2.99x against 1.01-2.98x with 2+, better on each
            return PromptLookupDrafter(min_ngram=2 if cpu_quantized(self.bundle, self.provider) and not adaptive
                                       else 1)
        check_mtp_drafter(self.bundle)
        mtp = self._mtp_drafter(graph)
        if runs_on_cpu(self.drafter_provider) and self._first_spin_warning():
            # 2-core Xeon, int4 Gemma 3 270M (--layer-op integer), MTP K = 2: 54-58 against 64-68 tok/s, a
            # drafter step's p90 7.7-8.0 against 2.8 ms (docs/measurements.md, session 32)
            warnings.warn("the MTP drafter shares the CPU with a target whose threads spin-wait between runs, "
                          "which slows its steps: load with Engine.load(..., mtp=True) to draft with it",
                          RuntimeWarning, stacklevel=app_stacklevel())
        # adaptive: the hybrid too copies after any repeat, and a copy that does not pay leaves the round to
        # its MTP drafter (guess_options); fp32 Gemma 3 270M, five prompts: 1.61x plain against 1.58x with
        # neither (one lookup guess on a 2+ repeat), int4 1.21x against 1.20x (docs/measurements.md, session 29)
        return mtp if mode == "mtp" else HybridDrafter(mtp, min_ngram=1 if adaptive else 2)

    def _first_spin_warning(self) -> bool:
        """Whether the drafter's spinning-target warning is still to give (then marked given): read and marked
        under a lock, as two threads reading it before either marked it printed it twice."""
        with self._spins_lock:
            due, self.target_spins = self.target_spins, False
        return due

    def _lengths(self, draft: Draft, batch: int):
        k = min(draft.k, self.capacity)  # as Speculative's K: no round drafts more
        # p_min too: its drafts run on only past confident tokens, so each position's acceptance is its own
        return self._draft_lengths.take((draft.mode, k, batch, draft.p_min), k)

    def _mtp_drafter(self, graph: str = "drafter"):
        with self._drafters_lock:  # threads whose first drafting calls come together wait for one load
            # looked up once: close() in another thread clears the drafters without the lock, and a second
            # lookup after it raised KeyError (the call then fails on the closed target, saying so)
            drafter = self._drafters.get(graph)
            if drafter is None:
                from .drafter_session import DrafterSession

                self.bundle.check_unchanged()  # loaded now, from the files Engine.load checked
                tables = self.head_tables if runs_on_cpu(self.drafter_provider) else None
                drafter = self._drafters[graph] = DrafterSession.load(self.bundle, self.drafter_provider, self.threads,
                                                                      graph, tables and tables.initializers(graph))
                if isinstance(self.target, Closed):  # closed by another thread while it loaded: close() cleared
                    self._drafters.clear()  # the drafters before this one came, so it is let go here
                    raise EdgemtpError(CLOSED)
                release_freed_memory()
            return drafter

    def token_stream(self, prompt_ids: list[int], max_new_tokens: int = 128, sampling: Sampling = Sampling(),
                     draft: Draft | None = None, stats: Stats | None = None, *, stop=None) -> Iterator[int]:
        """Generated token ids as they come: plain decoding, or speculative when `draft` is given.
        `stats` (reset first, then filled as generation goes) may be a plain Stats with drafting too (it then
        gets the plain fields); `stop`: stop strings (see generate)."""
        self._check_process()
        check_kinds(sampling, draft, stats)
        if draft is None or draft.mode == "none" or draft.k == 0:
            return self.token_ids(prompt_ids, max_new_tokens, sampling, stats, stop=stop)
        stops = self.stops(stop)
        from .speculative import Speculative

        # first: a bad prompt is named, not a missing drafter, and loads no drafter
        prompt_ids = check_request(prompt_ids, max_new_tokens, self.capacity, self.target.contract.vocab_size)
        spec = Speculative(self.target, self.drafter(draft.mode, adaptive=draft.adaptive), draft.k,
                           adaptive=draft.adaptive, lengths=self._lengths(draft, 1) if draft.adaptive else None,
                           p_min=draft.p_min)
        if stats is not None:  # as token_ids: at the call
            stats.reset()
        return self._streams.add(self._drafting(spec, prompt_ids, max_new_tokens, sampling, stats, stops))

    def _drafting(self, spec, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                  stats: Stats | None, stops: Stops) -> Iterator[int]:
        from .speculative import SeqResult, SpecStats

        own = stats if stats is None or isinstance(stats, SpecStats) else SpecStats()  # reset by token_stream
        cache, cached = self.kept.take(prompt_ids)
        results = [SeqResult([])]
        rounds = spec.stream([prompt_ids], max_new_tokens, sampling, stops, own, results, cache, cached)
        given = 0
        try:
            with self.kept.keeping(cache, prompt_ids, results[0].tokens):
                for _row, tokens in rounds:
                    copy_plain_stats(own, stats)  # filled as generation goes, as without drafting
                    for token in tokens:
                        given += 1
                        yield token
        except GeneratorExit:
            # closed before the last round's last token: the loop's row already holds that round's reason (a stop,
            # max new tokens), which the reader never reached; it ended the stream, as plain decoding's says
            if given < len(results[0].tokens):
                results[0].stop_reason = STREAM_CLOSED
            raise
        finally:
            rounds.close()  # closed with this stream, not when collected: its stats say so (stop_reason "closed")
            copy_plain_stats(own, stats)

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 128, sampling: Sampling = Sampling(),
                 draft: Draft | None = None, *, stop=None) -> Generation:
        """`prompt`: text, or chat messages (see encode). `stop`: a string, or a list of them, that ends
        generation where the generated text first holds one; the text then ends just before it (`tokens` end
        with the token that completed it, and stats.stop_reason is "stop string"). Drafting stops at the same
        token as plain decoding."""
        check_kinds(sampling, draft)
        stops = self.stops(stop)
        gen = Generation("", [], new_stats(draft))
        gen.tokens = list(self.token_stream(self.encode(prompt), max_new_tokens, sampling, draft, gen.stats,
                                            stop=stops.strings))
        gen.text = stops.cut(stops.decode(gen.tokens))
        return gen

    def generate_batch(self, prompts: list[str | list[dict]], max_new_tokens: int = 128,
                       sampling: Sampling = Sampling(),
                       draft: Draft | None = None, *, stop=None) -> list[Generation]:
        """Several prompts at once, each with its own acceptance; stats are for the whole batch; `stop`: stop
        strings, each row stopping at its own (see generate).

        Drafted rows are verified together through the bundle's verify graph. `--draft auto` drafts for more
        than one prompt only on an engine loaded with `fast_verify`: measured at batch 4 on Gemma 3 270M
        (docs/measurements.md), lookup / hybrid K = 4 gave 1.48x / 1.44x plain batched decoding on code and
        1.34x / 1.47x on prose with it; hybrid 1.06x / 0.94x without it. Ask for a mode to draft anyway."""
        from .drafting import NoDrafter
        from .speculative import Speculative, SpecStats

        self._check_process()
        # a str: one prompt a letter; a mapping (a chat message given alone, a dict or a UserDict): one prompt a
        # key, 'role' and 'content'
        if isinstance(prompts, (str, bytes, Mapping)) or not isinstance(prompts, Iterable):
            raise ArgumentError("prompts", prompts, "must be a list of prompts (for one prompt: generate)")
        prompts = list(prompts)  # a generator or dict keys too
        check_kinds(sampling, draft)
        check_max_new_tokens(max_new_tokens)  # an empty batch too: the rows' checks would not run
        stops = self.stops(stop)
        use_draft = draft is not None and draft.mode != "none" and draft.k > 0
        if use_draft and draft.mode == "auto" and len(prompts) > 1 and not self.fast_verify:
            use_draft = False
        ids = [self._encode(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        for i, row in enumerate(ids):  # here, where the row is known: the loop's own check says "the prompt"
            check_request(row, max_new_tokens, self.capacity, self.target.contract.vocab_size, f"prompts[{i}]")
        adaptive = use_draft and draft.adaptive
        drafter = self.drafter(draft.mode, adaptive=adaptive) if use_draft else NoDrafter()
        spec = Speculative(self.target, drafter, draft.k if use_draft else 0, adaptive=adaptive,
                           lengths=self._lengths(draft, len(prompts)) if adaptive else None,
                           p_min=draft.p_min if use_draft else 0.0)
        stats = SpecStats()  # the speculative loop's, drafting or not
        if len(ids) == 1 and self.reuse_prefix:  # a one-prompt generation, as generate's: it keeps its cache
            results = self._reusing(spec, ids[0], max_new_tokens, sampling, stops, stats)
        else:
            results = spec.generate(ids, max_new_tokens, sampling, stops, stats)
        return [Generation(stops.cut(stops.decode(r.tokens)), r.tokens, stats) for r in results]

    def _reusing(self, spec, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, stops: Stops,
                 stats) -> list:
        """spec.generate for one prompt over the kept cache (reuse_prefix), keeping it again after."""
        from .speculative import SeqResult

        cache, cached = self.kept.take(prompt_ids)
        results = [SeqResult([])]
        with self.kept.keeping(cache, prompt_ids, results[0].tokens):
            for _ in spec.stream([prompt_ids], max_new_tokens, sampling, stops, stats, results, cache, cached):
                pass
        return results

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 128, sampling: Sampling = Sampling(),
               draft: Draft | None = None, *, stats: Stats | None = None, stop=None) -> Iterator[str]:
        """Yields text pieces as tokens arrive, holding back a character whose bytes have not all come, and
        text that may be the start of a stop string; the pieces joined are generate()'s text (arguments in
        its order; `stats` filled as generation goes). Arguments are checked at the call, as token_ids'."""
        stops = self.stops(stop)
        tokens = self.token_stream(self.encode(prompt), max_new_tokens, sampling, draft, stats, stop=stops.strings)
        return self._streams.add(self._pieces(tokens, stops), tokens)

    def _pieces(self, tokens: Generator[int, None, None], stops: Stops) -> Iterator[str]:
        text_of, shown = IncrementalDecoder(stops.decode), ""
        with closing(tokens):  # closed with this stream, not when collected: its stats say so at once
            for token in tokens:
                text = text_of.add(token)
                if text.endswith("\ufffd"):
                    continue
                grown = text.startswith(shown)  # else decoding rewrote shown text (the last piece mends it)
                text = stops.shown(text, len(shown) if grown else 0)  # shown holds no stop string
                if not grown or len(text) <= len(shown):  # a cut of text, which starts with shown
                    continue
                yield text[len(shown):]
                shown = text
        # what was held back when generation stopped (a cut character: U+FFFD)
        text = stops.cut(stops.decode(text_of.ids))
        if text != shown:
            same = len(os.path.commonprefix([text, shown]))  # all of it, unless decoding rewrote shown text
            yield text[same:]
