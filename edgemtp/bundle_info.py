"""What a bundle holds, for `edgemtp info`: the model, the KV capacity and what its cache takes in memory,
each graph's quantization, files and size, the drafter's head. Reads the manifest and the graphs' protobufs
(no weights, no ONNX Runtime), so it answers in a moment even for a bundle of several GB."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle, graph_facts
from .contract import TargetContract
from .errors import EdgemtpError
from .manifest_graphs import two_pass_built

# what each graph is for, in the words of README's "Bundles"
ROLES = {"target": "the model: prefill and decode passes",
         "verify": "batched verify passes (several rows x several positions)",
         "drafter": "MTP drafter",
         "drafter_full_head": "the MTP drafter with its full head (profile's comparison)"}


def describe(b: Bundle) -> dict:
    """The bundle as one JSON-ready dict (`edgemtp info --json`)."""
    m = b.manifest
    contract = b.target_contract
    graphs = {name: _graph(b, name, g) for name, g in m["graphs"].items()}
    return {"bundle": str(b.dir),
            "model": m["model"],
            "edgemtp_version": m.get("edgemtp_version"),  # none in a bundle written before it was recorded
            "source": m.get("source"),
            "capacity": contract.capacity,
            "kv_cache_bytes_per_row": kv_cache_bytes(contract),
            "kv_window_copies_bytes_per_row": kv_window_copies_bytes(contract),
            "sliding_window": contract.sliding_window,
            "graphs": graphs,
            "chat_template": b.chat is not None,
            "files": {rel: info["bytes"] for rel, info in sorted(m["files"].items())},
            "bytes": sum(info["bytes"] for info in m["files"].values())}


def kv_window_copies_bytes(contract: TargetContract) -> int:
    """The copies of the window's end a row's one-row passes bind on sliding layers with several KV heads
    (runtime/kv_cache.py's shadows), made once its context passes where a view can start (0 where none can)."""
    from .runtime.kv_cache import shadow_plan

    if not contract.window_views or not contract.window_offset(contract.capacity - 1):
        return 0
    slots, room = shadow_plan(contract.kv, contract.capacity)
    return sum(2 * 4 * s.num_heads * room * s.head_dim for s in slots)


def kv_cache_bytes(contract: TargetContract) -> int:
    """The runtime's K and V buffers for one row (fp32, [kv_heads, capacity, head_dim] per KV-owning layer):
    allocated whole at load, though untouched pages cost no RAM until the context reaches them."""
    return sum(2 * 4 * s.num_heads * contract.capacity * s.head_dim for s in contract.kv)


def _graph(b: Bundle, name: str, g: dict) -> dict:
    own, shared = graph_files(b.dir, g["file"])
    out = {"role": ROLES.get(name, name), "quant": g.get("quant", "fp32"), "files": own, "reads": shared,
           "bytes": sum(b.manifest["files"][f]["bytes"] for f in own)}
    contract = g.get("contract", {})
    if contract.get("static"):
        out["static"] = {"batch": contract.get("batch"), "verify_window": contract.get("verify_window")}
    if "quantization" in g:
        out["quantization"] = g["quantization"]
    if "weights" in g:  # a drafter of a quantized bundle: its own weights' precision
        out["weights"] = g["weights"]
    if "gemv_head" in g:
        out["head_table"] = "transposed [hidden, V]"
    if contract.get("kind") == "mtp":
        config, head = contract.get("config", {}), contract.get("head", {})
        # model_type, layer_types and hidden: of the right kind where present (manifest_graphs.drafter_contract)
        out["drafter"] = {"model_type": config.get("model_type"), "layers": len(config.get("layer_types", [])),
                          "hidden": config.get("hidden"),
                          "head": {**head, **head_slots(head, config.get("vocab_size"))}}
    return out


def graph_files(bundle_dir: Path, graph_file: str) -> tuple[list[str], list[str]]:
    """(the graph's own files: its .onnx and its .onnx.data, the external data files of other graphs it
    reads weights from: a verify graph the target's, a drafter the target's embedding table)."""
    data = graph_facts(bundle_dir / graph_file).data_files
    own = [f for f in data if f == graph_file + ".data"]
    return [graph_file, *own], [f for f in data if f not in own]


def text(info: dict, verified: bool) -> str:
    """The human-readable report of describe()'s dict."""
    model = info["model"]
    eos = ", ".join(map(str, model.get("eos_token_ids", []))) or "none"
    bos = "none" if model.get("bos_token_id") is None else model.get("bos_token_id")
    window = f", sliding window {info['sliding_window']:,}" if info["sliding_window"] else ""
    lines = [f"{info['bundle']}: {len(info['files'])} files, {_size(info['bytes'])}"
             + (" (every file's sha256 matches the manifest)" if verified
                else " (sizes checked; --no-verify: no sha256)"),
             f"model: {model.get('model_type')}, {_parameters(info['source'])}{model.get('num_layers')} layers, hidden "
             f"{model.get('hidden_size'):,}, vocabulary {model.get('vocab_size'):,} (bos {bos}, "
             f"eos {eos})",
             f"context: {info['capacity']:,} tokens{window}; KV cache {_size(info['kv_cache_bytes_per_row'])} "
             "a row (fp32" + (f"; {_size(copies)} more of copies of the window once a row's context passes it"
                              if (copies := info["kv_window_copies_bytes_per_row"]) else "") + ")",
             "chat: " + ("chat template (generate --chat, chat)" if info["chat_template"] else
                            "no chat template (a pretrained model)")]
    if info["edgemtp_version"] is not None:
        source = info["source"].get("model") if isinstance(info["source"], dict) else None
        lines.append(f"made by: edgemtp {info['edgemtp_version']}" + (f" from model {source}" if source else ""))
    for name, g in info["graphs"].items():
        files = " + ".join(g["files"]) + (f" (also reads {', '.join(g['reads'])})" if g["reads"] else "")
        lines.append(f"{name}: {g['role']}")
        lines.append(f"    {g['quant']}, {_size(g['bytes'])}: {files}")
        try:
            extra = _details(g)
        except (TypeError, ValueError, AttributeError) as e:  # of what it shows, only a scheme's fields are formatted
            where = Path(info["bundle"]) / "edgemtp.json"  # (the rest the load checked, or is printed as it is)
            raise EdgemtpError(f"{where}: graphs.{name}.quantization cannot be shown ({e})") from None
        if extra:
            lines.append(f"    {extra}")
    return "\n".join(lines)


def _parameters(source) -> str:
    """The model line's "268,098,176 parameters, " where the manifest records them (a bundle exported before it
    did says nothing)."""
    n = source.get("parameters") if isinstance(source, dict) else None
    return f"{n:,} parameters, " if isinstance(n, int) and not isinstance(n, bool) else ""


def _details(g: dict) -> str:
    parts = []
    if "static" in g:
        parts.append(f"static shapes: batch {g['static']['batch']}, verify window {g['static']['verify_window']}")
    if "quantization" in g:
        parts.append(_scheme(g["quantization"]))
    if "weights" in g:
        parts.append(f"its own weights {g['weights']}")
    if "head_table" in g:
        parts.append(f"LM head table {g['head_table']}")
    if "drafter" in g:
        d, head = g["drafter"], g["drafter"]["head"]
        parts.append(f"{d['model_type']}, {d['layers']} layer{'s' * (d['layers'] != 1)}, hidden {d['hidden']}; "
                     + _head(head))
    return "; ".join(parts)


def _scheme(q: dict) -> str:
    """An int8 / int4 target's scheme as export's flags set it (README "Quantization"), or a qdq one's."""
    if q.get("format") == "qdq":  # static QDQ: other fields (weight and activation bits, calibration)
        return _qdq_scheme(q)
    blocks = f"blocks of {q.get('block_size')}"
    if q.get("head_block_size", q.get("block_size")) != q.get("block_size"):
        blocks += f" (head {q['head_block_size']})"
    # a bundle exported before --layer-op / --head-op records neither: MatMulNBits was the only op then
    layer_op, head_op = q.get("layer_op", "nbits"), q.get("head_op", "nbits")
    parts = [f"layers {q.get('bits')}-bit ({layer_op}), head {q.get('head_bits')}-bit ({head_op}), "
             f"embedding {q.get('embed_bits')}-bit, {blocks}"]
    if q.get("frequent_rows"):
        parts.append(f"{q['frequent_rows']:,} frequent rows at 8 bits")
    if q.get("keep_8bit"):
        parts.append(f"kept at 8 bits: {', '.join(q['keep_8bit'])}")
    if q.get("gptq"):
        parts.append("GPTQ")
    # the settings that decide how far the bundle's logits are from fp32, and whether speculative output stays
    # plain greedy's (README "Known limits": --two-pass head / none can part within tens of tokens)
    symmetric = q.get("symmetric")
    if symmetric is None:  # the preset's: 8-bit symmetric, 4-bit with zero points (a bundle without 4-bit parts:
        # symmetric alone; frequent rows and --keep-8bit only add 8-bit ones)
        symmetric = True if all(q.get(f) == 8 for f in ("bits", "head_bits", "embed_bits")) else None
    parts.append("8-bit symmetric, 4-bit with zero points" if symmetric is None else
                 "symmetric" if symmetric else "with zero points")
    if "accuracy_level" in q:
        parts.append(f"accuracy level {q['accuracy_level']}")
    if "two_pass" in q:  # what the graph holds, whichever version recorded it (older ones: "all" beside integer ops)
        parts.append(f"two-pass activations: {two_pass_built(q['two_pass'], layer_op, head_op)}")
    if q.get("smooth"):
        parts.append(f"smoothing alpha {q['smooth']}")
    if q.get("calibration"):
        read = f" (activations from {q['calibration_tokens']:,} of its tokens)" if q.get("calibration_tokens") else ""
        parts.append(f"calibrated on {q['calibration']}{read}")
    return ", ".join(parts)


def _qdq_scheme(q: dict) -> str:
    """A --quant qdq target's: 8-bit weights, activations calibrated on text windows (exporters' qdq path)."""
    ops = f" (--qdq-ops {q['ops']})" if q.get("ops") else ""
    return (f"QDQ: weights {q.get('weight_bits')}-bit, activations {q.get('activation_bits')}-bit{ops}, "
            f"{q.get('method')} calibration on {q.get('calibration_windows')} windows of {q.get('calibration')}")


def head_slots(head: dict, vocab) -> dict:
    """A clustered head's slots per cluster and padding slots ({} for another head, or where the manifest's
    numbers do not fit together). Clusters are padded to ceil(V / C) slots each (exporters/head.py
    ClusteredShape), the padding masked; the candidates are top_k clusters' slots and the recent tokens."""
    numbers = [head.get(k) for k in ("clusters", "top_k", "candidates")] + [head.get("context", 0), vocab]
    if head.get("kind") != "clustered" or not all(type(n) is int for n in numbers):
        return {}
    clusters, top_k, candidates, context, vocab = numbers
    per_cluster, rest = divmod(candidates - context, top_k) if top_k > 0 else (0, 1)
    if rest or clusters <= 0 or vocab <= 0 or per_cluster != -(-vocab // clusters):
        return {}
    return {"per_cluster": per_cluster, "padding_slots": clusters * per_cluster - vocab}


def _head(head: dict) -> str:
    if head.get("kind") != "clustered":
        return f"{head.get('kind', 'full')} head"
    slots = ""
    if "per_cluster" in head:  # head_slots: describe() adds them where the manifest's numbers fit together
        slots = (f" of {head['per_cluster']:,} tokens" if not head["padding_slots"] else
                 f" of {head['per_cluster']:,} slots ({head['padding_slots']:,} of them padding, masked)")
    context = f", + the {head['context']} recent tokens" if head.get("context") else ""
    # int8 rows score the candidates from an int8 copy and rescore only the highest in fp32 (exporters/head.py);
    # a head from before int8 rows existed records none: fp32
    rows = head.get("rows", "fp32")
    scored = ("exactly (fp32 rows)" if rows == "fp32" else
              f"from {rows} rows, the highest rescored in fp32")
    return (f"clustered head: {head.get('clusters'):,} clusters{slots}, the tokens of the best {head.get('top_k')} "
            f"scored {scored}{context}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


__all__ = ["describe", "kv_cache_bytes", "kv_window_copies_bytes", "text"]
