"""Quantized target graphs, rewritten from the fp32 graph our exporter wrote, one weight at a time.

    quantize_graph(Path("b/target.onnx"), Path("q/target.onnx"), "int4")

* int8 / int4: weight-only, block-wise along the input axis (our own numpy packing, equal to ORT's
  quantizer on its grid; a per-block search adds grids of smaller squared error). Weight MatMuls
  and the head `Gemm(transB=1)` become com.microsoft `MatMulNBits` (accuracy level 4: activations
  go to int8 per block, the only fast CPU path: levels 0/1 ran 8-bit weights 40-90x slower than
  fp32), the embedding `Gather` becomes `GatherBlockQuantized`. A tied table is untied from the
  Gemm but packed once for both uses (measured: same decode speed, less file; ORT's own quantizer
  skips a Transpose-tied head). Bits per role, by measurement on Gemma 3 270M (bench_quant.py):
  int8 = 8-bit everywhere; int4 = 4-bit head/table (63% of the weights) with 8-bit layers: that
  split beat 4-bit layers on every axis (layers at 4 bits: top-1 0.75, ppl +27%; table at 4 bits:
  0.84, +10%), and the layers at 8 bits decode as fast as at 4 on AVX2. Head/table blocks of 16
  (layers 32: at 16 they were slower) halve the 4-bit ppl loss. `quantize_dynamic`'s per-tensor
  activations broke this model (top-1 0.42): Gemma has one hidden channel ~500x the median.
* fp16: weights stored in fp16 behind `Cast` nodes that ORT folds when the session loads: compute
  stays fp32 (the fp32 KV cache is updated in place by GroupQueryAttention, and x86 has no fast fp16
  MatMul). Halves the file, not the RAM or the time.
* fp32: a re-written copy.

Graph inputs and outputs (the KV cache contract included) are never touched: the runtime runs a
quantized bundle unmodified. Weights stream from the source `.data` through a memory map, so at
most one weight and its quantized form are in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import bundle as bundle_mod
from .. import contract as C
from ..errors import EdgemtpError
from .builder import MS_DOMAIN, _align, _set_external

QUANTS = ("fp32", "fp16", "int8", "int4")
Progress = Callable[[int, int, str], None]
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
       TensorProto.INT32: np.int32, TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}
_ROWS_PER_CHUNK = 16384  # rows quantized at once: bounds temporaries to ~100 MB for a 262k x 640 head


@dataclass(frozen=True)
class Scheme:
    """Bits and block size per weight role: the layers' MatMuls, the logit head and the embedding
    table (a tied head and table share one packed copy when their bits and blocks agree)."""

    bits: int
    head_bits: int
    embed_bits: int
    block_size: int  # layers
    head_block_size: int  # head and table
    symmetric: bool | None  # None: 8-bit symmetric (exact on llama.cpp's Q8_0/Q5_0 grids), 4-bit not
    accuracy_level: int

    def bits_for(self, kind: str) -> int:
        return {"matmul": self.bits, "head": self.head_bits, "gather": self.embed_bits}[kind]

    def block_for(self, kind: str) -> int:
        return self.block_size if kind == "matmul" else self.head_block_size

    def symmetric_for(self, bits: int) -> bool:
        return bits == 8 if self.symmetric is None else self.symmetric

    def to_json(self) -> dict:
        return asdict(self)


# bits (layers, head, table) and blocks (layers, head/table) per quant, chosen by measurement
PRESETS = {"int8": ((8, 8, 8), (32, 16)), "int4": ((8, 4, 4), (32, 16))}


def scheme(quant: str, block_size: int | None = None, symmetric: bool | None = None, accuracy_level: int = 4
           ) -> Scheme | None:
    """The scheme for `quant` (None for the float quants), after checking every option.

    `block_size` None keeps the preset's blocks; a number sets every role's."""
    if quant not in QUANTS:
        raise EdgemtpError(f"--quant {quant!r} is not supported (choose from {', '.join(QUANTS)})")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise EdgemtpError(f"--block-size {block_size} must be a power of two, at least 16 (MatMulNBits)")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise EdgemtpError(f"--accuracy-level {accuracy_level} must be 0..4 (MatMulNBits)")
    if quant not in PRESETS:
        return None
    bits, blocks = PRESETS[quant]
    return Scheme(*bits, *((block_size, block_size) if block_size else blocks), symmetric, accuracy_level)


# ------------------------------------------- block quantization of rows: w [N, K] -> [N, kb, blob]

def quantize_rows(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True, search: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Block-quantize each row of w [N, K] along K, in MatMulNBits' layout.

    Returns (packed uint8 [N, kb, block_size*bits/8], scales fp32 [N, kb], zero points uint8
    [N, ceil(kb*bits/8)] or None when symmetric; the ops then assume 2^(bits-1)). Symmetric blocks
    map their largest-magnitude value to -2^(bits-1) exactly, as ORT's own quantizer (MLAS) does:
    one more level than a +-(2^(bits-1)-1) grid. `search` then tries a few other grids per block
    and keeps the one of least squared error (see _candidates)."""
    kb = -(-w.shape[1] // block_size)
    parts = [_quantize_chunk(w[i:i + _ROWS_PER_CHUNK], bits, block_size, kb, symmetric, search)
             for i in range(0, len(w), _ROWS_PER_CHUNK)]
    packed, scales = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    zp = None if symmetric else np.concatenate([p[2] for p in parts])
    return packed, scales, zp


def _quantize_chunk(w: np.ndarray, bits: int, bs: int, kb: int, symmetric: bool, search: bool):
    n, k = w.shape
    blocks = np.zeros((n, kb * bs), np.float32)
    blocks[:, :k] = w  # padding with zeros: MatMulNBits reads whole blocks
    blocks = blocks.reshape(n, kb, bs)
    top = (1 << bits) - 1
    best = None
    for scale, zp in _candidates(blocks, bits, symmetric, search):
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)[..., None]
        q = np.clip(np.rint(blocks * inv) + zp[..., None], 0, top)
        err = np.square((q - zp[..., None]) * scale[..., None] - blocks).sum(axis=2)
        if best is None:
            best = [err, scale, zp, q]
            continue
        better = err < best[0]  # strict: a tie keeps the earlier (plain min/max) candidate
        for slot, new in enumerate((err, scale, zp)):
            best[slot] = np.where(better, new, best[slot])
        best[3] = np.where(better[..., None], q, best[3])
    _, scale, zp, q = best
    zp = None if symmetric else _pack(zp.astype(np.uint8), bits, pad=1 << (bits - 1))  # pad as ORT does
    return _pack(q.astype(np.uint8), bits), scale.astype(np.float32), zp


