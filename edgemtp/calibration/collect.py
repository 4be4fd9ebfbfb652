"""Calibration positions for the clustered head from the offline corpora: the model's final hidden states
on windows of the corpora's train split, and the full head's top tokens there (what `edgemtp cluster`
learns its tables from by default)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgemtpError
from .model_files import bos_id, head_rows, logit_softcap

Progress = Callable[[int, int, str], None]
CHUNK = 512  # tokens per calibration window (after a BOS)
# calibration positions `edgemtp cluster` collects by default: measured on Gemma 3 270M (idle 2 cores), 8,192 /
# 32,768 / 65,536 positions took 1.4 / 2.6 / 4.2 min for held-out recall@32 0.982 / 0.987 / 0.991 (code)
# and 0.981 / 0.986 / 0.989 (prose) (docs/measurements.md, Clustered head)
POSITIONS = 32768
TOP = 64  # full-head tokens kept per position


@dataclass
class Calibration:
    """Final hidden states [N, d] with the full head's top tokens [N, T] and their probabilities,
    the corpus characters and token ids seen (for `in_domain`) and the corpora its windows came from."""

    hidden: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    chars: set
    seen: np.ndarray
    domains: list


def collect_calibration(model_dir: Path, positions: int = POSITIONS, seed: int = 0, threads: int | None = None,
                        progress: Progress | None = None, skip: Callable | None = None) -> Calibration:
    """Run the model over windows of the offline corpora's train split: half code (CPython stdlib),
    half prose (Python docs and Shakespeare; a domain whose corpus is not on this machine is left out).

    The model runs as a scratch fp32 ONNX export (deleted afterwards) under onnxruntime; the full head
    on the hidden states runs as a small onnxruntime graph (MatMul, TopK, ReduceLogSumExp).
    `skip(document) -> bool` leaves documents out (e.g. a benchmark's held-out files)."""
    from ..checkpoint import open_tokenizer
    from ..drafter import data

    model_dir = Path(model_dir)
    missing = [f for f in ("config.json", "tokenizer.json") if not (model_dir / f).is_file()]
    if missing:
        raise EdgemtpError(f"{model_dir}: no {' or '.join(missing)} to run the model for calibration; pass "
                           "--calibration FILE (final hidden states) or --calibration none (embedding only)")
    tok = open_tokenizer(model_dir / "tokenizer.json")
    bos = bos_id(model_dir)
    count = max(1, -(-positions // CHUNK))
    docs = {}
    for name in ("code", "docs", "shakespeare"):
        if name == "shakespeare" and not (data.CACHE and (data.CACHE / "shakespeare" / "texts").is_dir()):
            continue  # not fetched yet (`edgemtp` drafter training downloads it): no network stall here
        try:
            found = data.documents(name, "train")
        except EdgemtpError:
            continue
        found = [d for d in found if not (skip and skip(d))]
        if found:
            docs[name] = found
    if not docs:
        raise EdgemtpError("no offline corpus found for calibration (see edgemtp.drafter.data); "
                           "pass --calibration FILE (hidden states) or --calibration none")
    prose = [n for n in docs if n != "code"]
    share = {"code": count // 2 if prose else count} if "code" in docs else {}
    for i, name in enumerate(prose):
        share[name] = (count - sum(share.values())) // (len(prose) - i)
    windows, chars, seen, used = [], set(), set(), []
    for name, n in share.items():
        if n <= 0:
            continue
        w, c, s = _sample_windows(tok, docs[name], n, seed)
        windows.append(w)
        chars |= c
        seen |= s
        if len(w):  # the head's calibration_source names the corpora its windows came from, not every one found
            used.append(name)
    if not used:  # checked before the scratch export, which takes minutes on a big model
        raise EdgemtpError(f"{model_dir / 'tokenizer.json'}: no document of the offline corpora ({', '.join(docs)}) "
                           f"is {CHUNK} tokens long under this tokenizer, the length of a calibration window; pass "
                           "--calibration FILE (final hidden states) or --calibration none (embedding only)")
    windows = np.concatenate(windows)
    embed = head_rows(model_dir)
    with tempfile.TemporaryDirectory(prefix=".edgemtp-cluster-") as tmp:
        hidden = _hidden_states(model_dir, Path(tmp) / "bundle", windows, bos, threads, progress)
    top_ids, top_probs = head_top(hidden, embed, TOP, logit_softcap(model_dir), threads, progress)
    return Calibration(hidden, top_ids, top_probs, chars, np.fromiter(seen, np.int64), used)


def _sample_windows(tok, docs: list, count: int, seed: int) -> tuple[np.ndarray, set, set]:
    """`count` windows of CHUNK tokens from `docs` (documents in a seeded order, windows spread over
    each document), plus the characters and token ids of the documents read."""
    from ..drafter import data

    rng = np.random.default_rng(seed)
    out, chars, seen = [], set(), set()
    order = rng.permutation(len(docs))
    for start in range(0, len(order), 64):
        batch = [docs[i] for i in order[start:start + 64]]
        texts = [data.read(d) for d in batch]
        for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False)):
            chars |= set(text)
            ids = enc.ids
            seen.update(ids)
            n = len(ids) // CHUNK
            for j in rng.permutation(n)[:max(1, n // 4)]:  # a few windows per document: spread
                out.append(ids[j * CHUNK:(j + 1) * CHUNK])
        if len(out) >= 2 * count:
            break
    if not out or count <= 0:
        return np.zeros((0, CHUNK), np.int64), chars, seen
    pick = rng.permutation(len(out))[:count]
    return np.asarray([out[i] for i in sorted(pick)], np.int64), chars, seen


def _hidden_states(model_dir: Path, bundle_dir: Path, windows: np.ndarray, bos: int | None, threads: int | None,
                   progress: Progress | None) -> np.ndarray:
    """[W * CHUNK, d] final hidden states of the windows (each after a BOS when the model has one)."""
    from .. import bundle as bundle_mod
    from ..exporters import export
    from ..runtime.session import make_session
    from ..runtime.target import Target

    lead = 0 if bos is None else 1
    export(model_dir, bundle_dir, quant="fp32", capacity=CHUNK + lead,
           progress=(lambda d, n, desc: progress(d, n, "scratch export: " + desc)) if progress else None)
    b = bundle_mod.load(bundle_dir, verify=False)
    target = Target(make_session(b.graph("target").path, "cpu", threads), b.target_contract)
    out = []
    for i, w in enumerate(windows):
        ids = np.concatenate([[bos], w]) if lead else w
        _, hidden = target.forward(ids[None].astype(np.int64), target.new_cache(1), n_logits=1)
        out.append(hidden[0, lead:])
        if progress:
            progress(i + 1, len(windows), "model on the calibration windows")
    return np.concatenate(out).astype(np.float32)


def head_top(hidden: np.ndarray, embed: np.ndarray, top: int, softcap: float | None, threads: int | None,
                  progress: Progress | None, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The full head's `top` best tokens [N, top] and their probabilities, with onnxruntime (the head
    rows are an input, not an initializer: the session builds in milliseconds)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    v, d = embed.shape
    top = min(top, v)
    nodes = [helper.make_node("Gemm", ["h", "w"], ["z"], transB=1)]
    if softcap:
        nodes = [helper.make_node("Gemm", ["h", "w"], ["z0"], transB=1), helper.make_node("Div", ["z0", "cap"], ["zc"]),
                 helper.make_node("Tanh", ["zc"], ["zt"]), helper.make_node("Mul", ["zt", "cap"], ["z"])]
    nodes += [helper.make_node("TopK", ["z", "k"], ["vals", "ids"], axis=-1),
              helper.make_node("ReduceLogSumExp", ["z"], ["lse"], axes=[-1], keepdims=1),
              helper.make_node("Sub", ["vals", "lse"], ["logp"]), helper.make_node("Exp", ["logp"], ["probs"])]
    inits = [numpy_helper.from_array(np.array([top], np.int64), "k")]
    if softcap:
        inits.append(numpy_helper.from_array(np.array(softcap, np.float32), "cap"))
    graph = helper.make_graph(nodes, "head_top", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", d]),
                                                  helper.make_tensor_value_info("w", TensorProto.FLOAT, [v, d])],
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", top]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", top])], inits)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
        opts, providers=["CPUExecutionProvider"])
    w = np.ascontiguousarray(embed, np.float32)
    ids, probs = np.empty((len(hidden), top), np.int64), np.empty((len(hidden), top), np.float32)
    for start in range(0, len(hidden), block):
        ids[start:start + block], probs[start:start + block] = sess.run(
            None, {"h": np.ascontiguousarray(hidden[start:start + block]), "w": w})
        if progress:
            progress(min(start + block, len(hidden)), len(hidden), "full head on the calibration positions")
    return ids, probs
