"""No bundle stores a tensor that none of its graphs reads: every initializer of every graph is read by a node (of
that graph or of a subgraph, an If's branches) or is a graph output, or its bytes are read by another graph of the
bundle (a drafter reads the target's table from the target's data file); and every byte of a data file belongs to
a tensor read so, but the padding that aligns each tensor."""

from __future__ import annotations

from collections import defaultdict

import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ALIGNMENT = 64  # builder._align: each tensor of a data file starts at a multiple of it

def names_read(graph: onnx.GraphProto) -> set[str]:
    """The tensors a node of `graph` or of its subgraphs reads, and the outputs of each."""
    out = {o.name for o in graph.output}
    for node in graph.node:
        out.update(node.input)
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                out |= names_read(sub)
    return out


def place(t: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(data file, offset, length) of an external tensor; None for one stored in the graph."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def unread(bundle_dir) -> tuple[list[tuple[str, onnx.TensorProto]], set]:
    """(each initializer its graph does not read, as (graph file, tensor); the places of those read)."""
    read_places, out = set(), []
    for path in sorted(bundle_dir.glob("*.onnx")):
        g = onnx.load(str(path), load_external_data=False).graph
        read = names_read(g)
        for t in g.initializer:
            if t.name in read:
                read_places.add(place(t))
            else:
                out.append((path.name, t))
    return out, read_places - {None}


def test_every_constant_of_a_graph_is_read(every_kind_of_bundle):
    """The verify graphs (window_view), Gemma 4's (cache_view) and the MTP drafters (committed_view) held a
    constant start of the cache view that a sliding view's computed start replaced."""
    found = [f"{b.name}/{file}: {t.name}" for b in every_kind_of_bundle for file, t in unread(b)[0]
             if place(t) is None]
    assert not found, "\n".join(found)


def unread_bytes(bundle_dir, read_places: set) -> list[str]:
    """The stretches of each data file that no tensor read covers and that are not alignment padding."""
    ranges = defaultdict(list)
    for file, offset, length in read_places:
        ranges[file].append((offset, offset + length))
    out = []
    for path in sorted(bundle_dir.glob("*.data")):
        end = 0
        for lo, hi in sorted(ranges[path.name]) + [(path.stat().st_size, None)]:
            if lo - end >= ALIGNMENT or hi is None and lo != end:
                out.append(f"{path.name}: bytes {end}..{lo}")
            end = max(end, hi or 0)
    return out


def test_every_stored_weight_is_read_by_a_graph_of_its_bundle(every_kind_of_bundle):
    """int4 tables packed for the gather only (an untied embedding, Gemma 4's per-layer table, the table of an
    integer head) stored MatMulNBits' zero points, which only a MatMulNBits head reads: ~37 MB for Gemma 4 E2B's
    per-layer table. Tensors another graph reads are fine: the [V, H] table a --gemv-head target keeps for its
    drafter, the target's table a quantized drafter points at (Qwen2's untied int4 embedding, gathered by the target:
    its drafter's tied head adds the zero points it multiplies by to its own file)."""
    found = []
    for b in every_kind_of_bundle:
        unread_here, read_places = unread(b)
        found += [f"{b.name}/{file}: {t.name}" for file, t in unread_here
                  if place(t) is not None and place(t) not in read_places]
        found += [f"{b.name}/{x}" for x in unread_bytes(b, read_places)]
    assert not found, "\n".join(found)
