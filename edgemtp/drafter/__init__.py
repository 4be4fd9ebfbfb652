"""MTP drafters (DESIGN.md §2): config (here, torch-free), torch module + trainer (`model`, `train`: the
`train` extra), ONNX export and an ONNX Runtime runner (`export`: numpy + onnxruntime only).

A trained drafter is a directory: `config.json` (DrafterConfig.to_json() + training facts) and
`model.safetensors` (fp16). It holds no embedding: it reads the target's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import SLIDING, Rope, TextConfig
from ..errors import EdgemtpError, missing
from ..json_file import read_json
from ..manifest_graphs import whole
from ..scratch import as_open_makes

MODEL_TYPE = "edgemtp_mtp_drafter"
WEIGHTS = "model.safetensors"
SHIPPED = Path(__file__).resolve().parent.parent / "drafters"
FINGERPRINT = "target_rows.safetensors"  # a few of the target's embedding rows: how it is recognised
EMBEDDING = "model.embed_tokens.weight"
MIN_COSINE = 0.99  # a re-quantized copy of the same model (GGUF Q4_K_M vs bf16) stays far above this


@dataclass(frozen=True)
class DrafterConfig:
    vocab_size: int
    backbone_hidden: int  # Hb: the target's hidden size
    hidden: int  # H: the drafter's width
    intermediate: int
    num_heads: int
    num_kv_heads: int  # the target's
    head_dim: int  # the target's
    layer_types: tuple[str, ...]
    target_kv: dict  # layer type -> target layer whose cache the drafter reads
    rope: dict = field(hash=False)  # layer type -> Rope (the target's)
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-6
    attention_scale: float = 1.0
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    embed_scale: float = 1.0  # the target's input embedding multiplier (Gemma: sqrt(Hb))
    target_model_type: str = "gemma3_text"

    @classmethod
    def for_target(cls, t: TextConfig, drafter_kv: dict, hidden: int = 256, intermediate: int = 1024,
                   num_layers: int = 4, num_heads: int | None = None) -> "DrafterConfig":
        """Gemma 4's assistant layout: all sliding layers but the last, which is full attention."""
        types = tuple(sorted(drafter_kv))
        full = [x for x in types if x != SLIDING]
        layer_types = tuple([SLIDING] * (num_layers - 1) + [full[0]]) if full and SLIDING in types \
            else (types[0],) * num_layers
        return cls(vocab_size=t.vocab_size, backbone_hidden=t.hidden_size, hidden=hidden,
                   intermediate=intermediate, num_heads=num_heads or t.num_heads, num_kv_heads=t.num_kv_heads,
                   head_dim=t.head_dim, layer_types=layer_types, target_kv=dict(drafter_kv),
                   rope={k: t.rope[k] for k in types}, sliding_window=t.sliding_window,
                   rms_norm_eps=t.rms_norm_eps, attention_scale=t.scale, hidden_activation=t.hidden_activation,
                   final_logit_softcapping=t.final_logit_softcapping, embed_scale=math.sqrt(t.hidden_size)
                   if t.model_type.startswith("gemma") else 1.0, target_model_type=t.model_type)

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def fits(self, target) -> bool:
        """Whether it drafts for a target of that contract (contract.TargetContract): the same hidden size and
        vocabulary, and for each attention type the layer whose KV it was trained to read."""
        kv = {t: int(layer) for t, layer in target.drafter_kv.items()}
        return (target.hidden_size, target.vocab_size) == (self.backbone_hidden, self.vocab_size) and \
            set(kv.values()) == set(self.target_kv.values()) and \
            all(kv.get(t) == layer for t, layer in self.target_kv.items())  # each type its own layer

    def window(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == SLIDING else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["rope"] = {k: asdict(v) for k, v in self.rope.items()}
        return {"model_type": MODEL_TYPE, **d}

    @classmethod
    def from_json(cls, d: dict) -> "DrafterConfig":
        d = {k: v for k, v in d.items() if k != "model_type"}
        d["layer_types"] = tuple(d["layer_types"])
        d["rope"] = {k: Rope(**v) for k, v in d["rope"].items()}
        d["target_kv"] = {k: int(v) for k, v in d["target_kv"].items()}
        return cls(**d)


def load_config(drafter_dir: Path) -> DrafterConfig:
    path = Path(drafter_dir) / "config.json"
    if not path.is_file():
        raise EdgemtpError(f"{path}: {missing(path)} (a drafter directory needs config.json and {WEIGHTS})")
    d = read_json(path)
    if not isinstance(d, dict) or d.get("model_type") != MODEL_TYPE:
        kind = d.get("model_type") if isinstance(d, dict) else type(d).__name__
        raise EdgemtpError(f"{path}: model_type {kind!r} is not {MODEL_TYPE!r}")
    _check_fields(d, path)
    known = set(DrafterConfig.__dataclass_fields__)
    try:
        return DrafterConfig.from_json({k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError, AttributeError) as e:  # a nested value of the wrong kind (rope, target_kv)
        raise EdgemtpError(f"{path}: a field has a value of the wrong type ({e})") from None


def _check_fields(d: dict, path: Path) -> None:
    """The fields a drafter is built from, named when missing or of the wrong kind (an edited or foreign
    config.json would otherwise be a KeyError deep in the export)."""
    for key in ("vocab_size", "backbone_hidden", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim"):
        if not whole(d.get(key), 1):
            raise EdgemtpError(f"{path}: field '{key}' {d.get(key)!r} must be a positive whole number")
    types = d.get("layer_types")
    if not (isinstance(types, list) and types and all(isinstance(t, str) for t in types)):
        raise EdgemtpError(f"{path}: field 'layer_types' {types!r} must be a non-empty list of layer types")
    kv, rope = d.get("target_kv"), d.get("rope")
    if not (isinstance(kv, dict) and set(types) <= set(kv) and all(isinstance(v, int) for v in kv.values())):
        raise EdgemtpError(f"{path}: field 'target_kv' {kv!r} must map each of its layer types to a target layer")
    if not (isinstance(rope, dict) and set(types) <= set(rope) and all(isinstance(v, dict) for v in rope.values())):
        raise EdgemtpError(f"{path}: field 'rope' must give each of its layer types its RoPE parameters")


def fingerprint_ids(vocab_size: int, n: int = 16) -> np.ndarray:
    return np.linspace(vocab_size // 64, vocab_size - 1, n).astype(np.int64)


def write_fingerprint(drafter_dir: Path, target_dir: Path) -> Path:
    """Stores the target's embedding rows at fingerprint_ids() beside the drafter (fp16, ~20 KB)."""
    from safetensors.numpy import save

    from ..checkpoint import Checkpoint

    cfg = load_config(drafter_dir)
    ids = fingerprint_ids(cfg.vocab_size)
    rows = Checkpoint(Path(target_dir)).rows(EMBEDDING, ids)
    path = Path(drafter_dir) / FINGERPRINT
    # written by Python, not by safetensors' save_file, whose full disk is its own SafetensorError (a traceback)
    path.write_bytes(save({"ids": ids, "rows": rows.astype(np.float16)}))
    as_open_makes(path)  # one an earlier version wrote (safetensors' 0600) keeps its mode through write_bytes
    return path



def recognises(drafter_dir: Path, target_dir: Path) -> bool:
    """True when the target in `target_dir` is the model this drafter was trained for, judged by its weights
    (not its path or name): matching shapes and embedding rows with cosine >= MIN_COSINE."""
    cos = _fingerprint_cosine(drafter_dir, target_dir)
    return cos is not None and cos >= MIN_COSINE


def trained_for_another(drafter_dir: Path, target_dir: Path) -> bool:
    """True when the drafter's fingerprint shows another model of the same shapes: its embedding rows differ.
    False where there is nothing to compare (no fingerprint, no embedding of those shapes)."""
    cos = _fingerprint_cosine(drafter_dir, target_dir)
    return cos is not None and cos < MIN_COSINE


def _fingerprint_cosine(drafter_dir: Path, target_dir: Path) -> float | None:
    """The least cosine between the fingerprint's embedding rows and the target's, or None where either is
    missing or the shapes differ."""
    from ..checkpoint import Checkpoint

    if not (Path(drafter_dir) / FINGERPRINT).is_file():
        return None
    fp = Checkpoint(Path(drafter_dir))
    ckpt = Checkpoint(Path(target_dir))
    cfg = load_config(drafter_dir)
    if EMBEDDING not in ckpt or ckpt.shape(EMBEDDING) != (cfg.vocab_size, cfg.backbone_hidden):
        return None
    want, have = fp["rows"], ckpt.rows(EMBEDDING, fp["ids"])
    cos = (want * have).sum(1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(have, axis=1) + 1e-12)
    return float(cos.min())


def match_shipped(target_dir: Path) -> Path | None:
    """The shipped drafter trained for the model in `target_dir`, if any."""
    if not SHIPPED.is_dir():
        return None
    for d in sorted(p for p in SHIPPED.iterdir() if (p / "config.json").is_file()):
        if recognises(d, target_dir):
            return d
    return None


def model_type_in(config: Path) -> str | None:
    """A config.json's model_type; None where it is unreadable, not JSON or not an object (not a drafter's either)."""
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
