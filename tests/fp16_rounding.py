"""An ONNX graph with every float value its ops compute rounded to fp16 (a Cast pair after each): what an NPU that
runs float ops in fp16 (QNN HTP, CoreML on the Neural Engine) keeps of them, on the CPU. Overflow past 65,504
gives inf as it does there; the ops themselves still compute in fp32 on fp16-rounded inputs."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper


def fp16_rounded(src: Path, dst: Path) -> Path:
    """Writes `src` (weights as they are) to `dst` with each float op output rounded to fp16; returns `dst`."""
    model = onnx.load(str(src))
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for i, out in enumerate(node.output):
            if out and types.get(out) == TensorProto.FLOAT:
                node.output[i] = out + ".fp32"
                nodes += [helper.make_node("Cast", [out + ".fp32"], [out + ".fp16"], to=TensorProto.FLOAT16),
                          helper.make_node("Cast", [out + ".fp16"], [out], to=TensorProto.FLOAT)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return dst
