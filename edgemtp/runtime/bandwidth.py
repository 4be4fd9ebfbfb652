"""Memory bandwidth as the fastest weight reader here sees it: the ceiling for decoding, which reads every
weight per token (but a few rows of the tables it gathers from: decode_bytes)."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from ..onnx_wire import one_node_model
from .session import intra_op_threads


class BandwidthProbe:
    """Reads one weight far larger than the caches with three matrix-vector kernels: ONNX Runtime's
    [1, K] x [N, K]^T Gemm and its [1, K] x [K, N] MatMul (its M = 1 GEMV), and numpy's `x @ w` over the
    [K, N] view (OpenBLAS's GEMV, on all cores). The fastest gives the ceiling: what the weights' bytes
    allow here, not a number from a data sheet. The third, outside ONNX Runtime, checks that the ceiling
    measures the memory and not ONNX Runtime's kernels: on the 2-core machines it read 4-7% slower than the
    GEMV (four runs, docs/measurements.md, "Session 20"), so the GEMV sets the ceiling there. Import
    edgemtp before numpy (see edgemtp/__init__.py): otherwise OpenBLAS's threads spin on after the probe
    and slow whatever runs next."""

    K = 2048

    def __init__(self, threads: int | None = None, mbytes: int = 512):
        n = mbytes * (1 << 20) // (4 * self.K)
        self.weights = np.random.default_rng(0).standard_normal((n, self.K), dtype=np.float32)
        self.nbytes = self.weights.nbytes
        x = np.ones((1, self.K), np.float32)
        transposed = _session("Gemm", {"transB": 1}, [n, self.K], threads)
        gemv = _session("MatMul", {}, [self.K, n], threads)
        # the same bytes read as [N, K] and as [K, N]: the values do not matter, only that all are read
        w_kn = self.weights.reshape(self.K, n)
        self.runs = [lambda: transposed.run(None, {"x": x, "w": self.weights})[0],
                     lambda: gemv.run(None, {"x": x, "w": w_kn})[0],
                     lambda: x @ w_kn]

    def products(self) -> list[np.ndarray]:
        """Each kernel's product, [1, N] (for tests: each reads every weight)."""
        return [np.asarray(run()).reshape(1, -1) for run in self.runs]

    def times(self) -> list[float]:
        """Seconds of one read of the weight by each kernel."""
        out = []
        for run in self.runs:
            t0 = time.perf_counter()
            run()
            out.append(time.perf_counter() - t0)
        return out


def _session(op: str, attributes: dict, w_shape: list[int], threads: int | None) -> ort.InferenceSession:
    model = one_node_model(op, {"x": [1, BandwidthProbe.K], "w": w_shape}, "y", attributes)
    opts = ort.SessionOptions()
    if threads := intra_op_threads(threads):  # the decode steps' own thread count (make_session)
        opts.intra_op_num_threads = threads
    # threads that spin on after a run would take the cores from whatever runs next (a decode step)
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def measure_bandwidth(threads: int | None = None, mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of the fastest kernel, each kernel's median of `repeats` reads (after one to warm up): the
    ceiling benchmarks/bench_decode.py's pairs use. The single fastest read, the figure before session 22,
    is a burst on a shared machine: on the 2-core VM it put a bundle's plain decoding at 61-68% of the
    ceiling where its steps paired with probes read 84-86%."""
    probe = BandwidthProbe(threads, mbytes)
    probe.times()
    times = np.array([probe.times() for _ in range(repeats)])  # [repeats, kernels]
    return probe.nbytes / float(np.median(times, axis=0).min())


def decode_bytes(bundle, context: int = 0) -> int:
    """Bytes a plain decode step reads (a Bundle) with `context` tokens in the cache: the target's weights,
    each once (a tied embedding whole, by the head), and the KV cache its attention reads (kv_read_bytes; a
    static graph's bundle reads every layer's whole cache, whatever the context: static_kv_read_bytes).

    Left out: the tables a step reads only rows of (rows_only_bytes: an untied input embedding, Gemma 4's
    per-layer embeddings, a --head-op integer head's packed table, the zero points of a packed embedding's
    gather), and the weights no node of the target reads (the [V, H] table a --gemv-head bundle keeps for a
    drafter that gathers its rows, exporters/gemv_head.py). A --gemv-head bundle exported before session 20
    (manifest value `true`) kept that table for its If's branch of several rows, where the graph shows it
    read: a plain step takes the other branch. A drafter's own weights are not read either. The rotary
    cos / sin caches that GroupQueryAttention rotates with (one row of R/2 numbers each per step, of
    [capacity, R/2]) are not counted: read at rows where they are in the data file (GraphBuilder.table), not
    in it at all where the graph file holds them (bundles exported before it)."""
    target = bundle.graph("target").path.name
    data = {rel: info["bytes"] for rel, info in bundle.manifest["files"].items()
            if rel.endswith(".data") and rel.startswith(target)}
    weights = sum(data.values()) - rows_only_bytes(bundle.facts.get("target"), data)
    if bundle.manifest["graphs"]["target"].get("gemv_head") is True:
        weights -= 4 * bundle.model["vocab_size"] * bundle.model["hidden_size"]
    if context and bundle.graph("target").contract.get("static"):
        weights += static_kv_read_bytes(bundle.target_contract.kv, bundle.target_contract.capacity)
    elif context:
        weights += kv_read_bytes(bundle.target_contract.kv, context)
    return weights


def rows_only_bytes(facts, data_files) -> int:
    """Bytes of the `data_files` that a step reads at most a few rows of: those of the initializers no node of
    the graph (GraphFacts `facts`) reads whole (read_at_rows: each is gathered from, or read by no node), less
    any bytes an initializer read whole shares (the --gemv-head alias). A step gathers one row of an
    embedding table and, with --head-op integer, the head's 8 rescored rows of its packed table
    (exporters/quantnodes.integer_head): some KB, against tables of hundreds of MB. Counted whole, an untied
    model's table, Gemma 4 E2B's per-layer embeddings (9.4 GB in fp32) and the integer head's packed table
    (~124 MB for Gemma 3 270M's int4 preset, ~1.4x the bytes its steps read) put the ceiling far below what
    the steps can reach."""
    if facts is None:
        return 0
    rows, whole = set(), set()
    for name, entries in facts.external.items():
        try:
            where = (entries.get("location"), int(entries.get("offset", 0)), int(entries.get("length", 0)))
        except ValueError:  # not a number: ONNX Runtime would refuse the graph
            continue
        (rows if name in facts.read_at_rows else whole).add(where)
    return sum(length for location, _, length in rows - whole if location in data_files)


def static_kv_read_bytes(slots, capacity: int) -> int:
    """Bytes of KV cache a static graph's step reads: it takes each layer's whole [1, Nk, C, D] buffers as
    inputs and scores all C positions, masked to the context (exporters/static.py's attention; a sliding
    layer's window is a mask too). Counting none, as before, put a static bundle's ceiling above what its
    steps can reach."""
    return sum(2 * 4 * s.num_heads * s.head_dim * capacity for s in slots)


def kv_read_bytes(slots, context: int) -> int:
    """Bytes of fp32 KV cache one new token's attention must read with `context` tokens cached: the keys and
    values of every cached position it attends to (on a sliding layer, the window - 1 before it), for
    each KV-owning layer once (Gemma 4's KV-shared layers read an owner's buffers, which are then hot). The
    new position's own keys and values are computed by the step, so are not counted."""
    total = 0
    for s in slots:
        positions = context if not s.window else min(context, s.window - 1)
        total += 2 * 4 * s.num_heads * s.head_dim * positions
    return total
