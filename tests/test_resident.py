"""What the runtime keeps resident, against what it allocates: measured as the process's anonymous resident
memory, in a fresh interpreter each time so that nothing else in the test run counts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

_ANON = """
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
"""


def _run(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _ANON + textwrap.dedent(code)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@linux
def test_kv_cache_buffers_cost_no_memory_until_written():
    """A new KVCache holds its capacity as address space: 256 MB of K and V buffers made resident ~0 MB (the
    values' buffers were made by np.zeros_like, which writes its zeros: half the cache resident from the start,
    72 MB a row for Gemma 3 270M at 4,096 positions whatever the context)."""
    out = _run("""
        import json
        from edgemtp.contract import KVSlot
        from edgemtp.runtime.kv_cache import KVCache
        before = anon_mb()
        cache = KVCache(tuple(KVSlot(i, 1, 256) for i in range(2)), 1, 65536)
        print(json.dumps({"bytes": cache.nbytes, "resident_mb": anon_mb() - before}))
    """)
    assert out["bytes"] == 2 * 2 * 65536 * 256 * 4
    assert out["resident_mb"] < 16, out
