"""`edgemtp profile`: llama-bench-style rows, one per configuration, measured side by side in one run.

Each row: prefill (pp) and generation (tg) tokens/s as mean ± std over repetitions after a warm-up,
time to first token, acceptance and tokens per round (a draft and its verification: on a static bundle
a round can take several target passes), the per-round time split (drafter, the target's verify passes, the
rest: acceptance, sampling, bookkeeping), peak RSS and the bundle's size. Rows that cannot run here (provider not
available, prompt + generation beyond the KV capacity) are kept with a `skipped` reason.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter

import onnxruntime as ort

from ..bundle import load as load_bundle
from ..errors import ArgumentError, EdgemtpError, SwitchError
from .drafting import NoDrafter
from .engine import Draft, Engine
from .kv_cache import physical_memory, position_bytes
from .loading import check_fast_verify
from .packed_cache import check_packed_cache
from .sampling import Sampling
from .session import full_name
from .speculative import SpecStats, Speculative
from .stops import Stops

try:
    import resource
except ImportError:  # Windows
    resource = None

SCHEMA_VERSION = 2  # 2: tokens_per_forward renamed tokens_per_round, one run's std null (README)


@dataclass(frozen=True)
class RowConfig:
    draft_k: int
    batch: int
    prompt_tokens: int
    gen_tokens: int
    provider: str
    drafter: str  # "none" | "lookup" | "mtp" | "hybrid"
    head: str = ""  # the MTP drafter's logit head: "clustered" | "full" ("" without an MTP drafter)
    adaptive: bool = False  # draft_k is the most a round drafts (runtime.draft_length)
    draft_p_min: float = 0.0  # MTP and hybrid rows: Draft.p_min


@dataclass
class Row:
    config: RowConfig
    skipped: str = ""
    pp_tokens_per_s: list[float] = field(default_factory=list)
    tg_tokens_per_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    acceptance_rate: float = 0.0
    tokens_per_round: float = 0.0
    acceptance_by_position: list[float] = field(default_factory=list)
    split_s: dict = field(default_factory=dict)  # per round: draft / verify (target passes) / other: decode_s
    peak_rss_mb: float = 0.0
    peak_reset: bool = True  # False: the peak could not be reset before the row (see reset_peak_rss)

    def to_json(self) -> dict:
        out = {**asdict(self.config), "skipped": self.skipped or None}
        if self.skipped:
            return out
        for name in ("pp_tokens_per_s", "tg_tokens_per_s", "ttft_s"):
            values = getattr(self, name)
            # one run has no spread: null, not a measured spread of 0
            out[name] = {"mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else None}
        out.update(acceptance_rate=self.acceptance_rate, tokens_per_round=self.tokens_per_round,
                   acceptance_by_position=self.acceptance_by_position, split_ms_per_round=self.split_s,
                   peak_rss_mb=self.peak_rss_mb)
        return out


def prompt_ids(engine: Engine, n: int, text: str | None, offset: int = 0) -> list[int]:
    """n tokens of real text (by default the Python standard library's own source: always present)."""
    if text is None:
        import inspect
        import json.decoder

        try:
            text = "".join(Path(m.__file__).read_text(encoding="utf-8") for m in (inspect, json.decoder, statistics))
        except (OSError, UnicodeDecodeError):  # an embedded Python's library, compiled only (in a zip: Windows')
            raise EdgemtpError("the default prompt text, the Python standard library's source, is not installed "
                               "here: give --text-file") from None
    ids = engine.encode(text)
    if len(ids) < n + offset:
        ids = ids * (1 + (n + offset) // max(1, len(ids)))
    return ids[offset:offset + n]


def configs(draft_ks, batches, prompt_tokens, gen_tokens, provider, drafters, heads=("",),
            adaptive=False, p_min=0.0) -> list[RowConfig]:
    """One plain row (K = 0) per prompt size and batch, then each drafter (and MTP head) at each K > 0,
    and with `adaptive` at the largest K adaptively; the MTP drafter's rows with Draft.p_min `p_min`."""
    rows = []
    draft_ks, batches, prompt_tokens = (list(dict.fromkeys(v)) for v in (draft_ks, batches, prompt_tokens))  # once each
    ks = [k for k in draft_ks if k]
    for p, b in itertools.product(prompt_tokens, batches):
        if 0 in draft_ks:
            rows.append(RowConfig(0, b, p, gen_tokens, provider, "none"))
        for d in drafters:
            pm = p_min if d in ("mtp", "hybrid") else 0.0
            for h in (heads if d in ("mtp", "hybrid") else ("",)):
                rows += [RowConfig(k, b, p, gen_tokens, provider, d, h, draft_p_min=pm) for k in ks]
                if adaptive and ks:
                    rows.append(RowConfig(max(ks), b, p, gen_tokens, provider, d, h, adaptive=True, draft_p_min=pm))
    return rows


def drafters_for(bundle, drafter: str, provider: str = "cpu") -> list[str]:
    """--draft: comma list of lookup / mtp / hybrid; auto is what `edgemtp generate` uses by default."""
    from .drafting import auto_mode

    names = [d.strip() for d in drafter.split(",") if d.strip()]
    auto = auto_mode(bundle, provider)
    return list(dict.fromkeys(auto if d == "auto" else d for d in names))


def check_mtp_options(drafters: list[str], drafter: str, draft_ks, head: str, p_min: float,
                      drafter_provider: str | None) -> None:
    """head, p_min and drafter_provider apply to the rows that run the MTP drafter (mtp, hybrid at a K above 0):
    given where no row does, they would change nothing, silently. The refusal names the argument as the caller
    wrote it (ArgumentError), and the drafters and Ks in plain words, right from Python and the CLI alike."""
    if {"mtp", "hybrid"} & set(drafters) and any(draft_ks):
        return
    runs = (f"the drafter {drafter} runs {', '.join(drafters) or 'none'} here" if any(draft_ks) else
            f"draft K {','.join(map(str, draft_ks))} runs plain rows only")
    if head != "auto":
        raise ArgumentError("head", head, f"applies to MTP and hybrid rows only (they have a head), and {runs}")
    for name, value, given in (("p_min", p_min, p_min > 0),
                               ("drafter_provider", drafter_provider, drafter_provider is not None)):
        if given:
            raise ArgumentError(name, value, "applies to MTP and hybrid rows only (they run the MTP drafter), and "
                                f"{runs}", "--draft-p-min" if name == "p_min" else None)


def heads_for(bundle, head: str) -> list[str]:
    """--head: clustered / full / auto (every head the bundle's drafter has: clustered, and its full-head twin)."""
    if not bundle.has_graph("drafter"):
        return [""]
    own = bundle.graph("drafter").contract.get("head", {"kind": "full"})["kind"]
    have = [own] + (["full"] if bundle.has_graph("drafter_full_head") else [])
    return have if head == "auto" else [h.strip() for h in head.split(",") if h.strip()]


def uses_mtp(c: RowConfig) -> bool:
    return c.draft_k > 0 and c.drafter in ("mtp", "hybrid")


def skip_reason(c: RowConfig, capacity: int, bundle=None) -> str:
    """Why a row cannot run here ("" when it can). A static bundle verifies a draft longer than its window - 1
    in two passes, as `edgemtp generate` does, so rows of a K + 1 wider than the window run (and show what
    that costs)."""
    if full_name(c.provider) not in ort.get_available_providers():
        return f"provider {c.provider!r} is not available in this onnxruntime build"
    # The cache holds the prompt and every generated token but the last, and a round drafts no more than the
    # generation has left (Speculative._draft): K takes no room of its own. Counting a draft window of K + 1 too
    # skipped rows that generate runs to their last token (57 + 8 on 64 positions: even the plain row).
    if c.prompt_tokens + c.gen_tokens - 1 > capacity:
        return f"prompt {c.prompt_tokens} + gen {c.gen_tokens} needs {c.prompt_tokens + c.gen_tokens - 1} cache " \
               f"positions (all but the last token), beyond the KV capacity of {capacity}"
    if c.prompt_tokens < 1 or c.gen_tokens < 1 or c.batch < 1 or c.draft_k < 0:
        return "prompt_tokens, gen_tokens and batch must be >= 1, draft_k >= 0"
    if c.drafter not in ("none", "lookup", "mtp", "hybrid"):
        return f"drafter {c.drafter!r} is unknown (lookup, mtp, hybrid)"
    if c.drafter in ("mtp", "hybrid") and not has_head(bundle, c.head):
        return f"the bundle has no MTP drafter with a {c.head} head" if c.head else "the bundle has no MTP drafter"
    need, have = row_bytes(c, bundle) if bundle is not None else 0, physical_memory()
    if have and need > have // 2:
        return f"batch {c.batch} needs about {need / 2**30:.1f} GiB of KV cache and logits; the memory here is " \
               f"{have / 2**30:.1f} GiB (the RAM, or a container's lower limit)"
    return ""


def row_bytes(c: RowConfig, bundle) -> int:
    """What a row's sequences touch beyond the weights: the KV of every position they reach and a verify
    pass's logits (both per sequence, times the batch)."""
    contract = bundle.target_contract
    per_position = position_bytes(contract.kv)
    positions = c.prompt_tokens + c.gen_tokens + c.draft_k + 1
    return c.batch * (per_position * positions + 2 * contract.vocab_size * 4 * (c.draft_k + 1))



def has_head(bundle, head: str) -> bool:
    return bundle is not None and bundle.has_graph("drafter") and head in heads_for(bundle, "auto")


def graph_for(bundle, head: str) -> str:
    own = bundle.graph("drafter").contract.get("head", {"kind": "full"})["kind"]
    return "drafter" if head == own else "drafter_full_head"


def run_row(engine: Engine, c: RowConfig, repetitions: int, text: str | None, reset_peak: bool = False) -> Row:
    row = Row(c)
    prompts = [prompt_ids(engine, c.prompt_tokens, text, offset=97 * b) for b in range(c.batch)]
    draft = Draft(c.drafter, c.draft_k, c.adaptive, c.draft_p_min) if c.draft_k else None
    drafter = engine.drafter(draft.mode, graph_for(engine.bundle, c.head) if c.head else "drafter",
                             c.adaptive) if draft else None
    totals = SpecStats()
    row.peak_reset = reset_peak and reset_peak_rss()
    for rep in range(repetitions + 1):  # the first run warms up and is not counted
        stats = SpecStats()
        if c.batch == 1 and not draft:
            plain_run(engine, prompts[0], c.gen_tokens, stats)
        else:
            spec = Speculative(engine.target, drafter or NoDrafter(), c.draft_k if draft else 0, adaptive=c.adaptive,
                               p_min=c.draft_p_min)
            spec.generate(prompts, c.gen_tokens, Sampling(), stop_ids=(), stats=stats)
        if rep == 0:
            continue
        row.pp_tokens_per_s.append(stats.prefill_tokens / stats.prefill_s)
        row.tg_tokens_per_s.append(stats.decode_tokens / stats.decode_s if stats.decode_s else 0.0)
        # a batch's rows are prefilled one after the other and each gets its first token only when all are:
        # the whole prefill (over the batch, it read the per-row prefill time, 1/batch of any row's wait)
        row.ttft_s.append(stats.prefill_s)
        for name in ("rounds", "drafted", "accepted", "draft_s", "verify_s", "other_s"):
            setattr(totals, name, getattr(totals, name) + getattr(stats, name))
        totals.drafted_at, totals.accepted_at = _sum(totals.drafted_at, stats.drafted_at), \
            _sum(totals.accepted_at, stats.accepted_at)
        totals.decode_tokens += stats.decode_tokens
    rounds = max(1, totals.rounds)
    row.acceptance_rate = totals.acceptance_rate
    row.acceptance_by_position = totals.acceptance_by_position
    row.tokens_per_round = totals.decode_tokens / rounds
    row.split_s = {k: 1e3 * getattr(totals, k + "_s") / rounds for k in ("draft", "verify", "other")}
    row.peak_rss_mb = peak_rss_mb()
    return row


def plain_run(engine: Engine, prompt: list[int], gen_tokens: int, stats: SpecStats) -> None:
    """One prompt without drafting, in the loop generate runs for it (Engine._plain), with no stop token. The
    speculative loop with no drafter costs ~55 us a step more of bookkeeping, and this row is the speedups'
    denominator. Each step is a round of one target pass: its pass is the verify time and the rest (sampling,
    stop checks) the other time, as in a drafting row, whose verify holds no sampling."""
    target, passes = engine.target, []
    forward = target.forward

    def timed(*args, **kwargs):
        t0 = perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            passes.append(perf_counter() - t0)

    target.forward = timed  # on the engine's own target, so the row still runs generate's loop; undone below
    try:
        tokens = engine._plain(prompt, gen_tokens, Sampling(), stats, Stops())
        next(tokens, None)  # the first token: the prefill's passes are in prefill_s, not decode_s
        passes.clear()
        for _ in tokens:
            pass
    finally:
        del target.forward
    stats.rounds, stats.verify_s = stats.decode_tokens, sum(passes)
    stats.other_s = stats.decode_s - stats.verify_s


def reset_peak_rss() -> bool:
    """Starts the process's peak resident memory afresh (Linux), so a row's peak is its own run's on its
    engine, not the first engine's or an earlier, larger row's. Says whether it did: some kernels and
    sandboxes refuse /proc/self/clear_refs or ignore it (CI's did), and elsewhere there is no /proc; then
    the peak stays the process's so far, and the result says so (`peak_rss`). The reset is the whole
    process's, for good: its VmHWM and getrusage's ru_maxrss drop to the current size (profile() does it
    only when asked to, with reset_peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status = _proc_status_kib()
    except OSError:
        return False
    # After a reset the peak is the current size; a peak still above it means the write was ignored.
    return "VmHWM" in status and status["VmHWM"] - status.get("VmRSS", 0) <= 4096


def _proc_status_kib() -> dict[str, int]:
    out = {}
    # its Name: line is the process's name as bytes (cut to 15, maybe within a character), not UTF-8 text
    for line in Path("/proc/self/status").read_text(errors="replace").splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def peak_rss_mb() -> float:
    try:
        return _proc_status_kib()["VmHWM"] / 1024
    except (OSError, KeyError):
        pass
    if resource is None:  # no /proc and no getrusage: Windows
        return windows_peak_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class _MemoryCounters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS (psapi.h)
    _fields_ = [("cb", ctypes.c_uint32), ("PageFaultCount", ctypes.c_uint32)] + [
        (name, ctypes.c_size_t) for name in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                                             "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage",
                                             "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]


def windows_peak_mb(kernel32=None) -> float:
    """The process's peak working set, Windows' peak RSS (it cannot be reset: reset_peak_rss says False there,
    and the profile labels its peaks the process's). 0.0 where it cannot be read. `kernel32`: for tests."""
    if kernel32 is None:
        if sys.platform != "win32":
            return 0.0
        kernel32 = ctypes.WinDLL("kernel32")
    kernel32.GetCurrentProcess.restype = ctypes.c_void_p  # a pseudo-handle, -1: pointer-wide, not an int
    kernel32.K32GetProcessMemoryInfo.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
    counters = _MemoryCounters(cb=ctypes.sizeof(_MemoryCounters))
    if not kernel32.K32GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
        return 0.0
    return counters.PeakWorkingSetSize / 2**20


def _sum(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]


def profile(bundle_dir: Path, prompt_tokens=(128, 512), gen_tokens=128, repetitions=5, draft_ks=(0, 2, 4, 6),
            batches=(1,), provider="cpu", threads=None, drafter="auto", text=None, progress=None,
            head="auto", drafter_provider=None, fast_verify=False, adaptive=False, p_min=0.0,
            reset_peak=False, packed_cache=None) -> dict:
    """Runs every configuration and returns the documented JSON object (see `SCHEMA` in the README).

    drafter: comma list of lookup / mtp / hybrid / auto; head: comma list of clustered / full / auto;
    adaptive: also a row per drafter (and head) drafting adaptively up to the largest K; p_min: the MTP drafter's
    Draft.p_min. reset_peak: reset the process's peak RSS before each row (Linux: reset_peak_rss), so each row's
    peak_rss_mb is its own; the caller's own peak reading is lost for good, so only `edgemtp profile`, a process
    of its own, asks. Without it the peaks are the process's so far (`peak_rss`: "process"). packed_cache: every
    engine's target from the packed copy under that directory (Engine.load's packed_cache)."""
    bundle = load_bundle(bundle_dir, verify=False)
    drafters = drafters_for(bundle, drafter, provider)
    check_mtp_options(drafters, drafter, draft_ks, head, p_min, drafter_provider)
    check_fast_verify(bundle, fast_verify)
    if fast_verify and max(batches) < 2:  # a pass of one row runs the target graph (Target.forward_outputs)
        # the batches named in plain words, right from Python (batches=) and the CLI (--batch) alike
        raise SwitchError("fast_verify", True, "needs rows of a batch above 1 (only they run the batched verify "
                          f"graph), and batch {','.join(map(str, batches))} has none")
    check_packed_cache(packed_cache, provider)
    todo = configs(draft_ks, batches, prompt_tokens, gen_tokens, provider, drafters, heads_for(bundle, head), adaptive,
                   p_min)
    rows: list[Row | None] = [None] * len(todo)
    done = 0
    # Each row runs on the engine `edgemtp generate` loads for it: rows drafting with the MTP drafter on a
    # target whose threads sleep between runs, the others (plain, prompt lookup) on one whose threads
    # spin. One engine for all rows made one kind pay for the other's setting (see session.make_session).
    # The engines are loaded one after the other, so the memory of only one is held at a time.
    capacity = bundle.target_contract.capacity
    if progress:  # the bar at 0 now: the engine's load and the first row's runs take seconds
        progress(0, len(todo), "")
    for mtp in (False, True):
        mine = [i for i, c in enumerate(todo) if uses_mtp(c) == mtp]
        for i in mine:
            reason = skip_reason(todo[i], capacity, bundle)
            rows[i] = Row(todo[i], skipped=reason) if reason else None
        if all(rows[i] is not None for i in mine):  # nothing of this kind runs here: no engine to load
            done += len(mine)
            if progress and mine:
                progress(done, len(todo), "skipped rows")
            continue
        engine = Engine.load(bundle_dir, provider=provider, threads=threads, verify=False,
                             drafter_provider=drafter_provider, mtp=mtp, fast_verify=fast_verify,
                             packed_cache=packed_cache)
        for i in mine:
            c = todo[i]
            if rows[i] is None:
                rows[i] = run_row(engine, c, repetitions, text, reset_peak)
            done += 1
            if progress:
                progress(done, len(todo), f"k={c.draft_k} batch={c.batch} prompt={c.prompt_tokens}")
        del engine
        gc.collect()  # its sessions' memory goes before the next engine loads
    return {"schema_version": SCHEMA_VERSION, "bundle": str(bundle_dir),
            "bundle_bytes": sum(f["bytes"] for f in bundle.manifest["files"].values()),
            "threads": threads, "repetitions": repetitions, "fast_verify": fast_verify,
            "packed_cache": packed_cache is not None, "drafter_provider": drafter_provider,
            "peak_rss": "row" if all(r.peak_reset for r in rows) else "process",
            "ceiling": ceiling(bundle, threads, prompt_tokens, gen_tokens), "rows": [r.to_json() for r in rows]}


def ceiling(bundle, threads, prompt_tokens=(), gen_tokens: int = 0) -> dict:
    """Plain decoding is bandwidth-bound: every weight byte is read once per token (but the tables a step only
    gathers rows of: bandwidth.decode_bytes), and the KV cache the new token attends to. The weights alone give
    `tg_tokens_per_s`; `by_prompt_tokens` adds, for each prompt length, the cache its generation's steps read on
    average: SmolLM2-135M's 3 KV heads over 30 layers are 94 MB a step at
    2,048 tokens beside 540 MB of weights, so a ceiling of the weights alone flatters long prompts."""
    from .bandwidth import decode_bytes, measure_bandwidth

    weights = decode_bytes(bundle)
    bw = measure_bandwidth(threads)
    by_prompt = []
    capacity = bundle.target_contract.capacity
    for p in sorted(set(prompt_tokens)):
        # the steps after the first token (which prefill gives) attend to p, p + 1, ... cached positions; none
        # past the capacity, where a row is skipped (a --gen-tokens of 1e8 summed 1e8 steps one at a time)
        contexts = range(p, max(p + 1, min(p + gen_tokens - 1, capacity + 1)))
        read = sum(decode_bytes(bundle, c) for c in contexts) / len(contexts)
        by_prompt.append({"prompt_tokens": p, "read_bytes": round(read), "tg_tokens_per_s": bw / max(1, read)})
    return {"bandwidth_gb_s": bw / 1e9, "weight_bytes": weights, "tg_tokens_per_s": bw / max(1, weights),
            "by_prompt_tokens": by_prompt}


def speedups(result: dict) -> list[dict]:
    """tg of each drafting row over the plain row of the same batch and prompt (the trade-off)."""
    base = {(r["batch"], r["prompt_tokens"]): r["tg_tokens_per_s"]["mean"]
            for r in result["rows"] if not r["skipped"] and r["draft_k"] == 0}
    out = []
    for r in result["rows"]:
        key = (r["batch"], r["prompt_tokens"])
        if not r["skipped"] and r["draft_k"] and key in base:
            out.append({**{k: r.get(k, "") for k in ("drafter", "head", "adaptive", "draft_k", "batch",
                                                     "prompt_tokens")},
                        "speedup": r["tg_tokens_per_s"]["mean"] / base[key]})
    return out
