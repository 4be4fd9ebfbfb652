"""Hand the C heap's freed pages back to the system once loading is done.

Loading frees a lot that glibc's malloc then keeps resident for reuse that never comes: the tokenizers
library parses tokenizer.json into a JSON tree, builds the tokenizer from it and frees the tree (Gemma 3's
33 MB file: ~290 MB resident after the load, ~95 MB of it the tokenizer), and ONNX Runtime frees the
protobuf and the unpacked copies it built a session from. The freed pages lie under live allocations, so
glibc's own trimming (only the top of the heap) leaves them; malloc_trim returns every free page of every
arena. Engine.load parses the tokenizer first and trims then, so the session is not built on top of the
parse's peak (Gemma 3 270M int4: peak RSS 0.74x, benchmarks/bench_memory.py), and trims again at the end.
It takes ~10 ms. glibc only: elsewhere (macOS, Windows, musl) this does nothing."""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    # the malloc this process runs on (no ldconfig run to find a libc by name, which might not be the one
    # in use: musl with glibc's compatibility layer)
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; musl has none
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; whether there was a way to (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
