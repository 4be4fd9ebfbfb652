"""Stop strings: generation ends at the token that completes one, the text just before it, the same with
and without drafting, streamed without ever showing a stop string's first characters."""

from __future__ import annotations

import re

import pytest

from edgemtp.cli import unescape
from edgemtp.errors import ArgumentError
from edgemtp.runtime.drafting import PromptLookupDrafter
from edgemtp.runtime.engine import Draft
from edgemtp.runtime.speculative import speculative_generate
from edgemtp.runtime.stops import Stops, stop_strings

from .test_speculative import _prompts, models  # noqa: F401  (the tiny models fixture)


def test_stop_strings_are_checked():
    assert stop_strings(None) == () and stop_strings("ab") == ("ab",)
    assert stop_strings(["a", "b", "a"]) == ("a", "b")  # duplicates once
    for bad, message in (("", "stop='' must not be empty"), (["x", ""], "stop='' must not be empty"),
                         (3, "stop=3 must be a string or a list of strings"),
                         (["x", 3], "stop=3 is not a string"),
                         # iterable, but their items are ints and keys: the message names what was given
                         (b"ab", "stop=b'ab' must be a string or a list of strings"),
                         (bytearray(b"ab"), "stop=bytearray(b'ab') must be a string or a list of strings"),
                         ({"ab": 1}, "stop={'ab': 1} must be a string or a list of strings")):
        with pytest.raises(ArgumentError, match=re.escape(message)):
            stop_strings(bad)
    with pytest.raises(ArgumentError) as e:
        stop_strings([""])
    assert e.value.cli_message() == "--stop '' must not be empty"


def test_find_cut_and_what_a_stream_may_show():
    stops = Stops((1,), ("\n\n", "END"), decode=lambda ids: "".join(map(chr, ids)))
    assert stops.find("a\n\nb END") == 1 and stops.find("a END\n\n") == 2 and stops.find("abc") == -1
    assert stops.cut("x END y\n\n") == "x " and stops.cut("plain") == "plain"
    assert stops.shown("abc\n") == "abc"  # "\n" may begin "\n\n"
    assert stops.shown("abc EN") == "abc "  # "EN" may begin "END"
    assert stops.shown("abc E\n") == "abc E"  # only the end that can still grow into a stop string
    assert stops.shown("abc EN\n\nz") == "abc EN"
    assert stops.shown("ENDX") == ""
    assert stops.reason([ord("a"), 1]) == "stop token"
    assert stops.reason([ord(c) for c in "xEND"]) == "stop string"
    assert stops.reason([ord(c) for c in "xEN"]) == ""
    with pytest.raises(ValueError):
        Stops((), ("x",))


def test_long_rows_are_checked_on_their_tail(monkeypatch):
    """Past TAIL tokens the check decodes the last TAIL only (decoding the whole text per token grows with
    it): a stop string the newest token completes is still found, even by a decoder that mangles the start
    of what it decodes (SentencePiece drops a leading space), and a tail too short to tell (tokens without
    text) falls back to the whole text."""
    from edgemtp.runtime import stops as S

    calls = []

    def decode(ids):  # token i is chr(i); the first character of any decode is dropped
        calls.append(len(ids))
        return "".join(map(chr, ids))[1:]

    stops = Stops((), ("xyz", "é"), decode)
    text = [ord("a") + i % 20 for i in range(600)]
    assert stops.reason(text) == "" and calls == [S.TAIL]
    assert stops.reason(text + [ord(c) for c in "xyz"]) == "stop string" and calls[-1] == 603
    assert stops.reason(text + [ord("é")]) == "stop string"
    # "xy", then tokens without text, then "z": the tail starts at "y", which its decode drops, so it
    # does not hold "xyz", but it is too short to be sure: the whole text decides
    calls.clear()
    gap = text + [ord("x"), ord("y")] + [5000] * (S.TAIL - 2) + [ord("z")]
    stops.decode = lambda ids: decode([i for i in ids if i < 1000])
    assert stops.reason(gap) == "stop string" and calls == [2, 603]  # the tail's 2 texts, then all
    assert stops.reason(text + [5000] * S.TAIL) == ""


