"""`threads` (Engine.load, --threads) never changes the tokens: the logits are bit-identical at 1 and 2 threads.

README (Known limits) says so: ONNX Runtime's CPU kernels split an op's outputs among the threads, not the sums
that make each one. The model here is random but large enough that they do split (MLAS adds a thread per
65,536 multiplies: a one-row 512 x 2048 MatMul splits, while the tests' tiny models run every op on one thread),
in fp32 and int8 (MatMulNBits); the real Gemma 3 270M gave the same (session 52: 1, 2 and 3 threads, prefills
of up to 775 tokens, decode steps and the batched verify graph)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgemtp.exporters import export  # noqa: E402
from edgemtp.exporters.quantize import quantize_bundle  # noqa: E402
from edgemtp.runtime.engine import Engine  # noqa: E402

from .reference import save_tiny  # noqa: E402

PROMPT = [2, 500, 901, 1100, 17, 3000, 77, 5, 4000, 12] * 4


@pytest.fixture(scope="module")
def mid_bundles(tmp_path_factory):
    """fp32 and int8 bundles of a random Gemma 3 with 512-wide layers and an 8,192-token head."""
    root = tmp_path_factory.mktemp("mid")
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=128, sliding_window=16, query_pre_attn_scalar=128,
                                        layer_types=["sliding_attention", "full_attention"],
                                        max_position_embeddings=256)
    fp32 = export(save_tiny(transformers.Gemma3ForCausalLM(cfg), root / "model"), root / "fp32", capacity=128)
    return {"fp32": fp32, "int8": quantize_bundle(fp32, root / "int8", "int8", calibration=None)}


def passes(bundle, threads: int) -> list[np.ndarray]:
    """Logits of a prefill, four one-token steps, a 3-position verify window and two rows of the verify graph."""
    target = Engine.load(bundle, threads=threads).target
    cache = target.new_cache(1)
    out = [target.forward(np.array([PROMPT]), cache, n_logits=len(PROMPT))[0]]
    out += [target.forward(np.array([[t]]), cache)[0] for t in (7, 70, 700, 7000)]
    out.append(target.forward(np.array([[8, 80, 800]]), cache, n_logits=3)[0])
    rows = target.new_cache(2)
    target.forward(np.array([PROMPT[:8], PROMPT[2:10]]), rows)
    out.append(target.forward(np.array([[9, 90, 900], [6, 60, 600]]), rows, n_logits=3)[0])
    return out


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_logits_are_bit_identical_at_one_and_two_threads(mid_bundles, kind):
    one, two = passes(mid_bundles[kind], 1), passes(mid_bundles[kind], 2)
    for i, (a, b) in enumerate(zip(one, two)):
        assert np.array_equal(a, b), f"pass {i}: max |diff| {np.abs(a - b).max()}"
