"""Quantized target graphs, rewritten from the fp32 graph our exporter wrote, one weight at a time.

    quantize_bundle(Path("b/fp32"), Path("b/int4"), "int4")                 # calibrates on the corpora
    quantize_graph(Path("b/target.onnx"), Path("q/target.onnx"), "int8", calibration=None)

* int8 / int4: weight-only, block-wise along the input axis (blockquant.py). Weight MatMuls and the head
  `Gemm(transB=1)` become com.microsoft `MatMulNBits` at accuracy level 4 (activations rounded to int8
  per block: the only fast CPU path; levels 0/1 ran 8-bit weights 40-90x slower than fp32), the
  embedding `Gather` becomes `GatherBlockQuantized`. A tied table is packed once for both uses (its
  MatMulNBits scales reach the gather through a folded Unsqueeze). Choices, measured on Gemma 3 270M
  against its fp32 bundle on held-out code and prose (benchmarks/bench_quant.py; docs/measurements.md has the table):
  - Layers stay 8-bit in both presets: at 4 bits top-1 agreement fell to 0.75-0.83 (sessions 5, 25) for
    decode steps only ~1.15x as fast (`--layer-bits 4` gives that choice to the user).
  - Activations go through MatMulNBits twice (`two_pass`, every weight in both presets): once rounded
    onto MLAS' own int8 grid, once the residual. Level 4's int8 activations alone cost the head ~2%
    top-1 (Gemma's final hidden state has channels ~15x the median); two passes restore it (0.98 ->
    1.00 head-only; whole model int4 0.976 -> 0.991). It also keeps speculative decoding exact: the
    fp32 attention of one position and of a verify window differ by ~1e-7, and a single int8 rounding
    of a block with a huge outlier turns that into ~0.5% of the logits (measured on Gemma 3 270M with
    two passes on the head only: greedy MTP parted from plain decoding within 48 tokens on 4 of 4
    prompts; with two passes everywhere, 0 of 4). The price: decode 1.54x fp32 instead of 1.86x in
    the same run; `--two-pass head` buys the speed back for plain decoding.
  - int4 keeps the head/table at 4 bits (block 32, zero points) except the `frequent_rows` rows of the
    tokens most frequent in the calibration text, kept at 8 bits: 98-99% of the fp32 argmaxes on
    held-out text are among the 32,768 most frequent train tokens, and those rows cost 2% of the file.
    The 4-bit rows are rounded by GPTQ against the head input's second moment (top-1 0.87 -> 0.93
    head-only, ppl loss +4% -> +1%; an importance-weighted grid search alone gave 0.88).
  - Blocks of 32 everywhere: the 8-bit table is then exact on the GGUF source's Q8_0 grid.
  - `layer_op="integer"` (`--layer-op integer`): the 8-bit layers as com.microsoft MatMulIntegerToFloat
    over int8 columns (one scale per output column, GPTQ-rounded when calibrated) and activations rounded
    per row in three 7-bit passes (quantnodes.integer_activations). ONNX Runtime runs u8 x s8 products on
    AMX / VNNI, where MatMulNBits' int8 activations path is compute-bound: on the Xeon VM (AMX) the body's
    72 matrices cost about the same for a verify window of 5 positions as for 1, against 1.8x with
    MatMulNBits; int4 decode steps 1.04x as fast, prefill 1.8x. Not the preset: one scale per
    column costs Gemma 3 270M ~1.3 points of top-1 agreement (0.979 vs 0.991), as its GGUF-sourced
    weights sit on 32-wide block grids that blocks of 32 keep exactly (docs/measurements.md, session 30).
  - `head_op="integer"` (`--head-op integer`): the head as one MatMulIntegerToFloat over an int8 copy of
    the table stored as columns [K, V] (one scale per token, GPTQ when calibrated; the packed table stays
    for the embedding, the drafter and this), activations in two 7-bit passes, and each position's 8
    highest logits rescored from the packed table's rows (quantnodes.integer_head). One scale per
    token alone would cost ~1.3 points of head-only top-1 (0.980 vs 0.993); with the rescoring the
    argmax is the table's in practice (the fp32 argmax was among the columns' top 4 at all 2,048
    positions measured) and the tail is closer to fp32 than the 4-bit table's. On AMX a verify window
    of 3 / 5 positions cost 22.5 / 28.0 ms instead of 26.7 / 35.7 (one: 17.1 vs 17.3), and MTP drafting
    ran 1.07-1.30x (K = 2) / 1.17-1.20x (K = 4) as fast; the bundle grows by V x K bytes (+168 MB for
    Gemma 3 270M), so not the preset (docs/measurements.md, session 31). `two_pass` and `accuracy_level`
    then apply to the layers only. The hidden size must be a multiple of the block size (the rescoring
    gathers whole rows of blocks).
* fp16: weights stored in fp16 behind `Cast` nodes that ORT folds when the session loads: compute
  stays fp32. Halves the file, not the RAM or the time.
* fp32: a re-written copy.

Graph inputs and outputs (the KV cache contract included) are never touched: the runtime runs a
quantized bundle unmodified. Weights are read from the source `.data` with positioned reads, a row
chunk at a time for big tables, and written as they are packed: memory stays bounded by one layer
matrix plus a chunk, at any model size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import bundle as bundle_mod
from .. import contract as C
from ..calibration import activations as A
from ..checkpoint import holds, non_finite
from ..errors import EdgemtpError, app_stacklevel
from .blockquant import dequantize_rows, quantize_rows  # noqa: F401 (re-exported)
from . import check_switch, gemv_head
from .head import ADDITIVE
from .builder import MS_DOMAIN, phase
from .quant_options import (CALIBRATED, CALIBRATION_TOKENS, GPTQ_MAX_K, QUANTS, Scheme, check_calibration_taken,
                            check_options, check_patterns_change, check_patterns_match, check_shapes, check_widths,
                            check_window, fit_vocab, scheme)
from .quantgraph import Shared, Sink, activation_sources, rewrite_float, role
from .quantrewrite import Rewrite

__all__ = ["QUANTS", "Scheme", "scheme", "check_options", "quantize_graph", "quantize_bundle", "calibrate",
           "quantize_rows", "dequantize_rows"]
Progress = Callable[[int, int, str], None]
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
       TensorProto.INT32: np.int32, TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}
QUANT_KEY, SCHEME_KEY = "edgemtp.quant", "edgemtp.quant_scheme"


# ------------------------------------------------------------------------------------- the graph

@dataclass
class Calibration:
    """What the calibrated options need: activation statistics by tensor name, and the vocabulary ids
    by descending frequency in the calibration text (ties: lower id first)."""

    stats: dict[str, A.Stats]
    order: np.ndarray | None
    source: str | None  # None: a scheme that reads nothing of the text (Scheme.takes_calibration)
    tokens: int = 0  # the tokens of the windows the activations were read on (0: none read)
    sha256: str | None = None  # of the calibration text (CalibrationText.sha256)


def quantize_graph(src: Path, dst: Path, quant: str, *, calibration: Calibration | None = None,
                   extra_outputs: tuple[str, ...] = (), progress: Progress | None = None,
                   shared: Shared | None = None, drafter: bool = False, drafter_weights: bool = False,
                   **options) -> list[str]:
    """Write the `quant` version of the fp32 target graph `src` (+ `.data`) to `dst` (+ `.data`).

    `options`: scheme()'s. `extra_outputs`: tensors to add as graph outputs (calibration runs).
    `shared`: what the bundle's earlier graphs made of their tensors (see quantrewrite.Shared).
    `drafter`: src is a drafter graph: its own weights stay fp32, the tables it reads from the target
    (the embedding) are the target's quantized ones, in the target's data file (so quantize the
    target first, with the same `shared`); with `drafter_weights`, its MatMuls are quantized too.
    Returns the file names written, relative to `dst`'s directory."""
    sch = scheme(quant, calibrated=calibration is not None, **options)
    if sch is not None and calibration is not None:
        # the text by content only: the path it was given by (which the manifest records) would make the same
        # calibration from another directory write another graph
        sch = replace(sch, calibration_sha256=calibration.sha256)
    src, dst = Path(src), Path(dst)
    model = load_fp32_graph(src, drafter)
    if dst.resolve() == src.resolve():
        raise EdgemtpError(f"{dst}: is the source graph (write the quantized graph elsewhere)")
    if sch is not None and not drafter:
        check_patterns_match(sch.keep_8bit, [t.name for t in model.graph.initializer])
        check_patterns_change(sch, model.graph)
        sch = fit_head(sch, model.graph)
    data_name = dst.name + ".data"
    with _Reader(src) as read, open(dst.parent / data_name, "wb") as f:
        sink = Sink(f, data_name)
        if sch is not None:
            own = ("matmul",) if drafter_weights else () if drafter else ("matmul", "head", "gather")
            Rewrite(model.graph, read, sink, sch, calibration, progress, shared, own, target=not drafter).run()
        else:
            rewrite_float(model.graph, read, sink, quant, progress, shared)
    if sch is not None and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs)
    helper.set_model_props(model, {QUANT_KEY: quant, **({SCHEME_KEY: json.dumps(sch.to_json())} if sch else {})})
    onnx.save(model, str(dst))
    if (dst.parent / data_name).stat().st_size == 0:  # every weight lives in another graph's file
        (dst.parent / data_name).unlink()
        return [dst.name]
    return [dst.name, data_name]


