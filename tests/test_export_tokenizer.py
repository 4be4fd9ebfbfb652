"""The bundle's tokenizer.json is the model's, written compactly with merges as strings (exporters/
tokenizer_copy.py): the same tokenizer, loaded faster."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import BPE

from edgemtp.exporters.tokenizer_copy import write_tokenizer

TEXT = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")[:20000] + " ünïcödé 日本語 🙂\t\n  x"


def same_tokenizer(a: Path, b: Path) -> None:
    ta, tb = Tokenizer.from_file(str(a)), Tokenizer.from_file(str(b))
    assert ta.to_str() == tb.to_str()  # tokenizers' own serialization of what it built from each
    ea, eb = ta.encode(TEXT), tb.encode(TEXT)
    assert ea.ids == eb.ids and len(ea.ids) > 1000
    assert ta.decode(ea.ids, skip_special_tokens=False) == tb.decode(eb.ids, skip_special_tokens=False)


def test_gemma_tokenizer_is_the_same_and_smaller(gemma3_270m_dir, tmp_path):
    src = gemma3_270m_dir / "tokenizer.json"
    write_tokenizer(src, tmp_path / "tokenizer.json")
    same_tokenizer(src, tmp_path / "tokenizer.json")
    merges = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert len(merges) == 513_511 and all(isinstance(m, str) for m in merges)
    assert (tmp_path / "tokenizer.json").stat().st_size < src.stat().st_size / 2  # 12.2 vs 33.3 MB


def test_merges_of_tokens_with_spaces_stay_pairs(tmp_path):
    """"a b" would be ambiguous if a merged token holds a space: the pairs stay, and it is still the same."""
    vocab = {"a": 0, "b": 1, " ": 2, "a ": 3, "a b": 4, "ab": 5}
    tok = Tokenizer(BPE(vocab=vocab, merges=[("a", " "), ("a ", "b"), ("a", "b")]))
    tok.save(str(tmp_path / "src.json"))
    write_tokenizer(tmp_path / "src.json", tmp_path / "out.json")
    merges = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges == [["a", " "], ["a ", "b"], ["a", "b"]]
    assert Tokenizer.from_file(str(tmp_path / "out.json")).to_str() == tok.to_str()


def test_the_test_models_tokenizers_are_the_same(tiny_gemma3, tmp_path):
    src = tiny_gemma3[1] / "tokenizer.json"
    write_tokenizer(src, tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).to_str() == Tokenizer.from_file(str(src)).to_str()
    assert (tiny_gemma3[2] / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()


def test_merges_starting_with_version_stay_pairs(tmp_path):
    """tokenizers skips a string merge that starts with "#version" (merges.txt's header): written as "a b",
    the merge ("#version", "x") would be lost, and "#versionx" encoded as two tokens."""
    vocab = {c: i for i, c in enumerate("#versionx")}
    merges = [("v", "e"), ("ve", "r"), ("ver", "s"), ("vers", "i"), ("versi", "o"), ("versio", "n"),
              ("#", "version"), ("#version", "x")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.save(str(tmp_path / "src.json"))
    write_tokenizer(tmp_path / "src.json", tmp_path / "out.json")
    out = Tokenizer.from_file(str(tmp_path / "out.json"))
    assert out.encode("#versionx").tokens == tok.encode("#versionx").tokens == ["#versionx"]
    assert out.to_str() == tok.to_str()
