"""The few facts loading a bundle reads from an ONNX file, and the one tiny graph the bandwidth probe builds,
straight from the protobuf wire format: the runtime then needs no `onnx` package (numpy + onnxruntime +
tokenizers, as DESIGN.md promises an app embedding it), and a load skips `import onnx` (~0.5 s).

Only what the checks need is decoded: the graph's inputs and outputs (names, shapes), the external data
files its initializers name, each GroupQueryAttention's past key and sliding window, and which names the
nodes (in subgraphs too) read whole rather than at rows. Everything else (weights stored inline, other
nodes' attributes) is skipped by its length. Field numbers are onnx.proto3's.
tests/test_onnx_wire.py checks every fact against the onnx package on the bundles the tests export."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

VARINT, I64, LEN, START_GROUP, END_GROUP, I32 = 0, 1, 2, 3, 4, 5

# onnx.proto3 field numbers
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 5, 11, 12
NODE_INPUT, NODE_OUTPUT, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 2, 4, 5
ATTRIBUTE_NAME, ATTRIBUTE_I, ATTRIBUTE_G, ATTRIBUTE_GRAPHS = 1, 3, 6, 11
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_EXTERNAL_DATA = 1, 2, 8, 13
ENTRY_KEY, ENTRY_VALUE = 1, 2
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE = 1, 2
SHAPE_DIM = 1
DIM_VALUE, DIM_PARAM = 1, 2


# The inputs an op reads only at rows (those its indices or positions pick): a decode step reads a few rows
# of such a table, not the whole (runtime/bandwidth.py). GatherElements: a --gemv-head table's columns
# (exporters/gemv_head.column_rows); GatherBlockQuantized: a packed table, its scales and zero points;
# GroupQueryAttention: the cos / sin caches [capacity, R/2] it rotates with, at the new positions.
ROW_READS = {b"Gather": (0,), b"GatherElements": (0,), b"GatherBlockQuantized": (0, 2, 3),
             b"GroupQueryAttention": (7, 8)}
# An op ONNX Runtime folds into a constant where its input is one (the packed table's scales reach
# GatherBlockQuantized through an Unsqueeze): its input is read as its output is.
FOLDED = b"Unsqueeze"
LAST_SLOT = max(i for slots in ROW_READS.values() for i in slots)


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class GraphFacts:
    inputs: dict = field(default_factory=dict)  # name -> dims: int, a symbolic name, or None
    outputs: dict = field(default_factory=dict)
    data_files: list = field(default_factory=list)  # the initializers' external data locations, sorted
    # initializer name -> its external data entries {key: value} (a key given twice: the last), for each
    # initializer that has any and whose name and entries are UTF-8 (runtime/head_pages.py finds the bytes a
    # table's name points at)
    external: dict = field(default_factory=dict)
    # the same initializers' (data type, dims): the bytes of a table are given only where they are read as one
    external_types: dict = field(default_factory=dict)
    windows: dict = field(default_factory=dict)  # GroupQueryAttention's past key input -> window (None: global)
    # the names in `external` that no node reads whole, in the graph or its subgraphs (an If's branches):
    # each node that reads one reads it at rows (ROW_READS), or through a FOLDED op whose output is read so,
    # or none reads it at all (runtime/bandwidth.py leaves their bytes out of a decode step's)
    read_at_rows: set = field(default_factory=set)


def read_graph_facts(path: Path) -> GraphFacts:
    """GraphFacts of the ONNX file at `path`; WireError if it is not a well-formed one.

    Read as protobuf reads it (onnx.load): a field of a known number but another wire type is an unknown
    field, skipped; a sub-message given twice is the two merged (their repeated fields joined, a later
    scalar winning); of a oneof (a dim's value or parameter, a type's kind) the last one set holds."""
    data = Path(path).read_bytes()
    graphs = [v for n, v in fields(data) if n == MODEL_GRAPH and isinstance(v, memoryview)]
    if not graphs:
        raise WireError("no graph")
    facts, files = GraphFacts(), set()
    whole, folded = set(), {}
    for number, value in _merged(graphs):
        if not isinstance(value, memoryview):
            continue
        if number == GRAPH_INPUT:
            name, dims = _value_info(value)
            facts.inputs[name] = dims
        elif number == GRAPH_OUTPUT:
            name, dims = _value_info(value)
            facts.outputs[name] = dims
        elif number == GRAPH_INITIALIZER:
            name, entries, data_type, dims = _external_entries(value)
            files.update(_text(v) for k, v in entries if k == b"location")
            try:  # names and entries as text; one that is not UTF-8 (onnx and ONNX Runtime take it) is left out
                named = (_text(name), {_text(k): _text(v) for k, v in entries})
            except UnicodeDecodeError:
                continue
            if entries:
                facts.external[named[0]] = named[1]
                facts.external_types[named[0]] = (data_type, dims)
        elif number == GRAPH_NODE:
            node = _node(value)
            _attention_window(node, facts.windows)
            _node_reads(node, whole, folded)
    facts.data_files = sorted(files)
    whole = _through_folded(whole | {name.encode() for name in facts.outputs}, folded)
    facts.read_at_rows = {name for name in facts.external if name.encode() not in whole}
    return facts


class _Fixed(int):
    """A fixed-width (I32 / I64) field's value: no varint field of the schema reads it."""


