"""The graph rewrite behind quantize_graph(): which weight becomes what, written one weight at a time.

MatMul -> MatMulNBits (optionally behind a smoothing Mul and two-pass activations) or, with layer_op
integer, MatMulIntegerToFloat; the head Gemm -> MatMulNBits over the table's row parts (or, with head_op
integer, MatMulIntegerToFloat over int8 columns whose top logits the row parts rescore), Gather ->
GatherBlockQuantized over the same parts. Weights are packed as they are read (row chunks for the big
tables) and streamed to the new data file. What the rewrite shares between graphs (quantgraph.Shared)
and the float rewrite are in quantgraph.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ArgumentError
from . import quantnodes as QN
from .blockquant import CHUNK_ELEMENTS, pack_zero_points, quantize_chunks, unpack
from .head import ROW_DOTS
from .quant_options import check_two_pass_width
from .quantgraph import Shared, Sink, Table, activation_sources, renamed, replace_all, role, source_key

PROGRESS_UNIT = 1_000_000  # "quantizing weights" counts the weights' bytes in MB


class Rewrite:
    """One pass over the initializers (packing the quantized ones), then one over the nodes."""

    def __init__(self, g: onnx.GraphProto, read, sink: Sink, sch, calib, progress, shared: Shared | None = None,
                 own: tuple[str, ...] = ("matmul", "head", "gather"), target: bool = True):
        """`shared`: what earlier graphs of the bundle made of their tensors (reused, and added to);
        `own`: the roles this graph quantizes itself; tables an earlier graph packed are reused whatever
        their role (a drafter reads the target's table and quantizes its MatMuls, or nothing, itself).
        `target`: the target's graph, whose layers must all take two-pass activations when asked (its verify
        windows and single steps must round alike); a drafter's layer that cannot goes without (the target
        checks every draft)."""
        self.g, self.read, self.sink, self.sch, self.calib, self.progress = g, read, sink, sch, calib, progress
        self.target = target
        self.shared, self.own = shared if shared is not None else Shared(), own
        self.inits = {t.name: t for t in g.initializer}
        self.sources = activation_sources(g)
        self.new_inits: list[TensorProto] = []
        self.emit: dict[tuple[str, str], Callable] = {}  # (weight, kind) -> node -> replacement nodes
        # progress counts the weights' bytes, advanced chunk by chunk inside a matrix: one table can take
        # most of the time (Gemma 3 270M's 4-bit table with GPTQ: ~1 min of ~2)
        self.done, self.total = 0, sum(_nbytes(t) for t in g.initializer)
        self.once: dict[str, str] = {}  # cache of per-activation subgraph outputs (smoothing, two-pass)

    def run(self) -> None:
        roles = [role(n, self.inits) for n in self.g.node]
        # GatherBlockQuantized wants whole blocks along the row: otherwise that Gather stays fp32
        roles = [None if r and r[0] == "gather" and self.inits[r[1]].dims[1] % self.sch.head_block_size else r
                 for r in roles]
        roles = [r if r and (r[0] in self.own or self._table_of(self.inits[r[1]])) else None for r in roles]
        uses: dict[str, dict[str, list]] = {}
        float_users = set()
        for node, r in zip(self.g.node, roles):
            for name in node.input:
                if r is not None and name == r[1]:
                    uses.setdefault(name, {}).setdefault(r[0], []).append(node)
                elif name in self.inits:
                    float_users.add(name)
        for t in list(self.g.initializer):
            start = self.done
            if t.name in uses:
                self._weight(t, uses[t.name])
            if t.name not in uses or t.name in float_users:
                self.new_inits.append(self._float(t))
            self.done = start + _nbytes(t)  # whatever its chunks counted
            self._report()
        dots = {}  # MatMul's output -> (its Gather, the table, h); nodes go by output name (SSA)
        for n, r in zip(self.g.node, roles):
            if r and r[0] == "gather" and (r[1], "dot") in self.emit:
                matmul, h = self._dot_after(n)
                if matmul is not None:
                    dots[matmul.output[0]] = (n, r[1], h)
        fused = {gather.output[0] for gather, _, _ in dots.values()}
        nodes = []
        for n, r in zip(self.g.node, roles):
            first = n.output[0] if n.output else None
            if first in dots:  # the gather's MatMul: both become one table_dot, here, where h exists
                gather, weight, h = dots[first]
                nodes += self.emit[weight, "dot"](gather, h, first)
            elif first not in fused:
                nodes += [n] if r is None else self.emit[r[1], r[0]](n)
        replace_all(self.g, self.new_inits, nodes)

    def _dot_after(self, gather: onnx.NodeProto) -> tuple[onnx.NodeProto | None, str | None]:
        """(MatMul, h) when the gathered rows' one use is MatMul(rows, Unsqueeze(h, [-1])) marked ROW_DOTS by
        the exporter (head.exact_logits: ids [N, K], h [N, d], no broadcasting, which table_dot relies on):
        each row dotted with its h, as a drafter's head scores its candidates; (None, None) otherwise."""
        rows = gather.output[0]
        users = [n for n in self.g.node if rows in n.input]
        if any(o.name == rows for o in self.g.output) or len(users) != 1:
            return None, None
        matmul = users[0]
        if matmul.doc_string != ROW_DOTS or list(matmul.input) != [rows, matmul.input[1]]:
            return None, None
        col = next((n for n in self.g.node if matmul.input[1] in n.output), None)
        axes = self.inits.get(col.input[1]) if col is not None and col.op_type == "Unsqueeze" else None
        if axes is None or onnx.numpy_helper.to_array(axes).tolist() != [-1]:
            return None, None
        return matmul, col.input[0]

    def _report(self) -> None:
        if self.progress:  # done / total in MB (PROGRESS_UNIT)
            total = -(-self.total // PROGRESS_UNIT)
            self.progress(total if self.done >= self.total else self.done // PROGRESS_UNIT, total, "quantizing weights")

    # ------------------------------------------------------------------------------- weights

    def _float(self, t: TensorProto) -> TensorProto:
        """t copied to the new data file, or pointing at the copy an earlier graph already wrote."""
        key = source_key(t)
        if key is None:
            return t
        made = self.shared.floats.get(key)
        if made is not None and not made[1]:
            return renamed(made[0], t.name)
        new = self.sink.write(t.name, self.read(t))
        self.shared.floats[key] = (new, False)
        return new

    def _table_of(self, t: TensorProto) -> Table | None:
        key = source_key(t)
        return None if key is None else self.shared.tables.get(key)

    def _weight(self, t: TensorProto, uses: dict[str, list]) -> None:
        if "matmul" in uses:
            self._matmul(t, uses["matmul"])
        if uses.keys() & {"head", "gather"}:
            table = self._table_of(t)
            integer = "head" in uses and "head" in self.own and self.sch.head_op == "integer"
            if table is not None and (not integer or table.columns is not None):
                # the head is the integer one wherever the table has columns (it then only gathers rows)
                self._add_zero_points(table, matmul="head" in uses and table.columns is None,
                                      gather="gather" in uses or "head" in uses and table.columns is not None)
                have = {x.name for x in self.new_inits}
                self.new_inits += [x for x in table.protos if x.name not in have]
                self._emit_table(t.name, table.parts, table.order, table.columns)
                return
            start = len(self.new_inits)
            parts, order, columns = self._table(t, uses)
            key = source_key(t)
            if key is not None:
                self.shared.tables[key] = Table(parts, order, self.new_inits[start:], columns)

    def _add_zero_points(self, table: Table, matmul: bool, gather: bool) -> None:
        """The zero points of a reused table in the layout this graph reads and the graph that packed it did not
        write (pack writes each only for its own uses), derived from the other layout and written to this graph's
        file; `table` then holds them for the graphs after (an untied target gathers its embedding, the MTP
        drafter's tied head multiplies by it)."""
        for i, p in enumerate(table.parts):
            if p.zero_points is None and p.gather_zero_points is None:  # symmetric: none
                continue
            kb = -(-p.k // p.block)
            if matmul and p.zero_points is None:
                z = self._written(table, p.gather_zero_points)[..., 0]
                proto = self.sink.write(p.data + ".zero_points", pack_zero_points(z, p.bits))
                p = replace(p, zero_points=proto.name)
                table.protos.append(proto)
            if gather and p.gather_zero_points is None:
                z = unpack(self._written(table, p.zero_points), p.bits, kb)[..., None]
                proto = self.sink.write(p.data + ".gather_zero_points", z.astype(np.uint8))
                p = replace(p, gather_zero_points=proto.name)
                table.protos.append(proto)
            table.parts[i] = p

    def _written(self, table: Table, name: str) -> np.ndarray:
        """A uint8 tensor of `table` as written to a data file beside this graph's (its own, or an earlier graph's)."""
        t = next(x for x in table.protos if x.name == name)
        info = {e.key: e.value for e in t.external_data}
        self.sink.f.flush()
        path = Path(self.sink.f.name).parent / info["location"]
        return np.fromfile(path, np.uint8, int(info["length"]), offset=int(info["offset"])).reshape(tuple(t.dims))

    def _stats(self, x: str):
        src = self.sources.get(x)
        return None if self.calib is None or src is None else self.calib.stats.get(src)

    def _matmul(self, t: TensorProto, users: list) -> None:
        """W [K, N] (stored for x @ W) -> MatMulNBits over W^T's rows."""
        sch, (k, n) = self.sch, t.dims
        bits, block = sch.bits_for("matmul", t.name), sch.block_for("matmul")
        xs = {u.input[0] for u in users}
        st = self._stats(next(iter(xs))) if len(xs) == 1 else None
        s = smoothing_scale(st.amax, sch.smooth) if st is not None and sch.smooth > 0 else None
        w = self.read(t).T  # [N, K]
        if s is not None:
            w = w * s[None, :]
        importance = hessian = None
        if st is not None:
            importance = st.mean_square if s is None else st.mean_square / s ** 2
            if sch.gptq and st.hessian is not None:
                hessian = st.hessian if s is None else st.hessian / np.outer(s, s)
        integer = sch.layer_op == "integer" and bits == 8
        if integer:
            w_int, w_scales = self._int8_columns(t.name, lambda a, b: w[a:b], n, k, importance, hessian)
        else:
            p = self.pack(t.name, lambda a, b: w[a:b], n, k, bits, block, importance, hessian, gather=False)
        # an integer layer rounds its activations per row (QN.integer_activations): no blocks, no two passes
        level = sch.accuracy_level
        two = sch.two_pass in ("all", "layers") and sch.accuracy_level == 4 and not integer
        if two and k % block and not self.target:  # a drafter's layer goes without (its drafts are checked)
            two = False
        elif two:  # check_widths ran before any work; leaving the passes out would break exactness
            check_two_pass_width(block, k, t.name)

        def emit(node):
            nodes, x = [], node.input[0]
            if s is not None:
                x = self._once(x + ".smoothed", nodes, lambda out: [
                    QN.smooth(node.input[0], self._const(out + ".inv_s", (1.0 / s).astype(np.float32)), out,
                              out + "_n")])
            if integer:
                xq = self._once(f"{x}.integer", nodes, lambda out: QN.integer_activations(x, out)[::2])
                zero = self._once("edgemtp.int_zero", nodes, lambda out: [
                    QN.const(out, np.array(QN.INT_ZERO, np.uint8))])
                return nodes + QN.integer_matmul(xq, f"{x}.integer.scales", zero, w_int, w_scales, node.output[0],
                                                 node.name + "_i")
            if not two:
                return nodes + [QN.matmul_nbits(x, p, node.output[0], node.name + "_q", level)]
            x2 = self._once(f"{x}.two_pass{block}", nodes, lambda out: QN.two_pass(x, k, block, out))
            y = node.output[0] + ".passes"
            return nodes + [QN.matmul_nbits(x2, p, y, node.name + "_q", level)] + \
                QN.sum_halves(y, node.output[0], node.name + "_sum")
        self.emit[t.name, "matmul"] = emit

    def _int8_columns(self, name: str, rows, n: int, k: int, importance, hessian, unit: int = 4) -> tuple[str, str]:
        """rows(start, stop) of W^T [n, k] -> (int8 W [k, n], fp32 scales [n]): each output column on its own
        symmetric 8-bit grid (the block quantizer with one block per row: its grid search, and GPTQ when
        calibrated). The levels go to a scratch file beside the output ([n, k] int8) and are written
        transposed a stripe at a time. `unit`: progress bytes per weight."""
        scales, start = [], 0
        where = getattr(self.sink.f, "name", None)
        with tempfile.TemporaryFile(dir=os.path.dirname(where) or None if isinstance(where, str) else None) as scratch:
            levels = np.memmap(scratch, np.int8, "w+", shape=(n, k))  # on disk: a big table's levels need not fit
            for q, s, _ in quantize_chunks(rows, n, k, 8, k, True, importance=importance, hessian=hessian):
                levels[start:start + len(q)] = (q.reshape(len(q), k).astype(np.int16) - 128).astype(np.int8)
                start += len(q)
                scales.append(s.reshape(-1))
                self.done += unit * len(q) * k
                self._report()
            stripe = max(1, CHUNK_ELEMENTS // n)
            data = self.sink.stream(f"{name}.int8", np.int8, (k, n),
                                    (levels[:, a:a + stripe].T for a in range(0, k, stripe)))
            del levels
        s = self.sink.write(f"{name}.int8.scales", np.concatenate(scales).astype(np.float32))
        self.new_inits += [data, s]
        return data.name, s.name

    def _table(self, t: TensorProto, uses: dict[str, list]) -> tuple[list, str | None, tuple[str, str] | None]:
        """A head and/or embedding table [V, K]: one or two row parts (the frequent rows at 8 bits), and
        with head_op integer the head's int8 columns. Returns the parts, the vocab -> row tensor (None
        when not split) and the columns (None without)."""
        sch, calib, (v, k) = self.sch, self.calib, t.dims
        kind = "head" if "head" in uses else "gather"
        bits, block = sch.bits_for(kind, t.name), sch.block_for(kind)
        st = self._stats(uses["head"][0].input[0]) if "head" in uses else None
        importance = None if st is None else st.mean_square
        hessian = st.hessian if st is not None and sch.gptq else None
        integer = "head" in uses and "head" in self.own and sch.head_op == "integer"
        if integer and k % block:
            raise ArgumentError("head_op", sch.head_op, f"rescores whole rows of {block}-blocks: the hidden size "
                                f"{k} of '{t.name}' is not a multiple of the block size {block}")
        gather = "gather" in uses or integer  # the integer head rescores its top rows through gathers
        matmul = "head" in uses and not integer  # the head's MatMulNBits
        unit = 2 if integer else 4  # progress: the table is read twice, each pass counts half its bytes
        r = sch.frequent_rows if "head" in uses and bits < 8 and calib is not None and calib.order is not None else 0
        if 0 < r < v:
            first, rest = np.sort(calib.order[:r]), np.sort(calib.order[r:])
            parts = [self.pack(t.name + ".frequent", lambda a, b: self.read.take(t, first[a:b]), r, k, 8, block,
                               importance, hessian, gather, unit, matmul),
                     self.pack(t.name + ".rest", lambda a, b: self.read.take(t, rest[a:b]), v - r, k, bits, block,
                               importance, hessian, gather, unit, matmul)]
            row_of = np.empty(v, np.int64)
            row_of[first], row_of[rest] = np.arange(r), np.arange(r, v)
            order = self._const(t.name + ".row_of", row_of)
        else:
            parts = [self.pack(t.name, lambda a, b: self.read.rows(t, a, b), v, k, bits, block, importance, hessian,
                               gather, unit, matmul)]
            order = None
        columns = self._int8_columns(t.name, lambda a, b: self.read.rows(t, a, b), v, k, importance, hessian,
                                     unit) if integer else None
        self._emit_table(t.name, parts, order, columns)
        return parts, order, columns

    def _emit_table(self, name: str, parts: list, order: str | None, columns: tuple[str, str] | None) -> None:
        sch, k, block = self.sch, parts[0].k, parts[0].block
        two = block if sch.two_pass in ("head", "all") and sch.accuracy_level == 4 and k % block == 0 else None
        if columns is not None:
            refine = min(QN.REFINE, sum(p.n for p in parts))
            self.emit[name, "head"] = lambda node: QN.integer_head(node.input[0], *columns, parts, order,
                                                                   node.output[0], node.name, refine)
        else:
            self.emit[name, "head"] = lambda node: QN.head(node.input[0], parts, node.output[0], node.name,
                                                            sch.accuracy_level, two, order)
        self.emit[name, "gather"] = lambda node: QN.table_gather(node.input[1], parts, node.output[0], node.name,
                                                                 order)
        if order is not None:  # a split table: score gathered rows in their parts (QN.table_dot)
            self.emit[name, "dot"] = lambda node, h, out: QN.table_dot(node.input[1], h, parts, out, node.name, order)

    def pack(self, name: str, rows, n: int, k: int, bits: int, block: int, importance, hessian,
             gather: bool, unit: int = 4, matmul: bool = True) -> QN.Packed:
        """Quantize rows(start, stop) of an [n, k] matrix chunk by chunk, streaming the packed data. `matmul` /
        `gather`: MatMulNBits / GatherBlockQuantized read it (which zero points to write)."""
        sym = self.sch.symmetric_for(bits)
        scales, zps = [], []

        def packed():
            for q, s, z in quantize_chunks(rows, n, k, bits, block, sym, importance=importance, hessian=hessian):
                scales.append(s)
                zps.append(z)
                self.done += unit * len(q) * k
                self._report()
                yield q
        kb = -(-k // block)
        data = self.sink.stream(f"{name}.q{bits}b{block}", np.uint8, (n, kb, block * bits // 8), packed())
        self.new_inits.append(data)
        s = self.sink.write(f"{name}.q{bits}b{block}.scales", np.concatenate(scales))
        self.new_inits.append(s)
        zp = gzp = None
        if not sym:
            z = np.concatenate(zps)
            # each layout only where a node of this graph reads it (an untied int4 embedding, gathered only, stored
            # MatMulNBits' for nothing: ~37 MB of Gemma 4 E2B's per-layer table); _add_zero_points adds the other
            # for a later graph that reads it
            if matmul:
                self.new_inits.append(self.sink.write(f"{name}.q{bits}b{block}.zero_points", z))
                zp = self.new_inits[-1].name
            if gather:
                g = unpack(z, bits, kb)[..., None].astype(np.uint8)
                self.new_inits.append(self.sink.write(f"{name}.q{bits}b{block}.gather_zero_points", g))
                gzp = self.new_inits[-1].name
        return QN.Packed(data.name, s.name, zp, gzp, bits, block, n, k)

    # ------------------------------------------------------------------------------- helpers

    def _const(self, name: str, value: np.ndarray) -> str:
        self.new_inits.append(self.sink.write(name, value))
        return name

    def _once(self, key: str, nodes: list, make: Callable[[str], list]) -> str:
        """A subgraph shared by every consumer of one activation, emitted before its first consumer."""
        if key not in self.once:
            made = make(key)
            if isinstance(made, tuple):  # (output, nodes)
                self.once[key], made = made
            else:
                self.once[key] = key
            nodes += made
        return self.once[key]


def _nbytes(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def smoothing_scale(amax: np.ndarray, alpha: float) -> np.ndarray:
    """s = max|x|^alpha per channel, geometric mean 1 (channels never seen non-zero keep s = 1)."""
    live = amax > 0
    s = np.ones_like(amax, dtype=np.float64)
    s[live] = amax[live].astype(np.float64) ** alpha
    s[live] /= np.exp(np.log(s[live]).mean())
    return s.astype(np.float32)
