"""The speed half of `edgemtp cluster --report`: the model's full head vs its clustered head, timed.

Three standalone head graphs (edgemtp.exporters.head) over the model's own table and the tables just
built: the full fp32 head, the clustered head with fp32 rows, and with int8 rows (what `edgemtp export
--draft-head-rows int8` builds). Each is called on one real held-out hidden state at a time, as a
drafter step is, the three taking turns round after round so a busy machine slows them alike; the
median call time of each is reported with the ratios, and the tokens the three pick are compared.
benchmarks/bench_head.py does the same at fixed shapes with synthetic tables (and quantized full heads).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .clustering import HeadTables

EMBED = "embed"


def head_speed(embed: np.ndarray, tables: HeadTables, top_k: int, hidden: np.ndarray, softcap: float | None = None,
               positions: int = 128, rounds: int = 5, threads: int = 2) -> dict:
    """{"ms": {variant: median ms per call}, "speedup": {variant: full fp32 ms / its ms},
    "agreement": {variant: fraction of positions where it picks the full head's token}}."""
    import onnxruntime as ort

    from ..exporters import builder
    from ..exporters import head as H

    shape = H.ClusteredShape(len(embed), embed.shape[1], tables.clusters, top_k)
    weights = {EMBED: embed, "centroids": tables.centroids, "token_ordering": tables.token_ordering,
               "token_mask": tables.token_mask}
    graphs = {"full fp32": H.full_graph(shape.vocab, shape.hidden, EMBED, cap=softcap),
              "clustered fp32 rows": H.clustered_graph(shape, EMBED, cap=softcap),
              "clustered int8 rows": H.clustered_graph(shape, EMBED, cap=softcap,
                                                       int8_ordering=tables.token_ordering)}
    xs = np.asarray(hidden[:positions], np.float32)
    with tempfile.TemporaryDirectory(prefix="edgemtp-head-speed-") as tmp:
        sessions = {}
        for i, (name, g) in enumerate(graphs.items()):
            path = Path(tmp) / f"head{i}.onnx"
            builder.save(g, path, weights.__getitem__)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            # the variants take turns: threads still spinning after one's run would steal the next one's CPU
            opts.add_session_config_entry("session.force_spinning_stop", "1")
            sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        picks = {name: [s.run([H.TOKEN_IDS], {H.INPUT: x[None]})[0][0, 0] for x in xs]  # also the warm-up
                 for name, s in sessions.items()}
        times = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                for x in xs:
                    s.run([H.TOKEN_IDS], {H.INPUT: x[None]})
                times[name].append((time.perf_counter() - t0) * 1e3 / len(xs))
    ms = {name: float(np.median(t)) for name, t in times.items()}
    full = np.array(picks["full fp32"])
    return {"positions": len(xs), "threads": threads, "ms": ms,
            "speedup": {name: ms["full fp32"] / v for name, v in ms.items()},
            "agreement": {name: float(np.mean(np.array(p) == full)) for name, p in picks.items()}}
