"""A device's own copy of a bundle's target graph with ONNX Runtime's packed weights in its data file
(Engine.load's `packed_cache`, the CLI's --packed-cache DIR).

At load ONNX Runtime repacks every MatMul's weights into its kernels' layout, in anonymous memory: 1.0 GB for Gemma
3 270M fp32, private to the process, memory a phone's system can only reclaim by killing it, and on 4 KB pages.
ONNX Runtime can instead write the packed weights into the data file of an optimized copy of the graph
(session.save_external_prepacked_constant_initializers) and map them from there at every later load. Then they are
page cache: shared by the processes that load the copy, dropped and read again under memory pressure, and (on a file
system with large folios, e.g. ext4 on Linux 6.x) on 2 MB pages, which decode steps read faster. Measured on Gemma
3 270M fp32 (docs/measurements.md, session 56): anonymous memory after load 1,137 -> 115 MB, decode steps 1.02x as
fast beside the bandwidth probe (benchmarks/bench_decode.py --packed-cache) and 1.06-1.13x in plain generation.

The copy is ONNX Runtime's optimized graph: it belongs to one ONNX Runtime version and one CPU (its instruction set
picks the kernels and their layouts), so it is kept under a key of those and of the target's files' sha256s, built
the first time its key is missing (~10 s for Gemma 3 270M) and reused after. Its price is disk: the data file holds
the original weights (ONNX Runtime reads them at load to find their packed forms) and the packed ones, 2.15 GB beside
the 1.08 GB target (2.82 GB as ONNX Runtime writes it, the head table once for each of its two names:
share_duplicates keeps it once). A build removes the copies of the same target that it supersedes on this device
(remove_superseded: an older onnxruntime's).

A copy gets the modes mkdir() and open() give (the umask), as a bundle does: in a cache directory shared by several
users (a service and its clients), each maps the copy the first one built. They are the bundle's weights, no more
private than its files; a cache meant for one user only is a directory only that user can read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import warnings
from pathlib import Path

import onnxruntime as ort

from .. import bundle as bundle_mod
from .. import onnx_wire
from .. import scratch
from ..errors import ArgumentError, EdgemtpError, app_stacklevel
from ..verified import Record

FORMAT = 1  # of the copies this module makes: a change makes new keys, so older copies are never read
RECORD = "edgemtp-packed.json"  # in a copy's directory: what its key was made of, and its files' sizes
GRAPH = "target.onnx"
DATA = GRAPH + ".data"
CPUINFO = "/proc/cpuinfo"


def check_packed_cache(cache, provider: str) -> None:
    """Engine.load's and profile's `packed_cache` (the CLI's --packed-cache), before any work: a path, for a session
    on the CPU (the packed layouts are ONNX Runtime's CPU kernels'), not at or under a file. A missing directory is
    made at the load, and one that cannot be written is fine where the copy is already in it. Profile checks here
    too, not only at its first engine's load: where every row is skipped no engine loads."""
    from .session import runs_on_cpu

    if cache is None:
        return
    if not isinstance(cache, (str, os.PathLike)) or not str(cache):
        raise ArgumentError("packed_cache", cache, "must be a directory's path (str or pathlib.Path) or None")
    # the path as text: a pathlib.Path's repr named the class in the CLI's message
    given = os.fspath(cache)
    if not runs_on_cpu(provider):
        raise ArgumentError("packed_cache", given, f"keeps the packed weights of ONNX Runtime's CPU kernels, and the "
                            f"target runs on provider {provider!r} (give no packed cache there)")
    path = Path(cache).expanduser()
    if (link := scratch.link_to_nothing(path)) is not None:  # else named at the build, after the bundle's load
        raise ArgumentError("packed_cache", given, ("is" if link == path else f"is under {link},") +
                            " a symbolic link to nothing (dangling, or a loop)")
    here = scratch.nearest_existing(path)
    if not here.is_dir():  # else mkdir's error, after the bundle's load: 'Not a directory' or 'File exists'
        raise ArgumentError("packed_cache", given, "is a file, not a directory" if here == path else
                            f"is under {here}, which is a file, not a directory")


# The flags of /proc/cpuinfo that ONNX Runtime's CPU kernels (MLAS) pick their kernels and packed layouts by: the
# instruction sets, as Linux names them, by prefix. Only these are keyed on: the others are mitigations and platform
# facts (md_clear, ibrs, flush_l1d, hypervisor on x86; ssbs, paca, evtstrm on Arm) that a kernel or microcode update
# adds or drops, and each such update made another 2.15 GB copy for the same kernels.
ISA_PREFIXES = {
    # x86: sse* (sse2, sse4_1...), ssse3, pni (SSE3's name there), avx* (avx2, avx512*, avx_vnni...), fma, f16c,
    # bmi1/2, amx*
    "flags": ("sse", "ssse3", "pni", "avx", "fma", "f16c", "bmi", "amx"),
    # Arm: fp, fphp, asimd* (asimdhp, asimddp: the dot product), sve*, sme*, i8mm, bf16 (dotprod: another kernel's name
    # for asimddp)
    "Features": ("fp", "asimd", "sve", "sme", "i8mm", "bf16", "dotprod"),
}


def cpu_identity() -> dict:
    """The CPU as its kernels' choice depends on it: the model name and instruction-set flags (Linux's
    /proc/cpuinfo, x86 'flags' or Arm 'Features'; Arm's implementer and part), else what the platform module
    says."""
    seen = {}
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                # Arm: 'CPU part' is numbered by each implementer, two vendors' cores can share one (x86 has
                # neither, so its keys are as before)
                if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in seen:
                    seen[key] = " ".join(sorted(value.split()))
    except OSError:
        pass
    return kernels_choice(seen) if seen else {"processor": platform.processor()}


def kernels_choice(cpu: dict) -> dict:
    """`cpu` (cpu_identity's, or a record's of an older edgemtp that kept every flag) with the flags outside
    ISA_PREFIXES left out."""
    return {key: " ".join(w for w in value.split() if w.startswith(ISA_PREFIXES[key])) if key in ISA_PREFIXES
            else value for key, value in cpu.items()}


def source_of(bundle) -> dict:
    """What a copy of `bundle`'s target depends on: each of its files' sha256, ONNX Runtime's version, the machine
    and the CPU."""
    target = bundle.graph("target").path.name
    files = [target, *bundle.facts["target"].data_files] if "target" in bundle.facts else [target]
    return {"format": FORMAT, "files": sha256s(bundle, sorted(set(files))),
            "onnxruntime": ort.__version__, "machine": platform.machine(), "cpu": cpu_identity()}


def sha256s(bundle, files: list[str]) -> dict:
    """File -> its sha256 as it is now: the manifest's where this machine's record knows the file unchanged since
    it matched (verified.py: bundle.load with verify just checked it), else hashed. With verify=False load checks
    sizes only and runs the files as they are: weights edited under an unchanged manifest loaded the copy of the
    weights the manifest names."""
    record, out = Record(), {}
    for rel in files:
        p = bundle_mod.inside(bundle.dir, rel)
        listed = bundle.manifest["files"][rel]["sha256"]
        try:
            st = p.stat()
            if record.known(p, st, listed):
                out[rel] = listed
                continue
            out[rel] = bundle_mod.sha256(p)
        except OSError as e:
            raise EdgemtpError(f"{bundle.dir / rel}: cannot read it ({e.strerror or e})") from None
        record.add(p, st, out[rel])
    record.save()
    return out


def key_of(source: dict) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:24]


