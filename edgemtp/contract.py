"""The I/O contract of a target graph: one object serves the exporter and the runtime.

Names follow the ecosystem (optimum / onnxruntime-genai). The KV cache is a set of pre-allocated
buffers `[batch, kv_heads, capacity, head_dim]`, one key and one value buffer per KV-owning layer.
A decode step never copies the cache. Two ways to update it (`TargetContract.kv_update`):

- "in_place" (every target graph): GroupQueryAttention with past and present bound to the same memory.
- "rows" (the batched verify graph of Gemma 3 / Llama / Qwen2 bundles): the graph reads the buffers
  (inputs `past_key_values.*`) and returns only the new positions' keys/values (`present.*`, [batch,
  kv_heads, new positions, head_dim]), which the runtime writes into the buffers at each sequence's
  length. Standard ops, so several rows x several new positions per pass, which ONNX Runtime's CPU
  GroupQueryAttention refuses.

No tensor is ever found by substring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
SEQLENS_K = "seqlens_k"  # [batch] int32: tokens in the cache after this step, minus one
TOTAL_SEQ_LEN = "total_sequence_length"  # scalar int32: max over the batch of seqlens_k + 1
NUM_LOGITS = "num_logits"  # scalar int64: logits only for the last n positions
LOGITS = "logits"
LAST_HIDDEN = "last_hidden_state"


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


@dataclass(frozen=True)
class KVSlot:
    """The cache of one KV-owning layer. `window` is the sliding window (None: full attention)."""

    layer: int
    num_heads: int
    head_dim: int
    window: int | None = None


@dataclass(frozen=True)
class TargetContract:
    vocab_size: int
    hidden_size: int
    capacity: int  # KV positions per sequence the buffers hold
    kv: tuple[KVSlot, ...]
    # For an MTP drafter: the KV-owning layer it reads per attention type, e.g.
    # {"sliding_attention": 13, "full_attention": 14} (DESIGN.md §2).
    drafter_kv: dict
    kv_update: str = "in_place"  # or "rows": see the module docstring

    def to_json(self) -> dict:
        d = asdict(self)
        d["kv"] = [asdict(s) for s in self.kv]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TargetContract":
        return cls(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                   capacity=int(d["capacity"]), kv=tuple(KVSlot(**s) for s in d["kv"]),
                   drafter_kv={k: int(v) for k, v in d.get("drafter_kv", {}).items()},
                   kv_update=str(d.get("kv_update", "in_place")))
