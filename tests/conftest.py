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
