"""Calibration for quantization: token windows of calibration text, and statistics of the activations
that reach each weight, gathered by running a target graph with those tensors as extra outputs.

    text = calibration_text("corpora")             # the offline corpora's TRAIN split (never held-out)
    stats = collect(graph, contract, windows(tokenizer, text, ...), {"h": True})

Per input tensor x [.., K]: max |x| and the mean square per channel (llama.cpp's "imatrix"), and when
asked the second moment H = E[x x^T] [K, K] that GPTQ needs. The graph runs without torch (numpy +
onnxruntime), one window at a time, each with a fresh KV cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import contract as C
from ..errors import ArgumentError, EdgemtpError
from ..text_bytes import utf8_text

CORPORA = "corpora"
WINDOW = 512
MAX_CHARS = 6_000_000  # of calibration text: token counts for the frequent-row split, and the windows


@dataclass
class Stats:
    """Running statistics of one activation tensor over `count` positions (channels last)."""

    count: int
    amax: np.ndarray  # [K] max |x|
    sumsq: np.ndarray  # [K] sum of x^2 (float64)
    xtx: np.ndarray | None  # [K, K] sum of x x^T (float32: E2B's are 2 GB in all), when asked for

    @property
    def mean_square(self) -> np.ndarray:
        return self.sumsq / max(self.count, 1)

    @property
    def hessian(self) -> np.ndarray | None:
        return None if self.xtx is None else self.xtx.astype(np.float64) / max(self.count, 1)

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        self.count += len(x)
        np.maximum(self.amax, np.abs(x).max(axis=0), out=self.amax)
        self.sumsq += np.square(x, dtype=np.float64).sum(axis=0)
        if self.xtx is not None:
            self.xtx += x.T @ x


@dataclass(frozen=True)
class CalibrationText:
    texts: tuple[str, ...]  # documents
    source: str  # what the manifest records: "corpora: code, docs, shakespeare (train split)" or the file

    @property
    def sha256(self) -> str:
        """Of the text read (its documents' UTF-8 bytes one after the other: a UTF-8 file read whole gives its
        sha256sum when its line ends are \\n, as they are read), what the manifest records beside `source`, which
        names it but does not say what it held (nor which corpora: the code corpus is the running Python's standard
        library)."""
        h = hashlib.sha256()
        for text in self.texts:
            h.update(text.encode("utf-8"))
        return h.hexdigest()

    def token_ids(self, tokenizer) -> list[int]:
        ids: list[int] = []
        for enc in tokenizer.encode_batch(list(self.texts), add_special_tokens=False):
            ids.extend(enc.ids)
        return ids


def calibration_text(source: str | Path, max_chars: int = MAX_CHARS) -> CalibrationText:
    """The text to calibrate on: CORPORA (the train split of the offline corpora present on this machine:
    code always, docs and shakespeare when installed; up to max_chars spread over each) or a text file. A file that
    cannot be used is refused as the argument `calibration` (--calibration from the CLI)."""
    if str(source) != CORPORA:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ArgumentError("calibration", str(path), f"cannot be read ({e.strerror or type(e).__name__})") \
                from None
        # bytes that are not UTF-8 (a Latin-1 file's accents) are replaced, not refused; no byte order mark (Notepad,
        # PowerShell), else one more token to calibrate on; line ends as a prompt file's (universal newlines)
        try:
            text = utf8_text(data, "it", errors="replace")
        except EdgemtpError as e:  # UTF-16, or a NUL byte: 'it: not text (...)' read as the argument's rule
            raise ArgumentError("calibration", str(path), "is " + str(e).removeprefix("it: ")) from None
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            raise ArgumentError("calibration", str(path), "is an empty file")
        return CalibrationText((text[:max_chars],), str(path))
    from ..drafter import data as D

    texts, used = [], []
    domains = [d for d in D.DOMAINS if _present(d, D)]  # prose corpora are optional: never download here
    for domain in domains:
        docs = sorted(D.documents(domain, "train"), key=lambda d: d.rel)
        texts += _take(docs, D.read, max_chars // len(domains))
        used.append(domain)
    return CalibrationText(tuple(texts), f"{CORPORA}: {', '.join(used)} (train split)")


def _present(domain: str, D) -> bool:
    if domain == "docs":
        return D.DOCS_ROOT.is_dir()
    if domain == "shakespeare":
        return D.CACHE is not None and (D.CACHE / "shakespeare" / "texts").is_dir()
    return True


def _take(docs, read, max_chars: int) -> list[str]:
    """Documents drawn evenly from the whole sorted list (every part of the corpus), up to max_chars."""
    stride = max(1, len(docs) // 64)
    out, n = [], 0
    for start in range(stride):
        for d in docs[start::stride]:
            out.append(read(d)[:max_chars - n])
            n += len(out[-1])
            if n >= max_chars:
                return out
    return out


def token_windows(ids: list[int], length: int, count: int, bos: int | None) -> np.ndarray:
    """Up to `count` windows [n, length] of consecutive ids, spread evenly over the text, BOS first."""
    body = length - (bos is not None)
    chunks = len(ids) // body
    if chunks == 0:
        raise EdgemtpError(f"calibration text has {len(ids)} tokens, fewer than one window of {length}")
    picks = np.linspace(0, chunks - 1, min(count, chunks)).round().astype(int)
    rows = np.asarray([ids[i * body:(i + 1) * body] for i in picks], np.int64)
    if bos is not None:
        rows = np.concatenate([np.full((len(rows), 1), bos, np.int64), rows], axis=1)
    return rows


def token_counts(ids: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.asarray([i for i in ids if 0 <= i < vocab], np.int64), minlength=vocab)


def collect(session, contract: C.TargetContract, windows: np.ndarray, wanted: dict[str, bool],
            progress=None, max_hessian: int | None = None) -> dict[str, Stats]:
    """Run `session` (a target graph with the `wanted` tensors as extra outputs) over each window.

    `wanted`: tensor name -> whether its second moment (x x^T) is needed (only for inputs of at most
    `max_hessian` channels: it takes K^2 floats)."""
    from ..runtime.target import Target

    target = Target(session, contract)
    stats: dict[str, Stats] = {}
    for w, row in enumerate(windows):
        outs = target.forward_outputs(row[None], target.new_cache(1), list(wanted))
        for name, x in zip(wanted, outs):
            if name not in stats:
                k = x.shape[-1]
                second = wanted[name] and (max_hessian is None or k <= max_hessian)
                stats[name] = Stats(0, np.zeros(k, np.float32), np.zeros(k), np.zeros((k, k), np.float32) if second
                                    else None)
            stats[name].add(x)
        if progress:
            progress(w + 1, len(windows), "calibration")
    return stats
