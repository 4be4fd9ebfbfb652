"""An fp32 bundle's transposed LM head table, copied into the process's memory on 2 MB pages.

A decode step's logits are one GEMV over the whole [H, V] table (exporters/gemv_head.py): 671 MB for Gemma 3
270M, 63% of the step's bytes. ONNX Runtime reads an external initializer in place, from its mapping of the
data file: the page cache's pages, mostly 4 KB ones, one TLB entry (in a VM, one nested page walk) per 4 KB
read. On the 2-core Xeon VM the GEMV read a copy on 2 MB pages at 96.0% of the bandwidth ceiling, the file's
mapping at 92.4% (a copy on 4 KB pages: 89.2%), and whole decode steps ran 1.04x as fast with the copy
(benchmarks/bench_decode.py --mapped-head; docs/measurements.md, session 41).

So Engine.load reads the table's bytes into private memory advised onto huge pages, and every graph it loads
that names those bytes (the target under both of the table's names, the batched verify graph, the MTP
drafter) gets the copy as that initializer (SessionOptions.add_initializer, which ONNX Runtime uses in place):
ONNX Runtime then never reads that part of the file, so the process holds the table once, as before, but as
its own memory rather than page cache another process could share (Engine.load(head_copy=False) keeps the
mapping). Multi-row passes still pack their own copy from it at load, as they did from the mapping.

Only on Linux with transparent huge pages not "never" (on 4 KB pages a copy reads slower than the mapping,
which the page cache partly backs with 2 MB folios), and only for sessions on the CPU provider."""

from __future__ import annotations

import math
import mmap
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .. import contract as C
from ..errors import EdgemtpError

HUGE_PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

Key = tuple[str, int, int]  # the bytes an initializer names: (data file, offset, length)


def huge_pages_available() -> bool:
    """Whether memory advised onto huge pages gets them here (THP "always" or "madvise")."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


class HeadCopies:
    """The copies of one bundle's GEMV-read tables, by the bytes they hold."""

    def __init__(self, bundle, copies: dict[Key, ort.OrtValue]):
        self.bundle, self.copies = bundle, copies

    @classmethod
    def load(cls, bundle) -> "HeadCopies | None":
        """None where there is nothing to copy (a quantized or static bundle, one exported --no-gemv-head) or no
        huge pages to copy onto."""
        target = bundle.facts.get("target")
        if target is None or not huge_pages_available():
            return None
        copies = {}
        for name, dims in target.inputs.items():
            key = _key(target.external.get(name)) if name.endswith(C.GEMV_ALIAS) else None
            # the GEMV table is fp32 [H, V] (only fp32 graphs get one): its dims must account for its bytes
            if key and all(isinstance(d, int) and d > 0 for d in dims) and 4 * math.prod(dims) == key[2]:
                table = read_on_huge_pages(bundle.dir / key[0], key[1], key[2]).view(np.float32).reshape(dims)
                copies[key] = ort.OrtValue.ortvalue_from_numpy(table)  # it keeps `table` (and its memory) alive
        return cls(bundle, copies) if copies else None

    def initializers(self, graph: str) -> dict[str, ort.OrtValue]:
        """The copies graph `graph` of the bundle names, by its initializers' names."""
        facts = self.bundle.facts.get(graph)
        if facts is None:
            return {}
        found = {name: self.copies.get(_key(entries)) for name, entries in facts.external.items()}
        return {name: value for name, value in found.items() if value is not None}


def _key(entries: dict | None) -> Key | None:
    """An initializer's external data entries as the bytes they name; None if they name no definite range."""
    if not entries or not entries.get("location") or "length" not in entries:
        return None
    try:
        offset, length = int(entries.get("offset", "0")), int(entries["length"])
    except ValueError:
        return None
    return (entries["location"], offset, length) if offset >= 0 and length > 0 else None


def read_on_huge_pages(path: Path, offset: int, length: int) -> np.ndarray:
    """`length` bytes of the file from `offset`, as uint8, in private anonymous memory advised onto huge pages
    from a 2 MB boundary on (numpy's own large arrays are advised too, but start off the boundary)."""
    buf = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -np.frombuffer(buf, np.uint8, count=1).ctypes.data % HUGE_PAGE
    buf.madvise(mmap.MADV_HUGEPAGE, start, len(buf) - start)
    out = np.frombuffer(buf, np.uint8, count=length, offset=start)
    view, done = memoryview(out), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < length:
            n = f.readinto(view[done:done + (64 << 20)])
            if not n:
                raise EdgemtpError(f"{path}: ends at byte {offset + done}, inside a table its graph reads up to byte "
                                   f"{offset + length} (file changed after export)")
            done += n
    return out
