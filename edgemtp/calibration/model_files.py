"""What clustering reads of a model directory besides its tables' math: the output head's rows, the
tokens' texts, the logit softcap and the BOS id (config.json, tokenizer.json, the checkpoint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgemtpError


def head_rows(model_dir: Path) -> np.ndarray:
    """[V, d] float32: the model's output head (lm_head.weight, else the tied embedding)."""
    ckpt, key = _head_key(model_dir)
    return np.asarray(ckpt[key], np.float32)


def head_shape(model_dir: Path) -> tuple[int, int]:
    """(V, d) of the model's output head, read from the checkpoint's header (no weights loaded)."""
    ckpt, key = _head_key(model_dir)
    shape = ckpt.shape(key)
    if len(shape) != 2:
        raise EdgemtpError(f"{model_dir}: tensor '{key}' has shape {list(shape)}, expected [vocab, hidden]")
    return shape[0], shape[1]


def _head_key(model_dir: Path):
    from ..checkpoint import Checkpoint
    ckpt = Checkpoint(Path(model_dir))
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        if key in ckpt:
            return ckpt, key
    raise EdgemtpError(f"{model_dir}: no 'lm_head.weight' or 'model.embed_tokens.weight' tensor to cluster")


def token_texts(model_dir: Path, vocab: int) -> list[str] | None:
    """Each token id's decoded text (model_dir/tokenizer.json), or None without a tokenizer."""
    from ..checkpoint import open_tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = open_tokenizer(path)
    return tok.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)


def logit_softcap(model_dir: Path) -> float | None:
    """The model's final_logit_softcapping (None: none, or no config.json): the full head's logits, and so
    the calibration's top tokens and the report's mass, are capped with it."""
    cfg = model_config(model_dir)
    cfg = cfg.get("text_config", cfg)
    cap = cfg.get("final_logit_softcapping") if isinstance(cfg, dict) else None
    if isinstance(cfg, dict) and cfg.get("model_type") == "gemma2" and "final_logit_softcapping" not in cfg:
        cap = 30.0  # Gemma2Config's default (exporters/gemma2.py reads it so)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap < 0):
        raise EdgemtpError(f"{Path(model_dir) / 'config.json'}: field 'final_logit_softcapping' {cap!r} is not a "
                           "number of 0 or more")
    return cap or None


def model_config(model_dir: Path) -> dict:
    """config.json's fields ({} without one: a directory of weights alone clusters its table); a damaged
    file is named, not taken for a model without softcapping or BOS."""
    from ..config import read_config_json

    return read_config_json(model_dir) if (Path(model_dir) / "config.json").is_file() else {}


def bos_id(model_dir: Path) -> int | None:
    cfg = model_config(model_dir)
    bos = cfg.get("bos_token_id", cfg.get("text_config", {}).get("bos_token_id"))
    return int(bos) if isinstance(bos, int) else None
