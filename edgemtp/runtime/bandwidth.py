"""Memory bandwidth as ONNX Runtime sees it: the ceiling for decoding, which reads every weight per token."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def measure_bandwidth(threads: int | None = None, mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a ReduceSum over a buffer far larger than the caches (best of `repeats`)."""
    n = mbytes * (1 << 20) // 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n // 1024, 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    model = helper.make_model(helper.make_graph([node], "bw", [x], [y], [axes]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    data = np.ones((n // 1024, 1024), np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": data})
        best = min(best, time.perf_counter() - t0)
    return data.nbytes / best