def test_a_long_stop_string_is_checked_on_a_longer_tail_not_the_whole_text():
    """A stop string longer than TAIL tokens' text less SLACK (300 characters, one a token: digits, CJK) made every
    check decode the whole row, which grows with it (2 ms a token at 8,000 tokens, Gemma's tokenizer): the tail
    grows until it holds enough text, and what each check decodes stays bounded by the stop string, not the row."""
    calls = []

    def decode(ids):  # token i is chr(i); the first character of any decode is dropped
        calls.append(len(ids))
        return "".join(map(chr, ids))[1:]

    stop = "".join(chr(ord("a") + i % 7) for i in range(300))
    stops = Stops((), (stop,), decode)
    text = [ord("0") + i % 10 for i in range(5000)]
    assert stops.reason(text) == ""
    assert max(calls) < 1000
    calls.clear()
    assert stops.reason(text + [ord(c) for c in stop]) == "stop string"  # spanning 300 tokens
    assert stops.reason(text + [ord(c) for c in stop[:-1]]) == ""
    assert stops.reason(text[:10] + [ord(c) for c in stop]) == "stop string"


def test_a_tail_must_hold_more_than_the_stop_string():
    """A tail whose decode lost its first character (SentencePiece's leading space) may hold as many characters
    as the stop string, and still miss one that began there: it must hold SLACK more to decide alone."""
    from edgemtp.runtime import stops as S

    def decode(ids):  # token 1000: "z" and five "!"; tokens > 1000: no text; the first character dropped
        return "".join("z!!!!!" if i == 1000 else chr(i) for i in ids if i <= 1000)[1:]

    stops = Stops((), ("xyz",), decode)
    tokens = [ord("a")] * 300 + [ord("x")] + [5000] * (S.TAIL - 3) + [ord("y"), 1000]
    assert stops.decode(tokens[-S.TAIL:]) == "yz!!!!!"  # as long as the stop string and more, without it
    assert stops.reason(tokens) == "stop string"


def test_a_stream_never_shows_what_a_stop_string_takes_back():
    """What `shown` gives for each prefix of a text is the start of the text cut at its stop string: an end
    that may grow into a stop string is held back whole ("aa" may begin "aab", not only "a")."""
    stops = Stops((), ("aab", "\n\n"), decode=lambda ids: "".join(map(chr, ids)))
    assert stops.shown("xaa") == "x" and stops.shown("xa") == "x" and stops.shown("xaaa") == "xa"
    for text in ("xaaab y", "a\naab", "aaaa\n\n", "no stop here a", "xaaax\n"):
        final = stops.cut(text)
        for n in range(len(text) + 1):
            assert final.startswith(stops.shown(text[:n])), (text, n)


def _old_pieces(ids, stops):
    """Engine._pieces as it was: stop strings searched from the text's start after each token."""
    import os

    from edgemtp.runtime.detokenizer import IncrementalDecoder

    text_of, shown = IncrementalDecoder(stops.decode), ""
    for token in ids:
        text = stops.shown(text_of.add(token))
        if text != shown and text.startswith(shown):
            yield text[len(shown):]
            shown = text
    text = stops.cut(stops.decode(text_of.ids))
    if text != shown:
        yield text[len(os.path.commonprefix([text, shown])):]


