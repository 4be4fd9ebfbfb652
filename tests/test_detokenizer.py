"""The streaming text (runtime.detokenizer): decoding only the newest tokens gives the whole text's decode."""

import pytest
from tokenizers import Tokenizer, decoders

from edgemtp.runtime.detokenizer import IncrementalDecoder, decode_text

TEXT = ("Héllo  wörld,\tdéjà vu!\n\n  def f(x):\n      return x ** 2  # 平方\n"
        "Emoji 🙂👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢; Ελληνικά, русский, עברית, 日本語のテキスト. ")


def check_every_prefix(tok: Tokenizer, ids: list[int]) -> int:
    """Feeds `ids` one by one; returns how many prefixes ended inside a character."""
    lengths = []
    inc, cut = IncrementalDecoder(lambda i: lengths.append(len(i)) or decode_text(tok, i)), 0
    for n, token in enumerate(ids, 1):
        got, want = inc.add(token), decode_text(tok, ids[:n])
        assert got == want, (n, got[-40:], want[-40:])
        cut += got.endswith("\ufffd")
    # it decodes the newest tokens, not the whole list (but where a special token leaves nothing before them)
    assert sorted(lengths)[int(0.9 * len(lengths))] <= 8, sorted(lengths)[-20:]
    return cut


def tokenizer(model_dir, strip: bool) -> Tokenizer:
    """Gemma 3's tokenizer; `strip`: with a Llama-style decoder that drops the text's first space."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if strip:
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return tok


@pytest.mark.parametrize("strip", [False, True])
def test_incremental_text_is_the_whole_decode(gemma3_270m_dir, strip):
    """Gemma 3's tokenizer (byte fallback; and with a decoder that drops the first token's leading space):
    every prefix of mixed-script text, with runs of spaces, new lines, byte-fallback characters and special
    tokens (dropped from the text; a leading space after one must stay), decodes to what decoding all of it
    gives."""
    tok = tokenizer(gemma3_270m_dir, strip)
    ids = tok.encode(TEXT * 3, add_special_tokens=False).ids
    specials = [tok.token_to_id(t) for t in ("<start_of_turn>", "<end_of_turn>", "<bos>")]
    assert None not in specials
    # a special token before a word with its leading space, two in a row, one first of all
    spaced = tok.encode(" again and again", add_special_tokens=False).ids
    ids = [specials[2]] + ids[:40] + [specials[0]] + spaced + [specials[1], specials[0]] + spaced + ids[40:]
    assert check_every_prefix(tok, ids) > 0  # the text does cut characters (byte-fallback tokens)
    assert decode_text(tok, ids).count(" again and again") == 2


def test_one_character_over_many_tokens(gemma3_270m_dir):
    """Byte-fallback runs: a cut character shows as one U+FFFD after the text before it, then as itself."""
    tok = tokenizer(gemma3_270m_dir, False)
    ids = tok.encode("𓀀𓀁 x 𓀂", add_special_tokens=False).ids
    assert len(ids) >= 8  # each hieroglyph is four byte tokens
    assert check_every_prefix(tok, ids) >= 6


@pytest.mark.parametrize("strip", [False, True])
def test_bytes_that_are_not_utf8_keep_the_characters_beside_them(gemma3_270m_dir, strip):
    """A byte-fallback run that is not UTF-8 (a character the model got wrong) decodes as Python's
    errors="replace" does: the tokenizer's decoder would make the whole run U+FFFD, taking back a character
    that streaming had shown. Random lists of words and byte tokens: every text that does not end in U+FFFD
    is the start of every later one (what Engine.stream needs), and the incremental text is the whole one."""
    import numpy as np

    tok = tokenizer(gemma3_270m_dir, strip)
    v = tok.get_vocab()
    ids = [v[t] for t in ("▁the", "<0xC3>", "<0xA9>", "<0xE2>", "▁the")]
    assert tok.decode(ids) == " the\ufffd\ufffd\ufffd the".lstrip(" " if strip else "")  # the decoder's own
    assert decode_text(tok, ids) == " theé\ufffd the".lstrip(" " if strip else "")
    rng = np.random.default_rng(0)
    words = [v[t] for t in ("▁the", "▁x", ",", "é")] + [v[f"<0x{b:02X}>"] for b in (0x41, 0xC3, 0xA9, 0xE2, 0x82, 0xAC,
                                                                                    0xF0, 0x9F, 0x99, 0x82, 0xFF)]
    for _ in range(200):
        ids = [int(t) for t in rng.choice(words, size=12)]
        texts = [decode_text(tok, ids[:n]) for n in range(1, len(ids) + 1)]
        inc = IncrementalDecoder(lambda i: decode_text(tok, i))
        assert [inc.add(t) for t in ids] == texts, ids
        for n, text in enumerate(texts):
            if not text.endswith("\ufffd"):
                assert all(later.startswith(text) for later in texts[n:]), (ids, n, text, texts)


def test_a_byte_level_vocabulary_shows_a_cut_character_as_one_replacement():
    """A byte-level BPE vocabulary (GPT-2, Llama 3, Qwen: no <0x..> tokens, a token per byte here): a character
    cut at the end is one U+FFFD after the text before it, as Python decodes the bytes so far, token by token
    and incrementally."""
    from tokenizers import models, pre_tokenizers

    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = "ab 🙂x é€ 平方 z"
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode())  # a token per byte
    want = [text.encode()[:n].decode("utf-8", "replace") for n in range(1, len(ids) + 1)]
    assert sum(w.endswith("\ufffd") for w in want) == 10  # 3 + 1 + 2 + 2 + 2 cut
    assert [decode_text(tok, ids[:n]) for n in range(1, len(ids) + 1)] == want
    inc = IncrementalDecoder(lambda i: decode_text(tok, i))
    assert [inc.add(t) for t in ids] == want
    # bytes that are no UTF-8 at all: one U+FFFD each, as errors="replace" (they were collapsed into one)
    byte_token = {b: tok.token_to_id(c) for b, c in zip(range(256), _gpt2_byte_chars())}
    for data in (b"ab\xff\xff\xff", b"ab\xe2\x82\xff", b"\xff\xfe"):
        assert decode_text(tok, [byte_token[b] for b in data]) == data.decode("utf-8", "replace")


def test_a_stream_shows_a_character_once_all_its_bytes_came(tiny_gemma3):
    """Engine.stream's pieces over a byte-level vocabulary: a character cut so far is held back (its U+FFFD is not
    shown, to be taken back when its last byte comes), so each piece is the character its last byte completed."""
    from tokenizers import models, pre_tokenizers

    from edgemtp.runtime.engine import Engine

    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    engine = Engine.load(tiny_gemma3[2])
    engine.tokenizer = tok  # the text of the ids streamed: Engine._text decodes with it
    text = "ab 🙂x é€ 平方 z"
    ids = (i for i in tok.encode(text).ids)  # a generator, as token_stream's: the pieces close it with themselves
    assert list(engine._pieces(ids, engine.stops())) == list(text)


def _gpt2_byte_chars() -> list[str]:
    """The character GPT-2's byte-level alphabet gives each byte 0..255 (printable ones stand for themselves)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


