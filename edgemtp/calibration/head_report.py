"""What `edgemtp cluster` calls: cluster a model's head, write its tables, report recall.

Shapes: V vocabulary, d hidden size, C clusters, M slots per cluster, N positions, k clusters kept.

By default the head is learned from the model's own final hidden states on the offline corpora's
train split (`collect.collect_calibration`: CPython stdlib code, Python docs and Shakespeare, see
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
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, EdgemtpError
from ..scratch import as_open_makes, parents_made, place_file
from .centroids import full_head_top, in_domain, packed_tables, predicted_mass
from .clustering import HeadTables, check_sizes, cluster_vocab, table_problem
from .collect import POSITIONS, TOP, Progress, collect_calibration, head_top
from .model_files import head_rows, logit_softcap, token_texts

HEAD_FILE = "head.safetensors"
TOP_KS = (8, 16, 32, 64)
NO_CALIBRATION = "none"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a .npz: a zip, or an empty one (np.load's test)


def load_hidden(source, hidden_size: int) -> np.ndarray:
    """Final hidden states [N, d] from an array, a .npy file or a .npz file's 'hidden' array."""
    source_path = None
    if isinstance(source, (str, Path)):
        path = source_path = Path(source)
        if not path.is_file():
            raise EdgemtpError(f"{path}: calibration file not found")
        try:
            # opened here, not by np.load: it gives its file to NpzFile before reading the zip, and a damaged .npz
            # then left it open (a ResourceWarning where it was collected)
            with open(path, "rb") as f:
                # told apart by their first bytes, as np.load does, not by the name: an array saved under a .npz
                # name was opened as an archive (a TypeError)
                magic = f.read(len(np.lib.format.MAGIC_PREFIX))
                f.seek(0)
                if magic.startswith(ZIP_MAGIC):
                    with np.load(f, allow_pickle=False) as z:
                        if "hidden" not in z:
                            raise EdgemtpError(f"{path}: no 'hidden' array (expected final hidden states [N, d])")
                        source = z["hidden"]
                elif magic == np.lib.format.MAGIC_PREFIX:
                    source = np.load(f, allow_pickle=False)
                else:  # numpy takes any other file for a pickle, and says so
                    raise EdgemtpError(f"{path}: not a .npy / .npz array file (it starts with neither the .npy "
                                       "magic bytes nor a zip's)")
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
                  progress: Progress | None = None, calibration=None, positions: int = POSITIONS,
                  source: str | None = None, overwrite: bool = True) -> Path:
    """Cluster the head of the model in `model_dir` and write `out_dir/head.safetensors`; returns it.

    calibration: None (default) collects `positions` final hidden states of the model on the offline
    corpora (`collect_calibration`); else final hidden states [N, d] (array, .npy, or .npz with
    'hidden'), e.g. a few ten thousand positions of text like the deployment's; or "none": the
    clusters come from the embedding table alone (spherical k-means), with much lower recall.
    source: what the metadata's calibration_source calls the states (default: the file's path as given, or
    "array"). overwrite: False keeps a head.safetensors another run wrote there meanwhile (save_head)."""
    check_head_dir(Path(out_dir))  # before the calibration's minutes
    embed = head_rows(model_dir)
    check_sizes(len(embed), clusters, top_k)
    meta = {"clusters": clusters, "top_k": top_k, "vocab_size": len(embed), "hidden_size": embed.shape[1],
            "seed": seed}
    if isinstance(calibration, (str, Path)) and str(calibration) == NO_CALIBRATION:
        tables = cluster_vocab(embed, clusters, seed, progress=progress)
        return save_head(Path(out_dir), tables, {**meta, "method": "spherical-kmeans", "calibration_positions": 0},
                         overwrite)
    texts = token_texts(model_dir, len(embed))
    softcap = logit_softcap(model_dir)
    if calibration is None:
        cal = collect_calibration(model_dir, positions, seed=seed, progress=progress)
        hidden, top_ids, top_probs, chars, seen, source = cal.hidden, cal.top_ids, cal.top_probs, cal.chars, cal.seen, \
            "corpora:" + ",".join(cal.domains)
    else:
        hidden = load_hidden(calibration, embed.shape[1])
        top_ids, top_probs = head_top(hidden, embed, TOP, softcap, None, progress)
        chars, seen = None, None
        source = source or (str(calibration) if isinstance(calibration, (str, Path)) else "array")
    domain = in_domain(predicted_mass(top_ids, top_probs, len(embed)), texts, chars, seen)
    tables = packed_tables(embed, clusters, hidden, top_ids, top_probs, domain, seed, progress=progress)
    meta.update({"method": "packed", "calibration_positions": len(hidden), "calibration_source": source,
                 "in_domain_tokens": int(domain.sum())})
    return save_head(Path(out_dir), tables, meta, overwrite)