def fit_head(sch: Scheme, g: onnx.GraphProto) -> Scheme:
    """fit_vocab() for the graph's head table (the scheme as it stands without one), and the bits the tables
    are packed at where a --keep-8bit pattern names one: that table is whole at 8 bits (the rewrite's
    bits_for), which the manifest and `edgemtp info` said was 4-bit, with its frequent rows kept apart."""
    inits = {t.name: t for t in g.initializer}
    roles = [r for n in g.node if (r := role(n, inits))]
    heads = {name for kind, name in roles if kind == "head"}
    gathers = {name for kind, name in roles if kind == "gather"} - heads  # an untied embedding
    if gathers and sch.embed_bits < 8 and all(sch.bits_for("gather", name) == 8 for name in gathers):
        sch = replace(sch, embed_bits=8)
    if not heads:
        return sch
    tied = any(kind == "gather" and name in heads for kind, name in roles)
    if sch.head_bits < 8 and all(sch.bits_for("head", name) == 8 for name in heads):
        return replace(sch, head_bits=8, frequent_rows=0, **({"embed_bits": 8} if tied else {}))
    return fit_vocab(sch, min(inits[name].dims[0] for name in heads), tied)


def load_fp32_graph(src: Path, drafter: bool = False) -> onnx.ModelProto:
    """The graph proto (weights left on disk), refusing anything but an fp32 target (or drafter) graph of
    ours."""
    try:
        model = onnx.load(str(src), load_external_data=False)
    except FileNotFoundError:
        raise EdgemtpError(f"{src}: missing") from None
    except Exception as e:  # a corrupt protobuf raises several types
        raise EdgemtpError(f"{src}: not a valid ONNX file ({type(e).__name__})") from None
    names = {i.name for i in model.graph.input}
    wanted = {C.INPUT_IDS, C.LAST_HIDDEN} if drafter else {C.INPUT_IDS, C.SEQLENS_K}
    if model.producer_name != "edgemtp" or not wanted <= names:
        kind = "drafter" if drafter else "target"
        raise EdgemtpError(f"{src}: not a {kind} graph written by edgemtp export (only those can be quantized)")
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(QUANT_KEY, "fp32") != "fp32":
        raise EdgemtpError(f"{src}: already quantized ({props[QUANT_KEY]}); quantize the fp32 graph instead")
    gemv_head.restore_rows(model.graph)  # a transposed head table: quantized as the [V, H] table it was
    return model


