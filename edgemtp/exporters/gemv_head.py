"""The LM head table stored transposed, `[H, V]`, so one-row passes read it with GEMV (`export --gemv-head`,
the default for dynamic fp32 bundles since session 21: see exporters.drafter_pairing.layout).

A decode step's logits are a [1, H] x [V, H]^T product that reads the whole V x H table. ONNX Runtime packs
a constant MatMul / Gemm weight at load, and its packed kernel is not the fastest reader at M = 1: its
matrix-vector kernel (M = 1, an unpacked [H, V] row-major B) read Gemma 3 270M's 671 MB table 3-20% faster,
a whole fp32 decode step 4-9% faster (docs/measurements.md, "Session 19" and "Session 20"). Unpacked, though, passes of
several positions (speculative verify windows, M = K + 1) ran ~3x slower. So the table is stored once,
transposed, under two initializer names pointing at the same bytes of the data file:

- `<table>.T`, a constant: passes with several rows multiply by it with a MatMul, which ONNX Runtime packs
  (as fast as the default export's packed Gemm); the embedding gathers its columns (a tied head);
- `<table>.T.gemv`, a graph input with that default (an overridable initializer), which ONNX Runtime never
  packs since a caller may feed another value: an If sends passes with one row of logits to a MatMul over
  it, ONNX Runtime's GEMV. ONNX Runtime memory-maps both names onto the same file pages.

So the bundle is no bigger and holds no more in memory than the row-major export (Gemma 3 270M, the target
loaded and run: 1,168 vs 1,163 MB anonymous, 680 MB of the data file resident in both). Our MTP drafters
read the transposed table too (read_transposed: the columns of the few tokens they score exactly); a drafter
that gathers thousands of rows (fp32 head rows, a Gemma 4 assistant) keeps the `[V, H]` table as it is
(`keep_table`), for the drafter only. The quantizer undoes these rewrites (restore_rows) and quantizes the
`[V, H]` table as it would a row-major export's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .. import contract as C
from .builder import FLOAT, GraphBuilder, transpose

ALIAS = C.GEMV_ALIAS  # suffix of the overridable name of the transposed table
# The nodes of each rewrite are named "<GROUP>N/..." and the first carries the node it replaced (TAG + its
# bytes in hex), so restore_rows() can undo the rewrite for the quantizer, which works on the [V, H] table.
GROUP, TAG = "gemv_group", "edgemtp.gemv_head.replaces:"
TRANSPOSED = "edgemtp.transposed"  # external-data key restore_rows() puts on a [V, H] table over [H, V] bytes


def use_gemv_head(b: GraphBuilder, keep_table: bool = False) -> str:
    """Rewrites the graph's head (its one Gemm with transB over a [V, H] parameter) into If(rows == 1: MatMul
    over the overridable alias, else: MatMul over the transposed table), and the embedding's Gather over the
    same table (a tied head) into a Gather of the transposed table's columns. Returns the table's name."""
    heads = [i for i, n in enumerate(b.nodes) if n.op_type == "Gemm" and _is_head(b, n)]
    if len(heads) != 1:
        raise ValueError(f"graph {b.name}: expected one head Gemm, found {len(heads)}")
    i = heads[0]
    gemm = b.nodes[i]
    x, table = gemm.input[0], gemm.input[1]
    vocab, hidden = b.params[table].shape
    table_t = b.param(b.params[table].source, (hidden, vocab), transform=transpose, name=table + ".T")
    alias = b.alias(table_t + ALIAS, table_t)
    b.inputs.append(helper.make_tensor_value_info(alias, FLOAT, [hidden, vocab]))
    rows, one = b.fresh("head_rows"), b.fresh("head_one_row")
    single = helper.make_graph([helper.make_node("MatMul", [x, alias], ["gemv_logits"])], "gemv_head", [],
                               [helper.make_tensor_value_info("gemv_logits", FLOAT, None)])
    packed = helper.make_graph([helper.make_node("MatMul", [x, table_t], ["packed_logits"])], "packed_head",
                               [], [helper.make_tensor_value_info("packed_logits", FLOAT, None)])
    b.nodes[i:i + 1] = _group(b, gemm, [
        helper.make_node("Shape", [x], [rows], name=b.fresh("n_Shape"), start=0, end=1),
        helper.make_node("Equal", [rows, b.const([1], np.int64)], [one], name=b.fresh("n_Equal")),
        helper.make_node("If", [one], list(gemm.output), name=b.fresh("n_If"), then_branch=single,
                         else_branch=packed),
    ])
    _gather_columns(b, table, table_t)
    if not keep_table and not any(table in n.input for n in b.nodes):
        del b.params[table]
    return table


def _gather_columns(b: GraphBuilder, table: str, table_t: str) -> None:
    """Every Gather of `table`'s rows becomes a gather of `table_t`'s columns (column_rows)."""
    hidden = b.params[table_t].shape[0]
    nodes = []
    for n in b.nodes:
        if n.op_type == "Gather" and n.input[0] == table:
            nodes += _group(b, n, column_rows(b, table_t, n.input[1], hidden, n.output[0]))
        else:
            nodes.append(n)
    b.nodes[:] = nodes


def _group(b: GraphBuilder, original, nodes: list) -> list:
    """Names `nodes` as one rewrite group that replaces `original` (see restore_rows)."""
    group = b.fresh(GROUP)
    for n in nodes:
        n.name = f"{group}/{n.name}"
    nodes[0].doc_string = TAG + original.SerializeToString().hex()
    return nodes


def restore_rows(graph: onnx.GraphProto) -> bool:
    """Undoes use_gemv_head() / read_transposed() in a graph read back from a bundle: each rewrite group
    becomes the node it replaced again, and the transposed table `<table>.T` [H, V] the table `<table>`
    [V, H] it was made from, its external data marked TRANSPOSED (the same bytes, to be read transposed).
    The overridable alias and a kept table's transposed copy are dropped. Returns whether anything changed."""
    out, where = [], {}
    for n in graph.node:
        group = n.name.split("/", 1)[0] if n.name.startswith(GROUP) else None
        if group is None:
            out.append(n)
            continue
        if group not in where:  # the original takes the place of its group's first node
            where[group] = len(out)
            out.append(None)
        if n.doc_string.startswith(TAG):
            out[where[group]] = onnx.NodeProto.FromString(bytes.fromhex(n.doc_string[len(TAG):]))
    if not where:
        return False
    if any(n is None for n in out):
        raise ValueError(f"graph {graph.name}: a gemv-head rewrite group without the node it replaced")
    graph.ClearField("node")
    graph.node.extend(out)
    read = _reads(graph)
    stored = {t.name for t in graph.initializer}
    kept = []
    for t in graph.initializer:
        if t.name.endswith(".T") and t.name[:-2] in read and t.name[:-2] not in stored:
            t.name = t.name[:-2]
            t.dims[:] = list(t.dims)[::-1]
            t.external_data.add(key=TRANSPOSED, value="1")
        if t.name in read:  # not the alias, a kept table's transposed copy, the rewrite's constants
            kept.append(t)
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if not i.name.endswith(".T" + ALIAS)]
    graph.ClearField("input")
    graph.input.extend(inputs)
    return True


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Names the graph's nodes read, in subgraphs too, and its outputs."""
    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _reads(g)
    return names


