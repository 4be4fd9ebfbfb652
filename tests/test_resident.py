"""What the runtime keeps resident, against what it allocates: measured as the process's anonymous resident
memory, in a fresh interpreter each time so that nothing else in the test run counts."""

from __future__ import annotations

import platform
import sys

import pytest

from .test_heap import _run  # a fresh interpreter's JSON line, with anon_mb() (its RssAnon, in MB) defined

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
# the heap's state these tests set up (freed space, a raised mmap threshold, malloc_trim) is glibc's
glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="sets up glibc's heap (malloc_trim)")


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


@glibc
def test_kv_cache_buffers_cost_no_memory_over_freed_heap_space():
    """As above, where the heap holds freed space, as it does once a bundle is loaded (the session's build frees
    ~170 MB under live allocations, and freeing one large numpy array raises glibc's mmap threshold): a calloc
    served from that space is cleared by writing its zeros, which made every new KV cache wholly resident (Gemma 3
    270M: 144 MB at the first token of each generation after the first, 4,096 positions), then freed but still
    resident after the generation, ~150 MB that only malloc_trim gave back."""
    out = _run("""
        import ctypes, json
        import numpy as np
        from edgemtp.contract import KVSlot
        from edgemtp.runtime.kv_cache import KVCache
        big = np.ones(16 << 20, np.uint8)
        del big  # freeing an mmapped chunk raises the mmap threshold to its size
        blocks = [np.ones(1 << 20, np.uint8) for _ in range(96)]  # 96 MB on the heap now, then a live block on top
        pin = np.ones(1 << 20, np.uint8)
        del blocks
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the freed space is given back, and stays the heap's to reuse
        before = anon_mb()
        cache = KVCache(tuple(KVSlot(i, 1, 256) for i in range(4)), 1, 4096)  # 8 buffers of 4 MB
        resident = anon_mb() - before
        cache.keys[0][0, 0, :16] = 1  # a few positions written
        written = anon_mb() - before
        del cache
        print(json.dumps({"resident_mb": resident, "written_mb": written,
                          "after_mb": anon_mb() - before}))
    """)
    assert out["resident_mb"] < 4, out
    assert out["written_mb"] < 4, out
    assert out["after_mb"] < 4, out


@glibc
def test_shadows_cost_no_memory_over_freed_heap_space():
    """The copies one-row passes bind for sliding layers with several KV heads (KVCache's shadows) likewise: made
    by np.zeros over the heap's freed space they were resident whole from the first window pass, and stayed
    resident once the cache was gone (Gemma 3 4B's shape, 4 KV heads and a 1,024-position window: ~6.5 MB a
    shadow, two for each of its 29 sliding layers)."""
    out = _run("""
        import ctypes, json
        import numpy as np
        from edgemtp.contract import KVSlot
        from edgemtp.runtime.kv_cache import KVCache
        big = np.ones(16 << 20, np.uint8)
        del big  # freeing an mmapped chunk raises the mmap threshold to its size
        blocks = [np.ones(1 << 20, np.uint8) for _ in range(96)]
        pin = np.ones(1 << 20, np.uint8)
        del blocks
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        cache = KVCache(tuple(KVSlot(i, 4, 256, 512) for i in range(4)), 1, 4096)  # shadows of 3.4 MB, 8 of them
        before = anon_mb()
        cache.ort_values(slice(0, 1), 256)  # a one-row pass from position 256 on binds the shadows
        made = anon_mb() - before
        del cache
        print(json.dumps({"shadows_made_mb": made, "after_mb": anon_mb() - before}))
    """)
    assert out["shadows_made_mb"] < 4, out
    assert out["after_mb"] < 4, out


@glibc
def test_generations_leave_no_kv_cache_resident(gemma3_270m_bundle):
    """Gemma 3 270M (1,024 positions: a 36 MB KV cache), generations drafting by lookup and plain: at the last one's
    first token its cache holds what its prompt wrote, and once it is over none of it stays resident. Before
    lazy_zeros each generation after the first held its whole cache from the first token, and left it freed but
    resident (42 MB here, which a malloc_trim gave back; 150-170 MB with 4,096 positions)."""
    out = _run(f"""
        import ctypes, json
        from edgemtp.runtime.engine import Draft, Engine
        engine = Engine.load({str(gemma3_270m_bundle)!r}, threads=1)
        prompt = engine.encode("def fibonacci(n):")
        cache_mb = engine.target.new_cache(1).nbytes / 2**20
        for draft in (Draft("lookup", 4), None, Draft("lookup", 4), None):
            for i, _ in enumerate(engine.token_stream(prompt, 16, draft=draft)):
                if i == 0:
                    first_token = anon_mb()
        ended = anon_mb()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        settled = anon_mb()
        print(json.dumps({{"cache_mb": cache_mb, "held_at_first_token_mb": first_token - settled,
                           "freed_resident_mb": ended - settled}}))
    """)
    assert out["cache_mb"] == 36, out
    # what is left (5-9 MB) is the verify passes' logits, 5 MB each at K = 4, freed where the heap placed them
    assert out["held_at_first_token_mb"] < out["cache_mb"] / 2, out
    assert out["freed_resident_mb"] < out["cache_mb"] / 2, out
