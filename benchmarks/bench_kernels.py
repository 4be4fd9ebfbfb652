"""How fast ONNX Runtime's fp32 kernels read a model's body weights at one row (decode), against the ceiling.

    python benchmarks/bench_kernels.py BUNDLE [--threads 2] [--pairs 15]

The bandwidth ceiling (runtime/bandwidth.py) is the fastest matrix-vector read of one big weight. A decode
step reads the LM head (one big [H, V] table: its GEMV runs at the ceiling) and the body's many small
matrices. This builds the body's MatMuls alone, as one chain with the bundle's shapes in the bundle's order
(random weights, tiny Slice / Pad ops joining them), and times it through each fp32 kernel ONNX Runtime has
for a one-row product, each run beside a probe:

- packed: MatMul over a constant [K, N], which ONNX Runtime packs at load (what bundles use);
- packed transB: Gemm with transB over a constant [N, K] (packed too);
- GEMV: MatMul over a [K, N] graph input (never packed: the M = 1 matrix-vector kernel the head uses);
- GEMV transB: Gemm with transB over an [N, K] graph input (the M = 1 dot-product kernel);
- numpy: `x @ w` (OpenBLAS), for comparison outside ONNX Runtime.

Then the bundle's real body (its target graph less the head), with and without its attention, beside the
packed chain: what attention, the norms, the other small ops and the run's overhead add to the MatMuls (at
--threads; the kernels at one thread too).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgemtp import bundle as bundle_mod
from edgemtp import contract as C
from edgemtp.runtime.bandwidth import BandwidthProbe
from edgemtp.runtime.session import make_session
from edgemtp.runtime.target import Target
from edgemtp.errors import script_main

KINDS = ("packed", "packed transB", "GEMV", "GEMV transB")


def body_shapes(graph: onnx.GraphProto) -> list[tuple[int, int]]:
    """(K, N) of each MatMul / Gemm over a 2-D weight that the body (body_nodes) runs, in graph order."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    shapes = []
    for n in body_nodes(graph):
        w = dims.get(n.input[1]) if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 else None
        if w is None or len(w) != 2:
            continue
        transposed = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
        shapes.append((w[1], w[0]) if transposed else (w[0], w[1]))
    return shapes


def body_nodes(graph: onnx.GraphProto, nodes=None, dropped=frozenset({C.LOGITS})) -> list:
    """The nodes (of `nodes`, default the graph's) that the graph's outputs other than `dropped` need: all
    but the head, when only the logits are dropped. In graph order."""
    nodes = list(graph.node) if nodes is None else nodes
    producers = {out: n for n in nodes for out in n.output}
    needed, todo = set(), [o.name for o in graph.output if o.name not in dropped]
    while todo:
        n = producers.get(todo.pop())
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            todo += list(n.input)
    return [n for n in nodes if id(n) in needed]


