"""Golden tests on the real Gemma 3 270M: edgemtp's greedy tokens equal transformers' greedy tokens."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgemtp.runtime.engine import Engine  # noqa: E402

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = ",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def hf_model(gemma3_270m_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(gemma3_270m_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(gemma3_270m_bundle):
    return Engine.load(gemma3_270m_bundle, threads=2)


def test_tokenizer_ids(engine):
    assert engine.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]


def transformers_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_transformers(prompt, engine, hf_model):
    want = transformers_greedy(hf_model, engine.encode(prompt), 64)
    got = engine.generate(prompt, max_new_tokens=64).tokens
    assert got == want, f"first difference at {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
    assert len(got) == 64 or got[-1] in engine.stop_ids


@pytest.mark.parametrize("prompt", PROMPTS[::3])
def test_repetition_penalty_tokens_equal_transformers(prompt, engine, hf_model):
    """Greedy decoding with a repetition penalty (the prompt's and the output's tokens penalised), plainly and
    drafting: transformers' generate(repetition_penalty=1.3) token for token, and not the unpenalised tokens."""
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.sampling import Sampling

    ids = engine.encode(prompt)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, repetition_penalty=1.3,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    want = out[0, len(ids):].tolist()
    sampling = Sampling(repetition_penalty=1.3)
    assert engine.generate(prompt, 48, sampling).tokens == want
    drafted = engine.generate(prompt, 48, sampling, draft=Draft("lookup", 4))
    assert drafted.tokens == want and drafted.stats.drafted > 0
    assert want != engine.generate(prompt, 48).tokens


def test_greedy_past_the_sliding_window(engine, hf_model):
    """Past Gemma 3 270M's 512-token sliding window, where the prompts above never go: 64 greedy tokens after
    740 tokens of Python source (the project's code corpus), at positions 740-803. Once the cache holds 768
    positions, one-row passes bind the sliding layers' buffers from position 256 on (window views, README
    "Bundles"), decode steps and lookup's verify windows alike. Each step's logits are transformers' within
    2e-3 (measured 1.7e-4; its top two 0.14 apart or more) and their argmax is transformers' over the same
    prefix, which makes the tokens its greedy ones: one forward over prompt + tokens, not 64 generate steps,
    keeps this test cheap (a view starting 128 positions late passed the tokens, not the logits: 0.54 off)."""
    import argparse
    from pathlib import Path

    import numpy as np

    from edgemtp.runtime.engine import Draft, new_stats

    ids = engine.encode(Path(argparse.__file__).read_text(encoding="utf-8"))[:740]
    tokens = list(engine.token_ids(ids, 64))
    cache = engine.target.new_cache()
    logits = [engine.target.forward(np.array([ids]), cache)[0][0, -1]]
    logits += [engine.target.forward(np.array([[t]]), cache)[0][0, -1] for t in tokens[:-1]]
    assert engine.target.contract.window_offset(int(cache.lengths[0])) == 256  # the last steps read views
    with torch.no_grad():
        want = hf_model(torch.tensor([ids + tokens[:-1]]), logits_to_keep=64).logits[0].numpy()
    assert tokens == want.argmax(-1).tolist()
    assert np.abs(np.stack(logits) - want).max() < 2e-3
    stats = new_stats(Draft("lookup", 4))
    assert list(engine.token_stream(ids, 64, draft=Draft("lookup", 4), stats=stats)) == tokens
    assert stats.drafted > 0


