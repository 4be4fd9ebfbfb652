"""The embeddable API: `Engine.load(bundle).generate(prompt)` / `.stream(prompt)`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from .. import bundle as bundle_mod
from ..errors import EdgemtpError
from .sampling import Sampling, pick
from .session import make_session
from .stats import Stats
from .target import CapacityError, Target


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stats: Stats = field(default_factory=Stats)

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "stats": self.stats.to_json()}


class Engine:
    def __init__(self, bundle: bundle_mod.Bundle, target: Target, tokenizer: Tokenizer):
        self.bundle, self.target, self.tokenizer = bundle, target, tokenizer
        self.stop_ids = frozenset(bundle.model.get("eos_token_ids") or ())

    @classmethod
    def load(cls, bundle_dir: str | Path, provider: str = "cpu", threads: int | None = None,
             verify: bool = True) -> "Engine":
        b = bundle_mod.load(Path(bundle_dir), verify=verify)
        target = Target(make_session(b.graph("target").path, provider, threads), b.target_contract)
        try:
            tok = Tokenizer.from_file(str(b.tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise EdgemtpError(f"{b.tokenizer_path}: not a valid tokenizer.json ({e})") from None
        return cls(b, target, tok)

    @property
    def capacity(self) -> int:
        return self.target.contract.capacity

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_ids(self, prompt_ids: list[int], max_new_tokens: int = 128, sampling: Sampling = Sampling(),
                  stats: Stats | None = None) -> Iterator[int]:
        """Yields generated token ids one by one (plain decoding, batch 1)."""
        _check_request(prompt_ids, max_new_tokens, self.capacity)
        stats = stats if stats is not None else Stats()
        rng = np.random.default_rng(sampling.seed)
        cache = self.target.new_cache(1)
        t0 = time.perf_counter()
        logits, _ = self.target.forward(np.array([prompt_ids]), cache)
        stats.prefill_tokens, stats.prefill_s = len(prompt_ids), time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(max_new_tokens):
            token = pick(logits[0, -1], sampling, rng)
            yield token
            if token in self.stop_ids:
                stats.stop_reason = "stop token"
                return
            if i + 1 == max_new_tokens:
                stats.stop_reason = "max new tokens"
                return
            if cache.room(0) < 1:
                stats.stop_reason = "KV capacity reached"
                return
            logits, _ = self.target.forward(np.array([[token]]), cache)
            stats.decode_tokens += 1
            stats.decode_s = time.perf_counter() - t0

    def generate(self, prompt: str, max_new_tokens: int = 128, sampling: Sampling = Sampling()) -> Generation:
        gen = Generation("", [])
        gen.tokens = list(self.token_ids(self.encode(prompt), max_new_tokens, sampling, gen.stats))
        gen.text = self.decode(gen.tokens)
        return gen

    def stream(self, prompt: str, max_new_tokens: int = 128, sampling: Sampling = Sampling(),
               stats: Stats | None = None) -> Iterator[str]:
        """Yields text pieces as tokens arrive (holding back half-decoded UTF-8 sequences)."""
        ids, shown = [], ""
        for token in self.token_ids(self.encode(prompt), max_new_tokens, sampling, stats):
            ids.append(token)
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                continue
            yield text[len(shown):]
            shown = text


def _check_request(prompt_ids: list[int], max_new_tokens: int, capacity: int) -> None:
    if max_new_tokens < 1:
        raise EdgemtpError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if not prompt_ids:
        raise EdgemtpError("the prompt is empty (no tokens)")
    if len(prompt_ids) >= capacity:
        raise CapacityError(f"prompt of {len(prompt_ids)} tokens does not fit the bundle's KV capacity of "
                            f"{capacity} (export with a larger --max-context)")
