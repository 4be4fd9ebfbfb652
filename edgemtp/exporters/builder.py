"""A tiny ONNX op-builder: the graph is built without weights, weights are bound by name at save time.

Parameters are named by the checkpoint's own keys (`model.layers.0.self_attn.q_proj.weight`), so a
graph can be read against the checkpoint, and a tied head simply reuses the embedding's initializer.
`save()` then streams one tensor at a time from the checkpoint into the external-data file: export
never holds a second copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 23
MS_DOMAIN = "com.microsoft"

FLOAT, INT64, INT32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
_NP_TO_ONNX = {np.dtype(np.float32): FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): INT64, np.dtype(np.int32): INT32, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int8): TensorProto.INT8}

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Param:
    """An initializer to bind at save time: `source` is the checkpoint key it is read from."""

    name: str
    source: str | tuple[str, ...]  # a tuple: those tensors, each transformed, joined along the last axis
    shape: tuple[int, ...]
    dtype: np.dtype
    transform: Transform | None = None
    parts: tuple[int, ...] | None = None  # a joined parameter: each source's size along the last axis


@dataclass
class GraphBuilder:
    """Accumulates nodes; `op()` returns the output name(s) so graphs read like the maths."""

    name: str
    nodes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    params: dict[str, Param] = field(default_factory=dict)
    consts: list = field(default_factory=list)
    domains: set = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)  # initializer name -> the parameter whose bytes it shares
    tables: set = field(default_factory=set)  # the constants save() stores in the external data file (table())
    _count: int = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        if value != name:
            self.op("Identity", value, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def param(self, source: str | tuple[str, ...], shape, transform: Transform | None = None, name: str | None = None,
              dtype=np.float32, parts: tuple[int, ...] | None = None) -> str:
        """Declare a weight read from checkpoint key `source` (transformed, e.g. transposed, at bind), or
        from several keys joined along the last axis (`name` and each one's size there, `parts`, required)."""
        name = name or source
        if not isinstance(source, str) and (parts is None or len(parts) != len(source) or sum(parts) != shape[-1]):
            raise ValueError(f"parameter {name}: give each joined tensor's size along the last axis")
        p = Param(name, source, tuple(int(s) for s in shape), np.dtype(dtype), transform,
                  None if parts is None else tuple(int(n) for n in parts))
        old = self.params.get(name)
        if old is not None and old != p:
            raise ValueError(f"parameter {name} declared twice with different meaning")
        self.params[name] = p
        return name

    def const(self, value, dtype=np.float32, hint: str = "const") -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.consts.append(numpy_helper.from_array(arr, name))
        return name

    def table(self, value, hint: str) -> str:
        """A computed constant that save() stores in the external data file, not the graph file: ONNX Runtime
        copies a graph file's tensors onto its heap as it loads, but maps an external one and reads only the
        pages a run touches. For tables whose size grows with the KV capacity (RoPE's cos / sin of every
        position, 67 MB at 32,768 for Gemma 3 270M), of which a generation reads the rows of its positions."""
        name = self.const(value, hint=hint)
        self.tables.add(name)
        return name

    def op(self, op_type: str, *inputs: str | None, out: str | None = None, n_out: int = 1,
           domain: str = "", **attrs):
        if domain:
            self.domains.add(domain)
        if out is not None:
            outs = [out]
        else:
            base = self.fresh(op_type.lower())
            outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], outs,
                                           name=self.fresh("n_" + op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else tuple(outs)

    def alias(self, name: str, param: str) -> str:
        """A second initializer over the bytes of `param` (save() points both at the same external data)."""
        self.aliases[name] = param
        return name

    def model(self) -> onnx.ModelProto:
        """The graph with weight placeholders (no data): enough for shape checks and op listing."""
        inits = [_placeholder(p) for p in self.params.values()]
        inits += [_placeholder(replace(self.params[p], name=name)) for name, p in self.aliases.items()]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits + self.consts)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        m = helper.make_model(graph, opset_imports=opsets, producer_name="edgemtp")
        m.ir_version = 10
        return m


