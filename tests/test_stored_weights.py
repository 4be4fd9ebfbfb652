"""No graph of a bundle stores a tensor nothing reads: every initializer of every graph is read by a node (of
that graph or of a subgraph, an If's branches) or is a graph output."""

from __future__ import annotations

import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

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
