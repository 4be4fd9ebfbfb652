"""Quantized target graphs (fp16 / int8 / int4) and evaluate(), on tiny random models.

The exactness test carries the weight: a model whose weights already lie on the quantization grid
must come out of the quantized graph with the very same logits (MatMulNBits at accuracy level 0
computes in fp32). That pins the packing layout, scales, zero points, the untied head and the
GatherBlockQuantized embedding, for tied (gemma3, llama) and untied (qwen2) heads. Off the grid a
random tiny model says little about quality (its logits are nearly flat, so argmax flips easily):
there we only bound the error; real-model quality is measured by benchmarks/bench_quant.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgemtp import bundle as bundle_mod  # noqa: E402
from edgemtp.errors import EdgemtpError  # noqa: E402
from edgemtp.evaluate import evaluate, kl_divergence, text_windows  # noqa: E402
from edgemtp.exporters import export  # noqa: E402
from edgemtp.exporters.quantize import (dequantize_rows, quantize_bundle, quantize_graph,  # noqa: E402
                                        quantize_rows, scheme)
from edgemtp.runtime.engine import Engine  # noqa: E402

from .reference import save_tiny  # noqa: E402
from .test_parity import tiny  # noqa: E402

IDS = np.random.default_rng(1).integers(0, 96, size=(1, 30))


def snap_to_grid(model, quant: str, symmetric: bool | None = None) -> None:
    """Replace every matrix by its quantize-dequantize image (with the bits, block and symmetry `quant`
    gives its role): quantizing it again is then lossless. Plain grids: a block's extreme level then
    also lies on the finer grids the search tries."""
    sch = scheme(quant, symmetric=symmetric)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                kind = "head" if "embed" in name or "lm_head" in name else "matmul"
                w, bits, block = p.numpy(), sch.bits_for(kind), sch.block_for(kind)
                q = quantize_rows(w, bits, block, sch.symmetric_for(bits), search=False)
                p.copy_(torch.from_numpy(dequantize_rows(*q, bits, w.shape[1])))


def make_bundle(root, kind: str, snap: str | None = None, symmetric: bool | None = None):
    model = tiny(kind)
    if snap:
        snap_to_grid(model, snap, symmetric)
    export(save_tiny(model, root / "model"), root / "fp32", capacity=64)
    return root / "fp32"


def all_logits(bundle_dir, ids=IDS) -> np.ndarray:
    engine = Engine.load(bundle_dir)
    return engine.target.forward(ids, engine.target.new_cache(1), n_logits=ids.shape[1])[0]


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """|got - want| relative to the spread of the logits (their offset does not matter to softmax)."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want - want.mean(-1, keepdims=True)))


# ------------------------------------------------------------------------ block quantization maths

