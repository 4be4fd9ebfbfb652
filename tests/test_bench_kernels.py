"""benchmarks/bench_kernels.py measures the body's MatMuls apart from the head: its graphs must be the body."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import bench_kernels as bk  # noqa: E402

from edgemtp import bundle as bundle_mod  # noqa: E402
from edgemtp import contract as C  # noqa: E402
from edgemtp.runtime.session import make_session  # noqa: E402
from edgemtp.runtime.target import Target  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tiny_gemma3, tmp_path_factory):
    """The default (transposed head) and the row-major export of the tiny Gemma 3."""
    from edgemtp.exporters import export

    model, model_dir, default = tiny_gemma3
    row_major = export(model_dir, tmp_path_factory.mktemp("rows") / "b", capacity=64, gemv_head=False)
    return model, [bundle_mod.load(default), bundle_mod.load(row_major)]


def test_body_shapes_are_each_layers_matmuls_without_the_head(bundles):
    model, bs = bundles
    cfg = model.config
    h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    layer = [(h, q + 2 * kv), (q, h), (h, 2 * inter), (inter, h)]  # qkv, o, gate_up, down (fused as exported)
    for b in bs:
        graph = onnx.load(str(b.graph("target").path), load_external_data=False).graph
        assert bk.body_shapes(graph) == layer * cfg.num_hidden_layers


def test_body_graph_computes_the_targets_hidden_state_and_cache(bundles):
    """Less its head, the target graph gives the same last hidden state and KV cache, pass for pass."""
    _, bs = bundles
    ids = np.arange(3, 40)[None]
    for b in bs:
        full = Target(make_session(b.graph("target").path), b.target_contract)
        path = b.graph("target").path.parent / "body_test.onnx"
        onnx.save(bk.body_graph(b), str(path))
        try:
            body = Target(make_session(path), b.target_contract)
        finally:
            path.unlink()
        caches = [full.new_cache(1), body.new_cache(1)]
        for chunk in (ids[:, :30], ids[:, 30:31], ids[:, 31:32], ids[:, 32:]):
            _, hidden = full.forward(chunk, caches[0])
            (body_hidden,) = body.forward_outputs(chunk, caches[1], (C.LAST_HIDDEN,))
            np.testing.assert_array_equal(hidden, body_hidden)
        for layer in caches[0].keys:
            np.testing.assert_array_equal(caches[0].keys[layer], caches[1].keys[layer])
            np.testing.assert_array_equal(caches[0].values[layer], caches[1].values[layer])
        without = bk.body_graph(b, attention=False)
        ops = {n.op_type for n in without.graph.node}
        assert "GroupQueryAttention" not in ops and "MatMul" in ops
        assert not [i.name for i in without.graph.input if i.name.startswith("past")]


@pytest.mark.parametrize("kind", bk.KINDS)
def test_each_kernels_chain_computes_the_same_product(kind):
    """Each kernel's chain multiplies through every weight (one that skipped some would read faster)."""
    shapes = [(64, 96), (48, 64), (64, 200), (128, 64)]  # joined by Slice, then Pad, then Slice
    model, feeds = bk.chain(shapes, kind)
    out = bk.session(model, 1).run(None, feeds)[0]
    np.testing.assert_allclose(out.reshape(-1), bk.numpy_chain(shapes)(), rtol=1e-4, atol=1e-6)
