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
    """Text of `ids`. Bytes that are not UTF-8 (a character cut at the end, or bytes the model got wrong) are
    each one U+FFFD, as Python's errors="replace" has it, the complete characters beside them kept: the
    tokenizer's byte-fallback decoder turns a whole run of byte tokens into replacement characters, so a
    character `Engine.stream` had shown would be taken back."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        return text
    # a byte-level vocabulary (GPT-2, Llama 3, Qwen: no byte tokens) decodes its bytes as errors="replace" does
    repaired = _repaired_byte_runs(tokenizer, ids)
    return text if repaired is None else tokenizer.decode(repaired, skip_special_tokens=True)


def is_dropped(tokenizer, token: int) -> bool:
    """Whether the text leaves `token` out: a special token (skip_special_tokens), not one that is empty."""
    return tokenizer.decode([token], skip_special_tokens=False) != "" == tokenizer.decode([token],
                                                                                          skip_special_tokens=True)


def _repaired_byte_runs(tokenizer, ids: list[int]) -> list[int] | None:
    """`ids` with each run of byte-fallback tokens (<0x..>) that is not UTF-8 replaced by the byte tokens of
    its text decoded with errors="replace"; None when every run is UTF-8 (or the vocabulary has no byte tokens).
    A special token that the decode drops (skip_special_tokens) is kept where it is, inside a run: the
    tokenizer's decode drops it before joining the bytes around it into a character."""
    byte_of = {}
    for b in range(256):
        token = tokenizer.token_to_id(f"<0x{b:02X}>")
        if token is None:
            return None
        byte_of[token] = b
    token_of = {b: t for t, b in byte_of.items()}
    out, run, changed = [], bytearray(), False

    def flush():
        nonlocal changed
        try:
            run.decode("utf-8")
            out.extend(token_of[b] for b in run)
        except UnicodeDecodeError:
            out.extend(token_of[b] for b in run.decode("utf-8", "replace").encode("utf-8"))
            changed = True
        run.clear()

    for token in ids:
        if token in byte_of:
            run.append(byte_of[token])
            continue
        if run and is_dropped(tokenizer, token):  # a special token the decode drops never splits a run
            out.append(token)
            continue
        flush()
        out.append(token)
    flush()
    return out if changed else None


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
