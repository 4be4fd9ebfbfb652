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


def gemv_ifs(bundle_dir: Path) -> int:
    """How many If nodes the target graph holds: export's --gemv-head rewrites the head into one (one row: the
    transposed table's GEMV, else the packed MatMul); without it there is none. The logits are the same either
    way, so a parity case for that head checks nothing of it unless the graph is its own."""
    import onnx

    graph = onnx.load(str(bundle_dir / "target.onnx"), load_external_data=False).graph
    return sum(n.op_type == "If" for n in graph.node)
