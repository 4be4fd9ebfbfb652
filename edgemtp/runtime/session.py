"""ONNX Runtime sessions: execution-provider choice and session options."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnxruntime as ort

from ..errors import ArgumentError, EdgemtpError, app_stacklevel, memory_limit
from . import hugepages

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


# the oldest ONNX Runtime that runs bundles: 1.22 and older cannot load opset 23 graphs, and 1.23's
# GroupQueryAttention gave other tokens than transformers past a sliding window
ORT_MIN = (1, 24)
# the oldest that runs an int4 bundle (pyproject.toml asks for it: the newest any bundle needs): 1.24-1.26's
# GatherBlockQuantized read an int4 table (two 4-bit values a byte, a uint8 zero point per block) wrong, so the
# embedding of every token in the table's 4-bit part (Gemma 3 270M: all but the 32,768 most frequent) was off and a
# prompt holding one gave other tokens. Not the floor of every bundle: ONNX Runtime's OpenVINO build, for one, was
# at 1.24 when this was found, and its fp32 and int8 bundles run right
ORT_MIN_INT4 = (1, 27)


def check_onnxruntime(need: tuple[int, int] = ORT_MIN, who: str = "edgemtp", why: str = "") -> None:
    """An older ONNX Runtime an app already had (pip keeps one that met an earlier floor) is named, not run."""
    if tuple(int(x) for x in ort.__version__.split(".")[:2]) < need:
        version = ".".join(map(str, need))
        raise EdgemtpError(f"onnxruntime {ort.__version__} is installed; {who} needs {version} or later{why}: "
                           f"pip install 'onnxruntime>={version}'")


def full_name(spec: str) -> str:
    """The ONNX Runtime name of a provider spec's provider: 'openvino:device_type=NPU' -> OpenVINOExecutionProvider
    (short or full names, any case; an unknown name as it is)."""
    name = spec.partition(":")[0]
    return PROVIDERS.get(name.lower(), name)


def provider_options(spec: str, param: str = "provider") -> dict[str, str]:
    """The options after a provider's name, as ONNX Runtime's provider_options: 'openvino:device_type=NPU,
    precision=FP16' (OpenVINO on an Intel NPU, whose default device is the CPU), 'qnn:htp_performance_mode=burst'.
    They are the provider's own: a key it does not know fails at load, with its message."""
    name, colon, rest = spec.partition(":")
    options = {}
    for item in rest.split(",") if colon else ():
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ArgumentError(param, spec, f"option {item.strip()!r} should be KEY=VALUE (e.g. "
                                "openvino:device_type=NPU)")
        options[key] = value
    if options and full_name(spec) == "CPUExecutionProvider":
        raise ArgumentError(param, spec, "the CPU provider takes no options (they are for another provider's, e.g. "
                            "openvino:device_type=NPU)")
    return options


def runs_on_cpu(name: str) -> bool:
    """Whether a session asked for on provider `name` (short or full, any case) runs on the CPU provider:
    it is the CPU, or it is not in this build (resolve_provider falls back)."""
    full = full_name(name)
    return full == "CPUExecutionProvider" or full not in ort.get_available_providers()


def resolve_provider(name: str, param: str = "provider", warn: bool = True) -> str:
    """Maps a provider spec (a short or full provider name, and its options after a ':') to the provider this ONNX
    Runtime can run, falling back to CPU (with a warning unless `warn` is False: a check made before the load
    that warns); bad options are named here, before any work."""
    full = full_name(name)
    if full not in PROVIDERS.values():
        raise ArgumentError(param, name, f"is unknown (choose from {', '.join(PROVIDERS)}; options after a ':', "
                            "e.g. openvino:device_type=NPU)")
    provider_options(name, param)
    if full not in ort.get_available_providers():
        if warn:
            # at the app's Engine.load (or, for a drafter_provider, its first drafting call), not at make_session
            warnings.warn(f"provider {name!r} is not available in this onnxruntime build; using the CPU",
                          stacklevel=app_stacklevel())
        return "CPUExecutionProvider"
    return full


def check_threads(threads: int | None) -> None:
    """--threads: ONNX Runtime takes any number and makes that many threads (100,000 of them grew to 16 GB
    without finishing a pass), so refuse what cannot be meant: below 0 (0 and None: ONNX Runtime's
    default, one per core), or more than 4 per core."""
    most = 4 * (os.cpu_count() or 1)
    if threads is not None and not 0 <= threads <= most:
        raise ArgumentError("threads", threads, f"must be between 0 and {most} (0: one per core; at most 4 per "
                            "core of this machine)")


CGROUP = Path("/sys/fs/cgroup")  # where a container sees its own cgroup


