"""The target graph behind a small forward() that appends to a KVCache in place."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .. import contract as C
from ..errors import EdgemtpError
from .kv_cache import KVCache


class CapacityError(EdgemtpError):
    """The sequence would outgrow the bundle's KV capacity."""


class Target:
    def __init__(self, session: ort.InferenceSession, contract: C.TargetContract):
        self.session, self.contract = session, contract

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.contract.kv, batch, self.contract.capacity)

    def forward(self, ids: np.ndarray, cache: KVCache, rows: slice | None = None,
                n_logits: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """ids [b, S] for cache rows `rows` -> (logits [b, n_logits, V], last hidden [b, S, H]).

        Appends S positions to each row's cache (lengths grow by S)."""
        rows = rows or slice(0, cache.batch)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        S = ids.shape[1]
        lengths = cache.lengths[rows]
        if int(lengths.max()) + S > cache.capacity:
            raise CapacityError(f"context of {int(lengths.max()) + S} tokens exceeds the bundle's KV capacity "
                                f"of {cache.capacity} (export with a larger --max-context)")
        io = self.session.io_binding()
        io.bind_cpu_input(C.INPUT_IDS, ids)
        io.bind_cpu_input(C.POSITION_IDS, lengths[:, None] + np.arange(S, dtype=np.int64))
        io.bind_cpu_input(C.SEQLENS_K, (lengths + S - 1).astype(np.int32))
        io.bind_cpu_input(C.TOTAL_SEQ_LEN, np.array(int(lengths.max()) + S, np.int32))
        io.bind_cpu_input(C.NUM_LOGITS, np.array(n_logits, np.int64))
        io.bind_output(C.LOGITS)
        io.bind_output(C.LAST_HIDDEN)
        for layer, (k, v) in cache.ort_values(rows).items():
            io.bind_ortvalue_input(C.past_key(layer), k)
            io.bind_ortvalue_input(C.past_value(layer), v)
            io.bind_ortvalue_output(C.present_key(layer), k)
            io.bind_ortvalue_output(C.present_value(layer), v)
        self.session.run_with_iobinding(io)
        logits, hidden = io.get_outputs()[:2]
        cache.lengths[rows] += S
        return logits.numpy(), hidden.numpy()
