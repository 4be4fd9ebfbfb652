"""A checkpoint tensor holding NaN or ±inf (a damaged or badly converted checkpoint) is refused where the weights
are read, naming the tensor and its file: it was exported as is (int8 / int4 made NaN scales of it, fp16 called a
NaN an overflow) and only surfaced at generation time as logits that hold NaN."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edgemtp.cli import cli
from edgemtp.exporters import builder

from .cli_errors import assert_one_line_error

GATE = "model.layers.1.mlp.gate_proj.weight"
EMBEDDING = "model.embed_tokens.weight"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def spoiled_drafter(drafter_dir, at, value):
    """(its weights file, the matrix spoiled): the drafter's first float matrix holds `value` at `at`."""
    path = drafter_dir / "model.safetensors"
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.ndim == 2 and v.dtype.is_floating_point)
    weights[name][at] = value
    save_file(weights, str(path), metadata={"format": "pt"})
    return path, name


def spoiled(model_dir, out_dir, name=GATE, value=float("nan"), dtype=None, at=(2, 3)):
    """A copy of `model_dir` whose tensor `name` holds `value` at `at` (every tensor cast to `dtype` first)."""
    shutil.copytree(model_dir, out_dir)
    path = out_dir / "model.safetensors"
    weights = {k: v if dtype is None else v.to(dtype) for k, v in load_file(str(path)).items()}
    weights[name][at] = value
    save_file(weights, str(path), metadata={"format": "pt"})
    return out_dir


@pytest.mark.parametrize("dtype, value, quant, said", [(None, float("nan"), "fp32", "NaN"),
                                                        (torch.bfloat16, float("inf"), "int8", "inf"),
                                                        (torch.float16, float("-inf"), "fp16", "-inf"),
                                                        (None, float("nan"), "fp16", "NaN")])
def test_export_refuses_a_non_finite_weight(tiny_gemma3, tmp_path, dtype, value, quant, said):
    d = spoiled(tiny_gemma3[1], tmp_path / "model", value=value, dtype=dtype)
    out = tmp_path / "out"
    r = run("export", d, "-o", out, "--quant", quant)
    line = assert_one_line_error(r, f"{d / 'model.safetensors'}: tensor '{GATE}' holds {said} at [2, 3]")
    assert "overflows fp16" not in line
    assert not out.exists()


def spoiled_bundle(bundle_dir, out_dir, name, at, value):
    """A copy of the fp32 bundle whose target tensor `name` holds `value` at `at` (in its external data file)."""
    import onnx

    shutil.copytree(bundle_dir, out_dir)
    t = next(t for t in onnx.load(str(out_dir / "target.onnx"), load_external_data=False).graph.initializer
             if t.name == name)
    info = {e.key: e.value for e in t.external_data}
    with open(out_dir / info["location"], "r+b") as f:
        f.seek(int(info["offset"]) + 4 * int(np.ravel_multi_index(at, tuple(t.dims))))
        f.write(np.array([value], "<f4").tobytes())
    return out_dir


@pytest.mark.parametrize("quant, value, said", [("fp16", float("nan"), "NaN"), ("fp16", float("inf"), "inf"),
                                                ("int8", float("nan"), "NaN"), ("int4", float("-inf"), "-inf")])
def test_quantize_bundle_refuses_a_non_finite_weight(tiny_gemma3, tmp_path, quant, value, said):
    """A bundle's fp32 weight holding NaN or inf (a damaged bundle, or one made elsewhere) is named as such: fp16
    called it an overflow, int8 / int4 wrote NaN scales of it."""
    from edgemtp.errors import EdgemtpError
    from edgemtp.exporters.quantize import quantize_bundle

    name = "model.layers.1.mlp.down_proj.weight"
    b = spoiled_bundle(tiny_gemma3[2], tmp_path / "fp32", name, (2, 3), value)
    with pytest.raises(EdgemtpError) as e:
        quantize_bundle(b, tmp_path / "out", quant, calibration=None)
    assert str(e.value).startswith(f"{b / 'target.onnx.data'}: tensor '{name}' holds {said} at [2, 3]")
    assert "overflows fp16" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", ["fp16", "int8"])
