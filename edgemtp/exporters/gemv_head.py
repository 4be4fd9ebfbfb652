"""`export --gemv-head`: the LM head also stored transposed, for passes of one position (plain decode steps).

A decode step's logits are a [1, H] x [V, H]^T product that reads the whole V x H table. ONNX Runtime packs
a constant MatMul / Gemm weight at load, and its packed kernel is not the fastest reader at M = 1: its
matrix-vector kernel (M = 1, an unpacked [H, V] row-major B) read Gemma 3 270M's 671 MB table 3-15% faster,
a whole fp32 decode step 4-9% faster (README, "Session 19"). Unpacked, though, passes of several positions
(speculative verify windows, M = K + 1) ran ~3x slower, so the head keeps the packed Gemm for those and an
If picks the branch by the number of rows. The transposed copy is a graph input with a default (an
overridable initializer), which ONNX Runtime never packs since a caller may feed another value. The price:
V x H x 4 more bytes on disk and ~0.5 GB more resident for Gemma 3 270M, hence a flag and not the default.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from .builder import FLOAT, GraphBuilder, transpose


def use_gemv_head(b: GraphBuilder) -> None:
    """Rewrites the graph's head (its one Gemm with transB over a [V, H] parameter) into If(rows == 1:
    MatMul over the transposed copy, else: the Gemm)."""
    heads = [i for i, n in enumerate(b.nodes) if n.op_type == "Gemm" and _is_head(b, n)]
    if len(heads) != 1:
        raise ValueError(f"graph {b.name}: expected one head Gemm, found {len(heads)}")
    i = heads[0]
    gemm = b.nodes[i]
    x, table = gemm.input[0], gemm.input[1]
    vocab, hidden = b.params[table].shape
    table_t = b.param(b.params[table].source, (hidden, vocab), transform=transpose, name=table + ".T")
    b.inputs.append(helper.make_tensor_value_info(table_t, FLOAT, [hidden, vocab]))
    rows, one = b.fresh("head_rows"), b.fresh("head_one_row")
    single = helper.make_graph([helper.make_node("MatMul", [x, table_t], ["gemv_logits"])], "gemv_head", [],
                               [helper.make_tensor_value_info("gemv_logits", FLOAT, None)])
    packed = helper.make_graph([helper.make_node("Gemm", [x, table], ["packed_logits"], transB=1)], "packed_head",
                               [], [helper.make_tensor_value_info("packed_logits", FLOAT, None)])
    b.nodes[i:i + 1] = [
        helper.make_node("Shape", [x], [rows], name=b.fresh("n_Shape"), start=0, end=1),
        helper.make_node("Equal", [rows, b.const([1], np.int64)], [one], name=b.fresh("n_Equal")),
        helper.make_node("If", [one], list(gemm.output), name=b.fresh("n_If"), then_branch=single,
                         else_branch=packed),
    ]


def _is_head(b: GraphBuilder, node) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    p = b.params.get(node.input[1])
    return attrs.get("transB") == 1 and p is not None and p.transform is None and len(p.shape) == 2
