"""The runtime reads its graphs' facts from the protobuf wire format itself (edgemtp/onnx_wire.py): the same
facts as the onnx package reads, on every graph file the exporters write, and no onnx package at run time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import defaultdict

import numpy as np
import onnx
import pytest

from edgemtp.bundle import graph_facts
from edgemtp.errors import EdgemtpError
from edgemtp.onnx_wire import WireError, one_node_model, read_graph_facts



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
    external = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data}
    # a name, key or value that is not UTF-8 comes as bytes (proto2): such an initializer is left out
    external = {n: e for n, e in external.items() if isinstance(n, str) and all(isinstance(x, str) for x in
                                                                                   [*e, *e.values()])}
    types = {t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer if t.name in external}
    return {"inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output), "data_files": files,
            "windows": windows, "external": external, "external_types": types,
            "read_at_rows": {name for name in external if read_at_rows(model.graph, name)}}


def read_at_rows(graph, name: str) -> bool:
    """Whether no node of `graph` (or of its subgraphs: an If's branches) reads `name` whole: each reads rows of
    it (onnx_wire.ROW_READS) or an Unsqueeze of it read so, or none reads it."""
    rows = {"Gather": (0,), "GatherElements": (0,), "GatherBlockQuantized": (0, 2, 3), "GroupQueryAttention": (7, 8)}
    readers = defaultdict(list)  # name -> (node, input index); None: an output of the graph or a subgraph

    def walk(g):
        for o in g.output:
            readers[o.name].append((None, 0))
        for n in g.node:
            for i, x in enumerate(n.input):
                readers[x].append((n, i))
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                    walk(sub)
    walk(graph)

    def at_rows(x):
        return all(n is not None and (i in rows.get(n.op_type, ()) or
                                      n.op_type == "Unsqueeze" and i == 0 and at_rows(n.output[0]))
                   for n, i in readers[x])
    return at_rows(name)


def wire_facts(facts) -> dict:
    return {"inputs": facts.inputs, "outputs": facts.outputs, "data_files": facts.data_files,
            "windows": facts.windows, "external": facts.external, "external_types": facts.external_types,
            "read_at_rows": facts.read_at_rows}


@pytest.fixture(scope="module")
def bundles(every_kind_of_bundle):
    return every_kind_of_bundle


def test_facts_match_the_onnx_package_on_every_graph(bundles):
    graphs = [p for b in bundles for p in sorted(b.glob("*.onnx"))]
    assert len(graphs) >= 12 and any(b.name == "drafter.onnx" for b in graphs)
    seen_windows = seen_files = 0
    for path in graphs:
        facts = read_graph_facts(path)
        got = wire_facts(facts)
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


def _wire_cases() -> dict:
    """Models written field by field with what protobuf allows and exporters do not write: a known field of
    another wire type (protobuf reads it as an unknown field), a sub-message given twice (merged), oneofs set
    twice (the last holds), groups, 10-byte varints, external data entries of several keys."""
    from edgemtp.onnx_wire import _int_field as i_, _key, _len_field as s_

    def dims(*dims_):  # ValueInfoProto x: a float tensor of the given TensorShapeProto.Dimension payloads
        shape = s_(2, b"".join(s_(1, d) for d in dims_))
        return s_(1, b"x") + s_(2, s_(1, i_(1, 1) + shape))

    def model(graph: bytes) -> bytes:
        return i_(1, 9) + s_(7, graph)

    def gqa(*attributes: bytes) -> bytes:  # a GraphProto's GroupQueryAttention node reading past key "pk"
        return s_(1, b"".join(s_(1, n) for n in (b"q", b"k", b"v", b"pk")) + s_(4, b"GroupQueryAttention")
                  + b"".join(s_(5, a) for a in attributes))

    window = s_(1, b"local_window_size")
    return {
        "dim value 0, empty param, no value, negative, param": model(s_(11, dims(i_(1, 0), s_(2, b""), b"", i_(1, -5),
                                                                            s_(2, b"n")))),
        "dim value then param": model(s_(11, dims(i_(1, 3) + s_(2, b"s")))),
        "dim param then value": model(s_(11, dims(s_(2, b"s") + i_(1, 3)))),
        "two shapes": model(s_(11, s_(1, b"x") + s_(2, s_(1, s_(2, s_(1, i_(1, 1))) + s_(2, s_(1, i_(1, 2))))))),
        "two types": model(s_(11, s_(1, b"x") + s_(2, s_(1, s_(2, s_(1, i_(1, 1)))))
                                + s_(2, s_(1, s_(2, s_(1, i_(1, 2))))))),
        "tensor then sequence type": model(s_(11, s_(1, b"x") + s_(2, s_(1, s_(2, s_(1, i_(1, 1)))) + s_(4, b"")))),
        "two graphs": model(s_(11, dims(i_(1, 1)))) + s_(7, s_(12, dims(i_(1, 2)))),
        "name after type": model(s_(11, s_(2, s_(1, s_(2, s_(1, i_(1, 4))))) + s_(1, b"x"))),
        "unknown fields of every wire type": model(i_(99, 5) + s_(11, dims(i_(1, 1) + i_(7, 3) + s_(9, b"zz")))
                                                   + _key(60, 5) + bytes(4) + _key(61, 1) + bytes(8)),
        "groups": model(_key(30, 3) + i_(1, 5) + _key(31, 3) + s_(2, b"ab") + _key(31, 4) + _key(30, 4)
                        + s_(11, dims(_key(5, 3) + _key(5, 4) + i_(1, 7)))),
        "a tenth varint byte over 1": model(s_(11, dims(_key(1, 0) + b"\xff" * 9 + b"\x7f"))),
        "dim value length-delimited": model(s_(11, dims(s_(1, b"ab")))),
        "dim value fixed-width": model(s_(11, dims(_key(1, 1) + b"\x05" + bytes(7)))),
        "dim param a varint": model(s_(11, dims(i_(2, 5)))),
        "input a varint": model(i_(11, 5) + s_(12, dims(i_(1, 1)))),
        "type a varint": model(s_(11, s_(1, b"x") + i_(2, 3))),
        "name a varint": model(s_(11, i_(1, 3))),
        "initializer, node, attribute, entry varints": model(i_(5, 1) + s_(5, i_(13, 1)) + i_(1, 3) + gqa(b"")),
        "external data of several keys": model(s_(5, s_(8, b"w") + s_(13, s_(1, b"offset") + s_(2, b"0"))
                                                  + s_(13, s_(1, b"location") + s_(2, b"a.data"))
                                                  + s_(13, s_(2, b"b.data") + s_(1, b"location"))
                                                  + s_(13, s_(1, b"location"))  # no value: "" as onnx reads it
                                                  + s_(13, s_(1, b"length") + s_(2, b"4")) + i_(14, 1))),
        "initializer name twice, entry key twice, no key, same name twice":
            model(s_(5, s_(8, b"a") + s_(13, s_(2, b"x.data")) + s_(8, b"b")
                     + s_(13, s_(1, b"offset") + s_(2, b"7") + s_(1, b"length")))
                  + s_(5, s_(13, s_(1, b"location") + s_(2, b"y.data")))  # no name: ""
                  + s_(5, s_(8, b"b") + s_(13, s_(1, b"location") + s_(2, b"z.data")))
                  + s_(5, s_(8, b"c") + i_(13, 4))),  # an entry as a varint: unknown, so no external data
        "dims packed and not, data type twice and negative": model(
            s_(5, s_(8, b"t") + i_(1, 3) + s_(1, b"\x04\x05") + i_(2, 7) + i_(1, -1) + i_(2, 1)  # dims 3, 4, 5, -1
                  + s_(13, s_(1, b"location") + s_(2, b"t.data")))
            + s_(5, s_(8, b"n") + i_(2, -3) + s_(13, s_(1, b"location") + s_(2, b"n.data")))),
        "names and entries not UTF-8": model(s_(5, s_(8, b"w\xffw") + i_(2, 1) + s_(9, bytes(4)))  # inline weights
                                             + s_(5, s_(8, b"v") + s_(13, s_(1, b"location") + s_(2, b"v.data"))
                                                  + s_(13, s_(1, b"checksum") + s_(2, b"\x9c")))
                                             + s_(5, s_(8, b"u\xfe") + s_(13, s_(1, b"location") + s_(2, b"u.data")))),
        "window, first of two": model(gqa(window + i_(3, 8) + i_(20, 2), window + i_(3, 9))),
        "window negative": model(gqa(window + i_(3, -1))),
        "window length-delimited": model(gqa(window + s_(3, b"x"))),
        "attribute a varint": model(gqa() + s_(1, s_(1, b"pk2") * 4 + i_(5, 3) + s_(4, b"GroupQueryAttention"))),
        "op type a varint, not UTF-8 names elsewhere": model(s_(1, i_(4, 3)) + s_(1, s_(1, b"\xff") + s_(4, b"Add\xfe"))
                                                            + s_(11, dims(i_(1, 1)))),
    }


def test_wire_quirks_read_as_the_onnx_package_reads_them(tmp_path):
    for name, data in _wire_cases().items():
        path = tmp_path / "m.onnx"
        path.write_bytes(data)
        facts = read_graph_facts(path)
        assert wire_facts(facts) == onnx_facts(path), name


def test_damaged_graph_bytes_give_the_onnx_package_s_facts_or_wire_error(tiny_gemma3, tmp_path):
    """Bytes changed, cut, dropped or added at random in a real graph: the reader gives the onnx package's
    facts or raises WireError (UnicodeDecodeError: a name not UTF-8), never another exception."""
    import random

    data = (tiny_gemma3[2] / "target.onnx").read_bytes()
    rng, path, read = random.Random(0), tmp_path / "m.onnx", 0
    for _ in range(400):
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            i, op = rng.randrange(len(b)), rng.random()
            if op < 0.6:
                b[i] = rng.randrange(256)
            elif op < 0.75:
                del b[i:i + rng.randrange(1, 20)]
            elif op < 0.9:
                b[i:i] = rng.randbytes(rng.randrange(1, 10))
            else:
                b = b[:i + 1]
        path.write_bytes(b)
        try:
            facts = read_graph_facts(path)
        except (WireError, UnicodeDecodeError):
            continue
        try:
            theirs = onnx_facts(path)
        except Exception:  # noqa: BLE001 (protobuf's several types) a damage in what the reader skips
            continue
        read += 1
        assert wire_facts(facts) == theirs
    assert read > 50


def test_a_graph_field_of_another_wire_type_loads(tiny_gemma3, tmp_path):
    """A graph input field written as a varint is an unknown field to protobuf, so to onnx and ONNX Runtime:
    the bundle loads (it was a TypeError traceback)."""
    import hashlib
    import shutil

    from edgemtp.onnx_wire import _int_field, _len_field
    from edgemtp.runtime.engine import Engine

    d = shutil.copytree(tiny_gemma3[2], tmp_path / "b")
    with open(d / "target.onnx", "ab") as f:
        f.write(_len_field(7, _int_field(11, 5)))  # a second graph field, merged into the first
    m = json.loads((d / "edgemtp.json").read_text())
    data = (d / "target.onnx").read_bytes()
    m["files"]["target.onnx"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (d / "edgemtp.json").write_text(json.dumps(m))
    assert graph_facts(d / "target.onnx") == graph_facts(tiny_gemma3[2] / "target.onnx")
    assert Engine.load(d).generate("t1 t2 t3", 4).tokens == Engine.load(tiny_gemma3[2]).generate("t1 t2 t3", 4).tokens


def test_a_node_of_many_inputs_is_read_in_little_memory(tmp_path):
    """Only a GroupQueryAttention's fourth input is kept: a node of 200,000 inputs (a 0.8 MB file) read in a
    few MB (a memoryview kept per input was ~40 MB)."""
    import tracemalloc

    from edgemtp.onnx_wire import _len_field as s_

    path = tmp_path / "m.onnx"
    node = s_(4, b"GroupQueryAttention") + s_(1, b"a") * 3 + s_(1, b"pk") + s_(1, b"b") * 200_000
    path.write_bytes(s_(7, s_(1, node)))
    tracemalloc.start()
    try:
        facts = read_graph_facts(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert facts.windows == {"pk": None} == onnx_facts(path)["windows"] and peak < 8e6, peak


def test_read_at_rows_counts_outputs_and_branches_as_whole_reads(tmp_path):
    """The exporters' graphs never hand an initializer out as a graph's or an If branch's output, so the bundles
    above leave those reads untested: a table that is gathered from and also an output (of the graph, or of a
    branch that returns the outer name) is read whole; one gathered through a chain of Unsqueezes, or read by no
    node, only at rows."""
    from onnx import TensorProto, helper

    def table(name):
        return onnx.numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), name)

    names = ["gathered", "output", "branch", "chained", "matmul_after", "unread"]
    branch = helper.make_graph([], "then", [], [helper.make_tensor_value_info("branch", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "else", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Gather", [n, "ids"], [n + "_rows"]) for n in ("gathered", "output", "branch")]
    nodes += [helper.make_node("Unsqueeze", ["chained", "axes"], ["c1"]),
              helper.make_node("Unsqueeze", ["c1", "axes"], ["c2"]),
              helper.make_node("Gather", ["c2", "ids"], ["c_rows"]),
              helper.make_node("Unsqueeze", ["matmul_after", "axes"], ["m1"]),
              helper.make_node("MatMul", ["x", "m1"], ["m_out"]),
              helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=other)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, None) for n, t in
                     (("ids", TensorProto.INT64), ("x", TensorProto.FLOAT), ("cond", TensorProto.BOOL))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("output", "if_out", "m_out")],
        [table(n) for n in names] + [helper.make_tensor("axes", TensorProto.INT64, [1], [0])])
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="g.onnx.data",
                    size_threshold=0)
    facts = read_graph_facts(path)
    assert set(names) <= set(facts.external)
    assert facts.read_at_rows == {"gathered", "chained", "unread"} == onnx_facts(path)["read_at_rows"]


def test_with_external_offset_changes_that_entry_only(every_kind_of_bundle):
    """A real target graph: one initializer's offset changed, the model otherwise what the onnx package reads."""
    import onnx

    from edgemtp.onnx_wire import with_external_offset

    raw = (every_kind_of_bundle[0] / "target.onnx").read_bytes()
    model = onnx.load_from_string(raw)
    name = model.graph.initializer[3].name
    changed = onnx.load_from_string(with_external_offset(raw, name, 123456789))
    [entry] = [e for e in changed.graph.initializer[3].external_data if e.key == "offset"]
    assert entry.value == "123456789"
    entry.value = next(e.value for e in model.graph.initializer[3].external_data if e.key == "offset")
    assert changed.SerializeToString() == model.SerializeToString()
    assert with_external_offset(raw, "no such initializer", 5) == raw
