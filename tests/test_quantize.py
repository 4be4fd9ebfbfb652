"""Quantized target graphs (fp16 / int8 / int4), calibration and evaluate(), on tiny random models.

The exactness tests carry the weight: a model whose weights already lie on the quantization grid
must come out of the quantized graph with the very same logits (MatMulNBits at accuracy level 0
computes in fp32). That pins the packing layout, scales, zero points, the untied head, the
GatherBlockQuantized embedding, GPTQ, and the int4 table split into frequent (8-bit) and other
(4-bit) rows with its vocabulary permutation, for tied (gemma3, llama) and untied (qwen2) heads. Off
the grid a random tiny model says little about quality (its logits are nearly flat, so argmax flips
easily): there we bound errors against numpy references; real-model quality is measured by
benchmarks/bench_quant.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgemtp import bundle as bundle_mod  # noqa: E402
from edgemtp.checkpoint import Checkpoint  # noqa: E402
from edgemtp.calibration import activations as A  # noqa: E402
from edgemtp.errors import ArgumentError, EdgemtpError  # noqa: E402
from edgemtp.evaluate import evaluate, kl_divergence, leading_bos, text_windows  # noqa: E402
from edgemtp.exporters import builder, export  # noqa: E402
from edgemtp.exporters.quantize import (_Reader, check_options, dequantize_rows, quantize_bundle,  # noqa: E402
                                        load_fp32_graph, quantize_graph, quantize_rows, scheme)
from edgemtp.exporters.quantrewrite import smoothing_scale  # noqa: E402
from edgemtp.runtime.engine import Engine  # noqa: E402

from .cli_errors import assert_one_line_error  # noqa: E402
from .reference import save_tiny  # noqa: E402
from .test_parity import tiny  # noqa: E402

IDS = np.random.default_rng(1).integers(0, 96, size=(1, 30))
# calibration text for the tiny word-level tokenizer: t3 .. t18 are its 16 most frequent tokens
CALIB_TEXT = " ".join(f"t{3 + i % 16}" if i % 3 else f"t{20 + i % 70}" for i in range(3000))


def snap(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """w's quantize-dequantize image on the plain grid: quantizing it again is lossless."""
    q = quantize_rows(w, bits, block, symmetric, search=False)
    return dequantize_rows(*q, bits, w.shape[1])


def dual_grid(w: np.ndarray, block: int = 32) -> np.ndarray:
    """Blocks of k * s, k in -8..7, holding both -8s and 7s: exact on the 4-bit grid with zero points
    (min/max -> 0/15) and on the 8-bit symmetric one (-8s -> -128), and so for either part of a table."""
    b = w.reshape(len(w), -1, block)
    s = np.abs(b).max(-1, keepdims=True) / 8 + 1e-3
    k = np.clip(np.rint(b / s), -8, 7)
    k[..., 0], k[..., 1] = -8, 7
    return (k * s).reshape(w.shape).astype(np.float32)


def snap_model(model, layers=(8, 32, True), table=None) -> None:
    """Layers on the 8-bit grid; the head/table on `table`'s grid (a function) or the same 8-bit one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                w = p.numpy()
                big = "embed" in name or "lm_head" in name
                p.copy_(torch.from_numpy(table(w) if big and table else snap(w, *layers)))


def make_bundle(root, kind: str, snapped=None, **snap_args):
    model = tiny(kind)
    if snapped:
        snap_model(model, **snap_args)
    export(save_tiny(model, root / "model"), root / "fp32", capacity=64)
    return root / "fp32"


def all_logits(bundle_dir, ids=IDS) -> np.ndarray:
    engine = Engine.load(bundle_dir)
    return engine.target.forward(ids, engine.target.new_cache(1), n_logits=ids.shape[1])[0]


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """|got - want| relative to the spread of the logits (their offset does not matter to softmax)."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want - want.mean(-1, keepdims=True)))


def window_and_steps(bundle_dir) -> tuple[np.ndarray, np.ndarray]:
    """Logits of positions 20..24 of IDS as one verify window and as five single steps, after a 20-token prefill."""
    engine = Engine.load(bundle_dir)
    cache = engine.target.new_cache(1)
    engine.target.forward(IDS[:, :20], cache)
    window = engine.target.forward(IDS[:, 20:25], cache, n_logits=5)[0]
    cache.rollback(0, 20)
    steps = np.concatenate([engine.target.forward(IDS[:, i:i + 1], cache)[0] for i in range(20, 25)], axis=1)
    return window, steps


def op_types(bundle_dir) -> list[str]:
    return [n.op_type for n in onnx.load(str(bundle_dir / "target.onnx"), load_external_data=False).graph.node]


def ops_count(bundle_dir, op: str) -> int:
    return op_types(bundle_dir).count(op)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


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


def correlated_inputs(n=4000, k=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k) * np.linspace(0.3, 4.0, k)
    return (rng.standard_normal((n, k)) @ mix).astype(np.float32)


def test_gptq_lowers_the_output_error_and_keeps_grid_weights():
    x = correlated_inputs()
    h = x.T.astype(np.float64) @ x / len(x)
    w = np.random.default_rng(1).standard_normal((200, 64)).astype(np.float32)
    out_err = lambda q: float(np.mean(np.square(x @ (dequantize_rows(*q, 4, 64) - w).T)))  # noqa: E731
    rtn = out_err(quantize_rows(w, 4, 32, False))
    gptq = out_err(quantize_rows(w, 4, 32, False, importance=np.diag(h), hessian=h))
    assert gptq < 0.8 * rtn  # correlated inputs: compensation pays (measured ~0.5x here)
    on_grid = dual_grid(w)
    q = quantize_rows(on_grid, 4, 32, False, importance=np.diag(h), hessian=h)
    np.testing.assert_allclose(dequantize_rows(*q, 4, 64), on_grid, atol=1e-6)


def test_gptq_with_blocks_wider_than_a_batch_batches_lazily(monkeypatch):
    """--layer-op integer quantizes each row as one block: GPTQ then goes in lazy batches of GPTQ_BATCH
    inside the block, cut at each block's end (each block's grid is chosen where a batch starts, from
    weights every earlier batch has updated), with the result of one batch per block."""
    from edgemtp.exporters import blockquant

    assert blockquant._batches(640, 640) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 640)]
    assert blockquant._batches(576, 288) == [(0, 128), (128, 256), (256, 288), (288, 416), (416, 544),
                                             (544, 576)]
    assert blockquant._batches(96, 32) == [(0, 96)] and blockquant._batches(320, 32) == [(0, 128), (128, 256),
                                                                                          (256, 320)]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 512)).astype(np.float32) @ rng.standard_normal((512, 512)).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)
    w = rng.standard_normal((40, 512)).astype(np.float32)
    out_err = lambda q: float(np.mean(np.square(x @ (dequantize_rows(*q, 8, 512) - w).T)))  # noqa: E731
    for bs in (256, 512, 192):  # 192: three blocks of 192 over 512 columns, the last padded
        lazy = quantize_rows(w, 8, bs, True, importance=np.diag(h), hessian=h)
        with monkeypatch.context() as m:
            m.setattr(blockquant, "GPTQ_BATCH", 512)  # one batch per block
            whole = quantize_rows(w, 8, bs, True, importance=np.diag(h), hessian=h)
        np.testing.assert_allclose(lazy[1], whole[1], rtol=1e-5)  # each block's grid
        assert np.mean(lazy[0] != whole[0]) < 0.01  # levels: ties may round apart after reordered sums
        assert out_err(lazy) == pytest.approx(out_err(whole), rel=0.02)
        assert out_err(lazy) < 0.8 * out_err(quantize_rows(w, 8, bs, True))


def test_importance_weighted_search_favours_important_channels():
    w = np.random.default_rng(2).standard_normal((300, 64)).astype(np.float32)
    imp = np.where(np.arange(64) % 32 < 4, 100.0, 1.0).astype(np.float32)  # 4 loud channels per block
    weighted_err = lambda q: float((np.square(dequantize_rows(*q, 4, 64) - w) * imp).sum())  # noqa: E731
    assert weighted_err(quantize_rows(w, 4, 32, False, importance=imp)) < weighted_err(quantize_rows(w, 4, 32, False))


def test_smoothing_scale_has_unit_geometric_mean():
    s = smoothing_scale(np.array([1.0, 4.0, 16.0, 0.0], np.float32), 0.5)
    np.testing.assert_allclose(s, [0.5, 1.0, 2.0, 1.0], rtol=1e-6)


def test_reader_takes_rows_by_id(tmp_path):
    """Rows of the table, also from the default export, which stores it transposed: load_fp32_graph restores
    the [V, H] table over those bytes (gemv_head.restore_rows) and the reader transposes them."""
    fp32 = make_bundle(tmp_path, "gemma3_text")
    export(tmp_path / "model", tmp_path / "rows", capacity=64, gemv_head=False)
    ids = np.array([0, 1, 2, 7, 8, 50, 95])
    tables = []
    for bundle in (fp32, tmp_path / "rows"):
        model = load_fp32_graph(bundle / "target.onnx")
        t = next(t for t in model.graph.initializer if t.name == "model.embed_tokens.weight")
        with _Reader(bundle / "target.onnx") as read:
            np.testing.assert_array_equal(read.take(t, ids), read(t)[ids])
            np.testing.assert_array_equal(read.rows(t, 5, 9), read(t)[5:9])
            tables.append(read(t))
    np.testing.assert_array_equal(tables[0], tables[1])
    # the checkpoint's table: a reader that read nothing (zeros throughout) gave equal zeros above
    np.testing.assert_array_equal(tables[0], Checkpoint(tmp_path / "model")["model.embed_tokens.weight"])


def test_reader_reads_without_positioned_reads(tmp_path, monkeypatch):
    """Windows has no os.preadv (nor os.pread): the reader read the external data with it, and every int8 / int4
    export failed there with an AttributeError after its fp32 export. A data file cut short is still named."""
    fp32 = export(save_tiny(tiny("gemma3_text"), tmp_path / "model"), tmp_path / "rows", capacity=64, gemv_head=False)
    name = "model.embed_tokens.weight"
    t = next(t for t in load_fp32_graph(fp32 / "target.onnx").graph.initializer if t.name == name)
    want = Checkpoint(tmp_path / "model")[name]
    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "pread", raising=False)
    with _Reader(fp32 / "target.onnx") as read:
        np.testing.assert_array_equal(read(t), want)
        np.testing.assert_array_equal(read.rows(t, 3, 7), want[3:7])
    data = fp32 / next(e.value for e in t.external_data if e.key == "location")
    end = int(next(e.value for e in t.external_data if e.key == "offset")) + want.nbytes
    with open(data, "r+b") as f:
        f.truncate(end - 4)  # the tensor's last number gone
    with _Reader(fp32 / "target.onnx") as read, pytest.raises(EdgemtpError, match="runs past the end of"):
        read(t)


