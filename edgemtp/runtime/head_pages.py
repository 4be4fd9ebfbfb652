"""An fp32 bundle's transposed LM head table, read through a mapping of the data file on 2 MB pages.

A decode step's logits are one GEMV over the whole [H, V] table (exporters/gemv_head.py): 671 MB for Gemma 3
270M, 63% of the step's bytes. Read through 4 KB pages, each 4 KB costs a TLB entry (in a VM, a nested page
walk): on the 2-core Xeon VM the GEMV read the table at 96% of the bandwidth ceiling from memory on 2 MB pages
and at 89-92% from 4 KB ones, and whole decode steps ran 1.18x as fast through this module's mapping as through
ONNX Runtime's over a page cache holding the table in 4 KB folios, 1.00-1.06x where it held larger ones
(benchmarks/bench_decode.py --small-folios; docs/measurements.md, session 41).

A file mapping gets 2 MB pages where the page cache holds the file in 2 MB folios and the mapping's address
sits at the file offset's place within a 2 MB page (Linux places a file mapping so). ONNX Runtime's own
mappings of the data file took whatever folios the page cache had: mostly 4 KB ones, depending on how the
file was last read. So Engine.load maps the data file itself, advised onto huge pages (so that what the kernel
reads into the page cache through it comes in 2 MB folios, on file systems with large folios, e.g. ext4 and
xfs on Linux 6.x), and gives that mapping of the table to every graph that names its bytes (the target under
both of the table's names, the batched verify graph, the MTP drafter; SessionOptions.add_initializer, which
ONNX Runtime reads in place). If the table is cached in small folios, it is dropped from the page cache and
read again through the mapping once (`fault_in`). No copy: the process holds the same page cache pages as
before, mapped once instead of once per name, and other processes reading the bundle share them.

Only on Linux with transparent huge pages not "never", and only for sessions on the CPU provider."""

from __future__ import annotations

import math
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .. import contract as C
from ..errors import EdgemtpError
from ..onnx_wire import FLOAT

PAGE, HUGE_PAGE = mmap.PAGESIZE, 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ENOUGH = 0.9  # of a table's whole 2 MB pieces on 2 MB pages, below which its small folios are read again

Key = tuple[str, int, int]  # the bytes an initializer names: (data file, offset, length)


def huge_pages_available() -> bool:
    """Whether this is Linux with transparent huge pages "always" or "madvise"."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


class HeadTables:
    """One bundle's GEMV-read tables, each mapped once (map_on_huge_pages), by the bytes they hold."""

    def __init__(self, bundle, tables: dict[Key, ort.OrtValue]):
        self.bundle, self.tables = bundle, tables

    @classmethod
    def load(cls, bundle) -> HeadTables | None:
        """None where there is no such table (a quantized or static bundle, one exported --no-gemv-head) or no
        huge pages to map it on."""
        target = bundle.facts.get("target")
        if target is None or not huge_pages_available():
            return None
        tables = {}
        for name, dims in target.inputs.items():
            key = _key(target.external.get(name)) if name.endswith(C.GEMV_ALIAS) else None
            # the GEMV table is fp32 [H, V] (only fp32 graphs get one): its dims must account for its bytes
            if key and all(isinstance(d, int) and d > 0 for d in dims) and 4 * math.prod(dims) == key[2]:
                try:
                    table = map_on_huge_pages(bundle.dir / key[0], key[1], key[2])
                # a file system that cannot map files (some FUSE ones), a file larger than a 32-bit address
                # space (ValueError, OverflowError): ONNX Runtime reads the table as it can
                except (OSError, ValueError, OverflowError):
                    continue
                table = table.view(np.float32).reshape(dims)
                tables[key] = ort.OrtValue.ortvalue_from_numpy(table)  # it keeps `table` (and the mapping) alive
        return cls(bundle, tables) if tables else None

    def initializers(self, graph: str) -> dict[str, ort.OrtValue]:
        """The tables graph `graph` of the bundle names, by its initializers' names: those that read the
        bytes as the table is, fp32 of its dims (ONNX Runtime checks neither, and would run a graph that reads
        them as another shape or type over the wrong numbers, or fail at its first run)."""
        facts = self.bundle.facts.get(graph)
        if facts is None:
            return {}
        found = {name: self.tables.get(_key(entries)) for name, entries in facts.external.items()}
        return {name: value for name, value in found.items()
                if value is not None and facts.external_types.get(name) == (FLOAT, value.shape())}


