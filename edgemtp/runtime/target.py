"""The target graph behind a small forward() that appends to a KVCache in place."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnxruntime as ort

from .. import contract as C
from ..errors import EdgemtpError
from .kv_cache import KVCache


class CapacityError(EdgemtpError):
    """The sequence would outgrow the bundle's KV capacity."""


class Target:
    """`verify`: loads the bundle's batched verify graph (a "rows" graph over the same weights) the first time
    a pass has several rows x several new positions, which this graph's GroupQueryAttention refuses."""

    def __init__(self, session: ort.InferenceSession, contract: C.TargetContract,
                 verify: Callable[[], "Target"] | None = None):
        self.session, self.contract = session, contract
        self._load_verify, self._verify = verify, None

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.contract.kv, batch, self.contract.capacity)

    @property
    def multi_row_verify(self) -> bool:
        """Several rows x several new positions in one pass (a "rows" graph, or a bundle with a verify graph;
        ORT's CPU GroupQueryAttention refuses batch > 1 with more than one new position and a past)."""
        return self.contract.kv_update == "rows" or self._load_verify is not None

    def forward(self, ids: np.ndarray, cache: KVCache, rows: slice | None = None,
                n_logits: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """ids [b, S] for cache rows `rows` -> (logits [b, n_logits, V], last hidden [b, S, H]).

        Appends S positions to each row's cache (lengths grow by S)."""
        logits, hidden = self.forward_outputs(ids, cache, (C.LOGITS, C.LAST_HIDDEN), rows, n_logits)
        return logits, hidden

    def forward_outputs(self, ids: np.ndarray, cache: KVCache, names, rows: slice | None = None,
                        n_logits: int = 1) -> list[np.ndarray]:
        """forward() returning the graph outputs `names` (any intermediate value the graph exposes)."""
        rows = rows or slice(0, cache.batch)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        S = ids.shape[1]
        if S > 1 and ids.shape[0] > 1 and self.contract.kv_update == "in_place" and self._load_verify is not None:
            if self._verify is None:
                self._verify = self._load_verify()
            return self._verify.forward_outputs(ids, cache, names, rows, n_logits)
        lengths = cache.lengths[rows].copy()
        if int(lengths.max()) + S > cache.capacity:
            raise CapacityError(f"context of {int(lengths.max()) + S} tokens exceeds the bundle's KV capacity "
                                f"of {cache.capacity} (export with a larger --max-context)")
        io = self.session.io_binding()
        io.bind_cpu_input(C.INPUT_IDS, ids)
        io.bind_cpu_input(C.POSITION_IDS, lengths[:, None] + np.arange(S, dtype=np.int64))
        io.bind_cpu_input(C.SEQLENS_K, (lengths + S - 1).astype(np.int32))
        io.bind_cpu_input(C.TOTAL_SEQ_LEN, np.array(int(lengths.max()) + S, np.int32))
        io.bind_cpu_input(C.NUM_LOGITS, np.array(n_logits, np.int64))
        offset = 0
        if self.contract.window_views:  # sliding layers read from an offset on when the pass has one row
            offset = self.contract.window_offset(int(lengths[0])) if len(lengths) == 1 else 0
            io.bind_cpu_input(C.WINDOW_SEQLENS_K, (lengths + S - 1 - offset).astype(np.int32))
            io.bind_cpu_input(C.WINDOW_TOTAL_SEQ_LEN, np.array(int(lengths.max()) + S - offset, np.int32))
        for name in names:  # first: get_outputs() lists the outputs in binding order
            io.bind_output(name)
        values = cache.ort_values(rows, offset)
        in_place = self.contract.kv_update == "in_place"
        for layer, (k, v) in values.items():
            io.bind_ortvalue_input(C.past_key(layer), k)
            io.bind_ortvalue_input(C.past_value(layer), v)
            if in_place:
                io.bind_ortvalue_output(C.present_key(layer), k)
                io.bind_ortvalue_output(C.present_value(layer), v)
            else:
                io.bind_output(C.present_key(layer))
                io.bind_output(C.present_value(layer))
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        if not in_place:  # the new rows [b, Nk, S, D] go into the buffers at each row's length
            new = iter(outputs[len(names):])
            for layer in values:
                for buffer in (cache.keys[layer], cache.values[layer]):
                    rows_kv = next(new).numpy()
                    for i, length in enumerate(lengths):
                        buffer[rows.start + i, :, length:length + S] = rows_kv[i]
        cache.lengths[rows] += S
        return [o.numpy() for o in outputs[:len(names)]]
