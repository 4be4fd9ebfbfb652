"""Freed heap pages go back to the system after loading (runtime/heap.py): measured as the process's
anonymous resident memory, in a fresh interpreter each time so that nothing else in the test run counts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")

_ANON = """
def anon_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
"""


def _run(code: str) -> dict:
    # ResourceWarnings shown: a file or mapping left open by the code measured (or by anon_mb) fails the test
    r = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", _ANON + textwrap.dedent(code)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ResourceWarning" not in r.stderr, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@glibc
def test_release_returns_pages_lying_under_live_allocations():
    """200 MB of 1 KB blocks freed but for one in 64: no block at the heap's top is free, so only
    malloc_trim can hand the free pages back."""
    out = _run("""
        import ctypes, json
        from edgemtp.runtime.heap import release_freed_memory
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        blocks = []
        for _ in range(200 * 1024):
            p = libc.malloc(1000)
            ctypes.memset(p, 1, 1000)
            blocks.append(p)
        for i, p in enumerate(blocks):
            if i % 64:
                libc.free(p)
        before = anon_mb()
        released = release_freed_memory()
        print(json.dumps({"released": released, "before": before, "after": anon_mb()}))
    """)
    assert out["released"] and out["before"] - out["after"] > 150, out


@glibc
def test_loading_leaves_no_freed_memory_resident(gemma3_270m_bundle):
    """Gemma 3 270M: parsing its 33 MB tokenizer.json alone leaves ~190 MB freed but resident; after
    Engine.load there is nothing left for a trim to take (before heap.py: the same ~190 MB)."""
    out = _run(f"""
        import ctypes, json
        import edgemtp
        from edgemtp.runtime.engine import Engine
        engine = Engine.load({str(gemma3_270m_bundle)!r}, threads=1, verify=False, mtp=False)
        before = anon_mb()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        print(json.dumps({{"before": before, "after": anon_mb()}}))
    """)
    assert out["before"] - out["after"] < 30, out
