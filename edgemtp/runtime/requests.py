"""The embeddable API's arguments: Draft (speculative decoding settings) and the checks that name a wrong
argument as the caller wrote it (`max_new_tokens=0 must be at least 1`), before any work."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ArgumentError, EdgemtpError
from .sampling import Sampling, is_bool, is_number, is_whole
from .stats import Stats
from .target import CapacityError


DRAFT_MODES = ("auto", "mtp", "hybrid", "lookup")


@dataclass(frozen=True)
class Draft:
    """Speculative decoding settings: `mode` auto | mtp | lookup | hybrid | none, K drafted tokens per round
    (`adaptive`: at most K, each round's length chosen by measured cost and acceptance; the lengths follow
    the run's timings, so a seeded sampled run is not repeatable under it, a greedy one always is).
    `p_min`: the MTP drafter ends a round's draft after a token it gave less than this probability (its
    softmax's top greedy, q's top sampled), as llama.cpp's --draft-p-min; 0 drafts all K. Output unchanged."""

    mode: str = "auto"
    k: int = 4
    adaptive: bool = False
    p_min: float = 0.0

    def __post_init__(self):
        # here, not only where a drafter is made: a K = 0 (or mode "none") never makes one, and a typo passed
        if not isinstance(self.mode, str) or self.mode not in (*DRAFT_MODES, "none"):
            raise ArgumentError("Draft.mode", self.mode, f"is unknown (choose from {', '.join(DRAFT_MODES)}, none)",
                                "--draft")
        if not is_whole(self.k):
            raise ArgumentError("Draft.k", self.k, "must be a whole number", "--draft-k")
        if self.k < 0:
            raise ArgumentError("Draft.k", self.k, "must be >= 0", "--draft-k")
        if not is_bool(self.adaptive):
            raise ArgumentError("Draft.adaptive", self.adaptive, "must be True or False", "--adaptive")
        if not (is_number(self.p_min) and 0 <= self.p_min < 1):  # NaN too
            raise ArgumentError("Draft.p_min", self.p_min, "must be in [0, 1)", "--draft-p-min")
        object.__setattr__(self, "p_min", float(self.p_min))
        object.__setattr__(self, "adaptive", bool(self.adaptive))  # numpy's True as Python's (frozen dataclass)
        object.__setattr__(self, "k", int(self.k))  # and numpy's whole numbers, as Sampling's


def new_stats(draft: Draft | None) -> Stats:
    from .speculative import SpecStats

    return Stats() if draft is None or draft.mode == "none" or draft.k == 0 else SpecStats()  # as token_stream


def check_load_args(bundle_dir, provider, threads, drafter_provider, **flags) -> None:
    if not isinstance(bundle_dir, (str, os.PathLike)):
        raise ArgumentError("bundle_dir", bundle_dir, "must be a path (str or pathlib.Path)")
    for name, value in (("provider", provider), ("drafter_provider", drafter_provider)):
        if not isinstance(value, str) and not (name == "drafter_provider" and value is None):
            raise ArgumentError(name, value, "must be an execution provider's name, e.g. 'cpu'")
    if threads is not None and not is_whole(threads):
        raise ArgumentError("threads", threads, "must be a whole number or None")
    for name, value in flags.items():  # a truthy string ("no") would otherwise turn the option on
        if not is_bool(value) and not (name == "mtp" and value is None):
            raise ArgumentError(name, value, "must be True or False" + (" (or None)" if name == "mtp" else ""))


def check_kinds(sampling, draft, stats=None) -> None:
    """The API's arguments of the wrong kind, named (not an AttributeError from deep inside)."""
    if not isinstance(sampling, Sampling):
        raise ArgumentError("sampling", sampling, "must be a Sampling (e.g. Sampling(temperature=0.8))")
    if draft is not None and not isinstance(draft, Draft):
        raise ArgumentError("draft", draft, "must be a Draft (e.g. Draft('auto', 4)) or None")
    if stats is not None and not isinstance(stats, Stats):
        raise ArgumentError("stats", stats, "must be a Stats or None")


def check_ids(name: str, ids, vocab: int) -> list[int]:
    """`ids` checked, as a list of Python ints (an app may hand a numpy array or a tuple)."""
    # an iterator: used up here; bytes (a bytearray too, a Sequence of ints): a text's bytes, not its token ids
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise ArgumentError(name, ids, "must be a list of token ids")
    if isinstance(ids, np.ndarray) and ids.ndim != 1:  # a 0-d array raised TypeError iterating; a tokenizer's
        # return_tensors="np" is [1, T], whose row was "not a token id"
        raise ArgumentError(name, ids, f"must be a list of token ids (a numpy array of shape {ids.shape}, not (n,))")
    for i, t in enumerate(ids):
        if not (is_whole(t) and 0 <= t < vocab):
            raise ArgumentError(f"{name}[{i}]", t, f"is not a token id (a whole number below the vocabulary's {vocab})")
    return [int(t) for t in ids]


def check_text(text: str, name: str) -> str:
    """`text`, refused when it is not UTF-8: a lone surrogate (JSON's "\\ud83d" of an emoji cut in two, a file
    read with errors="surrogateescape") made the tokenizer raise TypeError("TextInputSequence must be str")."""
    if why := not_utf8(text):
        raise EdgemtpError(f"{name} {why}")
    return text


def not_utf8(text: str) -> str:
    """Why `text` is not UTF-8 text ("" when it is): the lone surrogate the tokenizer would fail on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not UTF-8 text: a lone surrogate {text[e.start]!r} at character {e.start}"
    return ""


def check_max_new_tokens(max_new_tokens) -> None:
    if not is_whole(max_new_tokens):
        raise ArgumentError("max_new_tokens", max_new_tokens, "must be a whole number")
    if max_new_tokens < 1:
        raise ArgumentError("max_new_tokens", max_new_tokens, "must be at least 1")


def check_request(prompt_ids: list[int], max_new_tokens: int, capacity: int, vocab: int,
                  name: str = "the prompt") -> list[int]:
    """`prompt_ids` checked, as check_ids returns them; `name`: the prompt in messages (a batch's
    "prompts[2]", so that the app learns which of its prompts is empty or too long)."""
    prompt_ids = check_ids("prompt_ids", prompt_ids, vocab)
    check_max_new_tokens(max_new_tokens)
    if not prompt_ids:
        raise EdgemtpError(f"{name} is empty (no tokens)")
    if len(prompt_ids) > capacity:  # a prompt that fills the cache still gives its one next token
        raise CapacityError(f"{name} of {len(prompt_ids)} tokens does not fit the bundle's KV capacity of "
                            f"{capacity} (export with a larger --max-context)")
    return prompt_ids
