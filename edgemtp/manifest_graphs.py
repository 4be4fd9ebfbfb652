"""Checks of a manifest's `graphs` entries and their contracts, field by field.

A bundle may come from someone else or be edited by hand: every field the runtime acts on is checked
here at load, so a wrong one is named (`graphs.target.contract.kv[3].window -1 ...`) instead of
surfacing as a KeyError, an array of the wrong shape or an error inside ONNX Runtime's run.
"""

from __future__ import annotations

from pathlib import Path

from .contract import HIDDEN_KIND, TargetContract
from .errors import EdgemtpError

QUANTS = ("fp32", "fp16", "int8", "int4", "qdq")  # a graph's "quant" (qdq: static QDQ graphs for NPUs)
KV_UPDATES = ("in_place", "rows")
HEAD_KINDS = ("full", "clustered")
HEAD_ROWS = ("fp32", "int8")
MAX_HEAD_CONTEXT = 1024  # a head's context ids are compared with every candidate: keep it a small share


def two_pass_built(two_pass, layer_op, head_op) -> str:
    """The two-pass activations an int8 / int4 graph holds, of those --two-pass asked for: none, head, layers
    or all. Only MatMulNBits take them: integer layers and an integer head round their activations their own
    way. The scheme records this (quant_options.scheme); info reads it again from the ops, because bundles
    exported before that recorded "all" beside integer layers, and before "layers" existed beside an integer
    head. A label it does not know (a later version's) is returned as it is."""
    if two_pass not in ("none", "head", "layers", "all"):
        return two_pass
    layers = two_pass in ("all", "layers") and layer_op != "integer"
    head = two_pass in ("head", "all") and head_op != "integer"
    return "all" if layers and head else "layers" if layers else "head" if head else "none"


class _Bad(Exception):
    """A field and what is wrong with it; check_graphs adds the manifest's path."""


