"""The plumbing of the quantizing rewrite (quantrewrite.py) and the float rewrite (fp32 / fp16): the new
external-data file, which node uses a weight how, and what each source tensor already became.

Graphs of one bundle share bytes: the drafter's embedding points into the target's data file, the
full-head twin's weights into the drafter's. `Shared` remembers what each source tensor (by its
location, offset and length) became, so the next graph points at the same new bytes instead of
writing a second copy: the drafter reads the target's quantized table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ArgumentError
from .builder import _align, _set_external


class Sink:
    """Appends tensors to the new external-data file; returns their (data-less) TensorProtos."""

    def __init__(self, f, location: str):
        self.f, self.location = f, location

    def write(self, name: str, arr: np.ndarray) -> TensorProto:
        return self.stream(name, arr.dtype, arr.shape, [arr])

    def stream(self, name: str, dtype, shape: tuple, chunks) -> TensorProto:
        """A tensor written chunk by chunk (chunks of leading-axis rows, in order)."""
        offset = _align(self.f)
        for c in chunks:
            self.f.write(memoryview(np.ascontiguousarray(c, dtype).reshape(-1)).cast("B"))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=shape)
        _set_external(t, self.location, offset, self.f.tell() - offset)
        return t


Key = tuple[str, int, int]  # a source tensor's external data: (location, offset, length)


@dataclass
class Table:
    """A packed table (its row parts, the vocab -> row tensor when split) and the initializers that hold it."""

    parts: list
    order: str | None
    protos: list
    columns: tuple[str, str] | None = None  # the head's int8 columns [k, V] and their scales (head_op integer)


@dataclass
class Shared:
    """Source tensor -> what a rewrite made of it: a float tensor (its new proto, and whether a Cast from
    fp16 stands before it) or a packed Table. One Shared goes through every graph of a bundle."""

    floats: dict = field(default_factory=dict)  # Key -> (TensorProto, cast: bool)
    tables: dict = field(default_factory=dict)  # Key -> Table


def source_key(t: TensorProto) -> Key | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info.get("length", -1))


def renamed(t: TensorProto, name: str) -> TensorProto:
    out = TensorProto()
    out.CopyFrom(t)
    out.name = name
    return out


def is_weight(name: str, inits: dict) -> bool:
    t = inits.get(name)
    return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2


def role(node: onnx.NodeProto, inits: dict) -> tuple[str, str] | None:
    """('matmul' | 'head' | 'gather', weight name) for a node we know how to quantize."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and is_weight(node.input[1], inits):
        return "matmul", node.input[1]
    if (node.op_type == "Gemm" and len(node.input) == 2 and is_weight(node.input[1], inits)
            and attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0):
        return "head", node.input[1]
    if node.op_type == "Gather" and attrs.get("axis", 0) == 0 and is_weight(node.input[0], inits):
        return "gather", node.input[0]
    return None


def activation_sources(g: onnx.GraphProto) -> dict[str, str]:
    """Input of each quantizable MatMul / head -> the tensor its statistics are taken from: itself, or
    for the head the full-length tensor before the Slice / Reshape that keep the last positions."""
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = {}
    for n in g.node:
        r = role(n, inits)
        if r and r[0] != "gather":
            x = n.input[0]
            # the head only: a layer MatMul's input may come out of a Reshape that changes its last axis
            while r[0] == "head" and x in producer and producer[x].op_type in ("Reshape", "Slice", "Identity"):
                x = producer[x].input[0]
            out[n.input[0]] = x
    return out


def rewrite_float(g: onnx.GraphProto, read, sink: Sink, quant: str, progress, shared: Shared | None = None) -> None:
    """fp32: copy. fp16: matrices stored fp16, cast back to fp32 by a Cast that ORT folds at load.
    A tensor an earlier graph of the bundle already wrote (`shared`) points at those bytes."""
    shared = shared if shared is not None else Shared()
    casts, new_inits = [], []
    n = len(g.initializer)
    positions = position_tables(g)
    for i, t in enumerate(list(g.initializer)):
        key = source_key(t)
        if key is None:
            new_inits.append(t)
            if progress:  # an inline constant counts too: the bar ends at its total (SmolLM2's stopped at 182/249)
                progress(i + 1, n, f"{quant} weights")
            continue
        made = shared.floats.get(key)
        if made is None:
            if quant == "fp16" and t.data_type == TensorProto.FLOAT and len(t.dims) >= 2 and t.name not in positions:
                value = read(t)
                with np.errstate(over="ignore"):  # an overflow is said below, naming the weight
                    half = value.astype(np.float16)
                # only a finite value that fp16 cannot hold: a padded clustered head's mask is -inf on purpose
                if (np.isinf(half) & np.isfinite(value)).any():
                    raise ArgumentError("quant", quant, f"cannot hold weight '{t.name}', which overflows fp16 "
                                        "(|w| > 65504): use fp32 or int8")
                made = (sink.write(t.name + ".fp16", half), True)
            else:
                made = (sink.write(t.name, read(t)), False)
            shared.floats[key] = made
        proto, cast = made
        if cast:
            new_inits.append(renamed(proto, t.name + ".fp16"))
            casts.append(helper.make_node("Cast", [t.name + ".fp16"], [t.name], name=t.name + ".cast",
                                          to=TensorProto.FLOAT))
        else:
            new_inits.append(renamed(proto, t.name))
        if progress:
            progress(i + 1, n, f"{quant} weights")
    replace_all(g, new_inits, casts + list(g.node))


def position_tables(g: onnx.GraphProto) -> set[str]:
    """The RoPE cos / sin caches GroupQueryAttention rotates with (its inputs 7 and 8): external data since
    GraphBuilder.table, but no weights; fp16 leaves them fp32 (GroupQueryAttention takes them in q's type,
    and rounded they would change the tokens), as it did when they were stored in the graph file."""
    return {name for node in g.node if node.op_type == "GroupQueryAttention" for name in node.input[7:9] if name}


def replace_all(g: onnx.GraphProto, inits: list, nodes: list) -> None:
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.node[:]
    g.node.extend(nodes)
