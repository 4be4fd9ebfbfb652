"""What `edgemtp cluster` calls: cluster a model's head, write its tables, report recall.

Shapes: V vocabulary, d hidden size, C clusters, M slots per cluster, N positions, k clusters kept.

By default the head is learned from the model's own final hidden states on the offline corpora's
train split (`collect_calibration`: CPython stdlib code, Python docs and Shakespeare, see
`edgemtp.drafter.data`; the model runs as a scratch fp32 ONNX export under onnxruntime, the full
head's top tokens come from a small onnxruntime MatMul + TopK graph), then `packed_tables`.
`calibration=` a file of hidden states skips the collection; `calibration="none"` clusters the
embedding table alone (spherical k-means: no model run, much lower recall).

The tables go to `OUT/head.safetensors` (keys `centroids` [C, d] float32, `token_ordering` [C, M]
int64, `token_mask` [C, M] bool; metadata: clusters, top_k, vocab_size, hidden_size, seed, method,
calibration_positions), which `edgemtp.checkpoint.Checkpoint(OUT)` reads and the head graph binds.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgemtpError
from .centroids import full_head_top, in_domain, packed_tables, predicted_mass
from .clustering import HeadTables, check_sizes, cluster_vocab

Progress = Callable[[int, int, str], None]
HEAD_FILE = "head.safetensors"
TOP_KS = (8, 16, 32, 64)
CHUNK = 512  # tokens per calibration window (after a BOS)
# calibration positions `edgemtp cluster` collects by default: measured on Gemma 3 270M (idle 2 cores), 8,192 /
# 32,768 / 65,536 positions took 1.4 / 2.6 / 4.2 min for held-out recall@32 0.982 / 0.987 / 0.991 (code)
# and 0.981 / 0.986 / 0.989 (prose) (docs/measurements.md, Clustered head)
POSITIONS = 32768
TOP = 64  # full-head tokens kept per position
NO_CALIBRATION = "none"


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


def load_hidden(source, hidden_size: int) -> np.ndarray:
    """Final hidden states [N, d] from an array, a .npy file or a .npz file's 'hidden' array."""
    source_path = None
    if isinstance(source, (str, Path)):
        path = source_path = Path(source)
        if not path.is_file():
            raise EdgemtpError(f"{path}: calibration file not found")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    if "hidden" not in z:
                        raise EdgemtpError(f"{path}: no 'hidden' array (expected final hidden states [N, d])")
                    source = z["hidden"]
            else:
                source = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # not numpy, pickled objects, damaged
            raise EdgemtpError(f"{path}: not a .npy / .npz array file ({str(e).split('. ')[0]})") from None
    source = np.asarray(source)
    if not (np.issubdtype(source.dtype, np.floating) or np.issubdtype(source.dtype, np.integer)):
        raise EdgemtpError(f"{source_path or 'calibration hidden states'}: holds {source.dtype} values, expected "
                           "real numbers (final hidden states [N, d])")
    hidden = np.asarray(source, np.float32)
    if hidden.ndim != 2 or hidden.shape[1] != hidden_size or len(hidden) == 0:
        raise EdgemtpError(f"{source_path or 'calibration hidden states'}: shape {list(hidden.shape)}, "
                           f"expected hidden states [N, {hidden_size}] (the model's hidden size)")
    bad = int((~np.isfinite(hidden).all(axis=1)).sum())
    if bad:
        where = f"{source_path}: " if source_path is not None else ""
        raise EdgemtpError(f"{where}{bad} of {len(hidden)} hidden states hold NaN or infinity")
    return hidden


