"""Timing and token counts of one generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

STREAM_CLOSED = "closed"  # the stop_reason of a stream its reader closed (or Engine.close ended) before its end


@dataclass
class Stats:
    """The clocks split at the first token, on every path (plain and drafting, one prompt or a batch): the prefill
    pass gives its logits, so prefill_s runs until it is sampled (the time to first token; a batch's until every row
    has its own), and decode_s from there to the last token's sampling. decode_s then holds the passes and the
    sampling of the decode_tokens and nothing else, and tokens_per_s is the same measure with drafting or without."""

    prefill_tokens: int = 0  # prompt tokens run through the model
    prefill_s: float = 0.0  # their passes and sampling the first token
    cached_tokens: int = 0  # prompt tokens the last generation had run (Engine.load's reuse_prefix)
    decode_tokens: int = 0  # tokens produced after the first (which the prefill produces)
    decode_s: float = 0.0  # from the first token to the last, a stream's reader's time between tokens included
    stop_reason: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}

    def reset(self) -> None:
        """Back to a fresh object's values: a Stats handed to a generation describes that generation only
        (some fields add up as it goes, so one reused from an earlier call would mix the two)."""
        fresh = type(self)()
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


def copy_plain_stats(own: Stats, stats: Stats | None) -> None:
    """A plain Stats given to a drafting stream gets the plain fields of the loop's SpecStats."""
    if stats is not None and own is not stats:
        for f in fields(Stats):
            setattr(stats, f.name, getattr(own, f.name))