def whole(copy: Path, source: dict) -> bool:
    """Whether `copy` is a finished copy made from `source`, its files the sizes it recorded (a cache directory
    holds what a full disk or someone else left: anything else is built again). The graph must be listed, and the
    data file wherever there is one: a record listing neither passed a copy with them missing or cut short."""
    try:
        record = json.loads((copy / RECORD).read_text(encoding="utf-8"))
        sizes = record["bytes"]
        needed = {GRAPH, DATA} if os.path.lexists(copy / DATA) else {GRAPH}
        return record["source"] == source and needed <= sizes.keys() and all(
            (copy / rel).stat().st_size == size for rel, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def remove_superseded(cache: Path, source: dict) -> None:
    """Removes the copies in `cache` that the copy of `source`, just built, supersedes on this device (superseded()):
    a pip upgrade of onnxruntime left the previous 2.15 GB copy of the same target there for good. A process mapping
    one keeps its files (Linux keeps an unlinked file's pages while mapped); where a removal fails (a file open on
    Windows) the copy stays. Only directories named by their record's key are read: nothing else is this module's."""
    try:
        entries = list(cache.iterdir())
    except OSError:
        return
    for copy in entries:
        try:
            theirs = json.loads((copy / RECORD).read_text(encoding="utf-8"))["source"]
            if copy.is_symlink() or key_of(theirs) != copy.name or not superseded(theirs, source):
                continue
            # renamed aside first, as scratch.replace_dir does: a removal cut short (a kill) leaves a hidden
            # directory the next load removes (remove_stale), not a copy missing files under its key
            aside = cache / f".packed-old-{secrets.token_hex(4)}"
            os.replace(copy, aside)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        shutil.rmtree(aside, ignore_errors=True)


def superseded(theirs: dict, ours: dict) -> bool:
    """Whether a copy made from `theirs` is one the copy of `ours` replaces: made from the same target files on the
    same machine and CPU (as its kernels' choice goes: an older edgemtp keyed on every flag, and on an Arm CPU's
    part without its implementer), for an older onnxruntime or FORMAT, or for the same ones under another key. A
    newer version's copy stays: two installs sharing the cache (a venv beside the system's) would each remove the
    other's at every switch, 10 s and 2.15 GB of writes; the older one builds its copy once, then both are kept.
    Other targets' copies stay (another bundle, or this one before a re-export, which may still be loaded from
    elsewhere), and so do other CPUs' (a cache shared between machines)."""
    if theirs == ours or (theirs["files"], theirs["machine"]) != (ours["files"], ours["machine"]):
        return False
    mine = kernels_choice(ours["cpu"])
    if "CPU implementer" not in theirs["cpu"]:  # an older edgemtp's copy: keyed on the part alone
        mine.pop("CPU implementer", None)
    if kernels_choice(theirs["cpu"]) != mine or theirs["format"] > ours["format"]:
        return False
    return theirs["onnxruntime"] == ours["onnxruntime"] or release(theirs["onnxruntime"]) < release(ours["onnxruntime"])


def release(version: str) -> tuple[int, ...]:
    """A version's leading numbers ('1.22.0.dev20250101' -> (1, 22, 0)); () where there are none."""
    found = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in found.group().split(".")) if found else ()