def test_a_stream_searches_only_its_new_text_for_stop_strings(monkeypatch):
    """Engine.stream searched a row's whole text for its stop strings after each token: 0.2 ms a token at 32k
    tokens with 4 stop strings (Gemma's tokenizer on the 2-core Xeon), growing with the text. What it showed holds
    none, so the search starts where one could end past it: the characters searched per token are bounded (counted
    here), and the pieces are the old ones, on random texts over 3 letters (some decoded with "ba" rewritten to
    "c", which changes text already shown)."""
    import random

    from edgemtp.runtime.engine import Engine

    def pieces(stops, ids):
        return list(Engine._pieces(None, (i for i in ids), stops))

    rng = random.Random(0)
    for trial in range(400):
        strings = tuple(dict.fromkeys("".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
                                      for _ in range(rng.randint(1, 3))))
        if trial % 2:
            stops = Stops((), strings, decode=lambda ids: "".join(map(chr, ids)).replace("ba", "c"))
        else:
            stops = Stops((), strings, decode=lambda ids: "".join(map(chr, ids)))
        ids = [ord(rng.choice("abc")) for _ in range(rng.randint(0, 30))]
        assert pieces(stops, ids) == list(_old_pieces(ids, stops)), (strings, ids, trial)

    searched, find = [], Stops.find

    def counting(self, text, *start):
        searched.append(len(text) - (start[0] if start else 0))
        return find(self, text, *start)

    monkeypatch.setattr(Stops, "find", counting)
    stops = Stops((), ("END", "\n\nUser:"), decode=lambda ids: "".join(map(chr, ids)))
    ids = [ord(c) for c in "the same words again, " * 200]  # 4,400 characters, one a token
    assert "".join(pieces(stops, ids)) == "the same words again, " * 200
    assert max(searched[:-1]) <= 10  # each token: its character and the 6 before it (the last: the final cut)


def test_a_tail_inside_a_byte_run_is_not_enough_to_decide():
    """A tail that starts inside a run of byte-fallback tokens decodes each byte of the run to U+FFFD: those
    do not count toward the text it must hold, so a stop string that began inside the run is still found."""
    from edgemtp.runtime import stops as S

    def decode(ids):  # ids >= 1000: byte tokens of chr(id - 1000), U+FFFD while the decode starts in their run
        out, leading = [], True
        for i in ids:
            leading = leading and i >= 1000
            out.append("\ufffd" if leading else chr(i - 1000 if i >= 1000 else i))
        return "".join(out)

    stops = Stops((), ("S!",), decode)
    run = [1000 + ord("x")] * (S.TAIL + 10) + [1000 + ord("S")]
    assert stops.reason([ord("a")] * 5 + run) == ""
    assert stops.reason([ord("a")] * 5 + run + [ord("!")]) == "stop string"


def test_a_character_cut_so_far_is_no_stop_string():
    """stop="\ufffd" (bytes that are not UTF-8): a character whose bytes have not all come decodes to U+FFFD for
    now, which ended generation in the middle of any character written over several tokens (CJK or an emoji in a
    byte-level vocabulary), the text cut before it. Bytes that are not UTF-8 stop at the next token, when the
    U+FFFD is no longer the end; and generate's text, cut by the whole decode, never holds one."""
    from edgemtp.runtime import stops as S

    stops = Stops((), ("\ufffd", "x\ufffd"), decode=lambda ids: bytes(ids).decode("utf-8", "replace"))
    for text in ("平方 x€ 🙂", "a" * (S.TAIL + 10) + "平方🙂"):  # the second's checks decode a tail first
        data = text.encode()
        assert [stops.reason(list(data[:n])) for n in range(1, len(data) + 1)] == [""] * len(data)
    bad = list(b"ab \xe2\x82")  # a character that never comes whole: at the next token
    assert stops.reason(bad) == "" and stops.reason(bad + [ord("c")]) == "stop string"
    assert stops.reason(list(b"ab\xff")) == "" and stops.cut("ab\ufffd") == "ab"


