"""Where a generation stops: the model's stop tokens, and stop strings in the text it generates.

A stop string ends a row's generation at the token whose text completes it; the row's text is cut just
before it, so the returned text never contains one (tokens keep the completing token: it may hold text
past the stop string). The check after each token decodes the row's last TAIL tokens (more where those hold
too little text), not its whole text (0.4 ms at 2,000 tokens, 0.05 at 256, Gemma's tokenizer): a suffix
decoded alone differs from the whole text only at its start (a SentencePiece decoder drops the leading space
of its first token, a byte-fallback run cut in two decodes to replacement characters, one per byte), so when
that text holds the longest stop string and SLACK characters more, a stop string completed by the newest
token lies in what the two agree on. Any doubt (a short row, or a stop string in its tail) is settled by
decoding the whole text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable

from ..errors import ArgumentError
from .requests import not_utf8


def stop_strings(stop) -> tuple[str, ...]:
    """`stop` as given to Engine.generate / stream / generate_batch (a string, or a list of them) as a
    tuple, refusing what is not a non-empty string."""
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else stop
    if isinstance(stop, (bytes, bytearray, Mapping)):  # iterable, but their items are not stop strings
        raise ArgumentError("stop", stop, "must be a string or a list of strings")
    try:
        items = tuple(items)
    except TypeError:
        raise ArgumentError("stop", stop, "must be a string or a list of strings") from None
    for s in items:
        if not isinstance(s, str):
            raise ArgumentError("stop", s, "is not a string (stop takes a string or a list of strings)")
        if not s:
            raise ArgumentError("stop", s, "must not be empty")
        if why := not_utf8(s):  # a byte that is not UTF-8 in --stop's argv: UnicodeEncodeError from the tokenizer
            raise ArgumentError("stop", s, why)
    return tuple(dict.fromkeys(items))


TAIL, SLACK = 256, 128  # tokens decoded per check; characters beyond the longest stop string it must hold


class Stops:
    """Stop tokens (ids) and stop strings; `decode` turns a row's generated ids into its text; `string_ids`: the
    special tokens that are stop strings ("<|im_end|>"), which the text leaves out (Engine.stops)."""

    def __init__(self, ids: Iterable[int] = (), strings: tuple[str, ...] = (),
                 decode: Callable[[list[int]], str] | None = None, string_ids: Iterable[int] = ()):
        if strings and decode is None:
            raise ValueError("stop strings need a decode function")
        self.ids, self.strings, self.decode = frozenset(ids), tuple(strings), decode
        self.string_ids = frozenset(string_ids)

    def reason(self, tokens: list[int]) -> str:
        """Why a row whose generated tokens are `tokens` stops now ("" if it goes on)."""
        if tokens[-1] in self.ids:
            return "stop token"
        if tokens[-1] in self.string_ids:
            return "stop string"
        if self.strings and self._holds(tokens):
            return "stop string"
        return ""

    def _holds(self, tokens: list[int]) -> bool:
        """Whether the text of `tokens` holds a stop string (checked after each token, so only one the
        newest token completed can be new), before a character it ends inside."""
        need, n = max(map(len, self.strings)) + SLACK, TAIL
        while n < len(tokens):
            tail = self.decode(tokens[-n:])
            # a tail starting inside a byte-fallback run decodes each of its bytes to U+FFFD: count what follows
            held = len(tail.lstrip("\ufffd"))
            if held >= need:
                if self.find(tail) < 0:
                    return False
                break
            # too little text (a long stop string, tokens of a character each): a longer tail, twice what the
            # characters per token so far say it needs, not the whole text, which grows with the row
            n = max(2 * n, 2 * n * need // max(held, 1))
        text = self.decode(tokens)
        # U+FFFDs at the end are a character whose bytes have not all come, one per byte in a byte-fallback
        # vocabulary (or bytes that are not UTF-8, which the next token leaves inside the text): stop="\ufffd"
        # stopped in the middle of any character over several tokens
        return self.find(text.rstrip("\ufffd")) >= 0

    def find(self, text: str, start: int = 0) -> int:
        """Where the first stop string in `text` beginning at `start` or later begins, -1 if there is none."""
        found = [i for i in (text.find(s, start) for s in self.strings) if i >= 0]
        return min(found, default=-1)

    def cut(self, text: str) -> str:
        """`text` up to its first stop string."""
        i = self.find(text)
        return text if i < 0 else text[:i]

    def shown(self, text: str, clean: int = 0) -> str:
        """What a stream may show of a row's text so far: up to its first stop string, and without an end
        that the next tokens could turn into one (a stop string's first characters). `clean`: how many of the
        text's first characters are known to hold no stop string (what the stream showed of it so far): one
        must end after them, so the search starts there less the longest one's length, not at the text's start
        (0.2 ms a token at 32k tokens with 4 stop strings, growing with the text)."""
        longest = max(map(len, self.strings), default=1)
        i = self.find(text, max(0, clean - longest + 1))
        if i >= 0:
            return text[:i]
        for n in range(min(len(text), longest - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.strings):
                return text[:-n]
        return text