def packed_target(bundle, cache: Path, provider: str, threads: int | None) -> Path:
    """The graph file of the packed copy of `bundle`'s target under `cache`, built first if missing."""
    cache = Path(cache).expanduser()
    if cache.exists() and not cache.is_dir():
        raise EdgemtpError(f"{cache}: not a directory (the packed cache's)")
    if (link := scratch.link_to_nothing(cache)) is not None:  # mkdir's error there reads 'File exists'
        raise EdgemtpError(f"{link}: a symbolic link to nothing (the packed cache's)")
    if bundle.dir.resolve() in (cache.resolve(), *cache.resolve().parents):
        # the bundle's files are its manifest's, and go wherever it is copied: this machine's copies do not
        raise EdgemtpError(f"{cache}: inside the bundle directory {bundle.dir}; keep the packed cache elsewhere")
    # at every load, not only at a build: a run right after a killed build spares its directory (a minute's
    # grace, scratch.py), builds, and the loads after it build nothing, so it would stay for good
    for prefix in (".packing-", ".packed-old-"):
        scratch.remove_stale(cache, prefix)
    source = source_of(bundle)
    copy = cache / key_of(source)
    if whole(copy, source):
        return copy / GRAPH
    try:
        # one build at a time: two at once each wrote the whole copy (twice the disk), then renamed one over the
        # other while that run loaded it. A run that waited finds the copy whole. A build that fails (a full disk,
        # Ctrl-C) removes the cache directory it made (empty: the build's scratch directory is gone by then)
        with scratch.made_and_locked(cache, waiting=lambda: warnings.warn(
                f"{cache}: waits for another run to build a packed copy there", stacklevel=app_stacklevel())):
            if not whole(copy, source):
                build(bundle, copy, source, provider, threads)
                remove_superseded(cache, source)
    except OSError as e:
        raise EdgemtpError(f"{cache}: cannot write the packed copy of the target there ({e.strerror or e})") from None
    return copy / GRAPH


def build(bundle, copy: Path, source: dict, provider: str, threads: int | None) -> None:
    """Writes the packed copy of `bundle`'s target to `copy` (replacing a broken one there)."""
    from .session import make_session

    with scratch.scratch_dir(copy.parent, ".packing-") as tmp:
        # the packed weights are written as the session is built; the session itself is not kept
        try:
            make_session(bundle.graph("target").path, provider, threads, packed_to=tmp / GRAPH)
        except EdgemtpError:  # onnxruntime's failed write reads as the bundle's graph failing to load
            if shutil.disk_usage(tmp).free < sum(bundle.manifest["files"][rel]["bytes"] for rel in source["files"]):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise
        share_duplicates(tmp)
        # built from the files load checked, whose sha256s are its key: a re-export meanwhile would be kept
        # under the old bundle's key, and loaded for it ever after
        bundle.check_unchanged()
        sizes = {rel: (tmp / rel).stat().st_size for rel in (GRAPH, DATA) if (tmp / rel).exists()}
        (tmp / RECORD).write_text(json.dumps({"source": source, "bytes": sizes}, indent=1), encoding="utf-8")
        scratch.as_open_makes(tmp)  # mkdtemp's 0700 kept the copy from the other users of a shared cache
        if not whole(copy, source):  # else another run finished it meanwhile (no flock here): its copy is kept
            try:  # over a broken copy of this key (files cut short) too
                scratch.replace_dir(tmp, copy, ".packed-old-")
            except EdgemtpError:  # another run renamed its copy there at the same moment
                if not whole(copy, source):
                    raise