@pytest.mark.parametrize("gemv_head", [True, False])
def test_export_streams_big_tables_in_row_blocks(tmp_path, monkeypatch, gemv_head):
    """E2B's 9.4 GB per-layer table is written in row blocks, and so are big transposed weights (the default
    fp32 export's [H, V] head table): the file is the same as written whole."""
    model_dir = save_tiny(tiny("gemma3_text"), tmp_path / "model")
    export(model_dir, tmp_path / "whole", capacity=64, gemv_head=gemv_head)
    monkeypatch.setattr(builder, "ROWS_BYTES", 1000)  # every matrix > 1 KB goes in blocks of ~4 rows
    whole_reads = []  # tensors read whole (memory-mapped) from the checkpoint
    real_getitem = Checkpoint.__getitem__
    monkeypatch.setattr(Checkpoint, "__getitem__", lambda ck, name: whole_reads.append(name) or real_getitem(ck, name))
    export(model_dir, tmp_path / "rows", capacity=64, gemv_head=gemv_head)
    assert (tmp_path / "rows/target.onnx.data").read_bytes() == (tmp_path / "whole/target.onnx.data").read_bytes()
    assert "model.embed_tokens.weight" not in whole_reads  # the table (transposed or not) only in row blocks
    graph = onnx.load(str(tmp_path / "rows/target.onnx"), load_external_data=False).graph
    assert any(t.name.endswith(".T") for t in graph.initializer) == gemv_head


# ------------------------------------------------------------------------ graphs