def check_head_dir(out_dir: Path, name: str = "out_dir") -> None:
    """head.safetensors belongs in a new directory or a drafter's. A model directory's checkpoint is every
    *.safetensors in it, so there the tables would be read as a shard of the model (export then warns of
    tensors its config.json does not describe); in a bundle it is a file the manifest does not list. The refusal
    names `name` (cluster_model's or fit_head's argument) from Python, -o from the CLI (ArgumentError)."""
    from ..drafter import MODEL_TYPE, model_type_in

    given = os.fspath(out_dir)  # the path as text: a pathlib.Path's repr named the class
    if (out_dir / "edgemtp.json").is_file():
        raise ArgumentError(name, given, "is an edgemtp bundle, not a drafter directory (give the tables a "
                            "directory of their own or the drafter's, then export with --drafter)", "-o")
    config = out_dir / "config.json"
    if not config.is_file():
        return
    if (kind := model_type_in(config)) != MODEL_TYPE:
        raise ArgumentError(name, given, f"holds a model ({config}: model_type {kind!r}), where head.safetensors "
                            "would be read as part of its checkpoint (give the drafter's directory or one of its "
                            "own)", "-o")


def save_head(out_dir: Path, tables: HeadTables, meta: dict, overwrite: bool = True) -> Path:
    """Writes head.safetensors whole or not at all: to a temporary file renamed over it (a full disk or a
    kill leaves an earlier head as it was, and the directories this call made are removed again). Without
    `overwrite`, one another run wrote there meanwhile stays, and this fails naming it (scratch.place_file)."""
    data = _safetensors({"token_ordering": np.ascontiguousarray(tables.token_ordering, "<i8"),
                         "centroids": np.ascontiguousarray(tables.centroids, "<f4"),
                         "token_mask": np.ascontiguousarray(tables.token_mask, bool)},
                        {k: json.dumps(v) for k, v in sorted(meta.items())})
    made = not out_dir.exists()
    with parents_made(out_dir):  # those made above out_dir go again too, once it is removed
        out_dir.mkdir(exist_ok=True)
        path = out_dir / HEAD_FILE
        fd, tmp = tempfile.mkstemp(prefix=f".{HEAD_FILE}.", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            as_open_makes(Path(tmp))  # mkstemp's 0600 would keep the tables from other users
            place_file(Path(tmp), path, overwrite)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            if made and not any(out_dir.iterdir()):
                out_dir.rmdir()
            raise
    return path


_DTYPES = {"<i8": "I64", "<f4": "F32", "|b1": "BOOL"}


def _safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors file of `tensors` with its header in a fixed order: safetensors' own save() keeps the
    metadata in a hash map, whose order changes from one call to the next, so the same tables made files of
    different bytes (a cache or a download checked by its hash saw another file)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": _DTYPES[a.dtype.str], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data 8-byte aligned
    return len(blob).to_bytes(8, "little") + blob + b"".join(a.tobytes() for a in tensors.values())


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
    problem = table_problem(tables)
    if problem:
        raise EdgemtpError(f"{path}: {problem}")
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