def test_a_character_cut_so_far_by_byte_fallback_tokens_is_no_stop_string():
    """A byte-fallback vocabulary (Gemma's: a character it lacks is one token per UTF-8 byte) decodes a character
    cut so far to one U+FFFD per byte that came, not one: stop="\ufffd" stopped after its second byte."""
    import itertools

    def decode(ids):  # ids < 256: byte tokens (tokenizers' ByteFallback: a run not UTF-8 is a U+FFFD a byte)
        out = []
        for is_byte, run in itertools.groupby(ids, lambda i: i < 256):
            run = list(run)
            if not is_byte:
                out.append("".join(chr(i - 256) for i in run))
                continue
            try:
                out.append(bytes(run).decode())
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
        return "".join(out)

    stops = Stops((), ("\ufffd",), decode)
    ids = [256 + ord(c) for c in "ab "] + list("𠀀".encode()) + [256 + ord("c")]
    assert [stops.reason(ids[:n]) for n in range(1, len(ids) + 1)] == [""] * len(ids)
    assert stops.reason(ids[:3] + [0xFF]) == "" and stops.reason(ids[:3] + [0xFF, 256 + ord("c")]) == "stop string"


def test_cli_escapes():
    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\r") == "a\tb\r"
    assert unescape(r"\\n") == "\\n" and unescape(r"\x") == r"\x" and unescape("plain") == "plain"


def _case(engine, prompt_ids, n=32):
    """A stop string from the middle of the plain greedy text: (prompt, stop, plain tokens, tokens up to the
    one completing the stop, text before it)."""
    full = list(engine.token_ids(prompt_ids, n))
    text = engine.decode(full)
    for j in range(4, len(full) - 4):
        stop = engine.decode(full[j:j + 2])
        at = text.find(stop)
        if at > 0:
            upto = next(i for i in range(1, len(full) + 1) if stop in engine.decode(full[:i]))
            if upto < len(full) - 2:
                return engine.decode(prompt_ids), stop, full, full[:upto], text[:at]
    pytest.fail("no stop string found")


@pytest.mark.parametrize("draft", [None, Draft("lookup", 4), Draft("lookup", 6, adaptive=True)])
def test_stop_string_ends_generation_as_plain_decoding_does(models, draft):  # noqa: F811
    engine = models["llama", 64]
    for prompt_ids in _prompts(engine)[1]:
        prompt, stop, full, want, want_text = _case(engine, prompt_ids)
        assert engine.encode(prompt) == prompt_ids
        gen = engine.generate(prompt, 32, draft=draft, stop=stop)
        assert gen.tokens == want and gen.text == want_text, (prompt, stop)
        assert gen.stats.stop_reason == "stop string" and gen.stats.decode_tokens == len(want) - 1
        assert "".join(engine.stream(prompt, 32, draft=draft, stop=[stop, "never"])) == want_text
        # a stop string that only starts in the text: nothing is cut, the held-back end comes at the end
        almost = stop + " t0 t0 t0"
        gen = engine.generate(prompt, 32, draft=draft, stop=almost)
        assert gen.tokens == full and gen.stats.stop_reason == "max new tokens"
        assert "".join(engine.stream(prompt, 32, draft=draft, stop=almost)) == gen.text == engine.decode(full)


def test_each_row_of_a_batch_stops_at_its_own_stop_string(models):  # noqa: F811
    engine = models["llama", 64]
    cases = [_case(engine, p) for p in _prompts(engine)[1][:2]]
    stops = [c[1] for c in cases]
    for draft in (None, Draft("lookup", 4)):
        outs = engine.generate_batch([c[0] for c in cases], 32, draft=draft, stop=stops)
        for out, (prompt, _stop, full, want, want_text) in zip(outs, cases):
            # either stop string may end a row: the earlier in its text
            single = engine.generate(prompt, 32, stop=stops)
            assert out.tokens == single.tokens and out.text == single.text
            assert len(single.tokens) <= len(want) and single.text == engine.stops(stops).cut(engine.decode(full))
        assert outs[0].stats.stop_reasons == ["stop string"] * 2