def fields(buf: memoryview | bytes):
    """(field number, value) of each field of a message: an int for varints and fixed-width numbers (the
    latter a _Fixed), a memoryview of the bytes for length-delimited fields (strings, sub-messages); groups
    (a deprecated wire type none of onnx's fields is) are skipped."""
    buf = memoryview(buf)
    i = 0
    while i < len(buf):
        number, kind, value, i = _field(buf, i)
        if kind == START_GROUP:
            i = _skip_group(buf, i, number)
        elif kind == END_GROUP:
            raise WireError("a group's end without its start")
        else:
            yield number, value


def _field(buf: memoryview, i: int) -> tuple:
    """(number, wire type, value, offset after) of the field at `i`; a group's start or end has no value."""
    key, i = _varint(buf, i)
    number, kind = key >> 3, key & 7
    if number == 0:
        raise WireError("field number 0")
    value = None
    if kind == VARINT:
        value, i = _varint(buf, i)
    elif kind == LEN:
        size, i = _varint(buf, i)
        if size > len(buf) - i:
            raise WireError("a field runs past the end")
        value, i = buf[i:i + size], i + size
    elif kind in (I64, I32):
        width = 8 if kind == I64 else 4
        if i + width > len(buf):
            raise WireError("a field runs past the end")
        value, i = _Fixed(int.from_bytes(buf[i:i + width], "little")), i + width
    elif kind not in (START_GROUP, END_GROUP):
        raise WireError(f"wire type {kind}")
    return number, kind, value, i


def _skip_group(buf: memoryview, i: int, number: int) -> int:
    """The offset after the group `number` that starts at `i` (nested groups and all)."""
    open_groups = [number]
    while open_groups:
        if i >= len(buf):
            raise WireError("a group runs past the end")
        n, kind, _, i = _field(buf, i)
        if kind == START_GROUP:
            open_groups.append(n)
        elif kind == END_GROUP:
            if n != open_groups[-1]:
                raise WireError(f"wire type {kind}")
            open_groups.pop()
    return i