def cluster_model(model_dir: Path, out_dir: Path, clusters: int = 2048, top_k: int = 32, seed: int = 0,
                  progress: Progress | None = None, calibration=None, positions: int = POSITIONS) -> Path:
    """Cluster the head of the model in `model_dir` and write `out_dir/head.safetensors`; returns it.

    calibration: None (default) collects `positions` final hidden states of the model on the offline
    corpora (`collect_calibration`); else final hidden states [N, d] (array, .npy, or .npz with
    'hidden'), e.g. a few ten thousand positions of text like the deployment's; or "none": the
    clusters come from the embedding table alone (spherical k-means), with much lower recall."""
    embed = head_rows(model_dir)
    check_sizes(len(embed), clusters, top_k)
    meta = {"clusters": clusters, "top_k": top_k, "vocab_size": len(embed), "hidden_size": embed.shape[1],
            "seed": seed}
    if isinstance(calibration, (str, Path)) and str(calibration) == NO_CALIBRATION:
        tables = cluster_vocab(embed, clusters, seed, progress=progress)
        return save_head(Path(out_dir), tables, {**meta, "method": "spherical-kmeans", "calibration_positions": 0})
    texts = token_texts(model_dir, len(embed))
    softcap = logit_softcap(model_dir)
    if calibration is None:
        cal = collect_calibration(model_dir, positions, seed=seed, progress=progress)
        hidden, top_ids, top_probs, chars, seen, source = cal.hidden, cal.top_ids, cal.top_probs, cal.chars, cal.seen, \
            "corpora:" + ",".join(cal.domains)
    else:
        hidden = load_hidden(calibration, embed.shape[1])
        top_ids, top_probs = _ort_head_top(hidden, embed, TOP, softcap, None, progress)
        chars, seen, source = None, None, "file"
    domain = in_domain(predicted_mass(top_ids, top_probs, len(embed)), texts, chars, seen)
    tables = packed_tables(embed, clusters, hidden, top_ids, top_probs, domain, seed, progress=progress)
    meta.update({"method": "packed", "calibration_positions": len(hidden), "calibration_source": source,
                 "in_domain_tokens": int(domain.sum())})
    return save_head(Path(out_dir), tables, meta)


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
    cfg = _config(model_dir)
    cfg = cfg.get("text_config", cfg)
    cap = cfg.get("final_logit_softcapping") if isinstance(cfg, dict) else None
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap < 0):
        raise EdgemtpError(f"{Path(model_dir) / 'config.json'}: field 'final_logit_softcapping' {cap!r} is not a "
                           "number of 0 or more")
    return cap or None


def _config(model_dir: Path) -> dict:
    """config.json's fields ({} without one: a directory of weights alone clusters its table); a damaged
    file is named, not taken for a model without softcapping or BOS."""
    from ..config import read_config_json

    return read_config_json(model_dir) if (Path(model_dir) / "config.json").is_file() else {}


# --- calibration positions from the offline corpora -----------------------------------------------