def _placeholder(p: Param) -> TensorProto:
    t = TensorProto()
    t.name = p.name
    t.data_type = _NP_TO_ONNX[p.dtype]
    t.dims.extend(p.shape)
    return t


ROWS_BYTES = 256 << 20  # a tensor bigger than this is read and written in row blocks, never whole,
BLOCK_BYTES = 32 << 20  # each of at most this many bytes (or ROWS_BYTES, if smaller)


def phase(progress: Callable[[int, int, str], None] | None, label: str):
    """`progress(done, total, what)` reporting `label` as what is being done (the CLI's bar shows it)."""
    if progress is None:
        return None
    return lambda done, total, what="": progress(done, total, label)


def save(b: GraphBuilder, path: Path, read: Callable[[str], np.ndarray],
         progress: Callable[[int, int, str], None] | None = None,
         read_rows: Callable[[str, np.ndarray], np.ndarray] | None = None) -> list[str]:
    """Write `path` and its external data `path.name + '.data'`, one tensor at a time.

    A big tensor (over ROWS_BYTES: an embedding table; E2B's per-layer table is 9.4 GB in fp32) is read with
    `read_rows(source, row_ids)` (default: rows of `read(source)`) and written in row blocks, never whole;
    so is a big transposed one (the head table of a --gemv-head export: _write_transposed). The graph's
    tables (GraphBuilder.table) follow the parameters.
    Returns the file names written (relative to the directory of `path`)."""
    path = Path(path)
    if read_rows is None:
        def read_rows(source: str, ids: np.ndarray) -> np.ndarray:
            return read(source)[ids]
    data_name = path.name + ".data"
    model = b.model()
    by_name = {t.name: t for t in model.graph.initializer}
    params = list(b.params.values())
    with open(path.parent / data_name, "wb") as f:
        for i, p in enumerate(params):
            offset = _align(f)
            row_bytes = int(np.prod(p.shape[1:], dtype=np.int64)) * p.dtype.itemsize
            big = isinstance(p.source, str) and row_bytes * p.shape[0] > ROWS_BYTES
            step = max(1, min(ROWS_BYTES, BLOCK_BYTES) // max(row_bytes, 1))
            if big and p.transform is None:
                for start in range(0, p.shape[0], step):
                    ids = np.arange(start, min(start + step, p.shape[0]))
                    _write(f, p, read_rows(p.source, ids), (len(ids), *p.shape[1:]))
            elif big and p.transform is transpose and len(p.shape) == 2:  # a --gemv-head export's [H, V] head
                _write_transposed(f, p, read_rows)
            else:
                _write(f, p, read_param(p, read), p.shape)
            _set_external(by_name[p.name], data_name, offset, f.tell() - offset)
            if progress:
                progress(i + 1, len(params), p.name)
        for t in model.graph.initializer:
            if t.name in b.tables:
                offset = _align(f)
                f.write(numpy_helper.to_array(t).tobytes())
                t.ClearField("raw_data")
                _set_external(t, data_name, offset, f.tell() - offset)
    for name, p in b.aliases.items():
        by_name[name].external_data.extend(by_name[p].external_data)
        by_name[name].data_location = TensorProto.EXTERNAL
    onnx.save(model, str(path))
    return [path.name, data_name]


def sources(p: Param) -> tuple[str, ...]:
    return (p.source,) if isinstance(p.source, str) else p.source


def part_shapes(p: Param) -> list[tuple[int, ...]]:
    """Each source tensor's shape after the transform (a joined parameter's parts split its last axis)."""
    if p.parts is None:
        return [p.shape]
    return [(*p.shape[:-1], n) for n in p.parts]


def read_param(p: Param, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """The parameter's value: its checkpoint tensor(s), transformed, joined along the last axis."""
    parts = []
    for key, shape in zip(sources(p), part_shapes(p)):
        arr = read(key) if p.transform is None else p.transform(read(key))
        if tuple(arr.shape) != shape:
            raise ValueError(f"tensor '{key}' has shape {list(arr.shape)} (as bound), the graph expects {list(shape)}")
        parts.append(arr)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def _write(f, p: Param, arr: np.ndarray, shape: tuple) -> None:
    arr = np.ascontiguousarray(arr, dtype=p.dtype)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{p.source}: shape {arr.shape} in the checkpoint, graph expects {p.shape}")
    f.write(memoryview(arr.reshape(-1)).cast("B"))


def _write_transposed(f, p: Param, read_rows: Callable[[str, np.ndarray], np.ndarray]) -> None:
    """Writes p = the transpose [H, V] of the checkpoint's [V, H] tensor p.source at f's position, from
    blocks of its rows (each a copy, read once) scattered into the file as H runs. Reading [V, H] row blocks
    rather than [H, V] ones (columns of the checkpoint's tensor) keeps the table out of memory: a block of
    columns maps pages all over a memory-mapped table, which then counted in the export's peak RSS (661 MB of
    Gemma 3 270M's 1.09 GB; docs/measurements.md, "Session 23")."""
    hidden, vocab = p.shape
    size = p.dtype.itemsize
    start = f.tell()
    step = max(1, min(ROWS_BYTES, BLOCK_BYTES) // (hidden * size))  # rows of the checkpoint's tensor
    for first in range(0, vocab, step):
        ids = np.arange(first, min(first + step, vocab))
        rows = np.asarray(read_rows(p.source, ids), dtype=p.dtype)
        if rows.shape != (len(ids), hidden):
            raise ValueError(f"{p.source}: shape {rows.shape[1:]} in the checkpoint's rows, graph expects "
                             f"[{vocab}, {hidden}] transposed")
        columns = np.ascontiguousarray(rows.T)  # [H, n]: run h goes to row h of the [H, V] table
        for h in range(hidden):
            f.seek(start + (h * vocab + first) * size)
            f.write(memoryview(columns[h]).cast("B"))
    f.seek(start + hidden * vocab * size)


def _align(f, alignment: int = 64) -> int:
    pos = f.tell()
    pad = (-pos) % alignment
    if pad:
        f.write(b"\0" * pad)
    return pos + pad


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v


def share_weights(b: GraphBuilder, source: Path) -> onnx.ModelProto:
    """b's model with every parameter pointing at the same-named initializer's bytes in the graph file
    `source` (its external data): a second graph over weights already written, nothing copied."""
    stored = {t.name: t for t in onnx.load(str(source), load_external_data=False).graph.initializer}
    model = b.model()
    for t in model.graph.initializer:
        if t.name not in b.params and t.name not in b.aliases:  # a constant, stored in the graph itself (a
            continue  # table() too: the graphs that share weights, the verify graph and drafters, have none)
        if t.name not in stored:
            raise ValueError(f"{source}: has no initializer '{t.name}' to share")
        if (list(t.dims), t.data_type) != (list(stored[t.name].dims), stored[t.name].data_type):
            # the bytes are the other graph's, bound with its transform: a second graph must declare the same
            raise ValueError(f"{source}: initializer '{t.name}' is {list(stored[t.name].dims)} of type "
                             f"{stored[t.name].data_type}, this graph declares {list(t.dims)} of type {t.data_type}")
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.extend(stored[t.name].external_data)
    return model


def transpose(w: np.ndarray, step: int = 256) -> np.ndarray:
    """HF Linear weights are [out, in]; MatMul wants [in, out]. Copied `step` rows at a time, so what is read
    and written stays in the cache: numpy's whole-matrix transposed copy took 1.4-6.6 s for Gemma 3 270M's
    [262144, 640] table (a --gemv-head export's head), this 0.25-0.35 s."""
    if w.ndim != 2:
        return np.ascontiguousarray(w.T)
    out = np.empty(w.shape[::-1], w.dtype)
    for start in range(0, w.shape[0], step):
        out[:, start:start + step] = w[start:start + step].T
    return out


def plus_one(w: np.ndarray) -> np.ndarray:
    """Gemma's RMSNorm multiplies by (1 + w); fold the 1 in at bind time."""
    return w.astype(np.float32) + 1.0
