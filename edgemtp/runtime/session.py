"""ONNX Runtime sessions: execution-provider choice and session options."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnxruntime as ort

from ..errors import EdgemtpError

# short names users type -> ONNX Runtime provider names
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}


def resolve_provider(name: str, flag: str = "--provider") -> str:
    """Maps a short or full provider name to what this ONNX Runtime can run, falling back to CPU."""
    full = PROVIDERS.get(name.lower(), name)
    if full not in PROVIDERS.values():
        raise EdgemtpError(f"{flag} {name!r} is unknown (choose from {', '.join(PROVIDERS)})")
    if full not in ort.get_available_providers():
        warnings.warn(f"provider {name!r} is not available in this onnxruntime build; using the CPU",
                      stacklevel=2)
        return "CPUExecutionProvider"
    return full


def make_session(path: Path, provider: str = "cpu", threads: int | None = None,
                 profile_prefix: str | None = None, spin: bool = True, prepack: bool = True) -> ort.InferenceSession:
    """`profile_prefix`: record ONNX Runtime's per-op profile (a Chrome trace) to that file prefix.
    `spin` False: the session's threads sleep as soon as a run ends instead of spin-waiting for the next
    one. Spinning speeds one session up (~15% on plain decoding here), but with a target and an MTP
    drafter taking turns on the same cores each session's spinning threads steal the other's CPU:
    measured on 2 cores, greedy MTP K = 2 went from 0.70x to 1.32x plain decoding, hybrid K = 4 from
    1.46x to 2.17x, with spinning off in both.
    `prepack` False: ONNX Runtime keeps no packed copy of the MatMul weights (a second session over the same
    weights then costs ~7 MB instead of ~1.7 GB for Gemma 3 270M fp32, its passes run slower)."""
    opts = ort.SessionOptions()
    if not prepack:  # weights stay in the memory-mapped data file, shared with another session over it
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    full = resolve_provider(provider)
    providers = [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types for a bad graph
        raise EdgemtpError(f"{path}: onnxruntime could not load the graph ({str(e).splitlines()[0][:300]})") from None