def chain(shapes: list[tuple[int, int]], kind: str) -> tuple[bytes, dict]:
    """A graph x [1, K0] -> MatMul after MatMul over random weights of `shapes` through kernel `kind`,
    and its feeds (the weights that are graph inputs)."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs, feeds = [], [], [], {}
    x, width = "x", shapes[0][0]
    for i, (k, n) in enumerate(shapes):
        if width > k:  # join: keep the first k numbers, or pad with zeros up to k
            x = _node(nodes, inits, "Slice", [x, [0], [k], [1]], f"join{i}")
        elif width < k:
            x = _node(nodes, inits, "Pad", [x, [0, 0, 0, k - width]], f"join{i}")
        transposed = "transB" in kind
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.03  # the same numbers for every kind
        w = np.ascontiguousarray(w.T) if transposed else w
        name = f"w{i}"
        if kind.startswith("GEMV"):
            feeds[name] = w
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(w.shape)))
        else:
            inits.append(numpy_helper.from_array(w, name))
        op = helper.make_node("Gemm", [x, name], [f"y{i}"], transB=1) if transposed else \
            helper.make_node("MatMul", [x, name], [f"y{i}"])
        nodes.append(op)
        x, width = f"y{i}", n
    graph = helper.make_graph(nodes, "body_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [1, shapes[0][0]])] + inputs,
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    feeds["x"] = np.full((1, shapes[0][0]), 0.1, np.float32)
    return model.SerializeToString(), feeds


def _node(nodes: list, inits: list, op: str, args: list, name: str) -> str:
    ins = [args[0]]
    for j, value in enumerate(args[1:]):
        inits.append(numpy_helper.from_array(np.array(value, np.int64), f"{name}_{j}"))
        ins.append(f"{name}_{j}")
    nodes.append(helper.make_node(op, ins, [name]))
    return name


def numpy_chain(shapes: list[tuple[int, int]]):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s, dtype=np.float32) * 0.03 for s in shapes]

    def run():
        x = np.full(shapes[0][0], 0.1, np.float32)
        for w in weights:
            x = np.pad(x, (0, max(0, w.shape[0] - len(x))))[:w.shape[0]] @ w
        return x
    return run


def session(model: bytes | str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.force_spinning_stop", "1")  # none steals the next run's cores
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def body_graph(b, attention: bool = True) -> onnx.ModelProto:
    """The bundle's target graph less its head (only the nodes the outputs other than the logits need);
    without `attention`, each GroupQueryAttention's output replaced by its query input and the KV cache
    inputs and outputs gone: what attention adds to the body."""
    model = onnx.load(str(b.graph("target").path), load_external_data=False)
    g = model.graph
    nodes, alias = [], {}
    for n in g.node:
        if not attention and n.op_type == "GroupQueryAttention":
            alias[n.output[0]] = n.input[0]
        else:
            nodes.append(n)
    for n in nodes:
        n.input[:] = [alias.get(x, x) for x in n.input]
    dropped = {C.LOGITS} | (set() if attention else {o.name for o in g.output if o.name.startswith("present")})
    nodes = body_nodes(g, nodes, dropped)
    for field, keep in (("node", nodes), ("output", [o for o in g.output if o.name not in dropped]),
                        ("input", [i for i in g.input if attention or not i.name.startswith("past")])):
        kept = list(keep)
        g.ClearField(field)
        getattr(g, field).extend(kept)
    return model


def body_step(b, threads: int, attention: bool):
    """A function running one decode step of the bundle's body at contexts 128-192 (as bench_decode's pairs)."""
    path = b.graph("target").path
    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=path.parent) as f:  # beside the data file it names
        onnx.save(body_graph(b, attention), f.name)
        sess = make_session(Path(f.name), "cpu", threads, spin=False)
    if attention:
        target = Target(sess, b.target_contract)
        cache = target.new_cache(1)
        target.forward_outputs(np.arange(10, 138)[None], cache, (C.LAST_HIDDEN,))

        def step():
            if cache.lengths[0] >= 192:
                cache.lengths[:] = 128
            target.forward_outputs(np.array([[42]]), cache, (C.LAST_HIDDEN,))
        return step
    io = sess.io_binding()
    n = 160
    feeds = {C.INPUT_IDS: np.array([[42]]), C.POSITION_IDS: np.array([[n]]), C.NUM_LOGITS: np.array(1, np.int64),
             C.SEQLENS_K: np.array([n], np.int32), C.TOTAL_SEQ_LEN: np.array(n + 1, np.int32),
             C.WINDOW_SEQLENS_K: np.array([n], np.int32), C.WINDOW_TOTAL_SEQ_LEN: np.array(n + 1, np.int32)}
    for i in sess.get_inputs():
        io.bind_cpu_input(i.name, feeds[i.name])
    io.bind_output(C.LAST_HIDDEN)
    return lambda: sess.run_with_iobinding(io)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=15)
    args = ap.parse_args()
    b = bundle_mod.load(args.bundle, verify=False)
    graph = onnx.load(str(b.graph("target").path), load_external_data=False).graph
    shapes = body_shapes(graph)
    nbytes = 4 * sum(k * n for k, n in shapes)
    print(f"{b.model.get('model_type', '?')}: {len(shapes)} body MatMuls, {nbytes / 1e6:.0f} MB "
          f"(first: {shapes[:4]})")
    for threads in sorted({args.threads, 1}, reverse=True):
        probe = BandwidthProbe(threads)
        runs = {}
        for kind in KINDS:
            model, feeds = chain(shapes, kind)
            runs[kind] = (lambda s=session(model, threads), f=feeds: s.run(None, f))
        if threads == args.threads:
            runs["numpy"] = numpy_chain(shapes)
            runs["bundle's body"] = body_step(b, threads, attention=True)
            runs["bundle's body less attention"] = body_step(b, threads, attention=False)
        seconds = {name: [] for name in runs}
        probes = {name: [] for name in runs}  # the probe's kernels' seconds, read right after each run
        for _ in range(args.pairs):
            for name, run in runs.items():
                run()  # once to settle, then timed
                t0 = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - t0)
                probes[name].append(probe.times())
        # the ceiling is the one kernel fastest over all pairs, as in bench_decode.py (the fastest of each
        # pair's three would favour the probe by the noise alone)
        kernel = int(np.argmin(np.median(np.concatenate(list(probes.values())), axis=0)))
        ratios = {name: nbytes / np.array(seconds[name]) / (probe.nbytes / np.array(probes[name])[:, kernel])
                  for name in runs}
        ceiling = probe.nbytes / np.median(np.concatenate(list(probes.values()))[:, kernel])
        print(f"threads={threads}: ceiling (probe) {ceiling / 1e9:.1f} GB/s")
        for name, r in ratios.items():
            print(f"  {name:32s} reads the body at {np.median(r):6.1%} of the ceiling "
                  f"(median of {len(r)} pairs, quartiles {np.percentile(r, 25):.1%}-{np.percentile(r, 75):.1%})")


if __name__ == "__main__":
    script_main(main)