def test_a_stop_string_cuts_an_accepted_run(models):  # noqa: F811
    """The token completing a stop string in the middle of a round's accepted drafts: the rest is dropped."""
    engine = models["llama", 64]
    base = _prompts(engine)[1][1]
    prompt = base + list(engine.token_ids(base, 12))  # the model's own text: lookup drafts get accepted
    _, stop, _full, want, _ = _case(engine, prompt)
    drafts = []

    class Recording(PromptLookupDrafter):
        def propose(self, history, k, ctx=None):
            drafts.append((len(history), *super().propose(history, k, ctx)))
            return drafts[-1][1:]

    r = speculative_generate(engine.target, Recording(), [prompt], 32, k=6,
                             stop_ids=Stops(engine.stop_ids, (stop,), engine.decode))[0]
    assert r.tokens == want and r.stop_reason == "stop string"
    n_before, last_draft, _ = drafts[-1]
    kept = len(prompt) + len(want) - n_before  # tokens the last round emitted, the completing one last
    assert len(last_draft) > kept and last_draft[kept - 1] == want[-1], "the stop should cut an accepted run"


def test_python_errors_name_stop(models):  # noqa: F811
    engine = models["llama", 64]
    for bad, message in (([""], "stop='' must not be empty"), (5, "stop=5 must be a string")):
        for call in (lambda: engine.generate("t1 t2", 4, stop=bad), lambda: list(engine.stream("t1", 4, stop=bad)),
                     lambda: engine.generate_batch(["t1"], 4, stop=bad)):
            with pytest.raises(ArgumentError, match=message):
                call()


@pytest.mark.parametrize("draft", [None, Draft("lookup", 4)])
def test_a_stop_string_that_is_a_special_token_stops_at_it(models, draft):  # noqa: F811
    """stop="<|im_end|>" where the model writes that special token: transformers' stop_strings match it (they
    read the tokens' own strings), but the text drops special tokens, so a stop string found in the text never
    saw it and generation ran on to max_new_tokens."""
    from tokenizers import Tokenizer

    engine = models["llama", 64]
    prompt_ids = _prompts(engine)[1][0]
    full = list(engine.token_ids(prompt_ids, 24))
    j = next(j for j in range(3, len(full)) if full[j] not in full[:j])  # a token the prompt's run writes once
    special = engine.decode([full[j]])
    own = engine.tokenizer
    engine.tokenizer = Tokenizer.from_str(own.to_str())
    try:
        engine.tokenizer.add_special_tokens([special])  # the vocabulary's own token, now dropped from the text
        assert engine.tokenizer.token_to_id(special) == full[j] and engine.decode([full[j]]) == ""
        prompt = engine.decode(prompt_ids)
        gen = engine.generate(prompt, 24, draft=draft, stop=["never", special])
        assert gen.tokens == full[:j + 1] and gen.stats.stop_reason == "stop string"
        assert gen.text == engine.decode(full[:j]) == "".join(engine.stream(prompt, 24, draft=draft, stop=special))
    finally:
        engine.tokenizer = own


def test_a_stop_string_holding_a_special_token_among_other_text_is_refused(models):  # noqa: F811
    """stop="abc<|im_end|>" or "<|im_end|>\nuser": the text leaves special tokens out, so it never held such a
    string and generation ran on silently (transformers' stop_strings, on the tokens' own strings, would match it).
    It is refused, naming the special token to give on its own, which stops at that token."""
    from tokenizers import Tokenizer

    engine = models["llama", 64]
    own = engine.tokenizer
    engine.tokenizer = Tokenizer.from_str(own.to_str())
    try:
        engine.tokenizer.add_special_tokens(["t7"])
        for stop in ("t3 t7", "t7\nt3", " t7"):
            for call in (lambda: engine.generate("t1 t2", 4, stop=["never", stop]),
                         lambda: engine.stream("t1", 4, stop=stop),
                         lambda: engine.generate_batch(["t1"], 4, stop=stop)):
                with pytest.raises(ArgumentError) as e:
                    call()
                assert e.value.cli_message() == (f"--stop {stop!r} holds the special token 't7', which the generated "
                                                 "text leaves out, so it would never match (a stop string of 't7' "
                                                 "alone stops at that token)")
        assert engine.stops("t7").string_ids == {engine.tokenizer.token_to_id("t7")}
        assert engine.stops("t3 t4").strings == ("t3 t4",)  # text without special tokens, as before
    finally:
        engine.tokenizer = own
