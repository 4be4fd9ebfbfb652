"""ONNX nodes of the quantized target graph: MatMulNBits, GatherBlockQuantized, and the small subgraphs
around them (two-pass activations, a head or table split into row parts, activation smoothing).

Every function returns a list of nodes; tensor names derive from the replaced node's name, so a graph
rewrite stays a pure function of (graph, packed weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .builder import MS_DOMAIN

ACT_LEVELS = 127.0  # MLAS' int8 activation grid at accuracy level 4: q = round(x * 127 / max|x|) per block


@dataclass(frozen=True)
class Packed:
    """One block-quantized matrix [n, k] in MatMulNBits layout, as initializer names."""

    data: str  # uint8 [n, kb, block*bits/8]
    scales: str  # fp32 [n, kb]
    zero_points: str | None  # uint8 [n, ceil(kb*bits/8)] (MatMulNBits' packing)
    gather_zero_points: str | None  # uint8 [n, kb, 1] (GatherBlockQuantized: one per block)
    bits: int
    block: int
    n: int
    k: int


def const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name + "_c", value=onnx.numpy_helper.from_array(value, name))


def matmul_nbits(x: str, p: Packed, out: str, name: str, accuracy_level: int) -> onnx.NodeProto:
    """x [.., k] @ W^T -> [.., n]."""
    attrs = dict(K=p.k, N=p.n, bits=p.bits, block_size=p.block)
    if accuracy_level:  # 0 is "unset": leave the attribute out, as ORT's quantizer does
        attrs["accuracy_level"] = accuracy_level
    inputs = [x, p.data, p.scales] + ([p.zero_points] if p.zero_points else [])
    return helper.make_node("MatMulNBits", inputs, [out], name=name, domain=MS_DOMAIN, **attrs)


def gather_rows(p: Packed, ids: str, out: str, name: str) -> list[onnx.NodeProto]:
    """Rows `ids` [..] of the packed table -> [.., k]."""
    blocks = out + ".blocks"  # [.., kb, block]
    return gather_blocks(p, ids, blocks, name) + [
        # [B, S, kb, block] -> [B, S, k] (Reshape's 0 keeps an axis)
        const(name + ".shape", np.array([0, 0, p.k], np.int64)),
        helper.make_node("Reshape", [blocks, name + ".shape"], [out], name=name + "_r")]


def gather_blocks(p: Packed, ids: str, out: str, name: str) -> list[onnx.NodeProto]:
    """Rows `ids` [..] of the packed table -> [.., kb, block]. Its MatMulNBits scales [n, kb] serve as
    GatherBlockQuantized's [n, kb, 1] through an Unsqueeze (folded when the session loads)."""
    scales = out + ".scales"
    return [const(name + ".axis2", np.array([2], np.int64)),
            helper.make_node("Unsqueeze", [p.scales, name + ".axis2"], [scales], name=name + "_s"),
            helper.make_node("GatherBlockQuantized", [p.data, ids, scales] + (
                [p.gather_zero_points] if p.gather_zero_points else []), [out], name=name, domain=MS_DOMAIN,
                gather_axis=0, quantize_axis=2, block_size=p.block, bits=p.bits)]