def test_a_special_token_inside_a_byte_run_is_dropped_as_the_tokenizer_drops_it(gemma3_270m_dir):
    """A special token between a character's bytes is dropped before decoding (transformers' decode with
    skip_special_tokens=True gives the character), whether or not another run in the text is broken: the repair
    of a broken run once split the run there, taking back a character that streaming had shown (the joined
    stream pieces then repeated the whole text)."""
    tok = tokenizer(gemma3_270m_dir, False)
    v = tok.get_vocab()
    resh = [v["<0xD7>"], v["<unk>"], v["<0xA8>"]]  # U+05E8 (ר) with <unk> inside
    assert tok.decode(resh, skip_special_tokens=True) == decode_text(tok, resh) == "\u05e8"
    ids = resh + [v["▁x"], v["<0xFF>"]]  # then a byte that is not UTF-8: the repair runs
    assert decode_text(tok, ids) == "\u05e8 x\ufffd"
    inc = IncrementalDecoder(lambda i: decode_text(tok, i))
    assert [inc.add(t) for t in ids] == [decode_text(tok, ids[:n]) for n in range(1, len(ids) + 1)]


def test_a_vocabulary_with_only_some_byte_tokens_keeps_the_decoders_text():
    """Byte-fallback runs are repaired only where all 256 <0x..> tokens exist: the repaired run is spelt in byte
    tokens (U+FFFD is EF BF BD), which a vocabulary holding a few of them lacks. Its text is the decoder's,
    a cut character one U+FFFD, not a KeyError."""
    from tokenizers import models

    tok = Tokenizer(models.WordLevel({"<0xC3>": 0, "<0xA9>": 1, "a": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    for ids, want in (([2, 0], "a\ufffd"), ([2, 0, 1], "aé"), ([0, 0, 2], "\ufffd\ufffda"), ([1, 2], "\ufffda")):
        assert decode_text(tok, ids) == want
