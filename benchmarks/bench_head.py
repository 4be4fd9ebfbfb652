"""Clustered head vs full head, batch 1, onnxruntime CPU, 2 threads, side by side in one run.

Shapes: Gemma 3 270M (V=262,144, d=640) and Gemma 4 E2B (V=262,144, d=1536), C=2048 clusters,
k=32 kept (4,096 candidate rows). Tables are synthetic (speed does not depend on the values).
Variants, each giving the top token, its logit and its probability:

    full fp32    Gemm with the [V, d] table (transB: the tied embedding itself)
    full int8    onnxruntime.quantization.quantize_dynamic (DynamicQuantizeLinear + MatMulInteger)
    full int4    MatMulNBits (onnxruntime.quantization.matmul_nbits_quantizer, block 32, symmetric,
                 accuracy_level 4); needs the `onnx-ir` package, skipped without it
    clustered    edgemtp.exporters.head.clustered_graph, fp32
    clustered int8 / int4   the same with its table gathered by GatherBlockQuantized from 8- / 4-bit
                 blocks of 32 (edgemtp's quantizer, as a quantized bundle's drafter reads the target's table)
    clustered int8 rows   the same with int8 copies of the centroids and of the rows in cluster order
                 (`head.clustered_graph(..., int8_ordering=...)`, as `--draft-head-rows int8` builds it):
                 MatMulInteger on a quarter of the bytes, shortlists rescored in fp32
    int8 rows+ctx  the same scoring also the 64 most recent tokens (`ClusteredShape.context`, the
                 default of `edgemtp export`; random ids here)
    ordered      (--ordered) experiment: the same with the head rows stored in cluster order ([C, M, d]
                 blocks, a permuted copy of the table): measured no faster in ORT, docs/measurements.md

Timing: every variant is run in turn, round after round (so a busy machine slows all of them
alike), and the median per variant is reported with the ratios to the clustered head. Each call
takes the next of 64 random hidden states, so the clustered head reads other clusters' rows every
call, as in decoding (one fixed input would keep its 25 MB of rows in the L3 cache). ORT maps the
weights file: before timing, every cluster is selected once (inputs made of the synthetic centroids),
so no first-touch page fault is timed (the full head touches the whole table on its first call).
--profile prints the clustered head's per-op kernel times (ORT's profiler) over the timed calls.

Usage: python benchmarks/bench_head.py [--rounds 30] [--shapes 270m,e2b] [--threads 2] [--profile]
       [--ordered]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import edgemtp  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS (see its docstring)
import numpy as np
import onnx
import onnxruntime as ort

from edgemtp.exporters import builder, head
from edgemtp.exporters.builder import FLOAT, GraphBuilder
from edgemtp.errors import script_main

SHAPES = {"270m": (262_144, 640), "e2b": (262_144, 1536)}
CLUSTERS, TOP_K, CONTEXT = 2048, 32, 64
EMBED = "model.embed_tokens.weight"
ORDERED = "head_rows_in_cluster_order"


def tables(vocab: int, hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    embed = (rng.standard_normal((vocab, hidden), np.float32) * 0.05).astype(np.float32)
    per = vocab // CLUSTERS
    return {EMBED: embed,
            "centroids": rng.standard_normal((CLUSTERS, hidden), np.float32),
            "token_ordering": rng.permutation(vocab).reshape(CLUSTERS, per).astype(np.int64),
            "token_mask": np.ones((CLUSTERS, per), bool)}


def matmul_full_graph(vocab: int, hidden: int) -> GraphBuilder:
    """The full head as MatMul with a [d, V] weight: the form the quantizers rewrite."""
    b = GraphBuilder("full_head_matmul")
    h = b.input(head.INPUT, FLOAT, ["N", hidden])
    logits = b.op("MatMul", h, b.param(EMBED, (hidden, vocab), builder.transpose))
    tokens = head.top_tokens(b, logits, 1)
    for value, name, kind in zip(tokens, (head.TOKEN_IDS, head.TOKEN_LOGITS, head.TOKEN_PROBS),
                                 (onnx.TensorProto.INT64, FLOAT, FLOAT)):
        b.output(value, name, kind, ["N", 1])
    return b


def ordered_clustered_graph(shape: head.ClusteredShape) -> GraphBuilder:
    """Experiment: the head rows stored in cluster order, [C, M, d], so the k picked clusters are
    k contiguous blocks (a model would then look its input embeddings up through the inverse
    permutation). Not used by the exporters; here to measure what contiguous blocks buy."""
    b = GraphBuilder("clustered_head_ordered")
    h = b.input(head.INPUT, FLOAT, ["N", shape.hidden])
    picked = head.pick_clusters(b, head.cluster_scores(b, h, "centroids", shape.hidden, shape.clusters), shape.top_k)
    ids = head.candidate_ids(b, picked, "token_ordering", shape)
    rows = b.op("Gather", b.param(ORDERED, (shape.clusters, shape.per_cluster, shape.hidden)), picked, axis=0)
    rows = b.op("Reshape", rows, b.const([0, -1, shape.hidden], np.int64))  # [N, k*M, d]
    col = b.op("Unsqueeze", h, b.const([-1], np.int64))
    logits = b.op("Squeeze", b.op("MatMul", rows, col), b.const([-1], np.int64))
    tokens = head.top_tokens(b, logits, 1, ids)
    for value, name, kind in zip(tokens, (head.TOKEN_IDS, head.TOKEN_LOGITS, head.TOKEN_PROBS),
                                 (onnx.TensorProto.INT64, FLOAT, FLOAT)):
        b.output(value, name, kind, ["N", 1])
    return b


def build_variants(vocab: int, hidden: int, tmp: Path, ordered: bool = False) -> tuple[dict[str, Path], list]:
    """The variants' files, and warm-up inputs that select every cluster once."""
    w = tables(vocab, hidden)
    paths = {"full fp32": tmp / "full.onnx", "clustered fp32": tmp / "clustered.onnx"}
    builder.save(head.full_graph(vocab, hidden, EMBED), paths["full fp32"], w.__getitem__)
    shape = head.ClusteredShape(vocab, hidden, CLUSTERS, TOP_K)
    builder.save(head.clustered_graph(shape, EMBED), paths["clustered fp32"], w.__getitem__)
    paths["clustered int8 rows"] = tmp / "clustered_rows.onnx"
    builder.save(head.clustered_graph(shape, EMBED, int8_ordering=w["token_ordering"]), paths["clustered int8 rows"],
                 w.__getitem__)
    paths["int8 rows+ctx"] = tmp / "clustered_rows_context.onnx"
    with_context = head.ClusteredShape(vocab, hidden, CLUSTERS, TOP_K, CONTEXT)
    builder.save(head.clustered_graph(with_context, EMBED, int8_ordering=w["token_ordering"]), paths["int8 rows+ctx"],
                 w.__getitem__)
    for quant in ("int8", "int4"):
        paths[f"clustered {quant}"] = quantize_table(paths["clustered fp32"], tmp / f"clustered_{quant}.onnx", quant)
    if ordered:
        paths["clustered ordered"] = tmp / "ordered.onnx"
        w[ORDERED] = w[EMBED][w["token_ordering"]]
        builder.save(ordered_clustered_graph(shape), paths["clustered ordered"], w.__getitem__)
        del w[ORDERED]
    # the sum of k random Gaussian centroids scores ~d on each of them and ~sqrt(k*d) elsewhere
    groups = np.random.default_rng(5).permutation(CLUSTERS).reshape(-1, TOP_K)
    warm = [w["centroids"][g].sum(axis=0, keepdims=True) for g in groups]
    builder.save(matmul_full_graph(vocab, hidden), tmp / "full_mm.onnx", w.__getitem__)
    del w
    paths["full int8"] = quantize_int8(tmp / "full_mm.onnx", tmp / "full_int8.onnx")
    int4 = quantize_int4(tmp / "full_mm.onnx", tmp / "full_int4.onnx")
    if int4:
        paths["full int4"] = int4
    return paths, warm


