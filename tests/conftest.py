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