def column_rows(b: GraphBuilder, table_t: str, ids: str, hidden: int, out: str) -> list:
    """Nodes computing out [*ids.shape, H] = table_t [H, V] columns `ids` (any shape), i.e. the rows of the
    untransposed table. GatherElements over ids broadcast to [H, n] rather than Gather on axis 1: ONNX Runtime's
    Gather copies one number at a time there, and took 2.4 ms for 72 columns of Gemma 3 270M's table where
    GatherElements took 0.30 (rows: 0.07-0.13 ms; docs/measurements.md, "Session 20")."""
    flat, wide, columns, rows, shape, ids_shape = (b.fresh(h) for h in (
        "ids_flat", "ids_wide", "columns", "rows", "rows_shape", "ids_shape"))
    node = helper.make_node
    return [node("Reshape", [ids, b.const([-1], np.int64)], [flat], name=b.fresh("n_Reshape")),
            node("Expand", [flat, b.const([hidden, 1], np.int64)], [wide], name=b.fresh("n_Expand")),  # [H, n]
            node("GatherElements", [table_t, wide], [columns], name=b.fresh("n_GatherElements"), axis=1),
            node("Transpose", [columns], [rows], name=b.fresh("n_Transpose"), perm=[1, 0]),
            node("Shape", [ids], [ids_shape], name=b.fresh("n_Shape")),
            node("Concat", [ids_shape, b.const([hidden], np.int64)], [shape], name=b.fresh("n_Concat"), axis=0),
            node("Reshape", [rows, shape], [out], name=b.fresh("n_Reshape"))]


def _is_head(b: GraphBuilder, node) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    p = b.params.get(node.input[1])
    return attrs.get("transB") == 1 and p is not None and p.transform is None and len(p.shape) == 2


def read_transposed(b: GraphBuilder, table: str) -> None:
    """Rewrites a graph that shares the target's `[V, H]` table (an MTP drafter's) to read the transposed
    table `<table>.T` of a --gemv-head target instead: each row Gather becomes a Gather of columns (any
    shape of ids), the full head's Gemm a MatMul. Parameters made from the table (its int8 rows) keep their
    source: the exporter computes them from its bytes."""
    vocab, hidden = b.params[table].shape
    table_t = b.param(b.params[table].source, (hidden, vocab), transform=transpose, name=table + ".T")
    nodes = []
    for n in b.nodes:
        if n.op_type == "Gather" and n.input[0] == table:
            nodes += _group(b, n, column_rows(b, table_t, n.input[1], hidden, n.output[0]))
        elif n.op_type == "Gemm" and n.input[1] == table and _is_head(b, n) and len(n.input) == 2:
            nodes += _group(b, n, [helper.make_node("MatMul", [n.input[0], table_t], list(n.output),
                                                    name=b.fresh("n_MatMul"))])
        else:
            nodes.append(n)
    b.nodes[:] = nodes
    if any(table in n.input for n in b.nodes):
        raise ValueError(f"graph {b.name}: '{table}' is read by an op read_transposed does not rewrite")
    del b.params[table]
