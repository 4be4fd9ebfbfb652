"""edgemtp: ONNX bundles and multi-token-prediction speculative decoding for edge devices."""

import os
import sys

__version__ = "0.1.0"

# numpy's OpenBLAS keeps its worker threads spinning for ~0.1 s after each call (2^28 cycles by default).
# The bandwidth probe (runtime/bandwidth.py) calls it between ONNX Runtime passes, and on 2 cores the
# spinning worker made the next pass 1.7x slower (a Gemma 3 270M fp32 decode step: 40 -> 68 ms). With 2^4
# cycles the workers sleep as soon as they are done. OpenBLAS reads this when it loads, so it is set only if
# numpy has not been imported yet (benchmarks import edgemtp first); a value the user set is kept.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
