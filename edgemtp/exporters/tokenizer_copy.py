"""The bundle's copy of the model's tokenizer.json, in the form the tokenizers library loads fastest.

Every load of a bundle parses its tokenizer.json, and for a large BPE vocabulary that is most of the load
after ONNX Runtime's session: Gemma 3's (262,144 tokens, 513,511 merges) took 0.78 s. Model directories
hold it pretty-printed (33 MB) with each merge a pair `["a", "b"]`; written compactly with each merge as
the string "a b" (the format tokenizers wrote before pairs, and still reads) it is 12 MB and loads in
0.59 s (median of 5, the Xeon VM, session 39). Only when no merged token holds a space (then "a b" is
ambiguous) and no merge's first token starts with "#version" (tokenizers skips such a string as the header
line of a merges.txt, dropping the merge): otherwise the pairs stay. The tokenizer is the same:
tests/test_export_tokenizer.py checks that both serialize alike and encode alike."""

from __future__ import annotations

import json
from pathlib import Path


def write_tokenizer(src: Path, dst: Path) -> None:
    """Writes `src` (a tokenizer.json that check_tokenizer read) to `dst`, compact, merges as strings. The
    same data in another layout: tokenizers' JSON reader accepted the file, and what it refuses that Python's
    accepts (NaN, lone surrogates) cannot be in it."""
    tok = json.loads(Path(src).read_text(encoding="utf-8"))
    model = tok.get("model") if isinstance(tok, dict) else None
    merges = model.get("merges") if isinstance(model, dict) and model.get("type") == "BPE" else None
    if isinstance(merges, list) and all(_plain_pair(m) for m in merges):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    Path(dst).write_text(json.dumps(tok, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _plain_pair(merge) -> bool:
    """A pair that reads back as itself from "a b": tokenizers splits the string at its one space, after
    skipping every string that starts with "#version" (merges.txt's header line)."""
    return (isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) and p and " " not in p
                                                               for p in merge)
            and not merge[0].startswith("#version"))