def test_quantize_bundle_refuses_a_padding_mask_holding_nan(tiny_gemma3, tmp_path, quant):
    """A padded clustered head's mask (7 clusters of 96 tokens: 2 padding slots) is the one table whose -inf is
    on purpose; a NaN in it (a damaged bundle) was let through as well, giving a NaN candidate logit whenever
    its cluster was picked."""
    import onnx

    from edgemtp.errors import EdgemtpError
    from edgemtp.exporters import export
    from edgemtp.exporters.quantize import quantize_bundle

    from .test_drafter import clustered_drafter

    clustered_drafter(tiny_gemma3[1], tmp_path / "d", clusters=7)
    b = export(tiny_gemma3[1], tmp_path / "fp32", capacity=64, drafter=tmp_path / "d", drafter_head_rows="fp32")
    name = "token_mask.additive"
    t = next(t for t in onnx.load(str(b / "drafter.onnx"), load_external_data=False).graph.initializer
             if t.name == name)
    mask = np.zeros(tuple(t.dims), bool)
    info = {e.key: e.value for e in t.external_data}
    with open(b / info["location"], "r+b") as f:
        f.seek(int(info["offset"]))
        mask.flat[:] = np.frombuffer(f.read(4 * mask.size), "<f4") == 0
        assert (~mask).sum() == 2  # the padding slots' -inf: quantized as they are
        quantize_bundle(b, tmp_path / "ok", quant, calibration=None)
        f.seek(int(info["offset"]) + 4 * 3)
        f.write(np.array([np.nan], "<f4").tobytes())
    with pytest.raises(EdgemtpError) as e:
        quantize_bundle(b, tmp_path / "out", quant, calibration=None)
    assert str(e.value).startswith(f"{b / 'drafter.onnx.data'}: tensor '{name}' holds NaN at [0, 3]")
    assert not (tmp_path / "out").exists()


def test_quantize_bundle_to_fp16_names_a_finite_overflow(tiny_gemma3, tmp_path):
    from edgemtp.errors import EdgemtpError
    from edgemtp.exporters.quantize import quantize_bundle

    name = "model.layers.1.mlp.down_proj.weight"
    b = spoiled_bundle(tiny_gemma3[2], tmp_path / "fp32", name, (2, 3), 1e5)
    with pytest.raises(EdgemtpError) as e:
        quantize_bundle(b, tmp_path / "out", "fp16")
    # the argument as the caller wrote it: quant= from Python, --quant from the CLI
    rule = f"cannot hold weight '{name}', which overflows fp16 (|w| > 65504): use fp32 or int8"
    assert str(e.value) == f"quant='fp16' {rule}"
    assert e.value.cli_message() == f"--quant 'fp16' {rule}"


def test_export_reads_a_big_table_in_row_blocks_and_refuses_its_non_finite_row(tiny_gemma3, tmp_path, monkeypatch):
    """A table over ROWS_BYTES is read a block of rows at a time (Checkpoint.rows): a NaN there is named too,
    at its own row, with the --gemv-head transposed table's path (on by default) and the plain one."""
    d = spoiled(tiny_gemma3[1], tmp_path / "model", name=EMBEDDING, at=(90, 5))
    monkeypatch.setattr(builder, "ROWS_BYTES", 1024)
    monkeypatch.setattr(builder, "BLOCK_BYTES", 1024)
    for flag in ("--gemv-head", "--no-gemv-head"):
        r = run("export", d, "-o", tmp_path / "out", flag)
        assert_one_line_error(r, f"{d / 'model.safetensors'}: tensor '{EMBEDDING}' holds NaN at [90, 5]")
        assert not (tmp_path / "out").exists()


