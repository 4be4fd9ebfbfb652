"""Weights on 2 MB pages (runtime/hugepages.py): only new, resident memory moves, and nothing changes value."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

from edgemtp.runtime import hugepages as H

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
MB = 1 << 20


def test_new_parts_subtracts_what_was_there():
    old = [(10, 20), (30, 40)]
    assert H.new_parts(0, 50, old) == [(0, 10), (20, 30), (40, 50)]
    assert H.new_parts(10, 20, old) == []
    assert H.new_parts(15, 35, old) == [(20, 30)]
    assert H.new_parts(40, 60, old) == [(40, 60)]  # the brk heap grown in place: only the new end
    assert H.new_parts(0, 5, []) == [(0, 5)]


def test_the_regions_are_the_writable_anonymous_ones_and_the_heap(monkeypatch):
    """anonymous_regions: the writable anonymous mappings a huge page long or longer, the brk heap among them (ONNX
    Runtime's weights are malloc'd: the small ones land there), not a file's mapping or the stack."""
    import io

    maps = ("00400000-00600000 r-xp 00000000 08:01 123 /usr/bin/python3\n"
            "00800000-00c00000 rw-p 00000000 00:00 0 [heap]\n"
            "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 \n"
            "7f0000400000-7f0000800000 rw-p 00000000 08:01 5 /tmp/weights.bin\n"
            "7f0000800000-7f0000900000 rw-p 00000000 00:00 0 \n"  # 1 MB: no whole huge page
            "7f0000a00000-7f0000e00000 r--p 00000000 00:00 0 \n"
            "7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0 [stack]\n")
    monkeypatch.setattr(H, "open", lambda *a, **k: io.StringIO(maps), raising=False)
    assert H.anonymous_regions() == [(0x800000, 0xC00000), (0x7F0000000000, 0x7F0000400000)]


@linux
def test_collapse_rounds_each_new_part_inward_to_whole_huge_pages(monkeypatch):
    """A new part of a region is collapsed from the first huge page wholly inside it: the piece it starts in holds
    memory that was there before, which must not move (nor, for a sparse piece, fill)."""
    before, asked = [(0, 3 * MB)], []
    monkeypatch.setattr(H, "anonymous_regions", lambda: [(0, 11 * MB)])  # grew from 3 MB to 11 MB
    monkeypatch.setattr(H, "resident_runs", lambda libc, lo, hi: asked.append((lo, hi)) or [(lo, hi)])
    monkeypatch.setattr(H, "_madvise", lambda libc, start, length, advice: True)
    assert H.collapse_new_regions(before) == 6 * MB and asked == [(4 * MB, 10 * MB)]


@linux
def test_resident_runs_are_whole_resident_huge_pages():
    libc = _libc()
    size = 8 * MB
    addr = _private_anonymous(libc, size + H.HUGE_PAGE, 0)
    lo = -(-addr // H.HUGE_PAGE) * H.HUGE_PAGE
    try:
        ctypes.memset(lo, 1, 2 * MB)  # the first huge page whole
        ctypes.memset(lo + 4 * MB, 1, 2 * MB - 4096)  # the third but for its last 4 KB page
        ctypes.memset(lo + 6 * MB, 1, 2 * MB)  # the fourth whole
        assert H.resident_runs(libc, lo, lo + size) == [(lo, lo + 2 * MB), (lo + 6 * MB, lo + 8 * MB)]
    finally:
        libc.munmap(addr, size + H.HUGE_PAGE)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _private_anonymous(libc, size: int, touch: int) -> int:
    """A private anonymous mapping (as malloc makes for big blocks) with its first `touch` bytes written."""
    prot, flags = 0x1 | 0x2, 0x02 | 0x20  # PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
    addr = libc.mmap(None, size, prot, flags, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    ctypes.memset(addr, 7, touch)
    return addr


def _huge_bytes(addr: int, size: int) -> int:
    """AnonHugePages of the mapping that holds [addr, addr + size)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= addr and addr + size <= end
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1]) * 1024
    raise AssertionError("mapping not found")


def _collapse_works() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@linux
def test_collapse_moves_new_resident_memory_only():
    if not _collapse_works():
        pytest.skip("transparent huge pages are off on this machine")
    libc = _libc()
    size = 16 * MB
    earlier = _private_anonymous(libc, size, size)
    before = H.anonymous_regions()
    full = _private_anonymous(libc, size, size)
    sparse = _private_anonymous(libc, size, 64 << 10)  # like a new thread's stack: mostly holes
    data = ctypes.string_at(full, size)
    try:
        moved = H.collapse_new_regions(before)
        if moved == 0:
            pytest.skip("this kernel cannot collapse memory into huge pages (MADV_COLLAPSE needs Linux 6.1+)")
        assert _huge_bytes(full, size) >= size - 2 * H.HUGE_PAGE  # all but the unaligned ends
        assert _huge_bytes(sparse, size) == 0
        assert _huge_bytes(earlier, size) == 0
        assert ctypes.string_at(full, size) == data
    finally:
        for addr in (earlier, full, sparse):
            libc.munmap(addr, size)


def test_engine_on_huge_pages_computes_the_same(gemma3_270m_bundle, monkeypatch):
    """The weights ONNX Runtime packed, moved onto 2 MB pages (where the kernel does it), give the same logits."""
    from edgemtp.runtime.engine import Engine

    moved = []
    collapse = H.collapse_new_regions
    monkeypatch.setattr(H, "collapse_new_regions", lambda before: moved.append(collapse(before)) or moved[-1])
    logits = []
    for huge in (False, True):
        engine = Engine.load(gemma3_270m_bundle, threads=2, verify=False, mtp=False, huge_pages=huge)
        assert len(moved) == huge  # only a huge_pages load collapses, once: the target's session
        if huge and moved[0] < 64 * MB:  # 996 MB of Gemma 3 270M fp32 on a 6.x kernel
            pytest.skip(f"this machine moved {moved[0]} bytes onto huge pages (MADV_COLLAPSE needs Linux 6.1+)")
        cache = engine.target.new_cache(1)
        engine.target.forward(np.array([[2, 818, 5279, 529, 7001, 563]]), cache)
        logits.append(engine.target.forward(np.array([[9079]]), cache)[0])
        del engine, cache
    np.testing.assert_array_equal(logits[0], logits[1])


@linux
def test_regions_are_read_whatever_the_mapped_files_are_named(tmp_path):
    """/proc/self/maps names each mapped file by its bytes: a name that is not UTF-8 (a file system's names are
    any bytes) stopped Engine.load(huge_pages=True) with a UnicodeDecodeError."""
    import mmap
    import os

    path = os.path.join(os.fsencode(tmp_path), b"caf\xe9.bin")  # Latin-1, not UTF-8
    with open(path, "wb") as f:
        f.write(b"\0" * mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ):
        regions = H.anonymous_regions()
    assert regions and all(start < end for start, end in regions)