@dataclass
class Calibration:
    """Final hidden states [N, d] with the full head's top tokens [N, T] and their probabilities,
    the corpus characters and token ids seen (for `in_domain`) and the domains used."""

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
    bos = _bos(model_dir)
    count = max(1, -(-positions // CHUNK))
    docs = {}
    for name in ("code", "docs", "shakespeare"):
        if name == "shakespeare" and not (data.CACHE / "shakespeare" / "texts").is_dir():
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
    windows, chars, seen = [], set(), set()
    for name, n in share.items():
        if n <= 0:
            continue
        w, c, s = _sample_windows(tok, docs[name], n, seed)
        windows.append(w)
        chars |= c
        seen |= s
    windows = np.concatenate(windows)
    embed = head_rows(model_dir)
    with tempfile.TemporaryDirectory(prefix=".edgemtp-cluster-") as tmp:
        hidden = _hidden_states(model_dir, Path(tmp) / "bundle", windows, bos, threads, progress)
    top_ids, top_probs = _ort_head_top(hidden, embed, TOP, logit_softcap(model_dir), threads, progress)
    return Calibration(hidden, top_ids, top_probs, chars, np.fromiter(seen, np.int64), list(share))


def _bos(model_dir: Path) -> int | None:
    cfg = _config(model_dir)
    bos = cfg.get("bos_token_id", cfg.get("text_config", {}).get("bos_token_id"))
    return int(bos) if isinstance(bos, int) else None


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


def _ort_head_top(hidden: np.ndarray, embed: np.ndarray, top: int, softcap: float | None, threads: int | None,
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
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])
    w = np.ascontiguousarray(embed, np.float32)
    ids, probs = np.empty((len(hidden), top), np.int64), np.empty((len(hidden), top), np.float32)
    for start in range(0, len(hidden), block):
        ids[start:start + block], probs[start:start + block] = sess.run(
            None, {"h": np.ascontiguousarray(hidden[start:start + block]), "w": w})
        if progress:
            progress(min(start + block, len(hidden)), len(hidden), "full head on the calibration positions")
    return ids, probs


def save_head(out_dir: Path, tables: HeadTables, meta: dict) -> Path:
    """Writes head.safetensors whole or not at all: to a temporary file renamed over it (a full disk or a
    kill leaves an earlier head as it was, and a directory this call made is removed again)."""
    from safetensors.numpy import save

    data = save({"centroids": np.ascontiguousarray(tables.centroids, np.float32),
                 "token_ordering": np.ascontiguousarray(tables.token_ordering, np.int64),
                 "token_mask": np.ascontiguousarray(tables.token_mask, bool)},
                metadata={k: json.dumps(v) for k, v in meta.items()})
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / HEAD_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{HEAD_FILE}.", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 would keep the tables from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return path


def load_head(path: Path) -> tuple[HeadTables, dict]:
    """`head.safetensors` (or its directory) -> (tables, metadata)."""
    from safetensors import safe_open
    path = Path(path)
    path = path / HEAD_FILE if path.is_dir() else path
    if not path.is_file():
        raise EdgemtpError(f"{path}: head tables not found (write them with `edgemtp cluster`)")
    try:
        with safe_open(str(path), "np") as f:
            missing = {"centroids", "token_ordering", "token_mask"} - set(f.keys())
            if missing:
                raise EdgemtpError(f"{path}: missing tensor(s) {', '.join(sorted(missing))}")
            tables = HeadTables(*(f.get_tensor(k) for k in ("centroids", "token_ordering", "token_mask")))
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except EdgemtpError:
        raise
    except Exception as e:  # safetensors' SafetensorError on a damaged file, a JSON error in its metadata
        raise EdgemtpError(f"{path}: not valid head tables ({type(e).__name__}: {str(e)[:200]})") from None
    return tables, meta


def recall_report(model_dir: Path, head: Path, hidden_states, top_ks=TOP_KS, softcap: float | None = None,
                  progress: Progress | None = None, speed: bool = False) -> dict:
    """Recall of the clustered head on held-out final hidden states (array or file; see load_hidden);
    with `speed`, also the head graphs timed on them at the tables' own k (head_speed.head_speed)."""
    embed = head_rows(model_dir)
    tables, meta = load_head(head)
    if tables.vocab_size != len(embed) or tables.centroids.shape[1] != embed.shape[1]:
        raise EdgemtpError(f"{head}: tables are for vocab {tables.vocab_size} x hidden {tables.centroids.shape[1]}, "
                           f"the model in {model_dir} has {len(embed)} x {embed.shape[1]}")
    hidden = load_hidden(hidden_states, embed.shape[1])
    top_ks = tuple(k for k in top_ks if k <= tables.clusters) or (tables.clusters,)  # a small head has fewer
    report = {"method": meta.get("method"), **recall_figures(hidden, embed, tables, top_ks, softcap, progress=progress)}
    if speed:
        from .head_speed import head_speed
        report["speed"] = head_speed(embed, tables, int(meta.get("top_k", 32)), hidden, softcap)
    return report


def recall_figures(hidden: np.ndarray, embed: np.ndarray, tables: HeadTables, top_ks=TOP_KS,
                   softcap: float | None = None, full: tuple[np.ndarray, np.ndarray] | None = None,
                   progress: Progress | None = None, context: np.ndarray | None = None) -> dict:
    """Per k: `recall` (fraction of positions whose clustered argmax is the full-head argmax) and
    `mass` (mean softmax probability the k selected clusters hold), plus the head's MAC ratio.

    full: the full head's (argmax [N], logsumexp [N]) if already known (must match `softcap`).
    context [N, W]: each position's recent token ids (-1: none); adds `recall_context`, the recall of a
    head that also scores them (exporters/head.py `add_context`): its argmax is the full one when the
    k clusters hold it or the context does."""
    for k in top_ks:
        check_sizes(tables.vocab_size, tables.clusters, k)
    if full is None:
        ids, _, lse = full_head_top(hidden, embed, top=1, softcap=softcap, progress=progress)
        full = ids[:, 0], lse
    argmax, lse = full
    scores = hidden @ tables.centroids.T
    rank = (scores > scores[np.arange(len(hidden)), tables.cluster_of()[argmax]][:, None]).sum(axis=1)
    mass = _cluster_mass(hidden, embed, tables, scores, max(top_ks), lse, softcap)
    seen = None if context is None else (np.asarray(context) == argmax[:, None]).any(axis=1)
    vocab, d, m = tables.vocab_size, embed.shape[1], tables.per_cluster
    return {"positions": len(hidden), "clusters": tables.clusters, "per_cluster": m,
            "k": {int(k): {"recall": float((rank < k).mean()), "mass": float(mass[:, k - 1].mean()),
                           "candidates": int(k * m),
                           "mac_ratio": vocab * d / (tables.clusters * d + k * m * d),
                           **({} if context is None else {"recall_context": float(((rank < k) | seen).mean())})}
                  for k in top_ks}}


def _cluster_mass(hidden: np.ndarray, embed: np.ndarray, tables: HeadTables, scores: np.ndarray, kmax: int,
                  lse: np.ndarray, softcap: float | None, block: int = 16) -> np.ndarray:
    """[N, kmax]: probability mass of the best 1..kmax clusters (by centroid score), cumulative."""
    picked = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]
    out = np.empty(picked.shape, np.float32)
    for start in range(0, len(hidden), block):
        p = picked[start:start + block]
        ids, valid = tables.token_ordering[p], tables.token_mask[p]  # [b, kmax, M]
        z = np.einsum("bd,bkmd->bkm", hidden[start:start + block], embed[ids])
        if softcap:
            z = softcap * np.tanh(z / softcap)
        prob = np.where(valid, np.exp(z - lse[start:start + block, None, None]), 0.0)
        out[start:start + block] = np.cumsum(prob.sum(axis=2), axis=1)
    return out
