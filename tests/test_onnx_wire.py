"""The runtime reads its graphs' facts from the protobuf wire format itself (edgemtp/onnx_wire.py): the same
facts as the onnx package reads, on every graph file the exporters write, and no onnx package at run time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

from edgemtp.bundle import graph_facts
from edgemtp.errors import EdgemtpError
from edgemtp.exporters import export
from edgemtp.onnx_wire import WireError, one_node_model, read_graph_facts

from .reference import save_tiny


def onnx_facts(path) -> dict:
    """The facts as the onnx package reads them (the code bundle.py had before onnx_wire)."""
    model = onnx.load(str(path), load_external_data=False)

    def shapes(values) -> dict:
        return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                         for d in v.type.tensor_type.shape.dim] for v in values}
    windows = {}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 3:
            size = next((a.i for a in node.attribute if a.name == "local_window_size"), -1)
            windows[node.input[3]] = size if size > 0 else None
    files = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    return {"inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output), "data_files": files,
            "windows": windows}


@pytest.fixture(scope="module")
def bundles(tiny_gemma3, tmp_path_factory):
    """Bundles of every kind of graph the exporters write: fp32 (target, batched verify, MTP drafter with
    its full-head variant), int8 / int4 (MatMulNBits, two-pass activations), static, QDQ, Gemma 4 with
    window views and KV-shared layers, llama, qwen2 with sliding layers."""
    from .test_drafter import tiny_drafter
    from .test_parity import tiny
    from .test_parity_gemma4 import tiny as tiny4

    root = tmp_path_factory.mktemp("wire")
    model_dir = tiny_gemma3[1]
    tiny_drafter(model_dir, root / "drafter")
    out = [export(model_dir, root / "mtp", capacity=64, drafter=root / "drafter"),
           export(model_dir, root / "int4", quant="int4", capacity=64),
           export(model_dir, root / "int8", quant="int8", capacity=64),
           export(model_dir, root / "static", capacity=64, static_window=3),
           export(model_dir, root / "qdq", quant="qdq", capacity=64, static_window=3)]
    for kind, make in (("gemma4_text_mqa", tiny4), ("llama", tiny), ("qwen2_sliding", tiny)):
        out.append(export(save_tiny(make(kind), root / f"{kind}_model"), root / kind, capacity=64))
    return out


def test_facts_match_the_onnx_package_on_every_graph(bundles):
    graphs = [p for b in bundles for p in sorted(b.glob("*.onnx"))]
    assert len(graphs) >= 12 and any(b.name == "drafter.onnx" for b in graphs)
    seen_windows = seen_files = 0
    for path in graphs:
        facts = read_graph_facts(path)
        got = {"inputs": facts.inputs, "outputs": facts.outputs, "data_files": facts.data_files,
               "windows": facts.windows}
        assert got == onnx_facts(path), path
        seen_windows += any(w is not None for w in facts.windows.values())
        seen_files += bool(facts.data_files)
    assert seen_windows and seen_files  # sliding windows and external data were among them


def test_the_probe_graph_is_the_onnx_package_s(tmp_path):
    """The bandwidth probe's one-node graphs are the graphs onnx.helper makes, field for field (that ONNX
    Runtime runs them and reads every weight: test_profile.py's probe test)."""
    from onnx import TensorProto, helper

    for op, attrs in (("Gemm", {"transB": 1}), ("MatMul", {})):
        ours = onnx.load_from_string(one_node_model(op, {"x": [1, 8], "w": [8, 5]}, "y", attrs))
        node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                  helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 5])]
        theirs = helper.make_model(helper.make_graph([node], "probe", inputs,
                                                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
                                   opset_imports=[helper.make_opsetid("", 18)])
        theirs.ir_version = 9
        assert ours == theirs, op


def test_damaged_graph_files_are_named(tiny_gemma3, tmp_path):
    data = (tiny_gemma3[2] / "target.onnx").read_bytes()
    for name, damaged in (("cut", data[:len(data) // 2]), ("noise", np.random.default_rng(0).bytes(4096)),
                          ("text", b"not onnx at all\n"), ("empty", b"")):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(damaged)
        with pytest.raises(WireError):
            read_graph_facts(path)
        with pytest.raises(EdgemtpError, match=f"{name}.onnx: not a valid ONNX file$"):
            graph_facts(path)


def test_the_runtime_runs_without_the_onnx_package(bundles):
    """An app embedding the runtime installs numpy, onnxruntime and tokenizers: loading (with every check),
    plain, MTP and batched speculative generation, a static bundle, `info` and the bandwidth probe import no
    onnx, and give what they give with it."""
    mtp, static = str(bundles[0]), str(bundles[3])
    code = textwrap.dedent(f"""
        import json, sys
        sys.modules["onnx"] = None  # any import of onnx now fails
        from edgemtp.runtime.engine import Engine
        from edgemtp.runtime.requests import Draft
        from edgemtp.runtime.bandwidth import BandwidthProbe
        from edgemtp.bundle_info import describe
        engine = Engine.load({mtp!r}, fast_verify=True)
        out = {{"plain": engine.generate("t1 t2 t3", 12, draft=Draft("none")).tokens,
               "mtp": engine.generate("t1 t2 t3", 12, draft=Draft("mtp", 3)).tokens,
               "batch": [g.tokens for g in engine.generate_batch(["t1 t2 t3", "t4 t5"], 12, draft=Draft("mtp", 3))],
               "static": Engine.load({static!r}).generate("t1 t2 t3", 12).tokens,
               "files": describe(engine.bundle)["graphs"]}}
        assert BandwidthProbe(1, mbytes=8).products()[0].size
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    from edgemtp.bundle_info import describe
    from edgemtp.runtime.engine import Engine
    from edgemtp.runtime.requests import Draft

    engine = Engine.load(mtp)
    plain = engine.generate("t1 t2 t3", 12, draft=Draft("none")).tokens
    assert out["plain"] == out["mtp"] == plain and out["batch"][0] == plain
    assert out["batch"][1] == engine.generate("t4 t5", 12, draft=Draft("none")).tokens
    assert out["static"] == Engine.load(static).generate("t1 t2 t3", 12).tokens
    assert out["files"] == json.loads(json.dumps(describe(engine.bundle)["graphs"]))
