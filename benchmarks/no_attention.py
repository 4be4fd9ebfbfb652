"""What attention costs a decode step in place: a copy of a bundle whose target has no attention at all.

    python benchmarks/no_attention.py BUNDLE OUT
    python benchmarks/bench_decode.py BUNDLE --rounds 1 --pairs 100 --contexts 128 --also OUT

Each GroupQueryAttention node becomes an Identity of its query (the layer then mixes no other position),
and its KV outputs Identities of the KV inputs, which ONNX Runtime skips when, as in the runtime's decode
steps, each present output is bound to its past input's buffer. Every other node, weight and the I/O
contract stay, so bench_decode's paired steps compare the two directly: the speed-up is what attention
(its kernel, and what it evicts or waits for beside the weights' stream) costs in a real step, which a
per-op profile inflates and a graph of the attention nodes alone understates. OUT is for measuring only:
its text is nonsense. The other files are hard links to BUNDLE's (no second copy of the weights); the
manifest's hash of target.onnx is rewritten."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
from onnx import helper

from edgemtp.errors import script_main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    src, out = args.bundle, args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("target.onnx", "edgemtp.json"):
            os.link(f, out / f.name)
    model = onnx.load(src / "target.onnx", load_external_data=False)
    nodes, removed = [], 0
    for n in model.graph.node:
        if n.op_type != "GroupQueryAttention":
            nodes.append(n)
            continue
        removed += 1
        if len(n.input) < 5 or not (n.input[3] and n.input[4]):  # e.g. Gemma 4's KV-shared layers
            raise SystemExit(f"{src}: attention node {n.name} has no KV cache inputs; only graphs whose every "
                             "attention node has its own cache can be measured this way")
        # inputs: query, key, value, past_key, past_value, ...; outputs: output, present_key, present_value
        nodes += [helper.make_node("Identity", [n.input[0]], [n.output[0]]),
                  helper.make_node("Identity", [n.input[3]], [n.output[1]]),
                  helper.make_node("Identity", [n.input[4]], [n.output[2]])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, out / "target.onnx")
    manifest = json.loads((src / "edgemtp.json").read_text(encoding="utf-8"))
    data = (out / "target.onnx").read_bytes()
    manifest["files"]["target.onnx"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (out / "edgemtp.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    print(f"{out}: {removed} attention nodes removed")


if __name__ == "__main__":
    script_main(main)