LAYOUTS = {  # export options -> the target's gemv_head entry and the drafter head's rows
    "default": ({}, {"kept_table": False}, "int8"),  # the table stored transposed only
    "row-major": ({"gemv_head": False}, None, "fp32"),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def drafter_engine(request, gemma3_270m_dir, tmp_path_factory):
    from edgemtp.exporters import AUTO, export

    options, gemv, rows = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp("g3mtp")
    out = export(gemma3_270m_dir, root / "bundle", capacity=1024, drafter=AUTO, **options)
    engine = Engine.load(out, threads=2)
    assert engine.bundle.manifest["graphs"]["target"].get("gemv_head") == gemv
    assert engine.bundle.graph("drafter").contract["head"]["rows"] == rows
    yield engine
    shutil.rmtree(root)  # 1.1 GB each: the next layout's bundle need not sit beside it on CI's disk


@pytest.mark.parametrize("prompt", PROMPTS[1::2])
def test_drafter_bundles_greedy_tokens_equal_transformers(prompt, drafter_engine, hf_model):
    """fp32 with the shipped drafter, in both table layouts: plain steps (the default layout's take the
    matrix-vector branch) and MTP rounds (verify windows take the packed MatMul; the default layout's drafter
    reads the transposed table's columns) give transformers' greedy tokens."""
    from edgemtp.runtime.engine import Draft

    want = transformers_greedy(hf_model, drafter_engine.encode(prompt), 48)
    assert drafter_engine.generate(prompt, max_new_tokens=48).tokens == want
    mtp = drafter_engine.generate(prompt, max_new_tokens=48, draft=Draft("mtp", k=3))
    assert mtp.tokens == want and mtp.stats.drafted > 0


def test_text_cut_inside_a_character(engine):
    """Generation stopping inside a byte-fallback character (ꙮ is 3 byte tokens): the text keeps the complete
    characters and marks the cut one with one U+FFFD (the tokenizer's decoder turned the whole byte run into
    replacement characters), and the stream, which holds back a character's first bytes, flushes the same at
    the end: its pieces joined are generate()'s text, with drafting too."""
    from edgemtp.runtime.engine import Draft

    prompt = "ꙮꙮꙮꙮꙮꙮꙮꙮ"
    assert engine.generate(prompt, max_new_tokens=5).text == "ꙮ\ufffd"  # was '\ufffd' * 5
    assert engine.generate(prompt, max_new_tokens=6).text == "ꙮꙮ"
    for n in (1, 2, 4, 5):
        for draft in (None, Draft("lookup", 4)):
            assert "".join(engine.stream(prompt, n, draft=draft)) == engine.generate(prompt, n, draft=draft).text


@pytest.mark.parametrize("stop", ["elif", ":\n", "return 1"])
def test_stop_strings_on_real_text(engine, stop):
    """Gemma 3 270M's text (SentencePiece pieces with leading spaces, newline tokens): a stop string ends
    generation at the token completing it, plainly and drafting, and the stream shows the same cut text."""
    from edgemtp.runtime.engine import Draft

    prompt = PROMPTS[0]
    full = engine.generate(prompt, max_new_tokens=48)
    at = full.text.find(stop)
    assert at > 0, f"{stop!r} not in {full.text!r}"
    upto = next(i for i in range(1, len(full.tokens) + 1) if stop in engine.decode(full.tokens[:i]))
    for draft in (None, Draft("lookup", 4)):
        gen = engine.generate(prompt, max_new_tokens=48, draft=draft, stop=[stop])
        assert gen.tokens == full.tokens[:upto] and gen.text == full.text[:at]
        assert gen.stats.stop_reason == "stop string"
        assert "".join(engine.stream(prompt, 48, draft=draft, stop=stop)) == full.text[:at]


def test_stop_strings_past_the_checked_tail(engine):
    """Past 256 tokens a stop string is looked for in the text of the last 256, or more where those hold too
    little text for it (runtime/stops.py); with Gemma's tokenizer, a stop string inside a long byte-fallback run
    (each byte a token; a tail cut inside a character decodes its bytes to U+FFFD each), or longer than the
    last 256 tokens' text, is still found at the token that completes it."""
    from edgemtp.runtime.stops import TAIL, Stops

    for text, stop in (("Hello " + "\U00013000" * 100 + "ꙮ" + "\U00013000" * 100, "ꙮ"),
                       ("def f(x):\n    return x\n" * 60 + "# end of file\n", "end of"),
                       ("Hello " + "\U00013000" * 100 + "ꙮ\U00013000" + "\U00013000" * 100, "ꙮ\U00013000"),
                       # a stop string longer than the tail's text (Gemma: a digit a token): a longer tail
                       ("1234567890" * 40 + "98765432" * 30 + "!" + "0" * 20, "0" + "98765432" * 30 + "!")):
        ids = engine.encode(text)[1:]  # without BOS, as generated tokens
        stops = Stops((), (stop,), engine.decode)
        first = next(n for n in range(1, len(ids) + 1) if stop in engine.decode(ids[:n]))
        assert first > TAIL
        assert [stops.reason(ids[:n]) for n in range(TAIL, first + 3)] == [""] * (first - TAIL) + ["stop string"] * 3