@pytest.mark.parametrize("kind", ["gemma3_text", "llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_on_grid_weights_quantize_exactly(kind, quant, tmp_path):
    """Uncalibrated: the head/table on the preset's grid (4 bits with zero points, or 8 bits)."""
    table = (lambda w: snap(w, 4, 32, False)) if quant == "int4" else None
    fp32 = make_bundle(tmp_path, kind, snapped=True, table=table)
    want = all_logits(fp32)
    quantize_bundle(fp32, tmp_path / "exact", quant, accuracy_level=0, calibration=None)
    np.testing.assert_allclose(all_logits(tmp_path / "exact"), want, atol=1e-4, rtol=0)
    # level 4 (the default) rounds activations to int8 per block: ~1% of the logit spread here
    quantize_bundle(fp32, tmp_path / "fast", quant, calibration=None)
    assert rel_error(all_logits(tmp_path / "fast"), want) < 0.05


def test_quantizing_reports_each_phase_and_counts_weight_bytes(tmp_path, calib_file, monkeypatch):
    """The export bar names the quantizer's phases, and "quantizing weights" moves chunk by chunk inside a
    matrix (a 4-bit table with GPTQ took a minute of Gemma 3 270M's two without a move). The calibration text's
    read and tokenization come first under a name of their own: Gemma 3 270M's int4 export sat 6.6 s on the
    finished "MTP drafter weights 42/42" over them."""
    from edgemtp.exporters import blockquant, quantrewrite

    fp32 = make_bundle(tmp_path, "gemma3_text")
    monkeypatch.setattr(blockquant, "CHUNK_ELEMENTS", 1024)  # tiny matrices in several chunks
    monkeypatch.setattr(quantrewrite, "PROGRESS_UNIT", 1)  # count bytes, not MB
    calls = []
    quantize_bundle(fp32, tmp_path / "q", "int4", calibration=calib_file, calibration_tokens=128,
                    progress=lambda done, total, what: calls.append((what, done, total)))
    assert list(dict.fromkeys(what for what, _, _ in calls)) == ["calibration text", "int8 copy for calibration",
                                                                 "calibration", "quantizing weights"]
    weights = [(done, total) for what, done, total in calls if what == "quantizing weights"]
    assert weights == sorted(weights) and weights[-1][0] == weights[-1][1]
    inits = onnx.load(str(fp32 / "target.onnx"), load_external_data=False).graph.initializer
    assert 0.9 < weights[-1][1] / sum(4 * int(np.prod(t.dims)) for t in inits if "weight" in t.name) < 1.1
    assert len(weights) > len(inits) + 10  # reports inside matrices, not only one per initializer


def test_fp16_progress_ends_at_its_total(tmp_path):
    """The fp16 bar counts every initializer, inline constants too: it stopped at 182/249 on SmolLM2-135M,
    whose last initializers are inline (they were skipped without a report)."""
    fp32 = make_bundle(tmp_path, "gemma3_text")
    calls = []
    quantize_bundle(fp32, tmp_path / "h", "fp16", progress=lambda done, total, what: calls.append((what, done, total)))
    weights = [(done, total) for what, done, total in calls if what == "fp16 weights"]
    assert weights and weights[-1][0] == weights[-1][1]


@pytest.mark.parametrize("kind", ["gemma3_text", "qwen2"])
def test_calibrated_int4_split_table_is_exact_on_grid(kind, tmp_path, calib_file):
    """Frequent rows at 8 bits, the rest at 4 (GPTQ), permuted by frequency: same logits as fp32."""
    fp32 = make_bundle(tmp_path, kind, snapped=True, table=dual_grid)
    quantize_bundle(fp32, tmp_path / "q", "int4", accuracy_level=0, frequent_rows=16, calibration=calib_file,
                    calibration_tokens=128)
    np.testing.assert_allclose(all_logits(tmp_path / "q"), all_logits(fp32), atol=1e-4, rtol=0)
    ops = op_types(tmp_path / "q")
    assert ops.count("MatMulNBits") == 4 * 4 + 2  # q/k/v, o, gate/up, down per layer; the head in two parts
    assert ops.count("GatherBlockQuantized") == (2 if kind == "gemma3_text" else 1)  # qwen2's table is untied
    q = bundle_mod.load(tmp_path / "q").manifest["graphs"]["target"]["quantization"]
    assert q["frequent_rows"] == 16 and q["gptq"] and q["calibration"] == str(calib_file)
    # which text that was: the path alone does not say (nor "corpora", the running Python's standard library)
    assert q["calibration_sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
    model = onnx.load(str(tmp_path / "q/target.onnx"))
    row_of = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(".row_of"))
    assert sorted(row_of[3:19]) == list(range(16))  # t3..t18, the frequent tokens, are the 8-bit rows


def test_the_calibration_file_path_changes_only_the_manifest(tmp_path, calib_file):
    """The same calibration text given by another path (another checkout's directory, relative or absolute) writes
    the same graph bytes: the graphs record the text by content, the manifest records the path as given too."""
    fp32 = make_bundle(tmp_path, "gemma3_text")
    (tmp_path / "elsewhere").mkdir()
    other = shutil.copy(calib_file, tmp_path / "elsewhere" / "text.txt")
    for out, text in (("a", calib_file), ("b", other)):
        quantize_bundle(fp32, tmp_path / out, "int8", calibration=text, calibration_tokens=128)
    manifests = [json.loads((tmp_path / out / "edgemtp.json").read_text()) for out in ("a", "b")]
    assert manifests[0]["files"] == manifests[1]["files"]  # every file's sha256
    quant = [m["graphs"]["target"].pop("quantization") for m in manifests]
    assert manifests[0] == manifests[1] and [q.pop("calibration") for q in quant] == [str(calib_file), str(other)]
    assert quant[0] == quant[1] and quant[0]["calibration_sha256"] == hashlib.sha256(CALIB_TEXT.encode()).hexdigest()


def nbits_bits(graph_path) -> list[int]:
    """The `bits` attribute of every MatMulNBits of a graph whose weights are in its own data file (a drafter's
    head over the target's table is the target's)."""
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    where = {t.name: e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    return [a.i for n in graph.node if n.op_type == "MatMulNBits" and where.get(n.input[1]) == graph_path.name + ".data"
            for a in n.attribute if a.name == "bits"]


@pytest.mark.parametrize("rows", [96, 32768])
def test_frequent_rows_covering_the_vocabulary_keep_the_whole_head_8bit(rows, tmp_path, calib_file):
    """--frequent-rows at least the vocabulary (96 here; the preset's 32,768 for a 32,000-token Llama 2): every
    row is frequent, so the table is 8-bit, exact on an 8-bit grid, and the manifest says so. It was packed
    wholly at 4 bits, the manifest saying its frequent rows were kept at 8."""
    fp32 = make_bundle(tmp_path, "gemma3_text", snapped=True)  # the table on the 8-bit grid
    quantize_bundle(fp32, tmp_path / "q", "int4", accuracy_level=0, frequent_rows=rows, calibration=calib_file,
                    calibration_tokens=128)
    np.testing.assert_allclose(all_logits(tmp_path / "q"), all_logits(fp32), atol=1e-4, rtol=0)
    assert set(nbits_bits(tmp_path / "q/target.onnx")) == {8}
    q = bundle_mod.load(tmp_path / "q").manifest["graphs"]["target"]["quantization"]
    assert (q["head_bits"], q["embed_bits"], q["frequent_rows"]) == (8, 8, 0)  # the tied table: both
    props = {p.key: p.value
             for p in onnx.load(str(tmp_path / "q/target.onnx"), load_external_data=False).metadata_props}
    assert json.loads(props["edgemtp.quant_scheme"])["head_bits"] == 8


@pytest.mark.parametrize("kind, pattern, recorded", [
    ("llama", "*embed_tokens*", (8, 8, 0)),  # the tied table: head and embedding
    ("mistral", "lm_head*", (8, 4, 0)),  # untied: the head alone, its frequent rows moot
    ("mistral", "*embed_tokens*", (4, 8, 16)),  # untied: the embedding alone, the head still split
])
def test_keep_8bit_naming_the_table_is_recorded(kind, pattern, recorded, tmp_path, calib_file):
    """--keep-8bit naming the head or embedding table packs it whole at 8 bits: the manifest (and so `edgemtp
    info`) says so. It said "head 4-bit, embedding 4-bit, 16 frequent rows at 8 bits" over an 8-bit table."""
    fp32 = make_bundle(tmp_path, kind)
    quantize_bundle(fp32, tmp_path / "q", "int4", keep_8bit=(pattern,), frequent_rows=16, calibration=calib_file,
                    calibration_tokens=128)
    q = bundle_mod.load(tmp_path / "q").manifest["graphs"]["target"]["quantization"]
    assert (q["head_bits"], q["embed_bits"], q["frequent_rows"]) == recorded
    model = onnx.load(str(tmp_path / "q/target.onnx"), load_external_data=False)

    def bits(table: str) -> set[int]:  # of its packed parts (.frequent / .rest when split)
        return {int(m[1]) for t in model.graph.initializer
                if (m := re.fullmatch(re.escape(table) + r"(?:\.frequent|\.rest)?\.q(\d)b32", t.name))}
    head, embed = ("model.embed_tokens.weight" if kind == "llama" else "lm_head.weight"), "model.embed_tokens.weight"
    assert bits(head) == ({8} if recorded[0] == 8 else {4, 8})
    assert bits(embed) == bits(head) if kind == "llama" else bits(embed) == {recorded[1]}
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["edgemtp.quant_scheme"])["head_bits"] == recorded[0]


def test_split_table_gather_picks_each_row_from_its_part():
    """table_gather over an 8-bit first part and a 4-bit rest (the int4 table with frequent rows): every id
    gets exactly its own part's dequantized row, bit for bit what GatherBlockQuantized gives over that part,
    with ids of both parts mixed in one call (an MTP drafter's candidates), ids all from one part (a
    single token) and ids of any rank."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgemtp.exporters import quantnodes as QN
    from edgemtp.exporters.blockquant import unpack

    rng = np.random.default_rng(3)
    k, first, rest = 64, 12, 20
    w0, w1 = rng.standard_normal((first, k)).astype(np.float32), rng.standard_normal((rest, k)).astype(np.float32)
    p0, s0, _ = quantize_rows(w0, 8, 32, True)
    p1, s1, z1 = quantize_rows(w1, 4, 32, False)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in (
        (p0, "B0"), (s0, "S0"), (p1, "B1"), (s1, "S1"), (z1, "Z1"),
        (unpack(z1, 4, k // 32)[..., None].astype(np.uint8), "G1"),
        (rng.permutation(first + rest).astype(np.int64), "row_of"))]
    row_of = onnx.numpy_helper.to_array(inits[-1])
    parts = [QN.Packed("B0", "S0", None, None, 8, 32, first, k), QN.Packed("B1", "S1", "Z1", "G1", 4, 32, rest, k)]

    def run(nodes, inputs, feeds):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.INT64, None)
                                               for n in inputs],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    mixed = rng.integers(0, first + rest, size=(1, 200))
    one_part = [np.array([[int(np.flatnonzero(row_of < first)[0])]]),  # a single token of each part
                np.array([[int(np.flatnonzero(row_of >= first)[0])]])]
    table = np.concatenate([dequantize_rows(p0, s0, None, 8, k), dequantize_rows(p1, s1, z1, 4, k)])
    for ids in [mixed, mixed.reshape(2, 4, 25), *one_part]:
        y = run(QN.table_gather("ids", parts, "y", "t", "row_of"), ["ids"], {"ids": ids})
        assert y.shape == ids.shape + (k,)
        rows = row_of[ids]
        x0 = run(QN.gather_rows(parts[0], "r", "y", "g"), ["r"], {"r": np.minimum(rows, first - 1).reshape(1, -1)})
        x1 = run(QN.gather_rows(parts[1], "r", "y", "g"), ["r"], {"r": np.maximum(rows - first, 0).reshape(1, -1)})
        want = np.where((rows < first).reshape(1, -1, 1), x0, x1).reshape(y.shape)
        np.testing.assert_array_equal(y, want)  # bit for bit each part's own gather
        np.testing.assert_allclose(y, table[rows], rtol=1e-6, atol=1e-7)  # each id its own row
        # the fused form: each id's row dotted with the h of its leading index, as a drafter scores candidates
        h = rng.standard_normal(ids.shape[:-1] + (k,)).astype(np.float32)
        graph_inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, None),
                        helper.make_tensor_value_info("h", TensorProto.FLOAT, None)]
        graph = helper.make_graph(QN.table_dot("ids", "h", parts, "y", "t", "row_of"), "g", graph_inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        dots = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"ids": ids, "h": h})[0]
        assert dots.shape == ids.shape + (1,)
        np.testing.assert_allclose(dots, want.reshape(y.shape) @ h[..., None], rtol=1e-5, atol=1e-5)


def head_graph(w: np.ndarray, bits: int, two_pass: bool) -> bytes:
    """A head alone: x [m, K] -> MatMulNBits at accuracy level 4, with or without two passes."""
    from onnx import TensorProto, helper

    from edgemtp.exporters import quantnodes as QN

    p, s, z = quantize_rows(w, bits, 32, bits == 8)
    inits = [onnx.numpy_helper.from_array(p, "B"), onnx.numpy_helper.from_array(s, "S")]
    inits += [] if z is None else [onnx.numpy_helper.from_array(z, "Z")]
    packed = QN.Packed("B", "S", None if z is None else "Z", None, bits, 32, *w.shape)
    nodes = QN.head("x", [packed], "y", "head", 4, 32 if two_pass else None, None)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", w.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString(), dequantize_rows(p, s, z, bits, w.shape[1])


@pytest.mark.parametrize("bits", [4, 8])
def test_two_pass_head_restores_fp32_activations(bits):
    """Level 4 rounds activations to int8 per block: a loud channel (Gemma's final hidden state has
    channels ~15x the median) coarsens its block. Two passes (on MLAS' grid + the residual) undo it."""
    import onnxruntime as ort

    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    x[:, 5] *= 30
    w = rng.standard_normal((96, 64)).astype(np.float32)
    errors = {}
    for two in (False, True):
        graph, dequantized = head_graph(w, bits, two)
        y = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errors[two] = rel_error(y, x @ dequantized.T)
    assert errors[False] > 3e-3 and errors[True] < 1e-4


def test_two_pass_everywhere_is_nearly_exact(tmp_path):
    fp32 = make_bundle(tmp_path, "llama", snapped=True)
    quantize_bundle(fp32, tmp_path / "all", "int8", two_pass="all", calibration=None)
    assert rel_error(all_logits(tmp_path / "all"), all_logits(fp32)) < 1e-3


def test_integer_layers_are_nearly_exact_on_their_grid(tmp_path, calib_file):
    """--layer-op integer: each layer a MatMulInteger over int8 columns and two 7-bit passes of per-row
    activations. Layers snapped to a per-column 8-bit grid (the head to the 8-bit block grid) give the fp32
    logits to ~1e-4; a verify window's rows give the single steps' logits (each row is rounded on its own);
    calibrated (GPTQ) and with smoothing it stays as close to fp32 as the block layout."""
    model = tiny("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                w = p.numpy()
                big = "embed" in name or "lm_head" in name
                p.copy_(torch.from_numpy(snap(w, 8, 32, True) if big else snap(w, 8, w.shape[1], True)))
    fp32 = tmp_path / "fp32"
    export(save_tiny(model, tmp_path / "model"), fp32, capacity=64)
    quantize_bundle(fp32, tmp_path / "int", "int8", calibration=None, layer_op="integer")
    layers = sum(1 for t in onnx.load(str(fp32 / "target.onnx"), load_external_data=False).graph.node
                 if t.op_type == "MatMul")
    assert ops_count(tmp_path / "int", "MatMulIntegerToFloat") == layers  # every layer MatMul; the head (a Gemm)
    assert ops_count(tmp_path / "int", "MatMulNBits") == 1  # stays MatMulNBits
    want = all_logits(fp32)
    assert rel_error(all_logits(tmp_path / "int"), want) < 5e-4
    window, steps = window_and_steps(tmp_path / "int")
    np.testing.assert_allclose(window, steps, atol=1e-4 * np.abs(steps).max())
    errors = {}
    for op in ("integer", "nbits"):
        # 16 windows of the capacity's 64 positions, the calibration measured
        quantize_bundle(fp32, tmp_path / op, "int8", calibration=calib_file, layer_op=op, smooth=0.5,
                        calibration_tokens=1024)
        errors[op] = rel_error(all_logits(tmp_path / op), want)
    assert errors["integer"] < 1.25 * errors["nbits"]  # 0.0074 vs 0.0078


@pytest.mark.parametrize("split", [True, False])
def test_integer_head_rescores_each_positions_top_logits_from_the_table(split):
    """QN.integer_head alone: every logit from the int8 columns (one scale per token, activations in
    HEAD_PASSES 7-bit passes, emulated here), except each position's top
    REFINE, which are the table's own rows dotted with x (an 8-bit and a 4-bit part permuted by row_of,
    or one 8-bit part)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgemtp.exporters import quantnodes as QN
    from edgemtp.exporters.blockquant import unpack

    rng = np.random.default_rng(5)
    k, v, first = 64, 300, 40
    w = rng.standard_normal((v, k)).astype(np.float32)
    w[:, 3] *= 8  # an outlier channel, as Gemma's
    row_of = rng.permutation(v) if split else np.arange(v)
    by_row = np.empty_like(w)
    by_row[row_of] = w  # table row row_of[id] holds token id
    inits, parts = [], []
    for name, (a, b), bits in ((("P0", (0, first), 8), ("P1", (first, v), 4)) if split else (("P0", (0, v), 8),)):
        packed, scales, zp = quantize_rows(by_row[a:b], bits, 32, bits == 8)
        inits += [onnx.numpy_helper.from_array(packed, name), onnx.numpy_helper.from_array(scales, name + "s")]
        if zp is not None:
            inits += [onnx.numpy_helper.from_array(zp, name + "z"),
                      onnx.numpy_helper.from_array(unpack(zp, 4, k // 32)[..., None].astype(np.uint8), name + "g")]
        parts.append(QN.Packed(name, name + "s", zp is not None and name + "z" or None,
                               zp is not None and name + "g" or None, bits, 32, b - a, k))
    table = np.concatenate([dequantize_rows(*quantize_rows(by_row[a:b], bits, 32, bits == 8), bits, k)
                            for a, b, bits in (((0, first, 8), (first, v, 4)) if split else ((0, v, 8),))])[row_of]
    levels, scales, _ = quantize_rows(w, 8, k, True)  # one block per token: the columns
    cols = (levels.reshape(v, k).astype(np.int16) - 128).astype(np.int8)
    inits += [onnx.numpy_helper.from_array(np.ascontiguousarray(cols.T), "W"),
              onnx.numpy_helper.from_array(scales.reshape(-1), "WS"),
              onnx.numpy_helper.from_array(row_of.astype(np.int64), "row_of")]
    nodes = QN.integer_head("x", "W", "WS", parts, "row_of" if split else None, "y", "head")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, k)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    levels_x, step, rest = np.zeros_like(x), np.abs(x).max(-1, keepdims=True) / QN.INT_LEVELS, x
    for _ in range(QN.HEAD_PASSES):  # integer_activations' passes, each rounding the last one's residual
        q = np.round(rest / step)
        levels_x, rest, step = levels_x + q * step, rest - q * step, step / (2 * QN.INT_LEVELS)
    approx = levels_x @ (cols.astype(np.float32) * scales.reshape(-1, 1)).T
    exact = x @ table.T
    top = np.argsort(-approx, -1, kind="stable")[:, :QN.REFINE]
    rescored = np.zeros_like(y, dtype=bool)
    np.put_along_axis(rescored, top, True, -1)
    tol = 1e-5 * np.abs(exact).max()  # float sums in another order
    np.testing.assert_allclose(y[rescored], exact[rescored], rtol=0, atol=tol)
    np.testing.assert_allclose(y[~rescored], approx[~rescored], rtol=0, atol=tol)
    assert np.abs(exact - approx).max() > 100 * tol  # the columns and the table differ where not rescored
    np.testing.assert_array_equal(y.argmax(-1), exact.argmax(-1))
    steps = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_array_equal(y, steps)  # each position on its own, whatever the window


@pytest.mark.parametrize("kind,quant", [("gemma3_text", "int4"), ("qwen2", "int8")])
def test_integer_head_bundle_keeps_the_tables_argmax(kind, quant, tmp_path, calib_file):
    """export --head-op integer: one MatMulIntegerToFloat head whose top logits the packed table rescores.
    On a table exact on its grids the rescored logits are fp32's, every argmax is fp32's, the columns'
    8 bits show elsewhere; a verify window gives the single steps' argmax and rescored logits. Gemma 3's tied
    table split into frequent 8-bit and 4-bit rows (int4); Qwen2's untied head in one 8-bit part (int8)."""
    fp32 = make_bundle(tmp_path, kind, snapped=True, table=dual_grid)
    opts = dict(calibration=calib_file, calibration_tokens=256,  # 4 windows of 64
                **({"frequent_rows": 16} if quant == "int4" else {}))
    quantize_bundle(fp32, tmp_path / "nbits", quant, **opts)
    quantize_bundle(fp32, tmp_path / "int", quant, **opts, head_op="integer")
    assert ops_count(tmp_path / "int", "MatMulIntegerToFloat") == 1 and ops_count(tmp_path / "int", "TopK") == 1
    assert ops_count(tmp_path / "int", "MatMulNBits") == 4 * 4  # the layers; no MatMulNBits head
    q = bundle_mod.load(tmp_path / "int").manifest["graphs"]["target"]["quantization"]
    assert (q["head_op"], q["two_pass"]) == ("integer", "layers")  # what the graph holds: the layers' passes alone
    layers = [n for n in onnx.load(tmp_path / "int" / "target.onnx", load_external_data=False).graph.node
              if n.op_type == "MatMulNBits"]
    assert all(".two_pass" in n.input[0] for n in layers)
    want, table, got = all_logits(fp32)[0], all_logits(tmp_path / "nbits")[0], all_logits(tmp_path / "int")[0]
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    from edgemtp.exporters.quantnodes import REFINE
    top = np.argsort(-got, -1)[:, :REFINE]
    spread = np.abs(want).max()
    assert np.abs(np.take_along_axis(got - table, top, -1)).max() < 1e-3 * spread  # the table's own logits
    assert 1e-4 < rel_error(got, want) < 2e-2  # elsewhere the columns' one scale per token
    window, steps = window_and_steps(tmp_path / "int")
    np.testing.assert_array_equal(window.argmax(-1), steps.argmax(-1))
    top = np.argsort(-steps, -1)[..., :REFINE]  # rescored: as close as the layers' outputs (their own passes)
    np.testing.assert_allclose(np.take_along_axis(window, top, -1), np.take_along_axis(steps, top, -1),
                               atol=1e-4 * spread)
    np.testing.assert_allclose(window, steps, atol=1e-3 * spread)  # the tail: a last-pass step at most


def test_a_plain_step_of_an_integer_head_bundle_reads_the_columns_not_the_packed_table(tmp_path, calib_file):
    """--head-op integer: a step's logits are the int8 columns [K, V], read whole; the packed table (its parts,
    scales, zero points and row order) is only gathered from: the embedding's row and the REFINE rows the
    head rescores. The ceiling's bytes per token (decode_bytes) counted the whole packed table as read too.
    Here an initializer that only gathers read (through an Unsqueeze, which the session folds, for the scales)
    is read at rows (left out: a few KB), any other whole; the data file's padding stays counted."""
    from edgemtp.runtime.bandwidth import decode_bytes

    from .test_profile import rows_read

    fp32 = make_bundle(tmp_path, "gemma3_text")  # a tied table: the embedding gathers from the packed one
    quantize_bundle(fp32, tmp_path / "int", "int4", calibration=calib_file, calibration_tokens=256, frequent_rows=16,
                    head_op="integer")
    rows = rows_read(tmp_path / "int/target.onnx")  # {(file, offset, length): names}
    gathered = {name: length for (_, _, length), names in rows.items() for name in names}
    table = "model.embed_tokens.weight."
    assert {table + "frequent.q8b32", table + "rest.q4b32.scales", table + "row_of"} <= set(gathered)
    assert table + "int8" not in gathered and table + "int8.scales" not in gathered
    b = bundle_mod.load(tmp_path / "int")
    assert decode_bytes(b) == b.manifest["files"]["target.onnx.data"]["bytes"] - sum(gathered.values())


def test_integer_head_drafter_of_an_untied_target_reads_the_targets_table(tmp_path):
    """An untied target packs its embedding for the gather only; the drafter's own head over that table is then
    MatMulNBits over the target's packed bytes, not a second packed copy (with int8 columns) in its file."""
    from edgemtp.drafter import export as X

    from .test_drafter import tiny_drafter

    fp32 = make_bundle(tmp_path, "qwen2")
    tiny_drafter(tmp_path / "model", tmp_path / "drafter")
    X.add_to_bundle(fp32, tmp_path / "drafter")
    quantize_bundle(fp32, tmp_path / "q", "int8", calibration=None, head_op="integer")
    graph = onnx.load(str(tmp_path / "q/drafter.onnx"), load_external_data=False).graph
    table = {e.value for t in graph.initializer if t.name.startswith("model.embed_tokens.")
             for e in t.external_data if e.key == "location"}
    assert table == {"target.onnx.data"}
    assert "MatMulIntegerToFloat" not in [n.op_type for n in graph.node]
    assert ops_count(tmp_path / "q", "MatMulIntegerToFloat") == 1  # the target's own head


def test_a_drafters_head_over_a_table_the_target_only_gathers_adds_its_zero_points(tmp_path):
    """An untied int4 target packs its embedding for GatherBlockQuantized, with that op's zero points only (the
    MatMulNBits layout it stored too was read by none of its nodes). The MTP drafter's tied head multiplies by the
    table: it reads the target's packed rows and scales and writes MatMulNBits' zero points to its own file,
    those of the table's fp32 rows."""
    from edgemtp.drafter import export as X

    from .test_drafter import tiny_drafter

    fp32 = make_bundle(tmp_path, "qwen2")
    tiny_drafter(tmp_path / "model", tmp_path / "drafter")
    X.add_to_bundle(fp32, tmp_path / "drafter")
    quantize_bundle(fp32, tmp_path / "q", "int4", calibration=None)
    packed = "model.embed_tokens.weight.q4b32"
    target = onnx.load(str(tmp_path / "q/target.onnx"), load_external_data=False).graph
    assert {packed, packed + ".gather_zero_points"} <= {t.name for t in target.initializer}
    assert packed + ".zero_points" not in {t.name for t in target.initializer}
    drafter = onnx.load(str(tmp_path / "q/drafter.onnx"), load_external_data=False).graph
    head = [n for n in drafter.node if n.op_type == "MatMulNBits" and n.input[1] == packed]
    assert len(head) == 1 and head[0].input[3] == packed + ".zero_points"
    zp = next(t for t in drafter.initializer if t.name == packed + ".zero_points")
    assert {e.value for e in zp.external_data if e.key == "location"} == {"drafter.onnx.data"}
    table = next(t for t in onnx.load(str(fp32 / "target.onnx")).graph.initializer
                 if t.name == "model.embed_tokens.weight")
    want = quantize_rows(onnx.numpy_helper.to_array(table), 4, 32, symmetric=False)[2]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(zp, str(tmp_path / "q")), want)


def test_drafter_quant_int8_keeps_the_drafters_weights_8bit_with_4bit_layers(tmp_path):
    """--drafter-quant int8 beside --layer-bits 4: the drafter's own MatMuls are 8-bit, as its manifest entry
    ("weights": "int8") says; they were packed at the target's 4 bits."""
    from edgemtp.drafter import export as X

    from .test_drafter import tiny_drafter

    fp32 = make_bundle(tmp_path, "gemma3_text")
    tiny_drafter(tmp_path / "model", tmp_path / "drafter")
    X.add_to_bundle(fp32, tmp_path / "drafter")
    quantize_bundle(fp32, tmp_path / "q", "int4", calibration=None, layer_bits=4, drafter_quant="int8")
    assert bundle_mod.load(tmp_path / "q").manifest["graphs"]["drafter"]["weights"] == "int8"
    own = nbits_bits(tmp_path / "q/drafter.onnx")
    assert len(own) >= 5 and set(own) == {8}
    assert set(nbits_bits(tmp_path / "q/target.onnx")) == {4}  # the target's layers and head as asked


def test_integer_head_needs_whole_blocks(tmp_path):
    """The rescoring gathers whole rows of blocks: a hidden size (64) that is not a multiple of the block size
    is one clear error, and no bundle is left behind."""
    fp32 = make_bundle(tmp_path, "gemma3_text")
    with pytest.raises(EdgemtpError, match="head_op='integer' .* hidden size 64 .* the block size 128"):
        quantize_bundle(fp32, tmp_path / "q", "int8", calibration=None, block_size=128, head_op="integer",
                        two_pass="none")
    # the two-pass activations need whole blocks too: they were left out, the manifest still saying "all"
    with pytest.raises(EdgemtpError, match="block_size=128 does not divide the hidden size 64: the two-pass "
                                           "activations \\(all\\)"):
        quantize_bundle(fp32, tmp_path / "q", "int8", calibration=None, block_size=128)
    assert not (tmp_path / "q").exists()
    # blocks of 64 divide the hidden size but not down_proj's input width (96): found in the rewrite
    with pytest.raises(EdgemtpError, match="block_size=64 does not divide the input width 96 of "
                                           "model.layers.0.mlp.down_proj.weight"):
        quantize_bundle(fp32, tmp_path / "q", "int8", calibration=None, block_size=64)
    assert not (tmp_path / "q").exists()
    quantize_bundle(fp32, tmp_path / "q", "int8", calibration=None, block_size=64, two_pass="head")
    shutil.rmtree(tmp_path / "q")
    quantize_bundle(fp32, tmp_path / "q", "int8", calibration=None, accuracy_level=2)  # no passes at level 2 ...
    assert bundle_mod.load(tmp_path / "q").manifest["graphs"]["target"]["quantization"]["two_pass"] == "none"


def test_embedding_blocks_must_divide_the_hidden_size(tmp_path):
    """Blocks of 128 on a hidden size of 64 with --two-pass none: the embedding's GatherBlockQuantized cannot
    take them. That bundle kept an fp32 Gather over the full table beside the packed head (Gemma 3 270M with
    blocks of 256: its 671 MB table), the manifest and `edgemtp info` saying "embedding 4-bit"; it is refused,
    before any work, and blocks that divide it give a packed gather."""
    fp32 = make_bundle(tmp_path, "gemma3_text")
    with pytest.raises(EdgemtpError, match="block_size=128 does not divide the hidden size 64: the embedding's "
                                           "GatherBlockQuantized"):
        quantize_bundle(fp32, tmp_path / "q", "int4", calibration=None, block_size=128, two_pass="none")
    assert not (tmp_path / "q").exists()
    quantize_bundle(fp32, tmp_path / "q", "int4", calibration=None, block_size=64, two_pass="none")
    assert ops_count(tmp_path / "q", "GatherBlockQuantized") == 1 and ops_count(tmp_path / "q", "Gather") == 0
    graph = onnx.load(str(tmp_path / "q/target.onnx"), load_external_data=False).graph
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [96, 64]]


def test_layer_widths_are_checked_before_the_fp32_export_and_calibration(tmp_path, calib_file, monkeypatch):
    """Blocks of 64 divide the hidden size (64) but not down_proj's input width (96): export names that before
    its fp32 export, quantize_bundle before its calibration (both came first, minutes at scale)."""
    import edgemtp.exporters as E
    from edgemtp.exporters import quantize as Q

    model_dir = save_tiny(tiny("gemma3_text"), tmp_path / "model")
    fp32 = export(model_dir, tmp_path / "fp32", capacity=64)
    monkeypatch.setattr(Q, "calibrate", lambda *a, **k: pytest.fail("the calibration ran"))
    message = "block_size=64 does not divide the input width 96 of model.layers.0.mlp.down_proj.weight"
    with pytest.raises(EdgemtpError, match=message):
        quantize_bundle(fp32, tmp_path / "q", "int4", calibration=calib_file, calibration_tokens=128, block_size=64)
    real = E.export
    monkeypatch.setattr(E, "export", lambda *a, **k: pytest.fail("the fp32 export ran"))
    with pytest.raises(EdgemtpError, match=message):
        real(model_dir, tmp_path / "q", "int4", capacity=64, quant_options={"block_size": 64, "calibration": None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32", "model"]


def test_integer_layers_take_any_block_size_of_the_head(tmp_path):
    """--layer-op integer: --block-size applies to the head only (the layers round each activation row, no
    blocks), so blocks of 64 that divide the hidden size but not down_proj's width (96) are fine; they were
    refused as if the layers took two-pass block activations."""
    fp32 = make_bundle(tmp_path, "gemma3_text")
    quantize_bundle(fp32, tmp_path / "q", "int8", calibration=None, layer_op="integer", block_size=64)
    assert ops_count(tmp_path / "q", "MatMulIntegerToFloat") == 4 * 4
    assert nbits_bits(tmp_path / "q/target.onnx") == [8]  # the head, in blocks of 64
    graph = onnx.load(str(tmp_path / "q/target.onnx"), load_external_data=False).graph
    assert [a.i for n in graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "block_size"] == [64]
    assert rel_error(all_logits(tmp_path / "q"), all_logits(fp32)) < 0.06  # int8's order, as the other layouts


def test_smoothing_keeps_the_function(tmp_path, calib_file):
    """x / s into W * s: the same product; only the rounding moves."""
    fp32 = make_bundle(tmp_path, "gemma3_text")
    quantize_bundle(fp32, tmp_path / "smooth", "int8", smooth=0.5, accuracy_level=0, two_pass="none",
                    calibration=calib_file, calibration_tokens=128)
    quantize_bundle(fp32, tmp_path / "plain", "int8", accuracy_level=0, two_pass="none", calibration=None)
    want = all_logits(fp32)
    assert rel_error(all_logits(tmp_path / "smooth"), want) < 2 * rel_error(all_logits(tmp_path / "plain"), want) + 1e-3
    assert ops_count(tmp_path / "smooth", "Mul") == ops_count(tmp_path / "plain", "Mul") + 4 * 4  # 4 inputs a layer
    # each Mul scales a MatMulNBits input by 1 / s, s per channel (geometric mean 1), not all 1: a smoothing that
    # inserted its Muls with s = 1 (no change at all) passed the bounds above
    graph = onnx.load(str(tmp_path / "smooth/target.onnx")).graph
    inv_s = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith(".inv_s")}
    fed = {i for n in graph.node if n.op_type == "MatMulNBits" for i in n.input}
    muls = [n for n in graph.node if n.op_type == "Mul" and n.input[1] in inv_s]
    assert len(muls) == len(inv_s) == 4 * 4 and all(n.output[0] in fed for n in muls)
    for v in inv_s.values():
        assert abs(np.log(v).mean()) < 1e-5 and v.max() / v.min() > 1.5, v


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_forced_symmetry_on_grid_is_exact(quant, symmetric, tmp_path):
    """Zero points (packed [N, ceil(kb*bits/8)] for MatMulNBits, one per block for the gather) or none."""
    bits = 4 if quant == "int4" else 8
    fp32 = make_bundle(tmp_path, "gemma3_text", snapped=True, layers=(8, 32, symmetric),
                       table=lambda w: snap(w, bits, 32, symmetric))
    quantize_bundle(fp32, tmp_path / "exact", quant, symmetric=symmetric, accuracy_level=0, calibration=None)
    np.testing.assert_allclose(all_logits(tmp_path / "exact"), all_logits(fp32), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, calib_file):
    """fp32 tiny gemma3 bundle and its fp16 / int8 / int4 versions (int4 calibrated on a small text)."""
    root = tmp_path_factory.mktemp("quant")
    fp32 = make_bundle(root, "gemma3_text")
    out = {"fp32": fp32, **{q: quantize_bundle(fp32, root / q, q, calibration=None) for q in ("fp16", "int8")}}
    out["int4"] = quantize_bundle(fp32, root / "int4", "int4", calibration=calib_file, frequent_rows=16,
                                  calibration_tokens=256)
    return out


def test_quantized_bundles_run_unmodified_and_are_smaller(gemma, monkeypatch):
    """The engine's tokens after a prompt prefilled PREFILL_CHUNK = 3 positions a pass (the runtime's 512 made
    small: 20 positions, the window of 8 twice over) are the greedy chain of one pass's logits."""
    from edgemtp.runtime import target as target_mod

    want = all_logits(gemma["fp32"])
    size = {q: (b / "target.onnx.data").stat().st_size for q, b in gemma.items()}
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"]
    err = {q: rel_error(all_logits(gemma[q]), want) for q in ("fp16", "int8", "int4")}
    # per-weight relative noise: fp16 ~1e-4, int8 ~0.5%, int4 ~9%; through 4 random layers int4 reaches
    # tens of % on this flat-logit toy, so the bounds only say "the right order"
    assert err["fp16"] < 1e-3 and err["int8"] < 0.06 and err["int4"] < 0.6
    assert err["fp16"] < err["int8"] < err["int4"]
    monkeypatch.setattr(target_mod, "PREFILL_CHUNK", 3)
    prompt = " ".join(f"t{i}" for i in IDS[0, :20] % 90 + 3)
    for q in ("int8", "int4"):  # the engine's tokens: the greedy chain of the quantized graph's own logits
        engine = Engine.load(gemma[q])
        engine.stop_ids = frozenset()
        gen, want = engine.generate(prompt, max_new_tokens=5), engine.encode(prompt)
        for _ in range(5):
            want.append(int(all_logits(gemma[q], np.array([want]))[0, -1].argmax()))
        assert gen.tokens == want[-5:], q


def test_a_scheme_that_takes_nothing_from_the_calibration_records_none(gemma, calib_file, tmp_path):
    """int8 without GPTQ or smoothing (int4 without them and its frequent rows too) reads nothing of the
    calibration text: the corpora were read anyway, and the manifest and `edgemtp info` said the bundle was
    "calibrated on corpora"; a text given for it is refused, as --calibration-tokens is."""
    for quant, options in (("int8", {}), ("int4", {"frequent_rows": 0})):
        out = quantize_bundle(gemma["fp32"], tmp_path / quant, quant, gptq=False, **options)
        q = bundle_mod.load(out).manifest["graphs"]["target"]["quantization"]
        assert q["calibration"] is None and q["calibration_sha256"] is None, quant
        with pytest.raises(EdgemtpError, match=f"calibration='{calib_file}' finds nothing to calibrate"):
            check_options(quant, calibration=calib_file, gptq=False, **options)


def test_a_head_fitted_to_8_bits_takes_nothing_from_the_calibration(gemma, calib_file, tmp_path, monkeypatch):
    """int4 without GPTQ whose head ends 8-bit whole (the vocabulary within --frequent-rows: every row is a frequent
    one; or --keep-8bit naming the table) reads nothing of the calibration text either: the scheme was judged
    before its head was fitted, so the corpora were read, the manifest said "calibrated on corpora", and a text
    given for it was taken."""
    from edgemtp import exporters

    vocab = bundle_mod.load(gemma["fp32"]).target_contract.vocab_size
    for options in ({"frequent_rows": vocab}, {"keep_8bit": ["*embed_tokens*"]}):
        out = quantize_bundle(gemma["fp32"], tmp_path / "int4", "int4", gptq=False, overwrite=True, **options)
        q = bundle_mod.load(out).manifest["graphs"]["target"]["quantization"]
        assert (q["head_bits"], q["frequent_rows"]) == (8, 0), options
        assert q["calibration"] is None and q["calibration_sha256"] is None, options
        assert set(nbits_bits(out / "target.onnx")) == {8}, options  # the head packed as recorded
        with pytest.raises(EdgemtpError, match=f"calibration='{calib_file}' finds nothing to calibrate"):
            quantize_bundle(gemma["fp32"], tmp_path / "given", "int4", gptq=False, calibration=calib_file, **options)
        assert not (tmp_path / "given").exists()
        # export refuses it before its fp32 export
        monkeypatch.setattr(exporters, "export", lambda *a, **k: pytest.fail("the fp32 export ran first"))
        with pytest.raises(EdgemtpError, match=f"calibration='{calib_file}' finds nothing to calibrate"):
            export(gemma["fp32"].parent / "model", tmp_path / "exported", quant="int4", capacity=64,
                   quant_options=dict(gptq=False, calibration=calib_file, **options))
        monkeypatch.undo()


def test_manifest_and_graph_record_the_quantization(gemma):
    b = bundle_mod.load(gemma["int4"])
    g = b.manifest["graphs"]["target"]
    q = g["quantization"]
    assert g["quant"] == "int4" and q["head_bits"] == 4 and q["head_block_size"] == 32 and q["two_pass"] == "all"
    assert g["contract"] == bundle_mod.load(gemma["fp32"]).manifest["graphs"]["target"]["contract"]
    # the batched verify graph reads fp32 bytes: the quantized bundle goes without it
    assert bundle_mod.load(gemma["fp32"]).has_graph("verify")
    assert not b.has_graph("verify") and "target_verify.onnx" not in b.manifest["files"]
    ops = set(op_types(gemma["int4"]))
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "Gemm" not in ops
    graph = onnx.load(str(gemma["int4"] / "target.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # attention's stay
    assert bundle_mod.load(gemma["int8"]).manifest["graphs"]["target"]["quantization"]["calibration"] is None


def test_fp32_copy_is_identical(tmp_path):
    """An fp32 "quantization" of a row-major export copies its bytes (the default export's transposed table
    comes back as the [V, H] table: test_gemv_head_bundle_quantizes_as_the_row_major_one)."""
    model_dir = save_tiny(tiny("gemma3_text"), tmp_path / "model")
    src = export(model_dir, tmp_path / "rows", capacity=64, gemv_head=False)
    files = quantize_graph(src / "target.onnx", tmp_path / "t.onnx", "fp32")
    assert files == ["t.onnx", "t.onnx.data"]
    assert (tmp_path / "t.onnx.data").read_bytes() == (src / "target.onnx.data").read_bytes()


def test_int4_export_is_reproducible(tmp_path, calib_file):
    """Two calibrated int4 exports (GPTQ, frequent rows, two-pass) of one checkpoint, in processes with
    different string hash seeds, write the same bytes: the manifest's sha256 names the content."""
    import os
    import subprocess
    import sys

    fp32 = make_bundle(tmp_path, "gemma3_text")
    for seed in ("1", "2"):
        code = ("import sys; from edgemtp.exporters.quantize import quantize_bundle; "
                "quantize_bundle(sys.argv[1], sys.argv[2], 'int4', frequent_rows=16, calibration=sys.argv[3], "
                "calibration_tokens=256)")
        subprocess.run([sys.executable, "-c", code, str(fp32), str(tmp_path / seed), str(calib_file)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
    files = [bundle_mod.load(tmp_path / s).manifest["files"] for s in ("1", "2")]
    assert files[0] == files[1]
    assert "GatherBlockQuantized" in op_types(tmp_path / "1")


# ------------------------------------------------------------------------ options and errors

@pytest.mark.parametrize("options, python, cli, rule", [
    (dict(block_size=24), "block_size=24", "--block-size 24", "must be a power of two"),
    (dict(accuracy_level=7), "accuracy_level=7", "--accuracy-level 7", "must be 0..4"),
    (dict(layer_bits=3), "layer_bits=3", "--layer-bits 3", "must be 4 or 8"),
    (dict(frequent_rows=-1), "frequent_rows=-1", "--frequent-rows -1", "must be 0 or more"),
    (dict(two_pass="both"), "two_pass='both'", "--two-pass 'both'", "must be one of none, head, all"),
    (dict(smooth=1.5), "smooth=1.5", "--smooth 1.5", "must be between 0"),
    (dict(layer_op="amx"), "layer_op='amx'", "--layer-op 'amx'", "must be one of nbits, integer"),
    (dict(layer_op="integer", layer_bits=4), "layer_op='integer'", "--layer-op 'integer'",
     "needs 8-bit layers (MatMulIntegerToFloat has no 4-bit weights), and the layer bits asked for are 4"),
    (dict(head_op="columns"), "head_op='columns'", "--head-op 'columns'", "must be one of nbits, integer"),
    (dict(keep_8bit=("",)), "keep_8bit=''", "--keep-8bit ''", "is no weight-name pattern"),
    (dict(calibration_tokens=10), "calibration_tokens=10", "--calibration-tokens 10", "must be at least"),
    (dict(calibration="/nonexistent/text.txt"), "calibration='/nonexistent/text.txt'",
     "--calibration '/nonexistent/text.txt'", "does not exist (give a text file, corpora or none)"),
    (dict(calibration="/dev/null"), "calibration='/dev/null'", "--calibration '/dev/null'",
     "is a device, not a file (give a text file, corpora or none)"),
    # an on/off option: --gptq takes no value
    (dict(calibration=None, gptq=True), "gptq=True", "--gptq",
     "needs calibration text, and the calibration asked for is none"),
    (dict(calibration=None, frequent_rows=8), "frequent_rows=8", "--frequent-rows 8",
     "needs calibration text, and the calibration asked for is none"),
    (dict(block_size=512), "block_size=512", "--block-size 512", "must be a power of two from 16 to 256"),
    (dict(two_pass="head", accuracy_level=2), "two_pass='head'", "--two-pass 'head'",
     "needs accuracy level 4 (the two int8 passes are that level's integer kernel), and the accuracy level asked "
     "for is 2"),
    # the integer ops take no MatMulNBits passes: the option was taken and changed nothing
    (dict(two_pass="head", head_op="integer"), "two_pass='head'", "--two-pass 'head'",
     "does nothing with the integer head op"),
    (dict(quant="int8", two_pass="all", layer_op="integer", head_op="integer"), "two_pass='all'", "--two-pass 'all'",
     "does nothing with the integer layer and head ops"),
    (dict(calibration=None, calibration_tokens=4096), "calibration_tokens=4096", "--calibration-tokens 4096",
     "needs calibration text to take them from, and the calibration asked for is none"),
    (dict(quant="int8", layer_bits=4), "layer_bits=4", "--layer-bits 4",
     "applies to int4 bundles (int8 keeps every weight at 8 bits)"),
    (dict(quant="int8", frequent_rows=100), "frequent_rows=100", "--frequent-rows 100", "applies to int4 bundles"),
    # the first pattern: --keep-8bit takes one at a time
    (dict(quant="int8", keep_8bit=("*down*", "*up*")), "keep_8bit='*down*'", "--keep-8bit '*down*'",
     "applies to int4 bundles"),
    (dict(quant="fp16", drafter_quant="fp32"), "drafter_quant='fp32'", "--drafter-quant 'fp32'",
     "applies to int8 and int4 bundles, not fp16"),
    # it sized the activations' windows only: without GPTQ or smoothing it was taken and did nothing
    (dict(gptq=False, calibration_tokens=4096), "calibration_tokens=4096", "--calibration-tokens 4096",
     "finds nothing to calibrate: nothing takes calibration activations"),
    (dict(quant="int8", gptq=False, smooth=0.0, calibration_tokens=4096), "calibration_tokens=4096",
     "--calibration-tokens 4096", "finds nothing to calibrate"),
    (dict(quant="int3"), "quant='int3'", "--quant 'int3'", "is not supported (choose from fp32, fp16, int8, int4)"),
])
def test_bad_options_name_the_option_as_the_caller_wrote_it(options, python, cli, rule):
    """From Python (quantize_bundle's keywords, export()'s quant_options keys) by its name, from the CLI by its
    flag: a Python caller was sent looking for flags it never passed."""
    with pytest.raises(ArgumentError) as e:
        check_options(options.pop("quant", "int4"), **options)
    assert str(e.value).startswith(f"{python} {rule}"), str(e.value)
    assert e.value.cli_message().startswith(f"{cli} {rule}"), e.value.cli_message()


def test_export_names_its_quant_options_by_their_keys(tmp_path):
    """export(quant_options={...}) refuses a bad option by its key, as quantize_bundle does its keyword (no flag an
    app never passed), before reading the model; a calibration file that cannot be used is named the same way."""
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    for options, message in (({"block_size": 24}, "block_size=24 must be a power of two from 16 to 256"),
                             ({"layer_op": "integer", "layer_bits": 4}, "layer_op='integer' needs 8-bit layers"),
                             ({"calibration": None, "gptq": True}, "gptq=True needs calibration text"),
                             ({"calibration": str(empty)}, f"calibration='{empty}' is an empty file"),
                             ({"calibration": str(tmp_path)}, f"calibration='{tmp_path}' is a directory, not a file")):
        with pytest.raises(ArgumentError) as e:
            export(tmp_path / "no-model", tmp_path / "b", "int4", quant_options=options)
        assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ArgumentError) as e:
        A.calibration_text(tmp_path)
    assert str(e.value) == f"calibration='{tmp_path}' cannot be read (Is a directory)"
    assert e.value.cli_message() == f"--calibration '{tmp_path}' cannot be read (Is a directory)"


def test_the_scheme_records_only_the_passes_its_ops_take():
    """Integer layers take no two-pass activations (MatMulIntegerToFloat), nor does an integer head: the preset's
    "all" was recorded beside them, and info said "two-pass activations: all" of a bundle with no pass at all."""
    from edgemtp.exporters.quant_options import scheme

    def two_pass(**options):
        return scheme("int4", calibrated=False, **options).two_pass

    assert two_pass(layer_op="integer", head_op="integer") == "none"
    assert two_pass(layer_op="integer") == two_pass(layer_op="integer", two_pass="all") == "head"
    assert two_pass() == two_pass(two_pass="all") == "all"
    # an integer head takes none either: "all" beside it said the head took them too (it is the layers alone)
    assert two_pass(head_op="integer") == two_pass(head_op="integer", two_pass="all") == "layers"
    assert two_pass(layer_op="integer", two_pass="none") == two_pass(head_op="integer", two_pass="none") == "none"


def test_options_of_float_quants_are_refused():
    with pytest.raises(EdgemtpError, match="frequent_rows=8 applies to int8 and int4 bundles only"):
        check_options("fp16", frequent_rows=8)
    assert check_options("fp16") is None


def test_keep_8bit_patterns_pick_weights():
    sch = scheme("int4", layer_bits=4, keep_8bit=("*down_proj*",))
    assert sch.bits_for("matmul", "model.layers.3.mlp.down_proj.weight") == 8
    assert sch.bits_for("matmul", "model.layers.3.mlp.up_proj.weight") == 4
    # joined weights (one MatMul for q/k/v, one for gate/up): a pattern matching a part keeps the whole
    v = scheme("int4", layer_bits=4, keep_8bit=("*.v_proj.weight",))
    assert v.bits_for("matmul", "model.layers.3.self_attn.q_proj+k_proj+v_proj.weight") == 8
    assert v.bits_for("matmul", "model.layers.3.mlp.gate_proj+up_proj.weight") == 4
    assert scheme("int4", calibrated=False).frequent_rows == 0 and not scheme("int4", calibrated=False).gptq


def test_keep_8bit_pattern_matching_no_weight_is_refused(tmp_path):
    """A typo in --keep-8bit would keep nothing at 8 bits without a word: it is named, with a real name;
    a pattern matching only a part of a joined weight counts."""
    fp32 = make_bundle(tmp_path, "gemma3_text")
    with pytest.raises(EdgemtpError, match=r"keep_8bit='\*dwon_proj\*' matches no weight .*model\.layers\."):
        quantize_bundle(fp32, tmp_path / "q", "int4", calibration=None, keep_8bit=("*down_proj*", "*dwon_proj*"))
    assert not (tmp_path / "q").exists()
    quantize_bundle(fp32, tmp_path / "q", "int4", calibration=None, layer_bits=4, keep_8bit=("*.v_proj.weight",))


@pytest.mark.parametrize("options, pattern", [({}, "*down_proj*"), ({"layer_bits": 4}, "*layernorm*")])
def test_keep_8bit_pattern_changing_nothing_is_refused(options, pattern, tmp_path, monkeypatch):
    """int4's layers are 8-bit unless --layer-bits 4, and a norm is never quantized: a pattern matching only
    such weights was taken, kept nothing more at 8 bits, and the manifest and `edgemtp info` listed it as kept
    (int8 refuses --keep-8bit for that reason). Named by quantize_bundle, and by export before any work."""
    import edgemtp.exporters as E

    fp32 = make_bundle(tmp_path, "gemma3_text")
    message = rf"keep_8bit='{re.escape(pattern)}' changes nothing: every weight it matches is 8-bit already"
    with pytest.raises(EdgemtpError, match=message):
        quantize_bundle(fp32, tmp_path / "q", "int4", calibration=None, keep_8bit=(pattern,), **options)
    real = E.export
    monkeypatch.setattr(E, "export", lambda *a, **k: pytest.fail("the fp32 export ran"))
    with pytest.raises(EdgemtpError, match=message):
        real(tmp_path / "model", tmp_path / "q", "int4",
             quant_options={"keep_8bit": (pattern,), "calibration": None, **options})
    assert not (tmp_path / "q").exists()


def test_export_names_a_keep_8bit_typo_before_any_work(tmp_path, monkeypatch):
    """export checks --keep-8bit against the graph's weight names before the fp32 export and calibration."""
    import edgemtp.exporters as E

    model_dir = save_tiny(tiny("gemma3_text"), tmp_path / "model")
    real = E.export
    monkeypatch.setattr(E, "export", lambda *a, **k: pytest.fail("the fp32 export ran"))
    with pytest.raises(EdgemtpError, match=r"keep_8bit='\*dwon_proj\*' matches no weight .*model\.layers\."):
        real(model_dir, tmp_path / "q", "int4", quant_options={"keep_8bit": ("*dwon_proj*",), "calibration": None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_cli_export_passes_and_checks_quant_options(tmp_path, calib_file):
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir = save_tiny(tiny("gemma3_text"), tmp_path / "model")
    run = lambda *a: CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(tmp_path / "b"), *a])  # noqa: E731
    bad = run("--quant", "int4", "--two-pass", "twice")
    assert_one_line_error(bad, exact="--two-pass 'twice' must be one of none, head, all")
    assert not (tmp_path / "b").exists()
    bad = run("--quant", "fp16", "--smooth", "0.5")
    assert_one_line_error(bad, exact="--smooth 0.5 applies to int8 / int4 bundles only")
    ok = run("--quant", "int4", "--max-context", "64", "--block-size", "16", "--frequent-rows", "8", "--calibration",
             str(calib_file), "--calibration-tokens", "128", "--layer-bits", "4", "--keep-8bit", "*q_proj*")
    assert ok.exit_code == 0, ok.output
    q = bundle_mod.load(tmp_path / "b").manifest["graphs"]["target"]["quantization"]
    assert (q["head_block_size"], q["frequent_rows"], q["bits"], q["keep_8bit"]) == (16, 8, 4, ["*q_proj*"])
    ok = run("--quant", "int8", "--max-context", "64", "--calibration", "none", "--overwrite", "--layer-op", "integer",
             "--head-op", "integer")
    assert ok.exit_code == 0, ok.output
    q = bundle_mod.load(tmp_path / "b").manifest["graphs"]["target"]["quantization"]
    assert (q["layer_op"], q["head_op"]) == ("integer", "integer")
    bad = run("--quant", "fp32", "--head-op", "integer", "--overwrite")
    assert_one_line_error(bad, exact="--head-op 'integer' applies to int8 / int4 bundles only")
    bad = run("--quant", "int4", "--layer-op", "integer", "--layer-bits", "4", "--overwrite")
    assert_one_line_error(bad, "--layer-op 'integer' needs 8-bit layers (MatMulIntegerToFloat has no 4-bit weights), "
                               "and the layer bits asked for are 4")
    # refused before the fp32 export (which takes minutes at scale): nothing is written, not even scratch
    scratch = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".edgemtp"))  # noqa: E731
    short = tmp_path / "short.txt"
    short.write_text("t1 t2 t3")
    for args, message in ((("--quant", "fp16", "--calibration", "none"),
                           "--calibration applies to int8 / int4 bundles only"),
                          (("--quant", "int4", "--calibration", str(short)),
                           f"--calibration '{short}' holds 3 tokens, fewer than one window of 64"),
                          (("--quant", "int4", "--block-size", "128", "--two-pass", "none", "--head-op", "integer"),
                           "--head-op 'integer' rescores whole rows of 128-blocks"),
                          (("--static", "--gemv-head"),
                           "--gemv-head applies to dynamic fp32 bundles (not static ones)"),
                          (("--quant", "fp16", "--static"),
                           "--quant 'fp16' makes no static graph: static graphs are fp32 or qdq")):
        bad = run(*args, "--max-context", "64", "--overwrite")
        assert_one_line_error(bad, message)
        assert bundle_mod.load(tmp_path / "b").graph("target").quant == "int8" and not scratch(), args


def test_bad_input_is_a_clear_error(gemma, tmp_path):
    src = gemma["fp32"] / "target.onnx"
    with pytest.raises(EdgemtpError, match=r"quant='int3' is not supported \(choose from fp32, fp16, int8, int4\)"):
        quantize_graph(src, tmp_path / "q.onnx", "int3")
    with pytest.raises(EdgemtpError, match="already quantized \\(int4\\)"):
        quantize_graph(gemma["int4"] / "target.onnx", tmp_path / "q.onnx", "int8")
    with pytest.raises(EdgemtpError, match="target graph is already int4"):
        quantize_bundle(gemma["int4"], tmp_path / "qb", "int8", calibration=None)
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


def test_calibration_tokens_count_windows_of_the_capacity(tmp_path, calib_file, monkeypatch):
    """A bundle of fewer than 512 positions calibrates on windows of its capacity: --calibration-tokens N takes
    N / capacity of them. It took N / 512, so 1/8 of the tokens asked at --max-context 64."""
    fp32 = make_bundle(tmp_path, "gemma3_text")  # capacity 64
    seen, collect = [], A.collect
    monkeypatch.setattr(A, "collect", lambda session, contract, windows, *a, **k: (
        seen.append(windows.shape), collect(session, contract, windows, *a, **k))[1])
    quantize_bundle(fp32, tmp_path / "q", "int4", calibration=calib_file, calibration_tokens=256, frequent_rows=16)
    assert seen == [(4, 64)]
    q = bundle_mod.load(tmp_path / "q").manifest["graphs"]["target"]["quantization"]
    assert q["calibration_tokens"] == 256


def test_calibration_tokens_beyond_the_text_are_said_and_recorded(tmp_path, calib_file, monkeypatch):
    """Asking for more calibration tokens than the text holds warns, naming the flag and what was read, and the
    manifest records the tokens the activations were read on (the text's whole windows, not the number asked)."""
    fp32 = make_bundle(tmp_path, "gemma3_text")  # capacity 64
    seen, collect = [], A.collect
    monkeypatch.setattr(A, "collect", lambda session, contract, windows, *a, **k: (
        seen.append(windows.shape), collect(session, contract, windows, *a, **k))[1])
    with pytest.warns(UserWarning, match=r"--calibration-tokens 1,000,000: the calibration text \(.*calib.txt\) "
                      r"fills \d+ windows of 64 tokens \([\d,]+ tokens\), fewer than asked") as said:
        quantize_bundle(fp32, tmp_path / "q", "int4", calibration=calib_file, calibration_tokens=10**6)
    assert {w.filename for w in said} == {__file__}  # the app's line, not one inside edgemtp
    (windows, length), = seen
    assert 1 < windows < 10**6 // 64 and length == 64
    q = bundle_mod.load(tmp_path / "q").manifest["graphs"]["target"]["quantization"]
    assert q["calibration_tokens"] == windows * 64


def test_calibration_text_comes_from_the_train_split_only():
    from edgemtp.drafter import data as D

    text = A.calibration_text(A.CORPORA, max_chars=300_000)
    assert text.source.startswith("corpora: code") and text.source.endswith("(train split)")
    heldout = {D.read(d)[:2000] for d in D.documents("code", "heldout")}
    assert text.texts and not any(t[:2000] in heldout for t in text.texts)


def test_a_calibration_files_byte_order_mark_is_not_text(tmp_path):
    """A file saved with a byte order mark (Notepad, PowerShell) calibrated on a U+FEFF token first."""
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("def f(x):\n    return x\n", encoding="utf-8")
    marked.write_text("def f(x):\n    return x\n", encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    assert A.calibration_text(marked).texts == A.calibration_text(plain).texts == ("def f(x):\n    return x\n",)


def test_a_calibration_file_s_bytes_that_are_not_utf8_are_replaced(tmp_path):
    """A Latin-1 or cp1252 calibration file's accents are read as U+FFFD, not refused (as the README says): a
    stray accent changes nothing a calibration needs; a prompt file's are refused."""
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"def caf\xe9(x):\r\n    return x\n")
    assert A.calibration_text(path).texts == ("def caf\ufffd(x):\n    return x\n",)


def test_a_utf16_calibration_file_is_named_as_such(tmp_path):
    """A UTF-16 file (PowerShell 5's `>`, Notepad's "Unicode") was "not a text file (it holds NUL bytes)": it is
    text, in an encoding the export does not read."""
    for encoding in ("utf-16", "utf-16-be"):
        path = tmp_path / f"{encoding}.txt"
        mark = "\ufeff" if encoding.endswith("be") else ""  # utf-16 writes its own
        path.write_bytes((mark + "def f(x):\n").encode(encoding))
        with pytest.raises(EdgemtpError) as e:
            A.calibration_text(path)
        assert str(e.value) == f"calibration='{path}' is UTF-16 text, not UTF-8 (save it as UTF-8)"
        assert e.value.cli_message() == f"--calibration '{path}' is UTF-16 text, not UTF-8 (save it as UTF-8)"


def test_token_windows_spread_over_the_text():
    w = A.token_windows(list(range(1000)), 10, 3, bos=2)
    assert w.shape == (3, 10) and (w[:, 0] == 2).all()
    assert w[0, 1] == 0 and w[-1, -1] == 998  # first and last whole chunks of 9
    with pytest.raises(EdgemtpError, match="fewer than one window"):
        A.token_windows([1, 2], 10, 3, bos=None)
    assert A.token_windows(list(range(121)), 11, 4, bos=None)[:, 0].tolist() == [0, 33, 77, 110]  # chunks 0, 3, 7, 10


def test_activation_stats_are_the_running_moments():
    """What the quantizer scales and GPTQ read: max |x|, mean x^2 and E[x x^T] per channel over every position."""
    rng = np.random.default_rng(4)
    parts = [rng.standard_normal((2, 5, 6)).astype(np.float32) - 0.5, rng.standard_normal((1, 3, 6)).astype(np.float32)]
    s = A.Stats(0, np.zeros(6, np.float32), np.zeros(6), np.zeros((6, 6), np.float32))
    for x in parts:
        s.add(x)
    x = np.concatenate([p.reshape(-1, 6) for p in parts]).astype(np.float64)
    assert s.count == 13
    np.testing.assert_array_equal(s.amax, np.abs(x).max(0).astype(np.float32))
    np.testing.assert_allclose(s.mean_square, (x ** 2).mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.hessian, x.T @ x / 13, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ evaluate()

def as_text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)  # the tiny models' word-level tokenizer


@pytest.fixture(scope="module")
def with_bos(gemma, tmp_path_factory):
    """The fp32 tiny bundle with a tokenizer that puts t2 (the config's bos_token_id) before a text."""
    out = tmp_path_factory.mktemp("bos") / "b"
    shutil.copytree(gemma["fp32"], out)
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "t2", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"t2": {"id": "t2", "ids": [2], "tokens": ["t2"]}}}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    manifest = json.loads((out / "edgemtp.json").read_text())
    bundle_mod.write_manifest(out, {k: v for k, v in manifest.items() if k not in ("format", "schema_version",
                                                                                      "files")})
    return out


def reference_perplexity(bundle_dir, tokens: list[int], window: int) -> float:
    """Straight from the graph's logits of each whole window: exp(mean NLL of every predicted token)."""
    from tokenizers import Tokenizer

    bos = leading_bos(Tokenizer.from_file(str(bundle_dir / "tokenizer.json")))
    nll = []
    for win in text_windows(tokens, window, bos):
        logits = all_logits(bundle_dir, np.array([win]))[0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll += [-logp[i, win[i + 1]] for i in range(len(win) - 1)]
    return float(np.exp(np.mean(nll)))


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_perplexity_equals_numpy_reference(gemma, with_bos, bos):
    """Windows start with the BOS the tokenizer puts before a text, and without one where it puts none (the
    config's bos_token_id, t2 here, is no BOS the model sees then: SmolLM2's names <|im_start|>)."""
    bundle = with_bos if bos else gemma["fp32"]
    tokens = list(np.random.default_rng(3).integers(3, 96, size=70))
    r = evaluate(bundle, as_text(tokens), window=16, step=5)  # pieces that straddle windows
    # 15 text tokens per window after BOS, each scored; else 16, all but the first scored
    assert (r["tokens"], r["windows"]) == ((70, 5) if bos else (65, 5))
    assert r["perplexity"] == pytest.approx(reference_perplexity(bundle, tokens, 16), rel=1e-5)
    assert "kl_mean" not in r


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_perplexity_equals_transformers(gemma, with_bos, bos):
    """Independent of the graph: transformers' model on the windows --help describes (window 64, the bundle's
    capacity: 63 text tokens after the BOS, else 64 with the first unscored), the short last window scored,
    a tail that would score nothing (without a BOS, a lone token) dropped."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma["fp32"].parent / "model", dtype=torch.float32).eval()
    tokens = [int(t) for t in np.random.default_rng(8).integers(3, 96, size=129)]
    n = 63 if bos else 64
    windows = [([2] if bos else []) + tokens[i:i + n] for i in range(0, len(tokens), n)]
    windows = [w for w in windows if len(w) >= 2]  # bos: 63 + 63 + 3; else 64 + 64 (t129 alone is dropped)
    nll = []
    for win in windows:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([win])).logits[0].double(), -1).numpy()
        nll += [-logp[i, win[i + 1]] for i in range(len(win) - 1)]
    r = evaluate(with_bos if bos else gemma["fp32"], as_text(tokens))
    assert (r["tokens"], r["windows"], r["window"]) == (len(nll), len(windows), 64) == ((129, 3, 64) if bos
                                                                                          else (126, 2, 64))
    assert r["nll"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert r["perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)


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


def test_a_lone_token_after_bos_is_scored(gemma, with_bos):
    """With a BOS before it, a text's first token is predicted too: one token is a text to score; without
    one it is not."""
    r = evaluate(with_bos, "t5")
    assert r["tokens"] == 1 and r["windows"] == 1
    assert r["perplexity"] == pytest.approx(reference_perplexity(with_bos, [5], 16), rel=1e-5)
    assert evaluate(with_bos, "t5 t6 t7", max_tokens=1)["perplexity"] == pytest.approx(r["perplexity"])
    with pytest.raises(EdgemtpError, match="the text has 1 token\\(s\\) to score; perplexity needs at least 2 "
                                           "\\(this model's tokenizer puts no BOS before a text"):
        evaluate(gemma["fp32"], "t5")


def test_evaluate_errors(gemma, with_bos, tmp_path):
    with pytest.raises(EdgemtpError, match="the text has 0 token\\(s\\) to score; perplexity needs at least 1"):
        evaluate(with_bos, "")
    with pytest.raises(EdgemtpError, match="max_tokens=0 must be a whole number of at least 1"):
        evaluate(gemma["fp32"], "t5", max_tokens=0)
    with pytest.raises(EdgemtpError, match="window=65 exceeds the KV capacity 64"):
        evaluate(gemma["fp32"], "t5 t6 t7", window=65)
    with pytest.raises(EdgemtpError, match="window=1 is too small"):
        evaluate(gemma["fp32"], "t5 t6 t7", window=1)
    with pytest.raises(EdgemtpError, match="step=0 must be at least 1"):
        evaluate(gemma["fp32"], "t5 t6 t7", step=0)
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


def test_gemv_head_bundle_quantizes_as_the_row_major_one(tiny_gemma3, tmp_path):
    """The default fp32 export stores the head table transposed (exporters/gemv_head.py); the quantizer undoes
    that rewrite (restore_rows) and quantizes the [V, H] table it was made from: the same graph and the same
    bytes as quantizing a --no-gemv-head export."""
    _, model_dir, _ = tiny_gemma3
    gemv = export(model_dir, tmp_path / "gemv", capacity=64)
    rows = export(model_dir, tmp_path / "rows", capacity=64, gemv_head=False)
    assert json.loads((gemv / "edgemtp.json").read_text())["graphs"]["target"]["gemv_head"] == {"kept_table": False}
    assert "gemv_head" not in json.loads((rows / "edgemtp.json").read_text())["graphs"]["target"]
    for quant in ("int8", "fp16", "int4"):
        outs = [quantize_bundle(src, tmp_path / f"{quant}-{src.name}", quant, calibration=None) for src in (gemv, rows)]
        graphs = [onnx.load(str(o / "target.onnx")).graph for o in outs]  # weights read in (tiny)
        tensors = [{t.name: onnx.numpy_helper.to_array(t) for t in g.initializer if not t.name.startswith("const_")}
                   for g in graphs]
        assert tensors[0].keys() == tensors[1].keys()
        for name, value in tensors[0].items():
            np.testing.assert_array_equal(value, tensors[1][name], err_msg=name)
        assert len(graphs[0].initializer) == len(graphs[1].initializer)
        assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
        assert "gemv_head" not in json.loads((outs[0] / "edgemtp.json").read_text())["graphs"]["target"]
        ids = np.array([[2, 11, 17, 5, 9]])
        engines = [Engine.load(o, verify=False) for o in outs]
        logits = [e.target.forward(ids, e.target.new_cache(1))[0] for e in engines]
        np.testing.assert_array_equal(logits[0], logits[1])


def test_keep_8bit_may_name_the_head_a_checkpoint_unties(tmp_path, monkeypatch):
    """tie_word_embeddings true beside an lm_head.weight of other values exports lm_head (own_head): the early
    --keep-8bit check knows that graph's names too."""
    from safetensors.numpy import load_file, save_file

    import edgemtp.exporters as E

    model_dir = save_tiny(tiny("gemma3_text"), tmp_path / "model")
    table = next(v for k, v in load_file(str(model_dir / "model.safetensors")).items()
                 if k.endswith("embed_tokens.weight"))
    save_file({"lm_head.weight": table + 1}, str(model_dir / "head.safetensors"))

    def reached(*args, **kwargs):
        raise RuntimeError("the fp32 export ran")

    real = E.export
    monkeypatch.setattr(E, "export", reached)
    with pytest.raises(RuntimeError, match="the fp32 export ran"):  # past the check
        real(model_dir, tmp_path / "q", "int4", quant_options={"keep_8bit": ("lm_head*",), "calibration": None})


def test_kl_agreement_and_perplexity_change_equal_numpy_reference(gemma):
    """Per scored position, KL(P || Q) with P the reference's distribution and Q the evaluated bundle's, and
    whether their argmax agrees; the summary's statistics over them, and the perplexity change in percent."""
    tokens = list(np.random.default_rng(6).integers(3, 96, size=60))
    r = evaluate(gemma["int4"], as_text(tokens), reference_bundle=gemma["fp32"], window=16)
    kl, reverse, agree, nll, ref_nll = [], [], [], [], []
    for win in text_windows(tokens, 16, None):  # the tiny tokenizer puts no BOS before a text
        logq, logp = (all_logits(gemma[q], np.array([win]))[0].astype(np.float64) for q in ("int4", "fp32"))
        logq, logp = (x - x.max(-1, keepdims=True) for x in (logq, logp))
        logq, logp = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (logq, logp))
        for i in range(len(win) - 1):
            kl.append(np.sum(np.exp(logp[i]) * (logp[i] - logq[i])))
            reverse.append(np.sum(np.exp(logq[i]) * (logq[i] - logp[i])))
            agree.append(logp[i].argmax() == logq[i].argmax())
            nll.append(-logq[i, win[i + 1]])
            ref_nll.append(-logp[i, win[i + 1]])
    assert abs(np.mean(reverse) - np.mean(kl)) > 1e-4 * np.mean(kl)  # the direction shows (KL is near symmetric)
    assert 0 < np.mean(agree) < 1  # so does an agreement taken over the wrong positions
    assert r["tokens"] == len(kl) == 56
    assert r["top1_agreement"] == np.mean(agree)
    want = {"kl_mean": np.mean(kl), "kl_median": np.median(kl), "kl_p99": np.quantile(kl, 0.99), "kl_max": np.max(kl),
            "perplexity_delta_pct": 100 * (np.exp(np.mean(nll)) / np.exp(np.mean(ref_nll)) - 1)}
    assert {k: r[k] for k in want} == pytest.approx(want, rel=1e-6)