def whole(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _need(ok: bool, where: str, value, what: str) -> None:
    if not ok:
        raise _Bad(f"{where} {value!r} {what}")


def _get(d: dict, key: str, where: str):
    if key not in d:
        raise _Bad(f"{where}.{key} is missing")
    return d[key]


def check_graphs(m: dict, mpath: Path) -> None:
    """Every graph entry is {"file": str, "quant": one of QUANTS, "contract": {...}}; the target's (and the
    verify graph's) contract is a valid TargetContract, a static one has its window and masks, and each
    drafter's contract reads KV the target has and scores the model's vocabulary."""
    try:
        for name, g in m["graphs"].items():
            where = f"graphs.{name}"
            if not isinstance(g, dict):
                raise _Bad(f"{where} is not an object")
            _need(isinstance(g.get("file"), str), f"{where}.file", g.get("file"), "must name a file listed in 'files'")
            _need(g.get("quant", "fp32") in QUANTS, f"{where}.quant", g.get("quant"),
                  f"is unknown (one of {', '.join(QUANTS)})")
            if not isinstance(g.get("contract", {}), dict):
                raise _Bad(f"{where}.contract is not an object")
        graphs = m["graphs"]
        target = target_contract(graphs["target"].get("contract", {}), "graphs.target.contract")
        # the target graph updates its cache in place, the batched verify graph returns rows (contract.py)
        _need(target.kv_update == "in_place", "graphs.target.contract.kv_update", target.kv_update,
              "must be 'in_place' (the target graph writes its cache in place)")
        for key in ("vocab_size", "hidden_size"):
            _need(getattr(target, key) == m["model"][key], f"model.{key}", m["model"][key],
                  f"differs from graphs.target.contract.{key} {getattr(target, key)}")
        if "verify" in graphs:
            verify = target_contract(graphs["verify"].get("contract", {}), "graphs.verify.contract")
            _need(verify.kv_update == "rows", "graphs.verify.contract.kv_update", verify.kv_update,
                  "must be 'rows' (the verify graph returns the new positions' keys and values)")
            for field in ("vocab_size", "hidden_size", "capacity", "kv"):
                _need(getattr(verify, field) == getattr(target, field), f"graphs.verify.contract.{field}",
                      _Short(getattr(verify, field)), "differs from the target's (the verify graph shares its cache)")
        for name in ("drafter", "drafter_full_head"):
            if name in graphs:
                drafter_contract(graphs[name].get("contract", {}), f"graphs.{name}.contract", target)
    except _Bad as e:
        raise EdgemtpError(f"{mpath}: {e}") from None


class _Short:
    """A long value shown by its length (repr of the list would be its every entry)."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return f"[{len(self.value)} entries]" if isinstance(self.value, tuple) else repr(self.value)


def target_contract(d: dict, where: str) -> TargetContract:
    for key in ("vocab_size", "hidden_size", "capacity"):
        _need(whole(_get(d, key, where), 1), f"{where}.{key}", d[key], "must be a positive whole number")
    kv = _get(d, "kv", where)
    _need(isinstance(kv, list) and kv, f"{where}.kv", kv, "must be a non-empty list of KV slots")
    for i, s in enumerate(kv):
        w = f"{where}.kv[{i}]"
        if not isinstance(s, dict) or set(s) - {"layer", "num_heads", "head_dim", "window"}:
            raise _Bad(f"{w} must be an object with layer, num_heads, head_dim and window")
        _need(whole(_get(s, "layer", w)), f"{w}.layer", s["layer"], "must be a layer index (0 or more)")
        for key in ("num_heads", "head_dim"):
            _need(whole(_get(s, key, w), 1), f"{w}.{key}", s[key], "must be a positive whole number")
        _need(s.get("window") is None or whole(s["window"], 1), f"{w}.window", s.get("window"),
              "must be a positive sliding window or null (full attention)")
    layers = [s["layer"] for s in kv]
    _need(len(set(layers)) == len(layers), f"{where}.kv", layers, "names a layer twice")
    dkv = d.get("drafter_kv", {})
    _need(isinstance(dkv, dict) and all(isinstance(k, str) and whole(v) and v in layers for k, v in dkv.items()),
          f"{where}.drafter_kv", dkv, "must map attention types to layers in its kv")
    _need(d.get("kv_update", "in_place") in KV_UPDATES, f"{where}.kv_update", d.get("kv_update"),
          f"is unknown (one of {', '.join(KV_UPDATES)})")
    _need(isinstance(d.get("window_views", False), bool), f"{where}.window_views", d.get("window_views"),
          "must be true or false")
    if d.get("static", False) is not False:
        _static(d, where)
    return TargetContract.from_json(d)


def _static(d: dict, where: str) -> None:
    """The fields a static graph (runtime.static_target) adds."""
    _need(d["static"] is True, f"{where}.static", d["static"], "must be true or false")
    _need(whole(_get(d, "verify_window", where), 1), f"{where}.verify_window", d["verify_window"],
          "must be a positive whole number")
    biases = _get(d, "attention_bias", where)
    _need(isinstance(biases, dict) and biases and all(v is None or whole(v, 1) for v in biases.values()),
          f"{where}.attention_bias", biases, "must map mask inputs to a sliding window or null")
    # the runtime builds each mask from these windows alone (the graph takes the mask, not the window): one
    # edited to a window no layer has decoded other text without a word
    windows = sorted({s["window"] for s in d["kv"]}, key=lambda w: w or 0)
    _need(sorted(set(biases.values()), key=lambda w: w or 0) == windows, f"{where}.attention_bias", biases,
          f"must give one mask per attention window of its kv ({', '.join(map(str, windows))})")


def drafter_contract(d: dict, where: str, target: TargetContract) -> None:
    _need(d.get("kind") == "mtp", f"{where}.kind", d.get("kind"), "is unknown (this edgemtp runs 'mtp')")
    config = _get(d, "config", where)
    _need(isinstance(config, dict), f"{where}.config", config, "must be an object")
    _need(_get(config, "vocab_size", f"{where}.config") == target.vocab_size, f"{where}.config.vocab_size",
          config["vocab_size"], f"differs from the target's {target.vocab_size}")
    # shown by info only, but shown ("5, 1 layer, hidden -5"); each optional, as the model's model_type is
    c = f"{where}.config"
    _need(isinstance(config.get("model_type", ""), str), f"{c}.model_type", config.get("model_type"),
          "must be a string")
    _need("hidden" not in config or whole(config["hidden"], 1), f"{c}.hidden", config.get("hidden"),
          "must be a positive whole number")
    types = config.get("layer_types", ["-"])
    _need(isinstance(types, list) and types and all(isinstance(t, str) for t in types), f"{c}.layer_types", types,
          "must be a non-empty list of attention types")
    layers = _get(d, "kv_layers", where)
    have = sorted(s.layer for s in target.kv)
    _need(isinstance(layers, list) and layers and all(whole(v) and v in have for v in layers),
          f"{where}.kv_layers", layers, f"must list layers of the target's kv ({have[0]}..{have[-1]})")
    # every target graph's last_hidden_state is after the final norm: a drafter made for another state would
    # draft from the wrong one without a word
    _need(d.get("hidden", HIDDEN_KIND) == HIDDEN_KIND, f"{where}.hidden", d.get("hidden"),
          f"is not the state a target graph gives ('{HIDDEN_KIND}')")
    for key in ("inputs", "outputs"):  # informative: DrafterSession checks the graph's own names
        value = d.get(key, [])
        _need(isinstance(value, list) and all(isinstance(v, str) for v in value), f"{where}.{key}", value,
              "must be a list of tensor names")
    head = d.get("head", {"kind": "full"})
    if not isinstance(head, dict):
        raise _Bad(f"{where}.head is not an object")
    _need(head.get("kind") in HEAD_KINDS, f"{where}.head.kind", head.get("kind"),
          f"is unknown (one of {', '.join(HEAD_KINDS)})")
    if head["kind"] == "clustered":
        for key in ("clusters", "top_k", "candidates"):
            _need(whole(_get(head, key, f"{where}.head"), 1), f"{where}.head.{key}", head[key],
                  "must be a positive whole number")
        _need(head["top_k"] <= head["clusters"], f"{where}.head.top_k", head["top_k"],
              f"exceeds its {head['clusters']} clusters")
        _need(head.get("rows", "fp32") in HEAD_ROWS, f"{where}.head.rows", head.get("rows"),
              f"is unknown (one of {', '.join(HEAD_ROWS)})")
        _need(whole(head.get("context", 0)) and head.get("context", 0) <= MAX_HEAD_CONTEXT,
              f"{where}.head.context", head.get("context"), f"must be between 0 and {MAX_HEAD_CONTEXT}")