def quota_cpus() -> int | None:
    """CPUs' worth of time a container's CPU quota gives it (docker --cpus, a Kubernetes CPU limit), rounded up:
    cgroup v2's cpu.max ("150000 100000": 2), else v1's cfs quota and period; None where none is set or
    readable."""
    try:
        quota, period = (CGROUP / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota, period = ((CGROUP / "cpu" / f"cpu.cfs_{n}_us").read_text().strip() for n in ("quota", "period"))
        except OSError:
            return None
    try:
        quota, period = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return -(-quota // period) if quota > 0 and period > 0 else None  # v1's -1: no quota


def cgroup_memory() -> int | None:
    """Bytes a container's memory limit lets this process use (docker --memory, a Kubernetes memory limit): cgroup
    v2's memory.max, else v1's memory.limit_in_bytes; None where none is set ("max") or readable. v1's "no limit"
    is a huge number (9223372036854771712): a caller taking the smaller of it and the RAM leaves it out."""
    for path in (CGROUP / "memory.max", CGROUP / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text()
        except OSError:
            continue
        try:
            return int(text)
        except ValueError:  # "max": no limit
            return None
    return None


CPUS = Path("/sys/devices/system/cpu")  # the kernel's CPU topology


def physical_cores(cpus: set[int]) -> int:
    """The physical cores `cpus` (logical CPU numbers) are on: SMT siblings (hyper-threads) count once, as in
    ONNX Runtime's default; each CPU its own core where the topology is not readable (not Linux)."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add((CPUS / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(cpu)
    return len(cores)


def intra_op_threads(threads: int | None) -> int | None:
    """The intra-op thread count a session is made with: `threads` where given, else allowed_cpus() (None:
    ONNX Runtime's own default)."""
    return threads or allowed_cpus()


def allowed_cpus() -> int | None:
    """The intra-op threads for the default (--threads unset or 0) where this process may run on fewer CPUs
    than the machine has (its affinity, its container's CPU quota): one per physical core it may use, at most
    the quota; else None (ONNX Runtime's own default, one per physical core of the machine). ONNX Runtime
    counts the machine's cores and ignores both (taskset, docker --cpuset-cpus or --cpus, a CI runner's
    limits): under `taskset -c 0` on 2 cores its 2 threads took turns on one CPU, and plain decoding of Gemma 3
    270M ran 13-16 tok/s against 19-21 with one thread. Hyper-threads count once, as in its default: one
    thread each gave `taskset -c 0-14` on 8 cores of 2 threads 15 threads, where the whole machine has 8."""
    machine = os.cpu_count() or 1
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(machine))  # not on macOS
    quota = quota_cpus()
    if len(cpus) >= machine and (quota or machine) >= machine:
        return None
    return min(physical_cores(cpus), quota or machine)


def make_session(path: Path, provider: str = "cpu", threads: int | None = None,
                 profile_prefix: str | None = None, spin: bool = True, prepack: bool = True,
                 huge_pages: bool = False, initializers: dict | None = None,
                 packed_to: Path | None = None) -> ort.InferenceSession:
    """`profile_prefix`: record ONNX Runtime's per-op profile (a Chrome trace) to that file prefix.
    `spin` False: the session's threads stop spin-waiting as soon as a run ends. Spinning between runs
    suits a lone session, but with a target and an MTP drafter taking turns on the same cores each
    session's spinning threads steal the other's CPU: measured on 2 cores, greedy MTP K = 2 went from
    0.70x to 1.32x plain decoding, hybrid K = 4 from 1.46x to 2.17x, with spinning off in both. Spinning
    within a run stays on (session.force_spinning_stop rather than allow_spinning 0): with no spinning at
    all each of a decode step's ~370 ops waits for sleeping threads, and plain decoding ran 4–12% slower,
    hybrid K = 4 6–7% slower (benchmarks/perf_table.py, Gemma 3 270M).
    `prepack` False: ONNX Runtime keeps no packed copy of the MatMul weights (a second session over the same
    weights then costs ~7 MB instead of ~1.07 GB for Gemma 3 270M fp32, its passes run slower).
    `huge_pages`: move the weights ONNX Runtime copied into its memory onto 2 MB pages once the session is
    built (see hugepages.py: a slower load for faster steps, worth it in a long-running process).
    `initializers`: name -> OrtValue the session reads in place of the graph's initializer of that name (a
    head table on 2 MB pages, head_pages.py); the session keeps them alive.
    `packed_to`: also write the optimized graph there, its packed weights in its data file (packed_cache.py)."""
    check_onnxruntime()
    check_threads(threads)
    opts = ort.SessionOptions()
    if not prepack:  # weights stay in the memory-mapped data file, shared with another session over it
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:  # spin-wait between the ops of a run, not after it
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads := intra_op_threads(threads):
        opts.intra_op_num_threads = threads
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    if packed_to is not None:
        opts.optimized_model_filepath = str(packed_to)
        data = f"{packed_to.name}.data"
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    full = resolve_provider(provider)
    options = provider_options(provider) if full != "CPUExecutionProvider" else {}  # the fallback takes none
    providers = [full] if full == "CPUExecutionProvider" else [(full, options), "CPUExecutionProvider"]
    before = hugepages.anonymous_regions() if huge_pages else None
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types for a bad graph, or a provider option it refuses
        if "std::bad_alloc" in str(e):
            limit = memory_limit()
            raise EdgemtpError(f"{path}: out of memory loading the graph (std::bad_alloc{'; ' * bool(limit)}"
                               f"{limit})") from None
        given = f" with provider {provider!r}" if options else ""
        raise EdgemtpError(f"{path}: onnxruntime could not load the graph{given} "
                           f"({str(e).splitlines()[0][:300]})") from None
    if before is not None:
        hugepages.collapse_new_regions(before)
    session.edgemtp_initializers = initializers  # ONNX Runtime reads them and does not hold them
    return session