@pytest.mark.parametrize("bits", [4, 8])
def test_rows_match_onnxruntime_quantizer(bits):
    """Symmetric packing equals ORT's own (C++) quantizer: MatMulNBits reads what it expects."""
    ort_q = pytest.importorskip("onnxruntime.capi._pybind_state")
    fn = getattr(ort_q, f"quantize_matmul_{bits}bits", None)
    if fn is None:
        pytest.skip("this onnxruntime has no quantize_matmul_Nbits")
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)  # [N, K]
    packed = np.zeros((48, 3, 32 * bits // 8), np.uint8)
    scales, zp = np.zeros((48, 3), np.float32), np.zeros((48, (3 * bits + 7) // 8), np.uint8)
    fn(packed, np.ascontiguousarray(w.T), scales, zp, 32, 48, 96, True)
    got = quantize_rows(w, bits, 32, search=False)
    np.testing.assert_array_equal(got[0], packed)
    np.testing.assert_array_equal(got[1], scales)
    assert got[2] is None


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error(bits, symmetric):
    w = np.random.default_rng(0).standard_normal((10, 80)).astype(np.float32)  # 80: a padded last block
    plain = quantize_rows(w, bits, 32, symmetric, search=False)
    assert plain[0].shape == (10, 3, 32 * bits // 8) and (plain[2] is None) == symmetric
    err = np.abs(dequantize_rows(*plain, bits, 80) - w)
    step = np.abs(plain[1]).repeat(32, axis=1)[:, :80]
    # rounding: half a step; symmetric clips +2^(b-1) to 2^(b-1)-1 (one step) for the block's opposite extreme
    assert (err <= step * (1.0 if symmetric else 0.5) + 1e-6).all()
    # the search picks, block by block, a grid at least as good as the plain one
    searched = np.square(dequantize_rows(*quantize_rows(w, bits, 32, symmetric), bits, 80) - w)
    blocks = lambda e: np.pad(e, ((0, 0), (0, 16))).reshape(10, 3, 32).sum(-1)  # noqa: E731
    assert (blocks(searched) <= blocks(err ** 2) + 1e-12).all()
    if bits == 4:
        assert searched.sum() < (err ** 2).sum()


# ------------------------------------------------------------------------ graphs

@pytest.mark.parametrize("kind", ["gemma3_text", "llama", "qwen2"])
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_on_grid_weights_quantize_exactly(kind, quant, tmp_path):
    fp32 = make_bundle(tmp_path, kind, snap=quant)
    want = all_logits(fp32)
    quantize_bundle(fp32, tmp_path / "exact", quant, accuracy_level=0)
    np.testing.assert_allclose(all_logits(tmp_path / "exact"), want, atol=1e-4, rtol=0)
    # level 4 (the default) quantizes activations to int8 per block: ~1% of the logit spread here
    quantize_bundle(fp32, tmp_path / "fast", quant)
    assert rel_error(all_logits(tmp_path / "fast"), want) < 0.05


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_forced_symmetry_on_grid_is_exact(quant, symmetric, tmp_path):
    """Zero points (packed [N, ceil(kb*bits/8)] for MatMulNBits, one per block for the gather) or none."""
    fp32 = make_bundle(tmp_path, "gemma3_text", snap=quant, symmetric=symmetric)
    quantize_bundle(fp32, tmp_path / "exact", quant, symmetric=symmetric, accuracy_level=0)
    np.testing.assert_allclose(all_logits(tmp_path / "exact"), all_logits(fp32), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """fp32 tiny gemma3 bundle and its fp16 / int8 / int4 versions."""
    root = tmp_path_factory.mktemp("quant")
    fp32 = make_bundle(root, "gemma3_text")
    return {"fp32": fp32, **{q: quantize_bundle(fp32, root / q, q) for q in ("fp16", "int8", "int4")}}


def test_quantized_bundles_run_unmodified_and_are_smaller(gemma):
    want = all_logits(gemma["fp32"])
    size = {q: (b / "target.onnx.data").stat().st_size for q, b in gemma.items()}
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"]
    assert size["fp16"] < 0.55 * size["fp32"]
    err = {q: rel_error(all_logits(gemma[q]), want) for q in ("fp16", "int8", "int4")}
    # per-weight relative noise: fp16 ~1e-4, int8 ~0.5%, int4 ~9% (block 32); through 4 random layers
    # int4 reaches ~40% on this flat-logit toy, so the bounds only say "the right order"
    assert err["fp16"] < 1e-3 and err["int8"] < 0.06 and err["int4"] < 0.6
    assert err["fp16"] < err["int8"] < err["int4"]
    for q in ("int8", "int4"):
        gen = Engine.load(gemma[q]).generate("t5 t6 t7", max_new_tokens=5)
        assert len(gen.tokens) >= 1


def test_manifest_and_graph_record_the_quantization(gemma):
    b = bundle_mod.load(gemma["int4"])
    g = b.manifest["graphs"]["target"]
    assert g["quant"] == "int4" and g["quantization"]["head_bits"] == 4 and g["quantization"]["head_block_size"] == 16
    assert g["contract"] == bundle_mod.load(gemma["fp32"]).manifest["graphs"]["target"]["contract"]
    model = onnx.load(str(gemma["int4"] / "target.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and not ops & {"MatMul", "Gemm", "Gather"}


def test_fp32_copy_is_identical(gemma, tmp_path):
    files = quantize_graph(gemma["fp32"] / "target.onnx", tmp_path / "t.onnx", "fp32")
    assert files == ["t.onnx", "t.onnx.data"]
    assert (tmp_path / "t.onnx.data").read_bytes() == (gemma["fp32"] / "target.onnx.data").read_bytes()


def test_bad_input_is_a_clear_error(gemma, tmp_path):
    src = gemma["fp32"] / "target.onnx"
    with pytest.raises(EdgemtpError, match=r"--quant 'int3' is not supported \(choose from fp32, fp16, int8, int4\)"):
        quantize_graph(src, tmp_path / "q.onnx", "int3")
    with pytest.raises(EdgemtpError, match="--block-size 24 must be a power of two"):
        quantize_graph(src, tmp_path / "q.onnx", "int4", block_size=24)
    with pytest.raises(EdgemtpError, match="already quantized \\(int4\\)"):
        quantize_graph(gemma["int4"] / "target.onnx", tmp_path / "q.onnx", "int8")
    with pytest.raises(EdgemtpError, match="target graph is already int4"):
        quantize_bundle(gemma["int4"], tmp_path / "qb", "int8")
    with pytest.raises(EdgemtpError, match="missing"):
        quantize_graph(tmp_path / "nope.onnx", tmp_path / "q.onnx", "int4")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(EdgemtpError, match="junk.onnx: not a valid ONNX file"):
        quantize_graph(tmp_path / "junk.onnx", tmp_path / "q.onnx", "int4")


def test_foreign_graph_is_refused(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              producer_name="someone-else")
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(EdgemtpError, match="other.onnx: not a target graph written by edgemtp export"):
        quantize_graph(tmp_path / "other.onnx", tmp_path / "q.onnx", "int4")


# ------------------------------------------------------------------------ evaluate()

def as_text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)  # the tiny models' word-level tokenizer


def reference_perplexity(bundle_dir, tokens: list[int], window: int) -> float:
    """Straight from the graph's logits of each whole window: exp(mean NLL of every predicted token)."""
    bos = bundle_mod.load(bundle_dir).model["bos_token_id"]
    nll = []
    for win in text_windows(tokens, window, bos):
        logits = all_logits(bundle_dir, np.array([win]))[0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll += [-logp[i, win[i + 1]] for i in range(len(win) - 1)]
    return float(np.exp(np.mean(nll)))


def test_perplexity_equals_numpy_reference(gemma):
    tokens = list(np.random.default_rng(3).integers(3, 96, size=70))
    r = evaluate(gemma["fp32"], as_text(tokens), window=16, step=5)  # pieces that straddle windows
    assert r["tokens"] == 70 and r["windows"] == 5  # 15 text tokens per window after BOS
    assert r["perplexity"] == pytest.approx(reference_perplexity(gemma["fp32"], tokens, 16), rel=1e-5)
    assert "kl_mean" not in r


def test_bundle_against_itself_has_zero_kl(gemma):
    text = as_text(np.random.default_rng(4).integers(3, 96, size=40))
    r = evaluate(gemma["fp32"], text, reference_bundle=gemma["fp32"], window=32)
    assert r["kl_mean"] == 0.0 and r["kl_max"] == 0.0 and r["top1_agreement"] == 1.0
    assert r["perplexity_delta_pct"] == 0.0
    q = evaluate(gemma["int4"], text, reference_bundle=gemma["fp32"], window=32)
    assert q["kl_mean"] > 0.0 and q["reference_perplexity"] == pytest.approx(r["perplexity"], rel=1e-9)


def test_kl_divergence_table():
    logp = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    logq = np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))
    np.testing.assert_allclose(kl_divergence(logp, logq), [0.0, 0.9 * np.log(1.8) + 0.1 * np.log(0.2)])


def test_windows_start_with_bos_and_drop_empty_tails():
    assert text_windows([5, 6, 7, 8], 3, bos=2) == [[2, 5, 6], [2, 7, 8]]
    assert text_windows([5, 6, 7], 2, bos=None) == [[5, 6]]  # a lone 7 predicts nothing


def test_evaluate_errors(gemma, tmp_path):
    with pytest.raises(EdgemtpError, match="the text has 1 token\\(s\\); perplexity needs at least 2"):
        evaluate(gemma["fp32"], "t5")
    with pytest.raises(EdgemtpError, match="--window 65 exceeds the KV capacity 64"):
        evaluate(gemma["fp32"], "t5 t6 t7", window=65)
    with pytest.raises(EdgemtpError, match="--window 1 is too small"):
        evaluate(gemma["fp32"], "t5 t6 t7", window=1)
    other = tmp_path / "other"
    shutil.copytree(gemma["fp32"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["extra"] = 96
    (other / "tokenizer.json").write_text(json.dumps(tok))
    manifest = json.loads((other / "edgemtp.json").read_text())
    keep = {k: v for k, v in manifest.items() if k not in ("format", "schema_version", "files")}
    bundle_mod.write_manifest(other, keep)
    with pytest.raises(EdgemtpError, match="reference bundle has a different tokenizer"):
        evaluate(gemma["fp32"], "t5 t6 t7", reference_bundle=other, window=8)


def test_fp16_weights_are_cast_once_at_load(gemma, tmp_path):
    """fp16 is a storage format: ORT folds the Casts into fp32 initializers, so no step pays for them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
    ort.InferenceSession(str(gemma["fp16"] / "target.onnx"), opts, providers=["CPUExecutionProvider"])
    before = onnx.load(str(gemma["fp16"] / "target.onnx"), load_external_data=False).graph.node
    after = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node
    assert sum(n.op_type == "Cast" for n in before) > 10
    assert not [n for n in after if n.op_type == "Cast" and n.input[0].endswith(".fp16")]