def _merged(parts):
    """The fields of the sub-messages `parts` (each occurrence of one singular message field) as protobuf
    merges them: the fields of one, then of the next."""
    for part in parts:
        yield from fields(part)


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireError("a truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, i  # as protobuf: a tenth byte's bits above the 64th dropped
        shift += 7


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _is_varint(v) -> bool:
    return type(v) is int


def _text(v: memoryview) -> str:
    return bytes(v).decode("utf-8")


TYPE_ONEOF = (1, 4, 5, 7, 8, 9)  # TypeProto's value: tensor, sequence, map, opaque, sparse tensor, optional


def _value_info(buf: memoryview) -> tuple[str, list]:
    name, types = "", []
    for number, value in fields(buf):
        if not isinstance(value, memoryview):
            continue
        if number == VALUE_NAME:
            name = _text(value)
        elif number == VALUE_TYPE:
            types.append(value)
    tensor_types = []
    for number, value in _merged(types):
        if isinstance(value, memoryview) and number in TYPE_ONEOF:  # another kind of type drops a tensor's
            tensor_types = tensor_types + [value] if number == TYPE_TENSOR else []
    shapes = [s for n, s in _merged(tensor_types) if n == TENSOR_TYPE_SHAPE and isinstance(s, memoryview)]
    return name, [_dim(d) for n, d in _merged(shapes) if n == SHAPE_DIM and isinstance(d, memoryview)]


def _dim(buf: memoryview):
    dim = None
    for number, v in fields(buf):
        if number == DIM_VALUE and _is_varint(v):
            dim = _signed(v)
        elif number == DIM_PARAM and isinstance(v, memoryview):
            dim = _text(v) or None
    return dim


def _external_entries(buf: memoryview) -> tuple[bytes, list, int, list]:
    """A TensorProto's (name, [(key, value) of each external data entry], data type, dims), name and entries as
    bytes, decoded by the caller (a weight's name need not be UTF-8: onnx.proto is proto2); a missing key or
    value reads b"". Dims come packed or one by one, joined in order, as protobuf reads a repeated int64."""
    name, entries, data_type, dims = b"", [], 0, []
    for number, value in fields(buf):
        if number == TENSOR_DIMS and _is_varint(value):
            dims.append(_signed(value))
        elif number == TENSOR_DATA_TYPE and _is_varint(value):
            data_type = (value + (1 << 31)) % (1 << 32) - (1 << 31)  # an int32: the low 32 bits, signed
        if not isinstance(value, memoryview):
            continue
        if number == TENSOR_DIMS:
            i = 0
            while i < len(value):
                v, i = _varint(value, i)
                dims.append(_signed(v))
        elif number == TENSOR_NAME:
            name = bytes(value)
        elif number == TENSOR_EXTERNAL_DATA:
            key, text = b"", b""
            for n, v in fields(value):
                if isinstance(v, memoryview):
                    if n == ENTRY_KEY:
                        key = bytes(v)
                    elif n == ENTRY_VALUE:
                        text = bytes(v)
            entries.append((key, text))
    return name, entries, data_type, dims


def _node(buf: memoryview) -> tuple[bytes, dict, bytes | None, bytes | None, list]:
    """A NodeProto's (op type, {input: its positions}, fourth input, first output, [(name, i, [subgraphs]) of
    each attribute]), names as bytes (only those read are decoded: the other nodes' strings are compared as
    bytes). Positions past LAST_SLOT read as LAST_SLOT + 1: a node of many inputs keeps one entry per name."""
    op, inputs, fourth, output, attributes = b"", {}, None, None, []
    count = 0
    for number, value in fields(buf):
        if not isinstance(value, memoryview):
            continue
        if number == NODE_OP_TYPE:
            op = bytes(value)
        elif number == NODE_INPUT:
            name = bytes(value)
            inputs.setdefault(name, set()).add(min(count, LAST_SLOT + 1))
            fourth = name if count == 3 else fourth
            count += 1
        elif number == NODE_OUTPUT and output is None:
            output = bytes(value)
        elif number == NODE_ATTRIBUTE:
            name, i, graphs = None, 0, []
            for n, v in fields(value):
                if n == ATTRIBUTE_NAME and isinstance(v, memoryview):
                    name = bytes(v)
                elif n == ATTRIBUTE_I and _is_varint(v):
                    i = v
                elif n in (ATTRIBUTE_G, ATTRIBUTE_GRAPHS) and isinstance(v, memoryview):
                    graphs.append(v)
            attributes.append((name, i, graphs))
    return op, inputs, fourth, output, attributes


def _node_reads(node: tuple, whole: set, folded: dict) -> None:
    """Adds to `whole` the names (bytes) the node reads whole, and those its subgraphs' nodes and outputs do
    (an outer name they read), and to `folded` a FOLDED node's output -> its first input."""
    op, inputs, _, output, attributes = node
    rows = ROW_READS.get(op, ())
    for name, slots in inputs.items():
        if op == FOLDED and output is not None and 0 in slots:
            folded[output] = name
            slots = slots - {0}
        if not slots <= set(rows):
            whole.add(name)
    for graph in (g for _, _, graphs in attributes for g in graphs):
        for number, value in fields(graph):
            if number == GRAPH_NODE and isinstance(value, memoryview):
                _node_reads(_node(value), whole, folded)
            elif number == GRAPH_OUTPUT and isinstance(value, memoryview):
                whole.update(bytes(v) for n, v in fields(value) if n == VALUE_NAME and isinstance(v, memoryview))


def _through_folded(whole: set, folded: dict) -> set:
    """`whole` and the inputs of the FOLDED nodes whose outputs it holds (chains of them too)."""
    whole = set(whole)
    grew = True
    while grew:
        grew = False
        for output, name in folded.items():
            if output in whole and name not in whole:
                whole.add(name)
                grew = True
    return whole


def _attention_window(node: tuple, windows: dict) -> None:
    """A GroupQueryAttention's past key (its fourth input) -> its window: the first attribute of that name, as
    onnx's readers take it."""
    op, _, past_key, _, attributes = node
    if op != b"GroupQueryAttention" or past_key is None:
        return
    size = next((_signed(i) for name, i, _ in attributes if name == b"local_window_size"), -1)
    windows[_text(past_key)] = size if size > 0 else None


# -- writing: the bandwidth probe's one-node graphs --------------------------------------------------------

FLOAT = 1  # TensorProto.FLOAT
ATTRIBUTE_TYPE_INT = 2


def _key(number: int, kind: int) -> bytes:
    return _encode_varint(number << 3 | kind)


def _encode_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, LEN) + _encode_varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _key(number, VARINT) + _encode_varint(value)