def two_pass(x: str, k: int, block: int, name: str) -> tuple[str, list[onnx.NodeProto]]:
    """x [.., k] -> [2 * d0, .., k]: x rounded onto MLAS' own int8 activation grid, then the rounding
    residual, stacked on the first axis (a product's two halves are then added by sum_halves).

    MatMulNBits at accuracy level 4 rounds each activation block to int8, which costs the head ~2% of
    its top-1 agreement on Gemma (a few hidden channels are ~15x the median, coarsening their blocks).
    The first half is already on that grid (exact in its int8 pass); the residual, ~1/254 of it, is
    rounded by the second pass: with the two products added, activations carry ~15 bits."""
    n = lambda s: f"{name}.{s}"  # noqa: E731
    nodes = [const(n("blocks_shape"), np.array([-1, k // block, block], np.int64)),
             const(n("levels"), np.array(ACT_LEVELS, np.float32)),
             const(n("tiny"), np.array(1e-30, np.float32)),
             const(n("axis"), np.array([-1], np.int64))]
    ops = [("Shape", [x], n("shape")), ("Reshape", [x, n("blocks_shape")], n("xb")), ("Abs", [n("xb")], n("abs")),
           ("ReduceMax", [n("abs"), n("axis")], n("amax")), ("Max", [n("amax"), n("tiny")], n("amax_safe")),
           ("Div", [n("levels"), n("amax_safe")], n("inv")), ("Mul", [n("xb"), n("inv")], n("scaled")),
           ("Round", [n("scaled")], n("q")), ("Div", [n("q"), n("inv")], n("hi_b")),
           ("Sub", [n("xb"), n("hi_b")], n("lo_b")), ("Reshape", [n("hi_b"), n("shape")], n("hi")),
           ("Reshape", [n("lo_b"), n("shape")], n("lo")), ("Concat", [n("hi"), n("lo")], n("out"))]
    for op, ins, out in ops:
        attrs = {"keepdims": 1} if op == "ReduceMax" else {"axis": 0} if op == "Concat" else {}
        nodes.append(helper.make_node(op, ins, [out], name=out + "_n", **attrs))
    return n("out"), nodes


INT_LEVELS = 63  # MatMulInteger activations: 7-bit magnitudes (see integer_activations)
INT_ZERO = 64  # their uint8 zero point
INT_PASSES = 3


def integer_activations(x: str, name: str, passes: int = INT_PASSES) -> tuple[str, str, list[onnx.NodeProto]]:
    """x [d0, .., k] -> (uint8 [passes * d0, .., k], their scales [passes * d0, .., 1]): each row rounded to
    7-bit levels of its own scale s = max|row| / 63, then the rounding residual (at most s / 2) to levels of
    s / 126, then (three passes) that residual to levels of s / 126^2, stacked on the first axis for one
    integer product (integer_matmul adds the passes).

    7 bits because MLAS' u8 x s8 kernel on AVX2 without VNNI sums pairs of products in int16 with
    saturation: 2 * 127 * 128 fits, 2 * 255 * 127 does not (ONNX Runtime's quantization docs; VNNI and
    AMX do not saturate). A row's levels depend on that row alone, but a verify window's attention differs
    from a single step's by ~1e-7, which can move a value across a rounding boundary, by one step of the
    last pass: with two passes (s / 252 of the row's largest value) greedy drafting on Gemma 3 270M int8
    parted from plain decoding on 2 of 6 prompts; with three, none did. On AMX the third row per position
    costs next to nothing."""
    n = lambda s: f"{name}.{s}"  # noqa: E731
    nodes = [const(n("inv_levels"), np.array(1.0 / INT_LEVELS, np.float32)),
             const(n("fine"), np.array(2.0 * INT_LEVELS, np.float32)),
             const(n("inv_fine"), np.array(1.0 / (2 * INT_LEVELS), np.float32)),
             const(n("tiny"), np.array(1e-30, np.float32)),
             const(n("zero"), np.array(INT_ZERO, np.float32)),
             const(n("axis"), np.array([-1], np.int64))]
    ops = [("Abs", [x], n("abs")), ("ReduceMax", [n("abs"), n("axis")], n("amax")),
           ("Max", [n("amax"), n("tiny")], n("safe")), ("Mul", [n("safe"), n("inv_levels")], n("s1")),
           ("Div", [x, n("s1")], n("x1")), ("Round", [n("x1")], n("q1"))]  # |q1| <= 63
    for i in range(2, passes + 1):  # the residual in steps 126x finer: |q_i| <= 63
        ops += [("Sub", [n(f"x{i - 1}"), n(f"q{i - 1}")], n(f"rest{i}")),
                ("Mul", [n(f"rest{i}"), n("fine")], n(f"x{i}")),
                ("Round", [n(f"x{i}")], n(f"q{i}")), ("Mul", [n(f"s{i - 1}"), n("inv_fine")], n(f"s{i}"))]
    each = range(1, passes + 1)
    ops += [("Concat", [n(f"q{i}") for i in each], n("q")), ("Add", [n("q"), n("zero")], n("shifted")),
            ("Cast", [n("shifted")], n("u8")), ("Concat", [n(f"s{i}") for i in each], n("scales"))]
    for op, ins, out in ops:
        attrs = {"keepdims": 1} if op == "ReduceMax" else {"axis": 0} if op == "Concat" else \
            {"to": TensorProto.UINT8} if op == "Cast" else {}
        nodes.append(helper.make_node(op, ins, [out], name=out + "_n", **attrs))
    return n("u8"), n("scales"), nodes


def integer_matmul(xq: str, x_scales: str, zero: str, w: str, w_scales: str, out: str,
                   name: str, passes: int = INT_PASSES) -> list[onnx.NodeProto]:
    """integer_activations' (xq, x_scales) @ W (int8 [k, n], one scale per column) -> [d0, .., n]: one
    com.microsoft MatMulIntegerToFloat over every pass (exact int32 sums, scaled by each row's and each
    column's scale), then the passes added."""
    parts = [f"{name}.pass{i}" for i in range(passes)]
    return [helper.make_node("MatMulIntegerToFloat", [xq, w, x_scales, w_scales, zero], [name + ".passes"],
                             name=name, domain=MS_DOMAIN),
            helper.make_node("Split", [name + ".passes"], parts, name=name + "_split", axis=0,
                             num_outputs=passes),
            helper.make_node("Sum", parts, [out], name=name + "_sum")]


def sum_halves(y: str, out: str, name: str) -> list[onnx.NodeProto]:
    """[2 * d0, .., n] -> [d0, .., n]: the two passes' products added."""
    halves = [name + ".a", name + ".b"]
    return [helper.make_node("Split", [y], halves, name=name + "_split", axis=0, num_outputs=2),
            helper.make_node("Add", halves, [out], name=name + "_add")]


def head(x: str, parts: list[Packed], out: str, name: str, accuracy_level: int, two_pass_block: int | None,
         inverse_order: str | None) -> list[onnx.NodeProto]:
    """x [m, k] -> logits [m, V] through the row parts of the table (in table order), then back into
    vocabulary order when the rows were permuted (`inverse_order`: vocab id -> table row)."""
    nodes: list[onnx.NodeProto] = []
    if two_pass_block:
        x, sub = two_pass(x, parts[0].k, two_pass_block, name + ".act")
        nodes += sub
    ys = [f"{name}.part{i}" for i in range(len(parts))]
    nodes += [matmul_nbits(x, p, y, f"{name}_q{i}", accuracy_level) for i, (p, y) in enumerate(zip(parts, ys))]
    y = ys[0]
    if len(parts) > 1:
        y = name + ".rows"
        nodes.append(helper.make_node("Concat", ys, [y], name=name + "_cat", axis=-1))
    if two_pass_block:
        nodes += sum_halves(y, name + ".summed", name + "_passes")
        y = name + ".summed"
    if inverse_order:  # GatherElements over the order broadcast to the logits' shape: a Gather on the last
        # axis copies one number at a time (on the Xeon VM 0.84 ms for a row of 262,144 logits, 4.8 ms for 3
        # rows), GatherElements 0.47 / 1.5 ms with its Expand (docs/measurements.md, session 29)
        n = lambda s: f"{name}.order_{s}"  # noqa: E731
        nodes += [const(n("axis0"), np.array([0], np.int64)),
                  helper.make_node("Unsqueeze", [inverse_order, n("axis0")], [n("row")], name=n("row_n")),
                  helper.make_node("Shape", [y], [n("shape")], name=n("shape_n")),
                  helper.make_node("Expand", [n("row"), n("shape")], [n("ids")], name=n("ids_n")),
                  helper.make_node("GatherElements", [y, n("ids")], [name + ".vocab"], name=name + "_order", axis=-1)]
        y = name + ".vocab"
    nodes.append(helper.make_node("Identity", [y], [out], name=name + "_out"))
    return nodes


REFINE = 8  # integer_head: logits recomputed from the table's rows at each position's top REFINE
HEAD_PASSES = 2  # integer_head's activation passes (the rescored logits decide the argmax, see there)


def integer_head(x: str, w: str, w_scales: str, parts: list[Packed], row_of: str | None, out: str,
                 name: str, refine: int = REFINE) -> list[onnx.NodeProto]:
    """x [m, k] -> logits [m, V]: every logit from the int8 columns W [k, V] (one scale per token,
    activations in HEAD_PASSES passes of integer_activations), then each position's `refine` highest
    recomputed from the table's rows (its parts, as the embedding reads them: dequantized rows times
    the fp32 x) and written back in place.

    One scale per token costs the int8 columns 1.3 points of top-1 agreement on Gemma 3 270M's head
    alone (0.980 against 0.993 for the int4 preset's table): the argmax is a near tie that the table's
    finer blocks settle. The fp32 argmax was among the int8 columns' top 4 at every one of 2,048
    positions, so rescoring the top 8 from the table gives the table's argmax (unless all 8 rescored
    logits fell below the 9th column logit: not seen), and the tail of the
    distribution keeps the columns' 8 bits (KL 0.0006 against 0.0015-0.0024 for the preset's head,
    docs/measurements.md, session 31). The point is speed where ONNX Runtime runs u8 x s8 on AMX /
    VNNI: a verify window of 5 positions costs 11 ms against 18 for MatMulNBits' 4-bit table.

    Two activation passes, not the layers' three: the argmax comes from the rescored fp32 products,
    so the passes only pick the candidates and shape the tail, where a third pass changed nothing
    (KL 0.00012 code / 0.00022 prose with two or three; one pass: 0.009 / 0.015)."""
    n = lambda s: f"{name}.{s}"  # noqa: E731
    xq, xs, nodes = integer_activations(x, n("act"), HEAD_PASSES)
    nodes += [const(n("zero"), np.array(INT_ZERO, np.uint8)), const(n("refine"), np.array([refine], np.int64)),
              const(n("last"), np.array([-1], np.int64))]
    nodes += integer_matmul(xq, xs, n("zero"), w, w_scales, n("approx"), name + "_i", HEAD_PASSES)
    nodes.append(helper.make_node("TopK", [n("approx"), n("refine")], [n("top"), n("ids")], name=n("top_n"),
                                  axis=-1))  # ids [m, refine]
    # each position's rows [refine, k] times its own x [k, 1]: the same product in a window as in a single
    # step (table_dot's one Gemm against every position's x sums in another order when the window widens)
    nodes += table_gather(n("ids"), parts, n("rows"), name + "_rows", row_of)  # [m, refine, k]
    nodes += [helper.make_node("Unsqueeze", [x, n("last")], [n("col")], name=n("col_n")),
              helper.make_node("MatMul", [n("rows"), n("col")], [n("dots")], name=n("dots_n"))]  # [m, refine, 1]
    return nodes + [helper.make_node("Squeeze", [n("dots"), n("last")], [n("exact")], name=n("exact_n")),
                    helper.make_node("ScatterElements", [n("approx"), n("ids"), n("exact")], [out], name=name,
                                     axis=-1)]


def table_gather(ids: str, parts: list[Packed], out: str, name: str, row_of: str | None) -> list[onnx.NodeProto]:
    """ids [..] -> embeddings [.., k] from a table stored as row parts (the first `parts[0].n` rows of
    the permuted table, then the rest): each id's row is gathered once, from its own part, and the rows
    are put back in the ids' order.

    The ids are split by part with NonZero (positions p0, p1), each part gathers its rows, and a Gather
    by the inverse of the order (p0, p1) restores the ids' order. Gathering every id from both parts and
    keeping one (Where, or 0/1 weights) dequantized twice the rows and wrote three more [n, k] tensors:
    for an MTP drafter's ~4,160 candidate rows a step spent ~6 ms there (session 26)."""
    if len(parts) == 1:
        return gather_rows(parts[0], ids, out, name)
    n = lambda s: f"{name}.{s}"  # noqa: E731
    nodes = _split_ids(ids, parts, row_of, name)
    nodes += gather_blocks(parts[0], n("row0"), n("x0"), name + "_g0")  # [n0, kb, block]
    nodes += gather_blocks(parts[1], n("row1"), n("x1"), name + "_g1")
    nodes.append(helper.make_node("Concat", [n("x0"), n("x1")], [n("x")], name=n("x_n"), axis=0))  # (p0, p1)
    return nodes + _restore_order(n("x"), ids, parts[0].k, out, name)


def table_dot(ids: str, h: str, parts: list[Packed], out: str, name: str, row_of: str) -> list[onnx.NodeProto]:
    """ids [.., m], h [.., k] -> [.., m, 1]: each id's table row dotted with its own h (the rows of
    leading index i with h[i]), i.e. MatMul(table_gather(ids), Unsqueeze(h, -1)), for a split table.

    An MTP drafter scores its ~4,160 candidate tokens this way. Scoring each part's rows where they
    are gathered, and reordering one number per id instead of a row, saves writing the rows twice
    more (Concat, reorder: ~1.5 ms of a 5.2 ms int4 draft step, session 27). Each part's rows are
    multiplied by every h (Gemm against h [L, k]^T, L the product of the leading axes: 1 when
    drafting one sequence) and each row keeps the column of its own leading index."""
    n = lambda s: f"{name}.{s}"  # noqa: E731
    k = parts[0].k
    nodes = _split_ids(ids, parts, row_of, name)
    nodes += [const(n("rows_shape"), np.array([-1, k], np.int64)), const(n("last"), np.array([-1], np.int64)),
              helper.make_node("Reshape", [h, n("rows_shape")], [n("h")], name=n("h_n")),  # [L, k]
              helper.make_node("Shape", [ids], [n("m")], name=n("m_n"), start=-1)]  # [1]: ids per leading index
    for i, p in enumerate(parts):
        x, lead = n(f"x{i}"), n(f"lead{i}")
        nodes += gather_blocks(p, n(f"row{i}"), x, f"{name}_g{i}")  # [n_i, kb, block]
        nodes += [helper.make_node("Reshape", [x, n("rows_shape")], [x + ".rows"], name=x + ".rows_n"),
                  helper.make_node("Gemm", [x + ".rows", n("h")], [x + ".dots"], name=x + ".dots_n", transB=1),
                  helper.make_node("Div", [n(f"p{i}"), n("m")], [lead], name=lead + "_n"),  # leading index
                  helper.make_node("Unsqueeze", [lead, n("last")], [lead + ".col"], name=lead + ".col_n"),
                  helper.make_node("GatherElements", [x + ".dots", lead + ".col"], [n(f"y{i}")], name=n(f"y{i}_n"),
                                   axis=1)]  # [n_i, 1]
    nodes.append(helper.make_node("Concat", [n("y0"), n("y1")], [n("y")], name=n("y_n"), axis=0))  # (p0, p1)
    return nodes + _restore_order(n("y"), ids, 1, out, name)


def _split_ids(ids: str, parts: list[Packed], row_of: str, name: str) -> list[onnx.NodeProto]:
    """ids [..] -> flat ids `flat` [n], the positions of each part's ids `p0`, `p1` and their rows
    within the part `row0`, `row1` (names prefixed by `name.`)."""
    n = lambda s: f"{name}.{s}"  # noqa: E731
    nodes = [const(n("flat_shape"), np.array([-1], np.int64)), const(n("first"), np.array(parts[0].n, np.int64))]
    ops = [("Reshape", [ids, n("flat_shape")], n("flat")),  # [n]
           ("Gather", [row_of, n("flat")], n("row")),  # table row of each id
           ("Less", [n("row"), n("first")], n("in0")),
           ("Not", [n("in0")], n("in1")),
           ("NonZero", [n("in0")], n("nz0")), ("NonZero", [n("in1")], n("nz1")),  # [1, n_i]
           ("Reshape", [n("nz0"), n("flat_shape")], n("p0")), ("Reshape", [n("nz1"), n("flat_shape")], n("p1")),
           ("Gather", [n("row"), n("p0")], n("row0")),
           ("Gather", [n("row"), n("p1")], n("row1_table")),
           ("Sub", [n("row1_table"), n("first")], n("row1"))]
    return nodes + [helper.make_node(op, ins, [o], name=o + "_n") for op, ins, o in ops]


def _restore_order(x: str, ids: str, width: int, out: str, name: str) -> list[onnx.NodeProto]:
    """x [n, ..] in the order (p0, p1) -> out [ids' shape.., width] in the ids' order (see _split_ids)."""
    n = lambda s: f"{name}.{s}"  # noqa: E731
    nodes = [const(n("width"), np.array([width], np.int64)), const(n("zero"), np.array(0, np.int64)),
             const(n("one"), np.array(1, np.int64)), const(n("axis0"), np.array([0], np.int64))]
    ops = [("Concat", [n("p0"), n("p1")], n("order"), {"axis": 0}),
           ("Shape", [n("flat")], n("count1"), {}), ("Squeeze", [n("count1"), n("axis0")], n("count"), {}),
           ("Range", [n("zero"), n("count"), n("one")], n("arange"), {}),
           # inverse[order[j]] = j: order is a permutation, so every slot is written
           ("ScatterElements", [n("order"), n("order"), n("arange")], n("inverse"), {"axis": 0}),
           ("Gather", [x, n("inverse")], n("rows"), {"axis": 0}),  # in the ids' order
           ("Shape", [ids], n("ids_shape"), {}),
           ("Concat", [n("ids_shape"), n("width")], n("out_shape"), {"axis": 0})]
    nodes += [helper.make_node(op, ins, [o], name=o + "_n", **attrs) for op, ins, o, attrs in ops]
    return nodes + [helper.make_node("Reshape", [n("rows"), n("out_shape")], [out], name=n("out"))]


def smooth(x: str, inverse_scale: str, out: str, name: str) -> onnx.NodeProto:
    """x / s per input channel (the weights were multiplied by s): SmoothQuant / AWQ's reparametrisation."""
    return helper.make_node("Mul", [x, inverse_scale], [out], name=name)
