"""Test helpers: tiny random transformers models saved as model directories, and their reference logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `t0 .. t{V-1}`: enough for export and round trips in tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))


def save_tiny(model, model_dir: Path) -> Path:
    model.save_pretrained(model_dir, safe_serialization=True)
    write_tokenizer(model_dir, model.config.get_text_config().vocab_size)
    return model_dir


def reference_logits(model, ids: np.ndarray, chunks: list[int]) -> list[np.ndarray]:
    """Logits of the transformers model fed `ids` [1, T] in successive chunks with its KV cache."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            piece = torch.tensor(ids[:, start:start + n])
            pos = torch.arange(start, start + n)[None]
            r = model(input_ids=piece, position_ids=pos, cache_position=pos[0], cache=cache,
                      use_cache=True)
            out.append(r.logits.float().numpy())
            start += n
    return out