def _float_value(name: str, dims: list[int] | None) -> bytes:
    tensor = _int_field(TENSOR_TYPE_ELEM, FLOAT)
    if dims is not None:
        tensor += _len_field(TENSOR_TYPE_SHAPE, b"".join(_len_field(SHAPE_DIM, _int_field(DIM_VALUE, d))
                                                          for d in dims))
    return _len_field(VALUE_NAME, name.encode()) + _len_field(VALUE_TYPE, _len_field(TYPE_TENSOR, tensor))


def one_node_model(op_type: str, inputs: dict[str, list[int]], output: str, int_attributes: dict[str, int],
                   opset: int = 18, ir_version: int = 9) -> bytes:
    """A serialized ModelProto of one node of the default domain over float inputs `inputs` (name -> shape),
    with int attributes, giving float `output` (shape left to inference)."""
    node = b"".join(_len_field(NODE_INPUT, n.encode()) for n in inputs) + _len_field(2, output.encode())
    node += _len_field(NODE_OP_TYPE, op_type.encode())
    for name, value in int_attributes.items():
        node += _len_field(NODE_ATTRIBUTE, _len_field(ATTRIBUTE_NAME, name.encode()) + _int_field(ATTRIBUTE_I, value)
                           + _int_field(20, ATTRIBUTE_TYPE_INT))
    graph = _len_field(GRAPH_NODE, node) + _len_field(2, b"probe")
    graph += b"".join(_len_field(GRAPH_INPUT, _float_value(n, dims)) for n, dims in inputs.items())
    graph += _len_field(GRAPH_OUTPUT, _float_value(output, None))
    opset_id = _len_field(1, b"") + _int_field(2, opset)  # OperatorSetIdProto: domain "", version
    return _int_field(1, ir_version) + _len_field(MODEL_GRAPH, graph) + _len_field(8, opset_id)


def with_external_offset(model: bytes, name: str, offset: int) -> bytes:
    """The serialized model with initializer `name`'s external data "offset" entry set to `offset`, every other
    byte as it was (packed_cache.share_one points a table at its twin's bytes)."""
    def entry(number: int, value: memoryview) -> bytes | None:
        if number != TENSOR_EXTERNAL_DATA or dict(fields(value)).get(ENTRY_KEY) != b"offset":
            return None
        return _len_field(ENTRY_KEY, b"offset") + _len_field(ENTRY_VALUE, str(offset).encode())

    def initializer(number: int, value: memoryview) -> bytes | None:
        if number != GRAPH_INITIALIZER or _external_entries(value)[0] != name.encode():
            return None
        return _rewritten(value, entry)

    return _rewritten(memoryview(model), lambda n, v: _rewritten(v, initializer) if n == MODEL_GRAPH else None)


def _rewritten(buf: memoryview, edit) -> bytes:
    """The message `buf` with each length-delimited field's payload replaced by edit(number, payload) where that
    gives bytes (None: the field's bytes as they were)."""
    out, i = bytearray(), 0
    while i < len(buf):
        start = i
        number, kind, value, i = _field(buf, i)
        if kind == START_GROUP:
            i = _skip_group(buf, i, number)
        new = edit(number, value) if kind == LEN else None
        out += buf[start:i] if new is None else _len_field(number, new)
    return bytes(out)