def test_export_refuses_a_drafter_with_a_non_finite_weight(tiny_gemma3, tmp_path):
    from .test_drafter import tiny_drafter

    tiny_drafter(tiny_gemma3[1], tmp_path / "drafter")
    path, name = spoiled_drafter(tmp_path / "drafter", (0, 1), float("inf"))
    r = run("export", tiny_gemma3[1], "-o", tmp_path / "out", "--drafter", tmp_path / "drafter")
    assert_one_line_error(r, f"{path}: tensor '{name}' holds inf at [0, 1]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch, tensor, raw, said", [
    ("gemma3", "blk.0.ffn_gate.weight", np.array([np.nan], "<f4").tobytes(), "NaN"),
    # Q8_0: each block of 32 weights is an fp16 scale and 32 int8 values; an inf scale makes the block inf
    ("llama", "blk.0.ffn_down.weight", np.array([np.inf], "<f2").tobytes() + bytes([1]), "inf")])
def test_import_gguf_refuses_a_non_finite_tensor(tmp_path, arch, tensor, raw, said):
    from .test_gguf_import import export_tiny

    _, path = export_tiny(tmp_path, arch, tied=True)
    offset = next(t.data_offset for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)
    out = tmp_path / "hf"
    r = run("import-gguf", path, "-o", out)
    assert_one_line_error(r, f"{path}: tensor {tensor} ", f"holds {said} at [0, 0]")
    assert not out.exists()
    r = run("export", path, "-o", tmp_path / "bundle")  # a GGUF file: imported into a scratch directory first
    assert_one_line_error(r, f"{path}: tensor {tensor} ", f"holds {said} at [0, 0]")
    assert not (tmp_path / "bundle").exists()


def test_cluster_refuses_a_non_finite_head(tiny_gemma3, tmp_path):
    d = spoiled(tiny_gemma3[1], tmp_path / "model", name=EMBEDDING, at=(7, 1))
    for calibration in (["--calibration", "none"], ["--positions", "512"]):  # the table alone; the model's states
        r = run("cluster", d, "-o", tmp_path / "head", "--clusters", 8, "--top-k", 2, *calibration)
        assert_one_line_error(r, f"{d / 'model.safetensors'}: tensor '{EMBEDDING}' holds NaN at [7, 1]")
        assert not (tmp_path / "head").exists()


SMALL = ["--data", "code=8", "--heldout", "code=2", "--seq-len", "12", "--steps", "1", "--batch", "2",
         "--hidden", "16", "--layers", "1"]


def test_train_drafter_refuses_a_target_with_a_non_finite_weight(tiny_gemma3, tmp_path):
    """The target runs in transformers: a NaN made NaN labels, and the run wrote a drafter that never drafts."""
    d = spoiled(tiny_gemma3[1], tmp_path / "model")
    r = run("train-drafter", d, "-o", tmp_path / "d", *SMALL)
    assert_one_line_error(r, f"{d / 'model.safetensors'}: tensor '{GATE}' holds NaN at [2, 3]")
    assert not (tmp_path / "d" / "model.safetensors").exists()


def test_train_drafter_checks_the_targets_weights_before_building_windows(tiny_gemma3, tmp_path, monkeypatch):
    """The NaN is said at once: it came after the training windows were built (minutes, on the corpora)."""
    from edgemtp.drafter import train

    built = []
    monkeypatch.setattr(train, "build_windows", lambda *a: built.append(a) or pytest.fail("windows built first"))
    d = spoiled(tiny_gemma3[1], tmp_path / "model")
    r = run("train-drafter", d, "-o", tmp_path / "d", *SMALL)
    assert not built
    assert_one_line_error(r, f"{d / 'model.safetensors'}: tensor '{GATE}' holds NaN at [2, 3]")
    assert not (tmp_path / "d").exists()


def test_train_drafter_refuses_an_init_drafter_with_a_non_finite_weight(tiny_gemma3, tmp_path):
    from .test_drafter import tiny_drafter

    tiny_drafter(tiny_gemma3[1], tmp_path / "init")
    path, name = spoiled_drafter(tmp_path / "init", (1, 0), float("nan"))
    r = run("train-drafter", tiny_gemma3[1], "-o", tmp_path / "d", "--init", tmp_path / "init", *SMALL[:-4])
    assert_one_line_error(r, f"{path}: tensor '{name}' holds NaN at [1, 0]")
    assert not (tmp_path / "d").exists()