class _Reader:
    """Tensor values read from the external data file with seeks and reads (no memory map: pages of an
    18 GB fp32 scratch file would otherwise count as this process's memory; not os.preadv, which Windows
    lacks); inline tensors decoded."""

    def __init__(self, src: Path):
        self.src, self.files, self.transposed = src, {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()

    def __call__(self, t: TensorProto) -> np.ndarray:
        return self.rows(t, 0, t.dims[0]) if t.data_location == TensorProto.EXTERNAL and t.dims else \
            self._inline(t)

    def _inline(self, t: TensorProto) -> np.ndarray:
        if t.data_location != TensorProto.EXTERNAL:
            return onnx.numpy_helper.to_array(t)
        return self._read(t, 0, 1).reshape(())

    def rows(self, t: TensorProto, start: int, stop: int) -> np.ndarray:
        row = int(np.prod(t.dims[1:], dtype=np.int64))
        return self._read(t, start * row, (stop - start) * row).reshape((stop - start, *t.dims[1:]))

    def take(self, t: TensorProto, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (ascending) of a 2-D tensor, one read per run of consecutive ids."""
        out = np.empty((len(ids), t.dims[1]), _NP[t.data_type])
        cuts = np.flatnonzero(np.diff(ids) != 1) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(ids)]):
            out[lo:hi] = self.rows(t, int(ids[lo]), int(ids[hi - 1]) + 1)
        return out

    def _read(self, t: TensorProto, first: int, count: int) -> np.ndarray:
        info = {e.key: e.value for e in t.external_data}
        if info.get(gemv_head.TRANSPOSED):  # a [V, H] table stored as [H, V] (restore_rows): read whole, once
            key = (info["location"], info.get("offset"))
            if key not in self.transposed:
                rows, cols = t.dims
                stored = self._bytes(t, info, 0, rows * cols).reshape(cols, rows)
                self.transposed = {key: np.ascontiguousarray(stored.T)}  # one table at a time
            values = self.transposed[key].reshape(-1)[first:first + count]
        else:
            values = self._bytes(t, info, first, count)
        # a padded clustered head's mask holds -inf on purpose, but never NaN or +inf
        self._finite(t, info, np.where(values == -np.inf, 0, values) if t.name.endswith(ADDITIVE) else values, first)
        return values

    def _finite(self, t: TensorProto, info: dict, values: np.ndarray, first: int) -> None:
        """Refuses values (t's, from flat index `first` on) holding NaN or inf, naming the tensor and its file:
        fp16 called a NaN an overflow, int8 / int4 wrote NaN scales of it."""
        bad = non_finite(values)
        if bad is not None:
            value, at, more = bad
            at = tuple(int(i) for i in np.unravel_index(first + at[0], tuple(t.dims)))
            path = bundle_mod.inside(self.src.parent, info["location"])
            raise EdgemtpError(f"{path}: tensor '{t.name}' {holds((value, at, more))}: a damaged bundle, or one "
                               "edgemtp did not export (weights must be finite numbers)")

    def _bytes(self, t: TensorProto, info: dict, first: int, count: int) -> np.ndarray:
        path = bundle_mod.inside(self.src.parent, info["location"])
        if path not in self.files:
            if not path.is_file():
                raise EdgemtpError(f"{self.src}: external data file {path} is missing")
            self.files[path] = open(path, "rb")
        dtype = np.dtype(_NP[t.data_type])
        total = int(np.prod(t.dims, dtype=np.int64))
        buf = bytearray(count * dtype.itemsize)
        f = self.files[path]
        f.seek(int(info.get("offset", 0)) + first * dtype.itemsize)
        got = f.readinto(buf) if count else 0  # fewer bytes only at the end of the file
        if got != len(buf) or first + count > total:
            raise EdgemtpError(f"{self.src}: external data of '{t.name}' runs past the end of {path.name}")
        return np.frombuffer(buf, dtype)


# ----------------------------------------------------------------------------------------- bundles

def quantize_bundle(src: Path, out: Path, quant: str, *, overwrite: bool = False, progress: Progress | None = None,
                    calibration: str | Path | None = A.CORPORA, calibration_tokens: int | None = None,
                    drafter_quant: str | None = None, **options) -> Path:
    """Copy the fp32 bundle `src` to `out` (atomically) with its target graph quantized to `quant`.

    `calibration`: A.CORPORA (the offline corpora's train split), a text file, None (no calibrated
    options), or a Calibration that calibrate() made for this bundle (benchmarks reuse one for several
    schemes). `options`: scheme()'s. Drafter graphs read the target's quantized table in place; their
    own (small) weights stay fp32 (fp16 with --quant fp16), or with `drafter_quant` "int8" their MatMuls
    become 8-bit MatMulNBits (uncalibrated, two-pass activations), or MatMulIntegerToFloat with
    `layer_op="integer"`, as the target's; other files are copied."""
    check_switch("overwrite", overwrite)
    made = calibration if isinstance(calibration, Calibration) else None
    sch = check_options(quant, A.CORPORA if made else calibration, calibration_tokens, drafter_quant, **options)
    b = bundle_mod.load(Path(src), verify=False)
    entry = b.graph("target")
    if entry.quant != "fp32":
        raise EdgemtpError(f"{b.dir / bundle_mod.MANIFEST}: target graph is already {entry.quant}; "
                           "quantize an fp32 bundle")
    if sch is not None:
        check_shapes(sch, int(b.model["hidden_size"]))
        graph = load_fp32_graph(entry.path).graph
        check_widths(sch, graph)  # before the calibration
        # as quantize_graph packs the head: one whole at 8 bits (every row a frequent one, or --keep-8bit naming
        # it) counts no frequent rows, so whether the scheme takes the calibration is known only now
        sch = fit_head(sch, graph)
        check_calibration_taken(sch, A.CORPORA if made else calibration)
    # the drafter graphs read the target's table: rewritten after it, pointing at its new bytes
    drafters = [name for name in ("drafter", "drafter_full_head") if b.has_graph(name)]
    # the batched verify graph reads the fp32 target's bytes: a quantized bundle goes without it
    # (drafted rows are then verified one row at a time)
    dropped = ["verify"] if b.has_graph("verify") else []
    done = {f for name in ["target", *drafters, *dropped]
            for f in (b.graph(name).path.name, b.graph(name).path.name + ".data")}
    with bundle_mod.atomic_dir(Path(out), overwrite) as tmp:
        calib = made
        if sch is not None and calibration is not None and not sch.takes_calibration:
            # neither read nor recorded (the bundle owes the text nothing), but the scheme is still the calibrated
            # one check_options made: --frequent-rows as many as the head's rows makes it 8-bit whole, which
            # quantize_graph would refuse without a calibration (and the preset's would leave at 4 bits)
            calib = Calibration({}, None, None)
        elif sch is not None and calibration is not None and made is None:
            # its int8 copy goes inside the bundle's held directory: a killed run's goes with it (scratch.py)
            calib = calibrate(b, entry.path, sch, calibration, calibration_tokens or CALIBRATION_TOKENS,
                              tmp / "calibration", progress)
        shared = Shared()
        quantize_graph(entry.path, tmp / "target.onnx", quant, calibration=calib, progress=progress, shared=shared,
                       **options)
        own = {k: v for k, v in options.items() if k not in CALIBRATED}  # a drafter quantizes no weight of its own
        weights = drafter_quant == "int8"
        if weights:  # its MatMuls at 8 bits, as the manifest says, whatever --layer-bits gives the target's
            own.pop("layer_bits", None)
        for name in drafters:
            path = b.graph(name).path
            quantize_graph(path, tmp / path.name, "int8" if weights else quant, shared=shared, drafter=True,
                           drafter_weights=weights, **own)
        for rel in b.manifest["files"]:
            if rel not in done:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(b.dir / rel, tmp / rel)
        manifest = {k: v for k, v in b.manifest.items() if k not in ("format", "schema_version", "files")}
        if sch is not None and calib is not None:
            sch = replace(sch, calibration=calib.source, calibration_tokens=calib.tokens or None,
                          calibration_sha256=calib.sha256)
        graphs = {k: v for k, v in manifest["graphs"].items() if k not in dropped}
        graphs["target"] = {**{k: v for k, v in graphs["target"].items() if k != "gemv_head"},
                            "file": "target.onnx", "quant": quant,
                            **({"quantization": sch.to_json()} if sch else {})}
        for name in drafters:  # the table the target's
            graphs[name] = {**graphs[name], "quant": quant, "table": "target",
                            "weights": "int8" if weights else "fp16" if quant == "fp16" else "fp32"}
        manifest["graphs"] = graphs
        bundle_mod.write_manifest(tmp, manifest)
    return Path(out)


def calibrate(b, graph: Path, sch: Scheme, source, tokens: int, work: Path, progress: Progress | None) -> Calibration:
    """Token order of the calibration text, and (when the scheme needs them) activation statistics from
    an int8 copy of the graph: 8-bit activations match fp32's to ~0.1%, and an int8 graph of E2B fits in
    RAM where its fp32 graph (18 GB) does not."""
    from tokenizers import Tokenizer

    if progress:  # reading and tokenizing the corpora take seconds (~5 for Gemma 3 270M): named, not left under
        progress(0, 1, "calibration text")  # the finished bar of the export's last phase
    text = A.calibration_text(source)
    ids = text.token_ids(Tokenizer.from_file(str(b.tokenizer_path)))
    if sch.needs_activations:
        check_window(text, ids, b.target_contract.capacity, b.model.get("bos_token_id") is not None)
    vocab = b.target_contract.vocab_size
    counts = A.token_counts(ids, vocab)
    order = np.lexsort((np.arange(vocab), -counts))
    stats: dict = {}
    if sch.needs_activations:
        model = load_fp32_graph(graph)
        sources = activation_sources(model.graph)
        wanted = {s: sch.gptq for s in dict.fromkeys(sources.values())}
        with tempfile.TemporaryDirectory(prefix=".calibration-", dir=work.parent) as d:
            path = Path(d) / "calibration.onnx"
            quantize_graph(graph, path, "int8", calibration=None, extra_outputs=tuple(wanted), two_pass="none",
                           progress=phase(progress, "int8 copy for calibration"))
            from ..runtime.session import make_session

            # as many windows as `tokens` fill at their length (shorter than A.WINDOW under a small capacity: the
            # count was tokens / A.WINDOW, 1/8 of the tokens asked at --max-context 64)
            length = min(A.WINDOW, b.target_contract.capacity)
            count = -(-tokens // length)
            windows = A.token_windows(ids, length, count, b.model.get("bos_token_id"))
            if len(windows) < count:  # the text holds no more: said, not left to a manifest nobody reads
                warnings.warn(f"--calibration-tokens {tokens:,}: the calibration text ({text.source}) fills "
                              f"{len(windows)} windows of {length} tokens ({windows.size:,} tokens), fewer than "
                              "asked", stacklevel=app_stacklevel())
            if progress:  # loading the copy takes seconds (~10 for Gemma 3 270M)
                progress(0, len(windows), "calibration")
            session = make_session(path, "cpu", None)
            stats = A.collect(session, b.target_contract, windows, wanted, progress, max_hessian=GPTQ_MAX_K)
            del session
            return Calibration(stats, order, text.source, int(windows.size), text.sha256)
    return Calibration(stats, order, text.source, sha256=text.sha256)


