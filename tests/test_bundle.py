"""Bundle integrity and the clear-message contract for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgemtp import bundle
from edgemtp.errors import EdgemtpError
from edgemtp.exporters import builder, export
from edgemtp.runtime.engine import Engine


def copy_bundle(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def test_manifest_lists_every_file_with_sha256(tiny_gemma3):
    _, _, b = tiny_gemma3
    m = json.loads((b / "edgemtp.json").read_text())
    assert set(m["files"]) == {"target.onnx", "target.onnx.data", "target_verify.onnx", "tokenizer.json"}
    for rel, info in m["files"].items():
        assert info["sha256"] == bundle.sha256(b / rel)
    assert m["graphs"]["target"]["contract"]["capacity"] == 64


def test_changed_file_is_detected(tiny_gemma3, tmp_path):
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    data = bytearray((b / "target.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (b / "target.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EdgemtpError, match=r"target.onnx.data: sha256 differs .*changed after export"):
        bundle.load(b)


def test_truncated_file_is_detected(tiny_gemma3, tmp_path):
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    (b / "tokenizer.json").write_text("{}")
    with pytest.raises(EdgemtpError, match="tokenizer.json: size"):
        bundle.load(b)


def test_manifest_path_outside_bundle_is_refused(tiny_gemma3, tmp_path):
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    m = json.loads((b / "edgemtp.json").read_text())
    m["files"]["../secret"] = {"bytes": 1, "sha256": "0"}
    (b / "edgemtp.json").write_text(json.dumps(m))
    with pytest.raises(EdgemtpError, match="points outside the bundle"):
        bundle.load(b)


def test_missing_and_corrupt_manifest(tmp_path):
    with pytest.raises(EdgemtpError, match="edgemtp.json: missing"):
        bundle.load(tmp_path)
    (tmp_path / "edgemtp.json").write_text("{not json")
    with pytest.raises(EdgemtpError, match="not valid JSON"):
        bundle.load(tmp_path)
    (tmp_path / "edgemtp.json").write_text(json.dumps({"format": "edgemtp-bundle", "schema_version": 99}))
    with pytest.raises(EdgemtpError, match="schema_version 99"):
        bundle.load(tmp_path)


def test_version_1_bundles_still_load(tiny_gemma3, tmp_path):
    """Schema 2 only adds what a version-1 bundle lacks (a contract's window_views, default off)."""
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    m = json.loads((b / "edgemtp.json").read_text())
    assert m["schema_version"] == 2
    m["schema_version"] = 1
    (b / "edgemtp.json").write_text(json.dumps(m))
    assert bundle.load(b).manifest["schema_version"] == 1


def test_export_interrupted_leaves_no_bundle(tiny_gemma3, tmp_path, monkeypatch):
    _, model_dir, _ = tiny_gemma3
    real_save = builder.save

    def dying_save(b, path, read, progress=None, read_rows=None):
        def read_then_die(name):
            if "layers.2" in name:
                raise KeyboardInterrupt
            return read(name)
        return real_save(b, path, read_then_die, progress)

    monkeypatch.setattr(builder, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        export(model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_output(tiny_gemma3):
    _, model_dir, b = tiny_gemma3
    with pytest.raises(EdgemtpError, match="already exists"):
        export(model_dir, b)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    (lambda d: (d / "config.json").write_text("{oops"), "config.json: not valid JSON"),
    (lambda d: _edit_config(d, model_type="mamba"), "model_type 'mamba' is not supported"),
    (lambda d: _edit_config(d, hidden_size=None), "missing field 'hidden_size'"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x05"), "not a valid safetensors file"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda d: _edit_config(d, intermediate_size=100), "has shape"),
    # q/k/v are one joined weight of the same total width (6*32 + 32 + 32 = 4*32 + 2*64): each part is checked
    (lambda d: _edit_config(d, num_attention_heads=6, num_key_value_heads=1), r"q_proj.weight' has shape"),
])
def test_bad_model_dir(tiny_gemma3, tmp_path, mutate, message):
    d = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], d)
    mutate(d)
    with pytest.raises(EdgemtpError, match=message):
        export(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_prompt_longer_than_capacity(tiny_gemma3):
    engine = Engine.load(tiny_gemma3[2])
    with pytest.raises(EdgemtpError, match="KV capacity of 64"):
        engine.generate(" ".join(["t5"] * 80))


def test_generation_stops_at_capacity(tiny_gemma3):
    engine = Engine.load(tiny_gemma3[2])
    engine.stop_ids = frozenset()
    gen = engine.generate(" ".join(["t5"] * 60), max_new_tokens=50)
    assert gen.stats.stop_reason == "KV capacity reached"
    assert len(gen.tokens) == 64 - 60 + 1  # the last one needs no KV slot of its own


def test_kv_cache_is_updated_in_place(tiny_gemma3):
    """The graph writes into the runtime's buffers: no copy of the cache per step."""
    engine = Engine.load(tiny_gemma3[2])
    cache = engine.target.new_cache(1)
    ids = np.array([[1, 2, 3]])
    buffers = {layer: k.ctypes.data for layer, k in cache.keys.items()}
    engine.target.forward(ids, cache)
    for layer, k in cache.keys.items():
        assert k.ctypes.data == buffers[layer]
        assert np.abs(k[0, :, :3]).sum() > 0 and np.abs(k[0, :, 3:]).sum() == 0