def _candidates(blocks: np.ndarray, bits: int, symmetric: bool, search: bool = True):
    """(scale, zero point) per block [n, kb] to try; the block keeps the one of least squared error.

    First the plain grid (max magnitude -> -2^(b-1), or min/max -> 0/2^b-1), then for 8 bits the
    +-(2^(b-1)-1) grid (that reproduces llama.cpp's Q8_0 exactly), and for 4 bits narrower grids that
    clip the block's extremes to round its bulk more finely."""
    half, top = 1 << (bits - 1), (1 << bits) - 1
    shrink = (1.0, 1.0625, 1.125, 1.1875, 1.25, 1.375) if search and bits <= 4 else (1.0,)
    if symmetric:
        idx = np.abs(blocks).argmax(axis=2)[..., None]
        m = np.take_along_axis(blocks, idx, axis=2)[..., 0]
        zp = np.full(m.shape, half, np.float32)
        for f in shrink:
            yield m / (-half * f), zp
            if search:
                yield m / ((half - 1) * f), zp
        return
    lo, hi = np.minimum(blocks.min(axis=2), 0), np.maximum(blocks.max(axis=2), 0)
    for f in shrink:
        scale = (hi - lo) / (top * f)
        safe = np.where(scale == 0, 1, scale)
        for zp in (-lo / safe, top - hi / safe, (top - (hi + lo) / safe) / 2):
            yield scale, np.clip(np.rint(zp), 0, top)
            if f == 1.0:
                break  # unshrunk: the three anchors coincide