def _key(entries: dict | None) -> Key | None:
    """An initializer's external data entries as the bytes they name; None if they name no definite range."""
    if not entries or not entries.get("location") or "length" not in entries:
        return None
    try:
        offset, length = int(entries.get("offset", "0")), int(entries["length"])
    except ValueError:
        return None
    return (entries["location"], offset, length) if offset >= 0 and length > 0 else None


def map_on_huge_pages(path: Path, offset: int, length: int) -> np.ndarray:
    """`length` bytes of the file from `offset` (uint8, read-only), through a mapping of the whole file advised
    onto huge pages from the first page of the range on, faulted in (fault_in)."""
    with open(path, "rb") as f:
        start, end, size = offset // PAGE * PAGE, offset + length, os.fstat(f.fileno()).st_size
        if end > size:  # said before mapping: mmap refuses an empty file with a ValueError
            raise EdgemtpError(f"{path}: {size} bytes, and its graph reads a table up to byte {end}")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # it keeps its own descriptor
        try:
            if end > len(mapping):  # shortened since
                raise EdgemtpError(f"{path}: {len(mapping)} bytes, and its graph reads a table up to byte {end}")
            mapping.madvise(mmap.MADV_HUGEPAGE, start, end - start)
            fault_in(mapping, f.fileno(), start, end)
        except BaseException:
            # unmapped now, not once the error's traceback (which holds `mapping`) is dropped
            mapping.close()
            raise
    return np.frombuffer(mapping, np.uint8, count=length, offset=offset)


def fault_in(mapping: mmap.mmap, fd: int, start: int, end: int) -> None:
    """Touches every page of [start, end) of the mapping. If fewer than ENOUGH of its whole 2 MB pieces then
    sit on 2 MB pages, the page cache holds them in smaller folios: where the file system makes 2 MB folios
    (some of the file's already are, or one piece read again becomes one), they are dropped from the page
    cache (those no other process maps) and read again through the advised mapping, now in 2 MB folios (a
    one-time cost: 0.3-1.3 s for Gemma 3 270M's table on the Xeon VM). Elsewhere nothing more is done."""
    _touch(mapping, start, end)
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return
    base = np.frombuffer(mapping, np.uint8, count=1).ctypes.data
    if base % HUGE_PAGE:  # the kernel did not place the mapping at a 2 MB page: none can be 2 MB
        return
    on_huge = pmd_mapped(base + first, base + last)
    if on_huge >= ENOUGH * (last - first):
        return
    if on_huge == 0:  # whether this file system makes 2 MB folios at all: try one piece
        _read_again(mapping, fd, first, first + HUGE_PAGE)
        if pmd_mapped(base + first, base + last) == 0:
            return
    _read_again(mapping, fd, first, last)


def _touch(mapping: mmap.mmap, start: int, end: int) -> None:
    np.frombuffer(mapping, np.uint8, count=end - start, offset=start)[::PAGE].sum()


def _read_again(mapping: mmap.mmap, fd: int, start: int, end: int) -> None:
    mapping.madvise(mmap.MADV_DONTNEED, start, end - start)  # unmaps them here (a file mapping: nothing lost)
    try:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    except OSError:  # the file system keeps its cache: the pages are mapped again as they are
        pass
    _touch(mapping, start, end)


def pmd_mapped(start: int, end: int) -> int:
    """Bytes of this process's file mappings in [start, end) mapped by 2 MB pages (/proc/self/smaps'
    FilePmdMapped of the mappings overlapping it: a range advised apart is a mapping of its own)."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps", errors="replace") as f:  # a mapped file's name is any bytes, not UTF-8
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and "-" in fields[0]:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    inside = lo < end and start < hi
                elif inside and fields and fields[0] == "FilePmdMapped:":
                    total += int(fields[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total
