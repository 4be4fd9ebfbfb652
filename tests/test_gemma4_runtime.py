"""Every runtime path on a tiny Gemma 4 whose sliding layers have 2 KV heads (as E4B): one-row passes hand the
sliding layers a copy of the window's end (kv_cache's shadows), batched ones the whole buffers, where
GroupQueryAttention masks the past beyond the window. Contexts
run well past 2x the window (8): greedy against transformers' generate, lookup and MTP drafting, batches of rows
of different lengths, seeded sampling, chat turns over a kept cache, int8 / int4 bundles."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgemtp.exporters import export  # noqa: E402
from edgemtp.exporters.quantize import quantize_bundle  # noqa: E402
from edgemtp.runtime.drafting import NoDrafter, PromptLookupDrafter  # noqa: E402
from edgemtp.runtime.engine import Draft, Engine  # noqa: E402
from edgemtp.runtime.sampling import Sampling  # noqa: E402
from edgemtp.runtime.speculative import SpecStats, speculative_generate  # noqa: E402

from .reference import save_tiny  # noqa: E402
from .test_assistant import tiny_assistant  # noqa: E402
from .test_parity_gemma4 import WINDOW, tiny  # noqa: E402
from .test_quantize import dual_grid, snap_model  # noqa: E402

N = 40  # new tokens: prompts of up to 17 tokens reach 57 positions, past 7 windows
BLOCK = 16  # quantization blocks: the MLP is 48 wide, the per-layer inputs 8 (with two_pass "none")
RNG = np.random.default_rng(5)
PROMPTS = [[int(t) for t in RNG.integers(3, 96, size=n)] for n in (2, 9, 17)]


@pytest.fixture(scope="module")
def g4(tmp_path_factory):
    """(transformers' greedy continuations of PROMPTS, {"fp32" | "int8" | "int4": bundle}): the target with an
    assistant drafter attached."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("g4")
        model = tiny("gemma4_text")
        # on the grids of both presets: the int8 / int4 bundles compute fp32's logits (within float rounding)
        snap_model(model, layers=(8, BLOCK, True), table=lambda w: dual_grid(w, BLOCK))
        model_dir = save_tiny(model, root / "model")
        tiny_assistant(False).save_pretrained(root / "assistant")
        fp32 = export(model_dir, root / "fp32", capacity=64, drafter=root / "assistant")
        bundles = {"fp32": fp32}
        for quant in ("int8", "int4"):  # accuracy level 0: fp32 activations, so exact on the grid
            bundles[quant] = quantize_bundle(fp32, root / quant, quant, calibration=None, block_size=BLOCK,
                                             two_pass="none", accuracy_level=0)
        return [hf_greedy(model, p, N) for p in PROMPTS], bundles
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engines(g4):
    return {name: Engine.load(b, threads=1, mtp=True) for name, b in g4[1].items()}


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of n tokens, whatever they are (as stop_ids=())."""
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=[])[0, len(prompt):].tolist()


def upto_stop(tokens: list[int], stop_ids) -> list[int]:
    ends = [i for i, t in enumerate(tokens) if t in stop_ids]
    return tokens[:ends[0] + 1] if ends else tokens


def test_engine_is_two_kv_heads_with_window_views(engines):
    """Two KV heads on the sliding layers: one-row passes bind copies of the window's end (kv_cache's shadows)."""
    for engine in engines.values():
        contract = engine.target.contract
        assert contract.window_views and contract.kv[0].num_heads == 2 and contract.kv[0].window == WINDOW
        assert engine.capacity == 64


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_greedy_matches_transformers_generate(g4, engines, quant):
    """Plain decoding past 2x the window, rows alone (Engine.token_ids, which stops at the stop token) and in one
    batch of rows of different lengths (batched decode steps, each row with its own seqlens_k over the whole
    buffers): transformers' tokens, token for token; the quantized bundles' too (their weights on the grid)."""
    want, engine = g4[0], engines[quant]
    assert min(len(p) + len(w) for p, w in zip(PROMPTS, want)) > 5 * WINDOW
    for p, w in zip(PROMPTS, want):
        assert list(engine.token_ids(p, N)) == upto_stop(w, engine.stop_ids), p
    got = speculative_generate(engine.target, NoDrafter(), PROMPTS, N, k=0)
    assert [r.tokens for r in got] == want


def test_quantized_logits_are_fp32s_past_the_window(engines):
    """int8 / int4 bundles of on-grid weights, through a prefill, single steps and verify-like windows past 3x
    the window: fp32's logits."""
    ids = np.array([PROMPTS[2] + PROMPTS[1] + PROMPTS[2] + PROMPTS[0]])  # 45 tokens
    chunks = [5] + [1] * 12 + [4] + [1] * 10 + [3] + [1] * 11

    def logits(engine):
        cache, start, out = engine.target.new_cache(1), 0, []
        for n in chunks:
            out.append(engine.target.forward(ids[:, start:start + n], cache, n_logits=n)[0])
            start += n
        assert start == ids.shape[1]
        return np.concatenate(out, axis=1)

    want = logits(engines["fp32"])
    assert np.ptp(want) > 1.0
    for quant in ("int8", "int4"):
        np.testing.assert_allclose(logits(engines[quant]), want, atol=1e-4, rtol=0, err_msg=quant)


