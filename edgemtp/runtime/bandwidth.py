"""Memory bandwidth as ONNX Runtime sees it: the ceiling for decoding, which reads every weight per token."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def measure_bandwidth(threads: int | None = None, mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a matrix-vector product over a weight far larger than the caches (best of `repeats`).

    The same kernel decoding spends its time in (a [1, K] x [N, K]^T Gemm), so the ceiling it gives is
    what the weights' bytes allow on this machine, not a number from a data sheet."""
    k = 2048
    n = mbytes * (1 << 20) // (4 * k)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [n, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    model = helper.make_model(helper.make_graph([node], "bw", [x, w], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    weights = np.random.default_rng(0).standard_normal((n, k), dtype=np.float32)
    feed = {"x": np.ones((1, k), np.float32), "w": weights}
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        sess.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return weights.nbytes / best
