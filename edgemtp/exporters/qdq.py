"""QDQ int8/int16 static graphs for NPUs, calibrated on real windows.

    reader = WindowReader("static/target.onnx", contract, "tokenizer.json", texts)
    quantize_static_qdq("static/target.onnx", "qdq/target.onnx", reader, activation_bits=16)

onnxruntime.quantization.quantize_static in QDQ format: weights int8 per channel (symmetric),
activations uint8 or uint16 (asymmetric), ranges from min-max (default), entropy or percentile
calibration. The inputs and outputs keep their float types and names: the runtime (StaticTarget)
runs the quantized graph unchanged. The mask Add and Softmax of each attention stay float
(static.KEEP_FLOAT): the mask's -65504 would otherwise set the range of the scores, leaving none of
the 256 (or 65536) levels to tell real scores apart.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from .. import contract as C
from ..errors import EdgemtpError, not_an_onnx_file
from .static import KEEP_FLOAT

METHODS = ("minmax", "entropy", "percentile")
# which ops carry QDQ pairs. weights: the weights' ops (the MatMuls with a weight, the head's Gemm, the
# embedding's Gather) and their activation inputs; attention's MatMuls of two activations (q . k, probs . v),
# the residual stream, norms, Gelu and softmax stay float (fp16 on an NPU that runs float ops). matmul: every
# MatMul, attention's too. all: every op onnxruntime quantizes. Gemma's residual stream reaches 1e5 in a few
# channels where its median |value| is ~12 (the 1.7e7 once quoted was a norm's mean square), so one scale per
# tensor leaves the ordinary channels a few levels even at 16 bits; and attention's 16-bit q, k and
# probabilities cost more than all the weights' int8 together. Gemma 3 270M's next tokens against the static
# fp32 graph's on held-out prose (W = 3, 16-bit): top-1 agreement 0.63 with all (perplexity +50%, KL 0.44),
# 0.85 with matmul (+5.0%, KL 0.06), 0.91 with weights (+0.8%, KL 0.02); the int8 weights alone, activations
# float: 0.94, +0.2% (docs/measurements.md, sessions 36-37).
# "Gather" also takes the static graph's RoPE cos / sin tables (a row per position of the capacity): they are
# stored in the activation type (uint16 by default) and stay so. The DequantizeLinear on the table does not
# dequantize it whole each step: ONNX Runtime's CPU graph gathers the quantized rows and dequantizes only those
# (the same time per step at capacity 64 and 1024), and QNN takes DQ -> Gather -> Q as one quantized Gather.
# At 16 bits a value is off by 1.5e-5 at most (fp16, where an NPU runs float ops, by 2.4e-4), the logits by
# 5e-5 of their spread; float tables ran no faster on ORT CPU (tiny llama, session 53).
OPS = {"weights": ["MatMul", "Gemm", "Gather"], "matmul": ["MatMul", "Gemm", "Gather"], "all": None}


def quantize_static_qdq(src: Path, dst: Path, calibration_reader, activation_bits: int = 8,
                        method="minmax", keep_float: Iterable[str] = KEEP_FLOAT,
                        per_channel: bool = True, ops: str = "weights") -> list[str]:
    """Writes the QDQ graph of the static float graph `src` to `dst` (+ `dst.data`).

    calibration_reader: an onnxruntime CalibrationDataReader (e.g. WindowReader) giving whole input
    feeds of `src`. method: "minmax", "entropy", "percentile" (or a CalibrationMethod). keep_float:
    node-name prefixes left unquantized. ops: "weights", "matmul" or "all" (OPS). Returns the file names
    written."""
    if activation_bits not in (8, 16):
        raise EdgemtpError(f"QDQ activation bits must be 8 or 16, got {activation_bits!r}")
    if ops not in OPS:
        raise EdgemtpError(f"QDQ ops {ops!r} must be one of {', '.join(OPS)}")
    method = _method_name(method)
    src, dst = Path(src), Path(dst)
    if not src.is_file():  # a bundle directory said "no such ONNX file", of a path that is there
        raise EdgemtpError(f"{src}: {not_an_onnx_file(src)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        model = onnx.load(str(src))  # quantize_static holds the whole model in memory too
        exclude = [n.name for n in model.graph.node if n.name.startswith(tuple(keep_float))]
        if ops == "weights":
            exclude += activation_matmuls(model)
        untie_gather_weights(model)
        onnx.save(model, str(Path(tmp) / "float.onnx"), save_as_external_data=True, location="float.onnx.data")
        del model
        _quantize(Path(tmp) / "float.onnx", dst, calibration_reader, activation_bits, method, exclude, per_channel,
                  OPS[ops])
    return [dst.name] + ([dst.name + ".data"] if (dst.parent / (dst.name + ".data")).is_file() else [])


def activation_matmuls(model) -> list[str]:
    """The MatMuls of two activations (attention's q . k and probs . v), which --qdq-ops weights leaves float:
    neither input is a weight (an initializer or a Constant's output)."""
    weights = {i.name for i in model.graph.initializer} | \
        {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not weights & set(n.input)]


def _method_name(method) -> str:
    """"minmax" | "entropy" | "percentile", or the matching onnxruntime CalibrationMethod."""
    name = getattr(method, "name", method)
    name = {"MinMax": "minmax", "Entropy": "entropy", "Percentile": "percentile"}.get(name, name)
    if name not in METHODS:
        raise EdgemtpError(f"calibration method {method!r} is unknown (choose from {', '.join(METHODS)})")
    return name


def _quantize(src: Path, dst: Path, reader, activation_bits: int, method: str, exclude: list[str],
              per_channel: bool, op_types: list[str] | None) -> None:
    # onnxruntime.quantization appends onnxruntime/transformers to sys.path for its own flat imports; an app
    # exporting in-process would then import from there any module of those names it lacks (the path is kept
    # until quantize_static is done, which may import more of them)
    path = list(sys.path)
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        # the histogram methods print their progress ("Number of histogram bins : 128") to standard output,
        # where `edgemtp export` prints only what it wrote
        with _without_preprocess_hint(), redirect_stdout(io.StringIO()):
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt16 if activation_bits == 16 else QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=True,
                op_types_to_quantize=op_types,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                calibration_providers=["CPUExecutionProvider"],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    finally:
        sys.path[:] = path


@contextmanager
def _without_preprocess_hint():
    """quantize_static logs "Please consider to run pre-processing before quantization" through the root
    logger. Its pre-processing (shape inference, graph optimization) is for traced models; our static graphs
    are built with their shapes and already simple, so the hint is only noise in `edgemtp export`. Other
    records pass, and a root logger without handlers gets a stderr one for the call only (what
    logging.warning's implicit basicConfig would otherwise add for good)."""
    root = logging.getLogger()
    hint = lambda record: "pre-processing before quantization" not in record.getMessage()  # noqa: E731
    handler = None if root.handlers else logging.StreamHandler()
    root.addFilter(hint)
    if handler:
        root.addHandler(handler)
    try:
        yield
    finally:
        root.removeFilter(hint)
        if handler:
            root.removeHandler(handler)


def untie_gather_weights(model: onnx.ModelProto) -> int:
    """Gives every other consumer of a weight that a Gather also reads (a tied embedding feeding the
    head Gemm) its own copy. ORT's quantizer would otherwise quantize the shared table per channel
    (for the Gemm) and hand the Gather's output the table's per-row scales: a broken graph.
    Returns the number of copies made."""
    inits = {t.name: t for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    copies: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "Gather":
            continue
        for i, name in enumerate(node.input):
            if name in gathered:
                if name not in copies:
                    copies[name] = name + ".untied"
                    t = onnx.TensorProto()
                    t.CopyFrom(inits[name])
                    t.name = copies[name]
                    model.graph.initializer.append(t)
                node.input[i] = copies[name]
    return len(copies)


class WindowReader:
    """Calibration feeds from real text: each text is tokenized and run through the float static graph
    window by window (StaticTarget); each window's whole input (ids, positions, masks and the cache
    as the float graph filled it) is one sample. At most `max_windows` samples (their number does not
    change the export's peak memory: min-max keeps two numbers a tensor), at most `per_text` from each text.

    Implements onnxruntime's CalibrationDataReader protocol (get_next() -> feed dict or None)."""

    def __init__(self, model_path: Path, contract: dict, tokenizer, texts: Iterable[str],
                 max_windows: int = 64, threads: int | None = None, per_text: int | None = None):
        from ..runtime.session import make_session
        from ..runtime.static_target import StaticTarget

        if max_windows < 1:
            raise EdgemtpError(f"max_windows {max_windows} must be at least 1")
        # no packed copy of the weights (~1 GB on Gemma 3 270M), held while quantize_static loads two more
        self.target = StaticTarget(make_session(Path(model_path), "cpu", threads, prepack=False), contract)
        self.tokenizer = _tokenizer(tokenizer)
        self.texts, self.max_windows, self.per_text = list(texts), max_windows, per_text
        self.count = 0  # samples given so far
        if not self.texts:
            raise EdgemtpError("calibration needs at least one text")
        self._feeds = self._windows()

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def _windows(self) -> Iterator[dict]:
        n, W, cap = 0, self.target.window, self.target.contract.capacity
        for text in self.texts:
            ids = np.asarray(self.tokenizer(text), np.int64)[:cap]
            if self.per_text:
                ids = ids[:self.per_text * W]
            cache = self.target.new_cache(1)
            for c in range(0, len(ids), W):
                if n == self.max_windows:
                    return
                chunk = ids[c:c + W]
                feed = self.target.feed(chunk, int(cache.lengths[0]))
                for s in self.target.contract.kv:
                    feed[C.past_key(s.layer)] = cache.keys[s.layer][:1]
                    feed[C.past_value(s.layer)] = cache.values[s.layer][:1]
                yield feed  # the calibrator runs it before asking for the next one
                n += 1
                self.count = max(self.count, n)
                self.target.step(chunk, cache, 0)


def _tokenizer(tok):
    """A callable text -> ids from a tokenizers.Tokenizer, a tokenizer.json path or a callable."""
    if callable(tok) and not hasattr(tok, "encode"):
        return tok
    if isinstance(tok, (str, Path)):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok))
    return lambda text: tok.encode(text).ids
