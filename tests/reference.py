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


def assert_chunked_prefill_matches(target, ids: np.ndarray, want: np.ndarray, want_hidden: np.ndarray | None,
                                   monkeypatch, chunk: int, tail: int = 5) -> None:
    """runtime.target.prefill over ids[:, :-tail] PREFILL_CHUNK = `chunk` positions a pass (the runtime's 512
    made small: a tiny model's prompt spans several chunks and its windows), then the last `tail` positions in one
    pass, which read the cache the chunks wrote: the logits want [1, T, V] (and last hidden states want_hidden
    [T, H]) at the prompt's last position and at every tail position."""
    from edgemtp.runtime import target as target_mod

    monkeypatch.setattr(target_mod, "PREFILL_CHUNK", chunk)
    n = ids.shape[1] - tail
    cache = target.new_cache(1)
    logits, _ = target_mod.prefill(target, ids[0, :n].tolist(), cache)
    np.testing.assert_allclose(logits[0, -1], want[0, n - 1], atol=1e-3, rtol=0,
                               err_msg=f"the last prompt position after chunks of {chunk}")
    assert cache.lengths[0] == n
    logits, hidden = target.forward(ids[:, n:], cache, n_logits=tail)
    np.testing.assert_allclose(logits[0], want[0, n:], atol=1e-3, rtol=0, err_msg=f"after chunks of {chunk}")
    if want_hidden is not None:
        np.testing.assert_allclose(hidden[0], want_hidden[n:], atol=1e-3, rtol=0,
                                   err_msg=f"hidden states after chunks of {chunk}")
