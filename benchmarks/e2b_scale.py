"""Export at Gemma 4 E2B scale: an E2B-shaped checkpoint of random bf16 weights, then `edgemtp export --quant`.

    python benchmarks/e2b_scale.py [--workdir /tmp/e2b_scale] [--layers 35] [--vocab 262144]
        [--quant int4] [--keep] [-- extra `edgemtp export` options]

E2B's text shapes (google/gemma-4-E2B config.json): vocab 262,144, hidden 1536, 35 layers (4 sliding :
1 full), 8 query heads, 1 KV head, head dim 256 (512 on full layers), MLP 6144 (12,288 on the 20
KV-shared layers), per-layer embeddings 35 x 256 wide over the whole vocabulary (a 262,144 x 8,960 table,
9.4 GB in fp32), tied head, soft-cap 30: ~4.6 B parameters, 9.2 GB of bf16. The tensor names and shapes
come from our own gemma4 graph (every parameter it binds), so the checkpoint is exactly what export reads.

The checkpoint is written tensor by tensor in row blocks (never a whole table in memory), then
`edgemtp export` runs as a child process; its wall time and peak RSS (the child's own maximum resident
set, from wait4) are printed, and so is a short run of the exported bundle (load + a few tokens) as a
second child. `--layers` / `--vocab` shrink the model to try the script quickly (e.g. --layers 5
--vocab 16384). Scratch files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgemtp.exporters import builder, gemma4
from edgemtp.errors import script_main

ROW_BLOCK_BYTES = 64 << 20


def e2b_config(layers: int = 35, vocab: int = 262_144) -> dict:
    """E2B's text config; fewer layers keep its 4:1 sliding/full pattern and share the last ~4/7 of them."""
    if layers < 5:
        raise SystemExit("--layers must be at least 5 (one full-attention layer must own a KV cache)")
    owners = max(5, round(layers * 15 / 35))
    return {
        "model_type": "gemma4_text", "vocab_size": vocab, "vocab_size_per_layer_input": vocab,
        "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": layers,
        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": None, "attention_k_eq_v": False, "sliding_window": 512,
        "hidden_size_per_layer_input": 256, "num_kv_shared_layers": layers - owners, "use_double_wide_mlp": True,
        "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
        "pad_token_id": 0,
        "layer_types": ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(layers)],
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}},
    }


def checkpoint_tensors(hf: dict) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: shape} of every weight our gemma4 graph binds (Linear weights as [out, in])."""
    graph, _ = gemma4.build(gemma4.parse_config(hf, "e2b"), capacity=64)
    out = {}
    for p in graph.params.values():  # a joined parameter (gate/up) is one checkpoint tensor per part
        for key, shape in zip(builder.sources(p), builder.part_shapes(p)):
            out[key] = tuple(reversed(shape)) if p.transform is builder.transpose else shape
    return out


def write_checkpoint(model_dir: Path, hf: dict, seed: int = 0) -> int:
    """config.json, a word-level tokenizer.json and model.safetensors (bf16); returns the bytes written."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(hf, indent=1))
    write_tokenizer(model_dir / "tokenizer.json", hf["vocab_size"])
    tensors = checkpoint_tensors(hf)
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = int(np.prod(shape, dtype=np.int64)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(model_dir / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in tensors.items():
            for block in random_rows(rng, shape):
                f.write(memoryview(block.reshape(-1)).cast("B"))
    return (model_dir / "model.safetensors").stat().st_size


def random_rows(rng: np.random.Generator, shape: tuple[int, ...]):
    """bf16 (as uint16) row blocks of one tensor: norms and scalars near 1, matrices N(0, 0.02)."""
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else int(shape[0])
    rows = shape[0] if len(shape) > 1 else 1
    step = max(1, ROW_BLOCK_BYTES // (4 * row))
    vector = len(shape) == 1
    for start in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - start), row), dtype=np.float32)
        x = 1.0 + 0.05 * x if vector else 0.02 * x
        yield ((x.view(np.uint32) + 0x8000) >> 16).astype(np.uint16)  # round to nearest bf16


def same_checkpoint(model_dir: Path, hf: dict) -> bool:
    st = model_dir / "model.safetensors"
    if not (model_dir / "config.json").is_file() or not st.is_file():
        return False
    want = sum(int(np.prod(s, dtype=np.int64)) * 2 for s in checkpoint_tensors(hf).values())
    return json.loads((model_dir / "config.json").read_text()) == hf and st.stat().st_size > want


def write_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def run_child(cmd: list[str]) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of a child process, its output passed through."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024  # Linux: kilobytes


SMOKE = """
import sys, time
from edgemtp.runtime.engine import Engine
t = time.perf_counter(); e = Engine.load(sys.argv[1], threads=2, verify=False); load = time.perf_counter() - t
g = e.generate("t5 t6 t7 t8", max_new_tokens=4)
print(f"loaded in {load:.1f} s; {len(g.tokens)} tokens at {g.stats.tokens_per_s:.2f} tok/s (random weights)")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/e2b_scale"))
    ap.add_argument("--layers", type=int, default=35)
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the bundle")
    ap.add_argument("--reuse", action="store_true", help="reuse a checkpoint this script wrote with the same shapes")
    ap.add_argument("--no-smoke", action="store_true", help="skip loading and running the exported bundle")
    ap.add_argument("export_options", nargs="*", help="extra `edgemtp export` options (after --)")
    args = ap.parse_args()
    model_dir, bundle = args.workdir / "model", args.workdir / f"bundle-{args.quant}"
    hf = e2b_config(args.layers, args.vocab)
    try:
        t0 = time.perf_counter()
        if args.reuse and same_checkpoint(model_dir, hf):
            print(f"checkpoint: reusing {model_dir}", flush=True)
        else:
            size = write_checkpoint(model_dir, hf)
            print(f"checkpoint: {len(checkpoint_tensors(hf))} tensors, {size / 1e9:.2f} GB bf16, written in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        cmd = [sys.executable, "-m", "edgemtp.cli", "export", str(model_dir), "-o", str(bundle), "--quant",
               args.quant, "--overwrite", *args.export_options]
        print("running:", " ".join(cmd), flush=True)
        rc, wall, rss = run_child(cmd)
        if rc != 0:
            raise SystemExit(f"export failed with exit status {rc}")
        data = sum(p.stat().st_size for p in bundle.iterdir())
        print(f"export --quant {args.quant}: {wall:.0f} s wall, peak RSS {rss / 2**30:.2f} GiB, "
              f"bundle {data / 1e9:.2f} GB", flush=True)
        if not args.no_smoke:
            rc, wall, rss = run_child([sys.executable, "-c", SMOKE, str(bundle)])
            print(f"bundle smoke run: exit {rc}, {wall:.0f} s wall, peak RSS {rss / 2**30:.2f} GiB", flush=True)
    finally:
        if not args.keep:
            for path in (model_dir, bundle):
                shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    script_main(main)