def _repetitive(engine) -> list[list[int]]:
    """Prompts whose continuation repeats text already in them: lookup drafts get accepted."""
    own = [r.tokens for r in speculative_generate(engine.target, NoDrafter(), [[11, 12]], 20, k=0)][0]
    return [[11, 12] + own + [11, 12], [5, 6, 7, 8] * 4, PROMPTS[1] + PROMPTS[1][:3]]


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("cfg", [dict(k=3), dict(k=4, adaptive=True)], ids=["k3", "adaptive"])
def test_lookup_drafting_is_plain_greedy_alone_and_batched(engines, quant, cfg):
    """Accepted and rejected drafts roll the sliding layers' caches back across the window, rows alone and in a
    batch (whose verify passes run row by row on this graph): plain greedy's tokens."""
    engine = engines[quant]
    prompts = _repetitive(engine) + PROMPTS
    want = [r.tokens for r in speculative_generate(engine.target, NoDrafter(), prompts, N, k=0)]
    for batch in (prompts, *([p] for p in prompts)):
        stats = SpecStats()
        got = speculative_generate(engine.target, PromptLookupDrafter(), batch, N, stats=stats, **cfg)
        assert [r.tokens for r in got] == [want[prompts.index(p)] for p in batch]
        if len(batch) > 1:
            assert stats.drafted > stats.accepted > 0


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_mtp_and_hybrid_are_plain_greedy_in_batches(engines, quant):
    """The assistant drafter reads the 2-head sliding cache (on the int4 bundle, the quantized table): greedy
    MTP / hybrid, one row and a batch of rows of different lengths, give plain greedy's tokens."""
    engine = engines[quant]
    prompts = PROMPTS + _repetitive(engine)[:1]
    want = [r.tokens for r in speculative_generate(engine.target, NoDrafter(), prompts, N, k=0)]
    for mode in ("mtp", "hybrid"):
        stats = SpecStats()
        got = speculative_generate(engine.target, engine.drafter(mode), prompts, N, k=3, stats=stats)
        assert [r.tokens for r in got] == want, mode
        assert stats.drafted > 0
        for p, w in zip(prompts, want):
            assert list(engine.token_stream(p, N, draft=Draft(mode, 3))) == upto_stop(w, engine.stop_ids), (mode, p)


def test_seeded_sampling_drafted_reproduces_its_distribution_and_plain_its_stream(engines):
    """Seeded sampling past 2x the window: with k = 0 the speculative loop's stream is the engine's; drafted
    runs follow plain sampling's exact distribution of the first 3 tokens (enumerated over the target): drafts
    by lookup (mostly rejected here) and drafts drawn from the target's own distribution (mostly accepted)."""
    from .test_speculative import ExactDrafter, _exact_first_tokens, _gof_pvalue

    engine = engines["fp32"]
    prompt = _repetitive(engine)[0]
    assert len(prompt) > 2 * WINDOW
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=123)
    want = list(engine.token_ids(prompt, 20, sampling))
    assert speculative_generate(engine.target, PromptLookupDrafter(), [prompt], 20, sampling, k=0,
                                stop_ids=engine.stop_ids)[0].tokens == want
    sampling = Sampling(temperature=0.1, top_k=3, seed=7)
    expected = _exact_first_tokens(engine.target, prompt, sampling, 3)
    for drafter in (PromptLookupDrafter(), ExactDrafter(engine.target)):
        stats = SpecStats()
        got = speculative_generate(engine.target, drafter, [prompt] * 200, 3, sampling, k=2, stats=stats)
        assert stats.drafted >= 200 and (stats.accepted > 0.9 * stats.drafted) == isinstance(drafter, ExactDrafter)
        assert _gof_pvalue([tuple(r.tokens) for r in got], expected) > 1e-3, type(drafter).__name__


@pytest.mark.parametrize("draft", [None, Draft("lookup", 3), Draft("mtp", 3)], ids=["plain", "lookup", "mtp"])
def test_chat_turns_over_a_kept_cache_past_the_window(g4, draft):
    """Turn after turn over a kept cache (reuse_prefix): only the new tokens run, and each turn's tokens are what
    a fresh engine generates from the whole conversation, which grows past 3 windows."""
    bundle = g4[1]["fp32"]
    reuse, fresh = Engine.load(bundle, reuse_prefix=True, threads=1), Engine.load(bundle, threads=1)
    text, ids = "t1 t2 t3 t4 t5", []
    for turn, words in enumerate(["t5 t6 t7", "t7 t8 t9 t10", "t11 t5 t6"]):
        got = reuse.generate(text, 8, draft=draft)
        want = fresh.generate(text, 8, draft=draft)
        assert got.tokens == want.tokens, turn
        prompt = reuse.encode(text)
        assert got.stats.cached_tokens == (len(ids) - 1 if turn else 0)
        ids = prompt + got.tokens
        text = f"{text} {got.text} {words}"
    assert len(ids) > 3 * WINDOW
