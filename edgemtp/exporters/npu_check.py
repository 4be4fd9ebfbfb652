"""Would an NPU execution provider take this graph whole? Lists what it would reject.

    problems = check_graph("bundle/target.onnx", target="qnn")   # [] means: nothing found

Checks (statically, without loading weights): every node's op is a standard ONNX op (no
com.microsoft ops such as GroupQueryAttention or MatMulNBits) in the provider's supported set, and
every graph input/output dimension is a fixed number (no symbolic or unknown dims). It does not
check per-op constraints (ranks, attribute values, data types): a graph that passes can still be
partly placed on the CPU; one that fails certainly will be.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from ..errors import EdgemtpError, not_an_onnx_file

# ONNX Runtime QNN EP (HTP backend): the op builders registered in
# onnxruntime/core/providers/qnn/builder/op_builder_factory.cc (microsoft/onnxruntime main, 2025; the
# operator table of docs/execution-providers/QNN-ExecutionProvider.md mirrors it).
QNN_OPS = frozenset("""
Abs Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization Cast Ceil Clip Concat Conv ConvTranspose
Cos CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal Exp Expand Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GridSample HardSigmoid HardSwish
InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization LRN LSTM
MatMul Max MaxPool Mean Min Mod Mul Neg Not Or Pad Pow PRelu QuantizeLinear RandomUniformLike Reciprocal
ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize RMSNormalization Round
ScatterElements ScatterND Sigmoid Sign Sin Slice Softmax SpaceToDepth Split Sqrt Squeeze STFT Sub Sum Tanh
ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where
""".split())

# ONNX Runtime CoreML EP, ML Program format (what reaches the Neural Engine):
# tools/ci_build/github/apple/coreml_supported_mlprogram_ops.md (microsoft/onnxruntime main), plus
# Gather (PR #24387) and Where / And (PR #28597), added to the builders after that table was written.
# No QuantizeLinear / DequantizeLinear: CoreML takes float graphs (it quantizes by palettization).
COREML_OPS = frozenset("""
Add And ArgMax AveragePool Cast Ceil Clip Concat Conv ConvTranspose Cos DepthToSpace Div Elu Erf Exp Gather
GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool GridSample GroupNormalization HardSigmoid Identity
InstanceNormalization LayerNormalization LeakyRelu MatMul Max MaxPool Mul Pow PRelu Range Reciprocal
ReduceMax ReduceMean ReduceSum Relu Reshape Resize Round Shape Sigmoid Sin Slice Softmax Softplus Split Sqrt
Squeeze Sub Tanh Tile Transpose Unsqueeze Where
""".split())

_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})

# the providers checked; "any" stands for all of them, so one added here is in its op set and its lines
PROVIDERS = {"qnn": QNN_OPS, "coreml": COREML_OPS}
# "any": what every provider takes, Q/DQ pairs allowed (QNN HTP and OpenVINO NPU consume QDQ graphs; for
# CoreML export the float graph).
TARGETS = {**PROVIDERS, "any": frozenset.intersection(*PROVIDERS.values()) | _QDQ}


def check_graph(model_or_path, target: str = "any") -> list[str]:
    """Problems an NPU provider would reject the graph for; [] when none is found.

    model_or_path: an onnx.ModelProto, a GraphBuilder (anything with .model()) or a .onnx path
    (external weights are not read). target: "qnn", "coreml" or "any"."""
    if target not in TARGETS:
        raise EdgemtpError(f"NPU check target {target!r} is unknown (choose from {', '.join(TARGETS)})")
    model = _load(model_or_path)
    return _op_problems(model.graph, TARGETS[target], target) + _dim_problems(model.graph)


def _load(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if hasattr(model_or_path, "model"):
        return model_or_path.model()
    path = Path(model_or_path)
    if not path.is_file():
        raise EdgemtpError(f"{path}: {not_an_onnx_file(path)}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError
        raise EdgemtpError(f"{path}: not an ONNX model ({e})") from None


def _op_problems(graph: onnx.GraphProto, supported: frozenset, target: str) -> list[str]:
    counts: Counter = Counter()
    first: dict = {}
    for node in _nodes(graph):
        domain = node.domain if node.domain not in ("", "ai.onnx") else ""
        if not domain and node.op_type == "Constant":  # ONNX Runtime makes it an initializer as it loads the
            continue  # graph (Graph's constructor): no provider is ever asked to run it
        if domain or node.op_type not in supported:
            key = f"{domain}:{node.op_type}" if domain else node.op_type
            counts[key] += 1
            first.setdefault(key, node.name or "(unnamed)")
    out = []
    for key, n in sorted(counts.items()):
        # "any" is no provider: name those it stands for that lack the op, so a user targeting one of them
        # knows whether this line concerns them
        lacking = [p for p, ops in PROVIDERS.items() if key not in ops] if target == "any" else [target]
        who = f"the {' and '.join(lacking)} provider{'s' if len(lacking) > 1 else ''}"
        why = "not a standard ONNX op" if ":" in key else f"not supported by {who}"
        out.append(f"op {key} ({n} node{'s' if n > 1 else ''}, e.g. {first[key]}): {why}")
    return out


def _nodes(graph: onnx.GraphProto):
    """Every node, those of subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(g)


def _dim_problems(graph: onnx.GraphProto) -> list[str]:
    out = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        init = {t.name for t in graph.initializer}
        for v in values:
            if v.name in init:
                continue
            t = v.type.tensor_type
            if not t.HasField("shape"):
                out.append(f"{kind} {v.name}: unknown rank")
                continue
            for i, d in enumerate(t.shape.dim):
                if d.HasField("dim_param"):
                    out.append(f"{kind} {v.name}: dimension {i} is symbolic ({d.dim_param!r})")
                elif not d.HasField("dim_value"):
                    out.append(f"{kind} {v.name}: dimension {i} is unknown")
    return out