def share_duplicates(copy: Path) -> int:
    """Where initializers' bytes in the copy's data file are another's too, points each at its twin's bytes and
    takes its own out of the file (moving down what follows); returns the bytes saved. ONNX Runtime writes each
    initializer's bytes apart, also two names of one table: an fp32 bundle's head table is (exporters/gemv_head.py),
    671 MB of Gemma 3 270M's 2.82 GB copy, followed only by the RoPE tables.
    Only initializers without packed bytes move (a "prepacked" entry gives its region's offset in a form of ONNX
    Runtime's own), so a duplicate with packed bytes after it stays."""
    saved = 0
    while shared := share_one(copy):
        saved += shared
    return saved


def share_one(copy: Path) -> int:
    """share_duplicates' step: the last duplicate that only initializers without packed bytes follow."""
    graph, data = copy / GRAPH, copy / DATA
    regions = []  # (offset, length, initializer name or None for packed bytes, whether it has packed bytes too)
    try:
        for name, entries in onnx_wire.read_graph_facts(graph).external.items():
            if entries.get("location") != DATA:
                continue
            packed = [v for k, v in entries.items() if k.startswith("prepacked")]
            regions.append((int(entries["offset"]), int(entries["length"]), name, bool(packed)))
            for value in packed:  # "Kernel+hash|offset;length;..."
                offset, length = value.split("|")[1].split(";")[:2]
                regions.append((int(offset), int(length), None, True))
    except (onnx_wire.WireError, KeyError, IndexError, ValueError):  # a layout this does not know: left whole
        return 0
    # by region start: the names at one start are one region's (a duplicate already pointed at its twin shares
    # the twin's), and are kept or moved together; a name taken for a twin of its own bytes cut them out
    regions.sort(key=lambda r: r[:2])
    for offset in sorted({r[0] for r in regions}, reverse=True):
        here = [r for r in regions if r[0] == offset]
        before = [r for r in regions if r[0] < offset]
        after = [r for r in regions if r[0] > offset]  # none with packed bytes: the loop stopped at those
        if any(r[2] is None or r[3] for r in here):
            break
        length = here[0][1]
        if any(r[1] != length for r in here) or any(r[0] + r[1] > offset for r in before):
            break  # overlapping regions: a layout this does not know, left whole from here down
        if not length:
            continue
        twin = next((r for r in before if r[2] is not None and r[1] == length
                     and same_bytes(data, r[0], offset, length)), None)
        if twin is None:
            continue
        # out goes the span up to the next region's start, its padding too: what follows moves down by as much
        # as lay between two region starts, so each keeps the alignment ONNX Runtime wrote it at
        span = (after[0][0] if after else data.stat().st_size) - offset
        model = graph.read_bytes()
        for r in here:
            model = onnx_wire.with_external_offset(model, r[2], twin[0])
        for r in after:
            model = onnx_wire.with_external_offset(model, r[2], r[0] - span)
        move_down(data, offset + span, offset)
        graph.write_bytes(model)
        return span
    return 0


def move_down(path: Path, start: int, to: int, chunk: int = 1 << 24) -> None:
    """Moves the bytes of `path` from `start` to its end down to `to` (< start), and cuts the file there."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        for pos in range(start, end, chunk):
            f.seek(pos)
            block = f.read(min(chunk, end - pos))
            f.seek(to + pos - start)
            f.write(block)
        f.truncate(to + end - start)


def same_bytes(path: Path, a: int, b: int, length: int, chunk: int = 1 << 24) -> bool:
    """Whether the `length` bytes of `path` at offsets `a` and `b` are the same."""
    with open(path, "rb") as f:
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            f.seek(a + start)
            first = f.read(n)
            f.seek(b + start)
            if len(first) != n or f.read(n) != first:  # a file shorter than its graph says: no twins in it
                return False
    return True
