"""What `edgemtp cluster` calls: cluster a model's head, write its tables, report recall.

Shapes: V vocabulary, d hidden size, C clusters, M slots per cluster, N positions, k clusters kept.

The tables go to `OUT/head.safetensors` (keys `centroids` [C, d] float32, `token_ordering` [C, M]
int64, `token_mask` [C, M] bool; metadata: clusters, top_k, vocab_size, hidden_size, seed, method,
calibration_positions), which `edgemtp.checkpoint.Checkpoint(OUT)` reads and the head graph binds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import EdgemtpError
from .centroids import calibrated_tables, full_head_top
from .clustering import HeadTables, check_sizes, cluster_vocab

Progress = Callable[[int, int, str], None]
HEAD_FILE = "head.safetensors"
TOP_KS = (8, 16, 32, 64)


def head_rows(model_dir: Path) -> np.ndarray:
    """[V, d] float32: the model's output head (lm_head.weight, else the tied embedding)."""
    from ..checkpoint import Checkpoint
    ckpt = Checkpoint(Path(model_dir))
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        if key in ckpt:
            return np.asarray(ckpt[key], np.float32)
    raise EdgemtpError(f"{model_dir}: no 'lm_head.weight' or 'model.embed_tokens.weight' tensor to cluster")


def load_hidden(source, hidden_size: int) -> np.ndarray:
    """Final hidden states [N, d] from an array, a .npy file or a .npz file's 'hidden' array."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise EdgemtpError(f"{path}: calibration file not found")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "hidden" not in z:
                    raise EdgemtpError(f"{path}: no 'hidden' array (expected final hidden states [N, d])")
                source = z["hidden"]
        else:
            source = np.load(path, allow_pickle=False)
    hidden = np.asarray(source, np.float32)
    if hidden.ndim != 2 or hidden.shape[1] != hidden_size or len(hidden) == 0:
        raise EdgemtpError(f"calibration hidden states have shape {list(hidden.shape)}, "
                           f"expected [N, {hidden_size}] (the model's hidden size)")
    return hidden


def cluster_model(model_dir: Path, out_dir: Path, clusters: int = 2048, top_k: int = 32, seed: int = 0,
                  progress: Progress | None = None, calibration=None) -> Path:
    """Cluster the head of the model in `model_dir` and write `out_dir/head.safetensors`; returns it.

    calibration: optional final hidden states [N, d] (array, .npy, or .npz with 'hidden'), e.g.
    a few ten thousand positions of text like the deployment's. Without it the clusters come from
    the embedding table alone (spherical k-means), with much lower recall."""
    embed = head_rows(model_dir)
    check_sizes(len(embed), clusters, top_k)
    if calibration is None:
        tables, method, n = cluster_vocab(embed, clusters, seed, progress=progress), "spherical-kmeans", 0
    else:
        hidden = load_hidden(calibration, embed.shape[1])
        top_ids, top_probs, _ = full_head_top(hidden, embed, progress=progress)
        tables = calibrated_tables(embed, clusters, hidden, top_ids, top_probs, seed, progress=progress)
        method, n = "calibrated", len(hidden)
    meta = {"clusters": clusters, "top_k": top_k, "vocab_size": len(embed), "hidden_size": embed.shape[1],
            "seed": seed, "method": method, "calibration_positions": n}
    return save_head(Path(out_dir), tables, meta)


def save_head(out_dir: Path, tables: HeadTables, meta: dict) -> Path:
    from safetensors.numpy import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / HEAD_FILE
    save_file({"centroids": np.ascontiguousarray(tables.centroids, np.float32),
               "token_ordering": np.ascontiguousarray(tables.token_ordering, np.int64),
               "token_mask": np.ascontiguousarray(tables.token_mask, bool)},
              str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


def load_head(path: Path) -> tuple[HeadTables, dict]:
    """`head.safetensors` (or its directory) -> (tables, metadata)."""
    from safetensors import safe_open
    path = Path(path)
    path = path / HEAD_FILE if path.is_dir() else path
    if not path.is_file():
        raise EdgemtpError(f"{path}: head tables not found (write them with `edgemtp cluster`)")
    with safe_open(str(path), "np") as f:
        missing = {"centroids", "token_ordering", "token_mask"} - set(f.keys())
        if missing:
            raise EdgemtpError(f"{path}: missing tensor(s) {', '.join(sorted(missing))}")
        tables = HeadTables(*(f.get_tensor(k) for k in ("centroids", "token_ordering", "token_mask")))
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return tables, meta


def recall_report(model_dir: Path, head: Path, hidden_states, top_ks=TOP_KS, softcap: float | None = None,
                  progress: Progress | None = None) -> dict:
    """Recall of the clustered head on held-out final hidden states (array or file; see load_hidden)."""
    embed = head_rows(model_dir)
    tables, meta = load_head(head)
    if tables.vocab_size != len(embed) or tables.centroids.shape[1] != embed.shape[1]:
        raise EdgemtpError(f"{head}: tables are for vocab {tables.vocab_size} x hidden {tables.centroids.shape[1]}, "
                           f"the model in {model_dir} has {len(embed)} x {embed.shape[1]}")
    hidden = load_hidden(hidden_states, embed.shape[1])
    return {"method": meta.get("method"), **recall_figures(hidden, embed, tables, top_ks, softcap, progress=progress)}


def recall_figures(hidden: np.ndarray, embed: np.ndarray, tables: HeadTables, top_ks=TOP_KS,
                   softcap: float | None = None, full: tuple[np.ndarray, np.ndarray] | None = None,
                   progress: Progress | None = None) -> dict:
    """Per k: `recall` (fraction of positions whose clustered argmax is the full-head argmax) and
    `mass` (mean softmax probability the k selected clusters hold), plus the head's MAC ratio.

    full: the full head's (argmax [N], logsumexp [N]) if already known (must match `softcap`)."""
    for k in top_ks:
        check_sizes(tables.vocab_size, tables.clusters, k)
    if full is None:
        ids, _, lse = full_head_top(hidden, embed, top=1, softcap=softcap, progress=progress)
        full = ids[:, 0], lse
    argmax, lse = full
    scores = hidden @ tables.centroids.T
    rank = (scores > scores[np.arange(len(hidden)), tables.cluster_of()[argmax]][:, None]).sum(axis=1)
    mass = _cluster_mass(hidden, embed, tables, scores, max(top_ks), lse, softcap)
    vocab, d, m = tables.vocab_size, embed.shape[1], tables.per_cluster
    return {"positions": len(hidden), "clusters": tables.clusters, "per_cluster": m,
            "k": {int(k): {"recall": float((rank < k).mean()), "mass": float(mass[:, k - 1].mean()),
                           "candidates": int(k * m),
                           "mac_ratio": vocab * d / (tables.clusters * d + k * m * d)} for k in top_ks}}


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
