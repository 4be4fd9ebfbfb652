"""Move the weights ONNX Runtime copies into its own memory onto 2 MB pages (Linux transparent huge pages).

Decoding streams every weight once per token. ONNX Runtime keeps its packed weights in plain malloc'd
memory, which under the usual THP setting ("madvise") gets 4 KB pages: one TLB entry, and in a VM one
nested page walk, per 4 KB read. numpy asks for huge pages for every large array, so the bandwidth we
compare against (edgemtp.runtime.bandwidth) already has them. After a session is built we ask the kernel
to move what building it filled into huge pages (MADV_COLLAPSE, Linux 6.1+). That copies the weights once:
0.6-3 s for Gemma 3 270M fp32, for a decode step ~2% faster with a row-major head (benchmarks/bench_decode.py
--huge-pages; 0-0.4% with the default transposed head, read from the data file's mapping, not copied),
so it pays in a long-running process, not in a one-shot command; it is off unless asked for.

Only memory that appeared while the session was built is touched, and only 2 MB pieces that are wholly
resident: collapsing a sparse piece (of a new thread's stack) would fill its holes and grow the process."""

from __future__ import annotations

import ctypes
import sys

import numpy as np

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
PAGE = 4096
HUGE_PAGE = 2 << 20

Regions = list[tuple[int, int]]  # sorted (start, end) address ranges


def anonymous_regions() -> Regions:
    """The process's writable anonymous mappings (the brk heap included), at least a huge page long."""
    regions: Regions = []
    if not sys.platform.startswith("linux"):
        return regions
    try:
        with open("/proc/self/maps", errors="replace") as f:  # a mapped file's name is any bytes, not UTF-8
            lines = f.readlines()
    except OSError:
        return regions
    for line in lines:
        fields = line.split()  # range perms offset dev inode [name]
        start, end = (int(x, 16) for x in fields[0].split("-"))
        anonymous = len(fields) == 5 or fields[5] == "[heap]"
        if fields[1].startswith("rw") and anonymous and end - start >= HUGE_PAGE:
            regions.append((start, end))
    return sorted(regions)


def collapse_new_regions(before: Regions) -> int:
    """Moves the resident anonymous memory that is not in `before` (from anonymous_regions()) into huge
    pages, 2 MB piece by 2 MB piece where every 4 KB page of the piece is resident. Returns the bytes
    moved: 0 where the platform or kernel does not do it."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    done = 0
    for start, end in anonymous_regions():
        for lo, hi in new_parts(start, end, before):
            lo, hi = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
            for a, b in resident_runs(libc, lo, hi):
                _madvise(libc, a, b - a, MADV_HUGEPAGE)  # keeps khugepaged from splitting them back
                if _madvise(libc, a, b - a, MADV_COLLAPSE):
                    done += b - a
    return done


def new_parts(start: int, end: int, old: Regions) -> Regions:
    """[start, end) less the sorted, disjoint ranges `old`: the part of a region that is new (the brk heap
    grows in place, and the kernel merges neighbouring mappings, so an old region can come back larger)."""
    parts = []
    for a, b in old:
        if b <= start or a >= end:
            continue
        if a > start:
            parts.append((start, a))
        start = max(start, b)
    if start < end:
        parts.append((start, end))
    return parts


def resident_runs(libc, lo: int, hi: int) -> Regions:
    """The runs of whole huge pages in [lo, hi) (aligned) whose every 4 KB page is resident (mincore)."""
    if hi <= lo:
        return []
    vec = (ctypes.c_ubyte * ((hi - lo) // PAGE))()
    if libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), vec) != 0:
        return []
    full = (np.frombuffer(vec, np.uint8) & 1).reshape(-1, HUGE_PAGE // PAGE).all(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], full.astype(np.int8), [0]])))
    return [(lo + int(a) * HUGE_PAGE, lo + int(b) * HUGE_PAGE) for a, b in zip(edges[::2], edges[1::2])]


def _madvise(libc, start: int, length: int, advice: int) -> bool:
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0
