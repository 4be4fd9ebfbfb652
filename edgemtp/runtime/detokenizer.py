"""The text of a growing list of generated ids, decoding only its newest tokens.

Engine.stream used to decode every id after each token: 0.2 ms a token at 1,000 tokens, 0.86 ms at 4,000
(Gemma's tokenizer on the 2-core Xeon), a few percent of a decode step by then and growing. Here the text is
split where a character ended ("settled"): each token decodes the tokens since the last split, together with
the tokens before it back to the split before that, and keeps what it adds to their text. Decoding from a
split keeps both decodes' starts alike: a SentencePiece decoder drops the leading space of the first token
in both, and a byte-fallback run is never cut. Where the earlier tokens decode to nothing (special tokens,
dropped), the leading space would be dropped from the new ones only: that token decodes the whole list."""

from __future__ import annotations

from typing import Callable


def decode_text(tokenizer, ids: list[int]) -> str:
    """Text of `ids`. When they end inside a character (its first bytes only, as byte-fallback tokens), the
    cut character is one U+FFFD after the text before it: the tokenizer's decoder would turn the whole run of
    byte tokens into replacement characters, the complete characters before the cut too."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not text.endswith("\ufffd"):
        return text
    for cut in range(1, min(3, len(ids)) + 1):  # a UTF-8 character has at most 3 bytes before its last
        head = tokenizer.decode(ids[:-cut], skip_special_tokens=True)
        if not head.endswith("\ufffd"):
            return head + "\ufffd"
    return text


class IncrementalDecoder:
    def __init__(self, decode: Callable[[list[int]], str]):
        """`decode`: ids -> text, ending in one U+FFFD where the ids end inside a character (Engine.decode)."""
        self.decode = decode
        self.ids: list[int] = []
        self.settled = ""  # the text of ids[:start], which later tokens do not change
        self.start = 0
        self.context = 0  # the split before start: ids[context:start] are decoded again with the new ones

    def add(self, token: int) -> str:
        """The whole text after `token` (ending in U+FFFD while a character is still cut)."""
        self.ids.append(token)
        if self.start == 0:
            text = self.decode(self.ids)
        else:
            before = self.decode(self.ids[self.context:self.start])
            window = self.decode(self.ids[self.context:])
            if before and window.startswith(before):
                text = self.settled + window[len(before):]
            else:
                text = self.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.settled, self.context, self.start = text, self.start, len(self.ids)
        return text