def _pack(q: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """uint8 values < 2^bits packed along the last axis, low-order bits first."""
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.full(q.shape[:-1] + (1,), pad, np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, k: int
                    ) -> np.ndarray:
    """Inverse of quantize_rows (for tests and error measurement): -> [N, K] fp32."""
    n, kb = scales.shape
    q = _unpack(packed.reshape(n, -1), bits, -1).reshape(n, kb, -1)
    z = np.full((n, kb), 1 << (bits - 1)) if zp is None else _unpack(zp, bits, kb)
    return ((q.astype(np.float32) - z[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[N, bytes] -> [N, count] values (count -1: all), inverse of _pack."""
    q = packed if bits == 8 else np.stack([packed & 15, packed >> 4], axis=-1).reshape(len(packed), -1)
    return q if count < 0 else q[:, :count]


# ------------------------------------------------------------------------------------- the graph

def quantize_graph(src: Path, dst: Path, quant: str, *, block_size: int | None = None, symmetric: bool | None = None,
                   accuracy_level: int = 4, progress: Progress | None = None) -> list[str]:
    """Write the `quant` version of the fp32 target graph `src` (+ `.data`) to `dst` (+ `.data`).

    Returns the file names written, relative to `dst`'s directory."""
    sch = scheme(quant, block_size, symmetric, accuracy_level)
    src, dst = Path(src), Path(dst)
    model = load_fp32_graph(src)
    if dst.resolve() == src.resolve():
        raise EdgemtpError(f"{dst}: is the source graph (write the quantized graph elsewhere)")
    read = _reader(src, model)
    data_name = dst.name + ".data"
    with open(dst.parent / data_name, "wb") as f:
        sink = _Sink(f, data_name)
        if sch is not None:
            _rewrite_blocks(model.graph, read, sink, sch, progress)
        else:
            _rewrite_float(model.graph, read, sink, quant, progress)
    if sch is not None and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    helper.set_model_props(model, {QUANT_KEY: quant, **({SCHEME_KEY: json.dumps(sch.to_json())} if sch else {})})
    onnx.save(model, str(dst))
    return [dst.name, data_name]


QUANT_KEY, SCHEME_KEY = "edgemtp.quant", "edgemtp.quant_scheme"


def load_fp32_graph(src: Path) -> onnx.ModelProto:
    """The graph proto (weights left on disk), refusing anything but an fp32 target graph of ours."""
    try:
        model = onnx.load(str(src), load_external_data=False)
    except FileNotFoundError:
        raise EdgemtpError(f"{src}: missing") from None
    except Exception as e:  # a corrupt protobuf raises several types
        raise EdgemtpError(f"{src}: not a valid ONNX file ({type(e).__name__})") from None
    names = {i.name for i in model.graph.input}
    if model.producer_name != "edgemtp" or not {C.INPUT_IDS, C.SEQLENS_K} <= names:
        raise EdgemtpError(f"{src}: not a target graph written by edgemtp export (only those can be quantized)")
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(QUANT_KEY, "fp32") != "fp32":
        raise EdgemtpError(f"{src}: already quantized ({props[QUANT_KEY]}); quantize the fp32 graph instead")
    return model


def _reader(src: Path, model: onnx.ModelProto) -> Callable[[TensorProto], np.ndarray]:
    """tensor -> its values, memory-mapped from the external data file (inline tensors decoded)."""
    maps: dict[str, np.memmap] = {}

    def read(t: TensorProto) -> np.ndarray:
        if t.data_location != TensorProto.EXTERNAL:
            return onnx.numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        path = bundle_mod.inside(src.parent, info["location"])
        if info["location"] not in maps:
            if not path.is_file():
                raise EdgemtpError(f"{src}: external data file {path} is missing")
            maps[info["location"]] = np.memmap(path, np.uint8, mode="r")
        offset, dtype = int(info.get("offset", 0)), np.dtype(_NP[t.data_type])
        count = int(np.prod(t.dims, dtype=np.int64))
        raw = maps[info["location"]][offset:offset + count * dtype.itemsize]
        if raw.size != count * dtype.itemsize:
            raise EdgemtpError(f"{src}: external data of '{t.name}' runs past the end of {path.name}")
        return raw.view(dtype).reshape(tuple(t.dims))

    return read


class _Sink:
    """Appends tensors to the new external-data file; returns their (data-less) TensorProtos."""

    def __init__(self, f, location: str):
        self.f, self.location = f, location

    def write(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        offset = _align(self.f)
        self.f.write(memoryview(arr).cast("B"))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        _set_external(t, self.location, offset, arr.nbytes)
        return t


def _is_weight(name: str, inits: dict) -> bool:
    t = inits.get(name)
    return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2


def _role(node: onnx.NodeProto, inits: dict) -> tuple[str, str] | None:
    """('matmul' | 'head' | 'gather', weight name) for a node we know how to quantize."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and _is_weight(node.input[1], inits):
        return "matmul", node.input[1]
    if (node.op_type == "Gemm" and len(node.input) == 2 and _is_weight(node.input[1], inits)
            and attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0):
        return "head", node.input[1]
    if node.op_type == "Gather" and attrs.get("axis", 0) == 0 and _is_weight(node.input[0], inits):
        return "gather", node.input[0]
    return None


def _rewrite_blocks(g: onnx.GraphProto, read, sink: _Sink, sch: Scheme, progress: Progress | None) -> None:
    """MatMul / head Gemm -> MatMulNBits and Gather -> GatherBlockQuantized (+ Reshape)."""
    inits = {t.name: t for t in g.initializer}
    roles = [_role(n, inits) for n in g.node]
    # GatherBlockQuantized wants whole blocks along the row: otherwise that Gather stays fp32
    roles = [None if r and r[0] == "gather" and inits[r[1]].dims[1] % sch.head_block_size else r for r in roles]
    wanted: dict[str, set] = {}
    float_users = set()
    for node, r in zip(g.node, roles):
        for name in node.input:
            if r is not None and name == r[1]:
                wanted.setdefault(name, set()).add(r[0])
            elif name in inits:
                float_users.add(name)
    new_inits, made = [], {}
    for i, t in enumerate(list(g.initializer)):
        arr = read(t)
        if t.name in wanted:
            tensors, uses = _quantize_uses(t.name, wanted[t.name], arr, sch, sink)
            new_inits += tensors
            made.update({(t.name, kind): use for kind, use in uses.items()})
        if t.name not in wanted or t.name in float_users:
            new_inits.append(sink.write(t.name, arr) if t.data_location == TensorProto.EXTERNAL else t)
        if progress:
            progress(i + 1, len(inits), t.name)
    nodes = []
    for n, r in zip(g.node, roles):
        nodes += [n] if r is None else _quantized_nodes(n, r[0], made[r[1], r[0]])
    _replace(g, new_inits, nodes)


def _quantize_uses(name: str, kinds: set, arr: np.ndarray, sch: Scheme, sink: _Sink):
    """-> (tensors written, {kind: (input names, attributes)}) for the quantized uses of one weight.

    A tied table used by the head and the gather is packed once when both want the same bits: one
    MatMulNBits-layout tensor [V, kb, blob] serves both (measured: same decode speed, no more RAM,
    and the file does not hold the biggest tensor twice)."""
    tensors, uses, packs = [], {}, {}
    for kind in sorted(kinds):
        bits, block = sch.bits_for(kind), sch.block_for(kind)
        key = (bits, block, kind == "matmul")
        if key not in packs:  # MatMul weights are stored [K, N]: their rows along K are the columns
            rows = arr.T if kind == "matmul" else arr
            packed, scales, zp = quantize_rows(rows, bits, block, sch.symmetric_for(bits))
            tensors.append(sink.write(f"{name}.q{bits}b{block}", packed))
            packs[key] = (tensors[-1].name, scales, zp, rows.shape)
        packed, scales, zp, (n, k) = packs[key]
        base = f"{name}.{kind}"
        if kind == "gather":  # one block per [v, kb] slot: scales (and zero points) get a unit last axis
            scales, zp = scales[..., None], None if zp is None else _unpack(zp, bits, scales.shape[1])[..., None]
            attrs = dict(gather_axis=0, quantize_axis=2, block_size=block, bits=bits, hidden=k)
        else:
            attrs = dict(K=k, N=n, bits=bits, block_size=block)
            if sch.accuracy_level:  # 0 is "unset": leave the attribute out, as ORT's quantizer does
                attrs["accuracy_level"] = sch.accuracy_level
        tensors.append(sink.write(base + ".scales", scales))
        names = [packed, tensors[-1].name]
        if zp is not None:
            tensors.append(sink.write(base + ".zero_points", zp))
            names.append(tensors[-1].name)
        uses[kind] = (names, attrs)
    return tensors, uses


def _quantized_nodes(node: onnx.NodeProto, kind: str, use) -> list[onnx.NodeProto]:
    (packed, scales, *zp), attrs = use
    if kind != "gather":
        return [helper.make_node("MatMulNBits", [node.input[0], packed, scales, *zp], list(node.output),
                                 name=node.name + "_q", domain=MS_DOMAIN, **attrs)]
    attrs = dict(attrs)
    hidden = attrs.pop("hidden")
    blocks = node.output[0] + ".blocks"  # [B, S, kb, block_size] -> [B, S, H]
    shape = helper.make_node("Constant", [], [blocks + ".shape"], name=node.name + "_shape",
                             value=helper.make_tensor(blocks + ".shape", TensorProto.INT64, [3], [0, 0, hidden]))
    return [helper.make_node("GatherBlockQuantized", [packed, node.input[1], scales, *zp], [blocks],
                             name=node.name + "_q", domain=MS_DOMAIN, **attrs),
            shape, helper.make_node("Reshape", [blocks, shape.output[0]], list(node.output), name=node.name + "_r")]


def _rewrite_float(g: onnx.GraphProto, read, sink: _Sink, quant: str, progress: Progress | None) -> None:
    """fp32: copy. fp16: matrices stored fp16, cast back to fp32 by a Cast that ORT folds at load."""
    casts, new_inits = [], []
    n = len(g.initializer)
    for i, t in enumerate(list(g.initializer)):
        if t.data_location != TensorProto.EXTERNAL:
            new_inits.append(t)
        elif quant == "fp16" and t.data_type == TensorProto.FLOAT and len(t.dims) >= 2:
            half = read(t).astype(np.float16)
            if not np.isfinite(half).all():
                raise EdgemtpError(f"weight '{t.name}' overflows fp16 (|w| > 65504): use --quant fp32 or int8")
            new_inits.append(sink.write(t.name + ".fp16", half))
            casts.append(helper.make_node("Cast", [t.name + ".fp16"], [t.name], name=t.name + ".cast",
                                          to=TensorProto.FLOAT))
        else:
            new_inits.append(sink.write(t.name, read(t)))
        if progress:
            progress(i + 1, n, t.name)
    _replace(g, new_inits, casts + list(g.node))


def _replace(g: onnx.GraphProto, inits: list, nodes: list) -> None:
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.node[:]
    g.node.extend(nodes)


# ----------------------------------------------------------------------------------------- bundles

def quantize_bundle(src: Path, out: Path, quant: str, *, overwrite: bool = False,
                    progress: Progress | None = None, **options) -> Path:
    """Copy the fp32 bundle `src` to `out` (atomically) with its target graph quantized to `quant`.

    `options` are quantize_graph's (block_size, symmetric, accuracy_level). Other graphs are copied."""
    b = bundle_mod.load(Path(src), verify=False)
    entry = b.graph("target")
    if entry.quant != "fp32":
        raise EdgemtpError(f"{b.dir / bundle_mod.MANIFEST}: target graph is already {entry.quant}; "
                           "quantize an fp32 bundle")
    target_files = {entry.path.name, entry.path.name + ".data"}
    with bundle_mod.atomic_dir(Path(out), overwrite) as tmp:
        quantize_graph(entry.path, tmp / "target.onnx", quant, progress=progress, **options)
        for rel in b.manifest["files"]:
            if rel not in target_files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(b.dir / rel, tmp / rel)
        manifest = {k: v for k, v in b.manifest.items() if k not in ("format", "schema_version", "files")}
        sch = scheme(quant, **options)
        manifest["graphs"] = {**manifest["graphs"], "target": {
            **manifest["graphs"]["target"], "file": "target.onnx", "quant": quant,
            **({"quantization": sch.to_json()} if sch else {})}}
        bundle_mod.write_manifest(tmp, manifest)
    return Path(out)
