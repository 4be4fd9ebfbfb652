from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    """(transformers model, model_dir, bundle_dir) for a tiny random Gemma 3 (sliding window 8)."""
    from edgemtp.exporters import export

    from .reference import save_tiny
    from .test_parity import tiny

    root = tmp_path_factory.mktemp("tiny_gemma3")
    model = tiny("gemma3_text")
    model_dir = save_tiny(model, root / "model")
    export(model_dir, root / "bundle", capacity=64)
    return model, model_dir, root / "bundle"


def _import_cache_dir():
    """The imported Gemma 3 270M, cached across runs and keyed by the importer's source code."""
    import hashlib
    import os
    from pathlib import Path

    import edgemtp.gguf_config as gc
    import edgemtp.gguf_import as gi
    import edgemtp.tokenizer_import as ti

    sources = [Path(m.__file__) for m in (gi, gc, ti)]  # what the imported directory's files are made by
    key = hashlib.sha256(b"".join(f.read_bytes() for f in sources)).hexdigest()[:12]
    root = Path(os.environ.get("EDGEMTP_TEST_CACHE", Path.home() / ".cache" / "edgemtp" / "tests"))
    return root / f"gemma3-270m-{key}"


@pytest.fixture(scope="session")
def gemma3_270m_dir():
    """Gemma 3 270M imported from the PyPI GGUF package (a test dependency)."""
    from edgemtp.gguf_import import default_gguf_path, import_gguf

    model_dir = _import_cache_dir()
    if not (model_dir / "config.json").is_file():
        import_gguf(default_gguf_path(), model_dir, overwrite=True)
    return model_dir


@pytest.fixture(scope="session")
def gemma3_270m_bundle(gemma3_270m_dir, tmp_path_factory):
    """A fresh fp32 export of the real model (never cached: it must reflect the exporter under test)."""
    from edgemtp.exporters import export

    out = tmp_path_factory.mktemp("g3bundle") / "bundle"
    export(gemma3_270m_dir, out, capacity=1024)
    return out


@pytest.fixture(scope="session")
def every_kind_of_bundle(tiny_gemma3, tmp_path_factory):
    """Bundles of every kind of graph the exporters write: fp32 (target, batched verify, MTP drafter with
    its full-head variant, the --gemv-head table kept for it), int8 / int4 (MatMulNBits, two-pass
    activations), static, QDQ, Gemma 4 with window views and KV-shared layers, llama, qwen2 with sliding
    layers; then the quantizer's other paths: --head-op / --layer-op integer over a tied table with an MTP
    drafter, untied tables packed for the gather only (Qwen2's read by its drafter's head too, Mistral's head
    split into frequent rows behind the integer head), Gemma 4's per-layer table in int4 with its assistant,
    fp16 (Gemma 2), Phi-3's fused weights. The first five are used by position (test_onnx_wire.py)."""
    from edgemtp.exporters import export

    from .reference import save_tiny
    from .test_assistant import tiny_assistant
    from .test_drafter import tiny_drafter
    from .test_parity import tiny
    from .test_parity_gemma4 import tiny as tiny4

    root = tmp_path_factory.mktemp("every_kind")
    model_dir = tiny_gemma3[1]
    tiny_drafter(model_dir, root / "drafter")
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"t{3 + i % 16}" if i % 3 else f"t{20 + i % 70}" for i in range(600)))
    out = [export(model_dir, root / "mtp", capacity=64, drafter=root / "drafter"),
           export(model_dir, root / "int4", quant="int4", capacity=64),
           export(model_dir, root / "int8", quant="int8", capacity=64),
           export(model_dir, root / "static", capacity=64, static_window=3),
           export(model_dir, root / "qdq", quant="qdq", capacity=64, static_window=3),
           export(model_dir, root / "int4_integer", quant="int4", capacity=64, drafter=root / "drafter",
                  quant_options={"calibration": None, "head_op": "integer", "layer_op": "integer"})]
    models = {kind: save_tiny((tiny4 if kind.startswith("gemma4") else tiny)(kind), root / f"{kind}_model")
              for kind in ("gemma4_text_mqa", "llama", "qwen2_sliding", "phi3", "gemma2", "qwen2", "mistral",
                           "gemma4_text")}
    out += [export(models[kind], root / kind, capacity=64) for kind in ("gemma4_text_mqa", "llama", "qwen2_sliding",
                                                                          "phi3")]
    tiny_drafter(models["qwen2"], root / "qwen2_drafter")
    tiny_assistant(False).save_pretrained(root / "assistant")
    out += [export(models["gemma2"], root / "gemma2_fp16", quant="fp16", capacity=64),
            export(models["qwen2"], root / "qwen2_int4", quant="int4", capacity=64, drafter=root / "qwen2_drafter",
                   quant_options={"calibration": None}),
            export(models["mistral"], root / "mistral_int4", quant="int4", capacity=64,
                   quant_options={"calibration": str(calib), "calibration_tokens": 128, "frequent_rows": 16,
                                  "head_op": "integer"}),
            export(models["gemma4_text"], root / "gemma4_int4", quant="int4", capacity=64, drafter=root / "assistant",
                   quant_options={"calibration": None, "block_size": 16, "two_pass": "none"})]
    return out