def quantize_table(src: Path, dst: Path, quant: str) -> Path:
    """The clustered head with its table's Gather block-quantized by edgemtp's quantizer (no calibration:
    int8 8-bit rows, int4 4-bit rows with zero points); centroids and the rest stay fp32."""
    from edgemtp.exporters.quantize import _Reader, scheme
    from edgemtp.exporters.quantgraph import Sink
    from edgemtp.exporters.quantrewrite import Rewrite

    model = onnx.load(str(src), load_external_data=False)
    with _Reader(src) as read, open(dst.parent / (dst.name + ".data"), "wb") as f:
        Rewrite(model.graph, read, Sink(f, dst.name + ".data"), scheme(quant, calibrated=False), None, None,
                own=("gather",)).run()
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return dst


def quantize_int8(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     use_external_data_format=True)
    return dst


def quantize_int4(src: Path, dst: Path) -> Path | None:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        print(f"full int4 skipped: {e} (pip install onnx-ir)")
        return None
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=True)
    return dst


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # the variants take turns: threads still spin-waiting after one variant's run would steal the
    # next variant's CPU (measured: the clustered head 2.1x slower after the full head's runs)
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(path.with_suffix(""))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(sessions: dict, hidden: int, rounds: int, warm: list, inner: int = 5) -> dict[str, float]:
    """Median ms per call of each session, measured round-robin, a different input every call."""
    xs = np.random.default_rng(1).standard_normal((64, 1, hidden)).astype(np.float32)
    recent = np.random.default_rng(2).integers(0, SHAPES["270m"][0], (64, 1, CONTEXT))

    def feed(s, i: int, x: np.ndarray) -> dict:
        extra = ({head.CONTEXT_IDS: recent[i % len(recent)]}
                 if head.CONTEXT_IDS in {v.name for v in s.get_inputs()} else {})
        return {head.INPUT: x, **extra}

    for s in sessions.values():
        for i, x in enumerate(warm):
            s.run([head.TOKEN_IDS], feed(s, i, x))
    times = {name: [] for name in sessions}
    for r in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            for i in range(inner):
                j = (r * inner + i) % len(xs)
                s.run([head.TOKEN_IDS], feed(s, j, xs[j]))
            times[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {name: float(np.median(t)) for name, t in times.items()}


def op_times(s: ort.InferenceSession, calls: int) -> dict[str, float]:
    """Median kernel ms per node over the last `calls` runs (the timed ones), slowest first."""
    by_node: dict[str, list] = {}
    for e in json.loads(Path(s.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_node.setdefault(f"{e['args']['op_name']} ({e['name'][:-len('_kernel_time')]})", []).append(e["dur"])
    med = {k: float(np.median(v[-calls:])) / 1e3 for k, v in by_node.items()}
    return dict(sorted(med.items(), key=lambda kv: -kv[1]))


def bench_shape(name: str, rounds: int, threads: int, profile: bool = False, ordered: bool = False) -> None:
    vocab, hidden = SHAPES[name]
    inner = 5
    with tempfile.TemporaryDirectory(prefix="bench_head_") as tmp:
        paths, warm = build_variants(vocab, hidden, Path(tmp), ordered)
        sessions = {k: session(p, threads, profile and k.startswith("clustered")) for k, p in paths.items()}
        ms = measure(sessions, hidden, rounds, warm, inner)
        ops = {k: op_times(s, rounds * inner) for k, s in sessions.items() if profile and k.startswith("clustered")}
        del sessions
    base = ms["clustered fp32"]
    print(f"\n{name}: V={vocab} d={hidden} C={CLUSTERS} k={TOP_K} ({TOP_K * vocab // CLUSTERS} candidates), "
          f"batch 1, {threads} threads, median of {rounds} rounds")
    for k in ("full fp32", "full int8", "full int4", "clustered fp32", "clustered int8", "clustered int4",
              "clustered int8 rows", "int8 rows+ctx", "clustered ordered"):
        if k in ms:
            print(f"  {k:19s} {ms[k]:8.3f} ms   {ms[k] / base:6.2f}x the clustered head's time   "
                  f"full fp32 head = {ms['full fp32'] / ms[k]:5.1f}x this")
    for k, per_op in ops.items():
        print(f"  {k} per op (median kernel ms): "
              + ", ".join(f"{op} {t:.2f}" for op, t in list(per_op.items())[:6]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--shapes", default="270m,e2b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="per-op times of the clustered head")
    ap.add_argument("--ordered", action="store_true", help="also the [C, M, d] permuted-copy experiment")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}")
    for name in args.shapes.split(","):
        bench_shape(name, args.rounds, args.threads, args.profile, args.ordered)


if __name__ == "__main__":
    script_main(main)
