"""`export()`: model directory -> bundle. One module per architecture builds the target graph; drafter_pairing.py
checks and lays out the MTP drafter attached to it."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import warnings
from pathlib import Path

import onnx
from typing import Callable

from .. import bundle as bundle_mod
from ..checkpoint import Checkpoint
from ..config import (TextConfig, parse_gemma3, parse_gemma3_multimodal, parse_llama, parse_mistral3_multimodal,
                      read_config_json)
from ..errors import ArgumentError, EdgemtpError, SwitchError, app_stacklevel, missing, not_a_file
from ..json_file import read_json
from ..manifest_graphs import QUANTS  # a graph's quant (qdq: static QDQ graphs for NPUs, with --static)
from ..runtime.sampling import is_bool, is_whole
from . import builder, chat_template, gemma2, gemma3, llama, phi3
from .checkpoint_checks import check_weights, own_head
from .drafter_pairing import AUTO, _check_drafter, _check_drafter_options, _drafter_needs_rows, layout, shipped_drafter
from .gemv_head import use_gemv_head
from .tokenizer_copy import write_tokenizer

Progress = Callable[[int, int, str], None]


def _architectures() -> dict:
    """model_type -> (parse(hf, source) -> cfg, build(cfg, capacity) -> (builder, contract))."""
    archs = {
        "gemma3_text": (parse_gemma3, gemma3.build),
        "gemma3": (parse_gemma3_multimodal, gemma3.build),  # multimodal (4B and up): its text tower
        "gemma2": (gemma2.parse_config, gemma3.build),
        "llama": (parse_llama, llama.build),
        "qwen2": (parse_llama, llama.build),
        "qwen3": (parse_llama, llama.build),
        "mistral": (parse_llama, llama.build),
        "smollm3": (parse_llama, llama.build),
        "granite": (parse_llama, llama.build),
        "ministral3": (parse_llama, llama.build),
        "mistral3": (parse_mistral3_multimodal, llama.build),  # multimodal: its text tower
        "phi3": (phi3.parse_config, llama.build),  # fused weights read as llama's (phi3.split_fused)
    }
    try:
        from . import gemma4
    except ImportError:
        return archs
    archs.update({t: (gemma4.parse_config, gemma4.build) for t in gemma4.MODEL_TYPES})
    return archs


def load_config(model_dir: Path):
    hf = read_config_json(model_dir)
    source = str(Path(model_dir) / "config.json")
    archs = _architectures()
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in archs:  # a list is not even looked up
        raise EdgemtpError(f"{source}: model_type {model_type!r} is not supported "
                           f"(supported: {', '.join(sorted(archs))})")
    text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
    quantized = hf.get("quantization_config") or text.get("quantization_config")
    if quantized:  # GPTQ / AWQ / bitsandbytes / FP8 weights: they were refused as missing or odd tensors
        method = quantized.get("quant_method") if isinstance(quantized, dict) else None
        raise EdgemtpError(f"{source}: field 'quantization_config'{f' ({method})' if method else ''}: a quantized "
                           "checkpoint; export reads float weights (fp32, bf16, fp16): give the unquantized model "
                           "(export quantizes it with --quant int8 / int4), or a GGUF file")
    try:
        cfg = archs[model_type][0](hf, source)
    except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type the parser converts
        raise EdgemtpError(f"{source}: a field has a value of the wrong type ({e})") from None
    return with_generation_stops(cfg, Path(model_dir)), archs[model_type][1]


def with_generation_stops(cfg, model_dir: Path):
    """cfg with generation_config.json's eos ids after config.json's: transformers' generate stops on those,
    and an instruction-tuned Gemma's end-of-turn token (106) is only there."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        if path.exists():  # a directory or a FIFO: read as absent, its stop ids were lost
            raise EdgemtpError(f"{path}: {not_a_file(path)} (the model's generation settings: its stop tokens)")
        return cfg
    gen = read_json(path)
    if not isinstance(gen, dict):  # a list was ignored, its stop ids lost (transformers' GenerationConfig fails)
        raise EdgemtpError(f"{path}: expected a JSON object, got {type(gen).__name__}")
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < cfg.vocab_size for e in eos):
        raise EdgemtpError(f"{path}: field 'eos_token_id' {eos!r} is not token ids below the vocabulary of "
                           f"{cfg.vocab_size}")
    extra = tuple(e for e in eos if e not in cfg.eos_token_ids)
    return dataclasses.replace(cfg, eos_token_ids=tuple(cfg.eos_token_ids) + extra) if extra else cfg


DEFAULT_CAPACITY = 4096
CAPACITY_FLAG = "--max-context"  # export's capacity= from the CLI


def resolve_capacity(capacity: int | None, cfg, limit: bool = False) -> int:
    """capacity (--max-context): by default 4096 positions, or the model's max_position_embeddings (or a LongRoPE
    model's original_max_position_embeddings) if fewer. `limit` (the CLI): a value beyond max_position_embeddings
    is refused, positions the model was never trained on (an internal scratch export of a tiny test model may go
    past them)."""
    longrope = [r.original_max_positions for r in getattr(cfg, "rope", {}).values() if r.kind == "longrope"]
    if capacity is None:  # within LongRoPE's original length too: a default the check below refuses is no default
        capacity = min(DEFAULT_CAPACITY, cfg.max_position_embeddings, *longrope)
    check_capacity(capacity)
    if limit and capacity > cfg.max_position_embeddings:
        raise ArgumentError("capacity", capacity, "exceeds the model's max_position_embeddings "
                            f"({cfg.max_position_embeddings}, config.json)", CAPACITY_FLAG)
    for original in longrope:
        if capacity > original:  # see exporters/phi3.py
            raise ArgumentError("capacity", capacity, f"exceeds original_max_position_embeddings ({original}, "
                                "config.json): past it LongRoPE turns to other frequencies, which the keys already "
                                "cached were not rotated with", CAPACITY_FLAG)
    return capacity


def check_capacity(capacity: int) -> None:
    """The capacity (--max-context) any model refuses (resolve_capacity checks it against the model's own length)."""
    check_whole("capacity", capacity, CAPACITY_FLAG)
    if capacity < 2:
        raise ArgumentError("capacity", capacity, "is too small (need at least 2)", CAPACITY_FLAG)


def check_whole(name: str, value, flag: str) -> None:
    """Refuses an argument that must be a whole number given as text, a float or a bool, naming it (ArgumentError):
    export(capacity="64") was a TypeError from the first comparison, capacity=64.0 onnx's refusal of a graph
    shape, and True counted as 1. A numpy integer is a whole number."""
    if not is_whole(value):
        raise ArgumentError(name, value, "must be a whole number", flag)


def check_switch(name: str, value, auto: bool = False) -> None:
    """Refuses an on/off argument (export's, quantize_bundle's, import_gguf's) that is not a bool, naming it
    (ArgumentError): overwrite="no" or gemv_head=1 were taken as on. `auto`: AUTO is taken too. A numpy bool is a
    bool."""
    if not is_bool(value) and not (auto and isinstance(value, str) and value == AUTO):
        raise ArgumentError(name, value, "must be True, False or 'auto'" if auto else "must be True or False")


def check_tokenizer(model_dir: Path, vocab_size: int) -> Path:
    """The bundle's tokenizer.json, checked before any weight is written: a broken one would otherwise
    surface only when the bundle is first used. Tokens with ids past the embedding table (a pad token added as
    id vocab_size, the table never resized) are named in a warning, not refused: transformers loads such a
    model too, and prompts without them run (the engine refuses one that holds them)."""
    from ..checkpoint import open_tokenizer
    from ..runtime.heap import release_freed_memory

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise EdgemtpError(f"{path}: {missing(path)} (the bundle needs the model's tokenizer.json)")
    beyond = sorted((i, t) for t, i in open_tokenizer(path).get_vocab(with_added_tokens=True).items()
                    if i >= vocab_size)
    if beyond:
        more = f" (and {len(beyond) - 3} more)" if len(beyond) > 3 else ""
        warnings.warn(f"{path}: {len(beyond)} token(s) with ids beyond config.json's vocab_size {vocab_size}, which "
                      f"the model has no embedding for: {', '.join(f'{t!r} ({i})' for i, t in beyond[:3])}{more}; "
                      "a prompt holding one is refused (is tokenizer.json this model's?)", stacklevel=app_stacklevel())
    release_freed_memory()  # the parse's ~300 MB (Gemma 3), which the weights would otherwise stack on
    return path


def export(model_dir: Path, out: Path, quant: str = "fp32", capacity: int | None = None, overwrite: bool = False,
           progress: Progress | None = None, static_window: int | None = None,
           drafter: Path | str | None = None, drafter_top_k: int | None = None,
           quant_options: dict | None = None, drafter_head_rows: str = AUTO,
           drafter_head_context: int | None = None, gemv_head: bool | str = AUTO) -> Path:
    """Writes a bundle for the model in `model_dir` to `out` (atomically) and returns `out`.

    `static_window` W: an NPU-ready static graph (batch 1, fixed capacity, W positions per call,
    standard ops only) instead of the dynamic ONNX Runtime graph; W = K + 1 for speculative K.
    `drafter`: a drafter directory (ours or a Gemma 4 assistant checkpoint), AUTO (the shipped drafter
    recognised by the model's weights; not for qdq bundles) or None. A quantized bundle's drafter keeps
    its own weights in fp32 and reads the target's quantized embedding table.
    `drafter_top_k`: clusters the drafter's clustered head keeps (None: its tables' default, 0: full head).
    `drafter_head_rows`: "int8" scores that head's candidates from an int8 copy of the table (made from the
    fp32 table; a quantized bundle keeps it as it is, its drafter's rescoring reads the quantized table);
    "fp32" from the table's rows; AUTO: see drafter_pairing.layout().
    `drafter_head_context`: recent tokens that head also scores (None: DEFAULT_CONTEXT for our drafters, 0
    for a Gemma 4 assistant, whose head then stays as transformers runs it; 0: none).
    `quant_options`: quantize_bundle()'s keywords for int8 / int4 (block_size, calibration, ...).
    `gemv_head`: store the head table transposed, for one-row passes to read with GEMV (exporters/gemv_head.py;
    dynamic fp32 bundles only, other ones refuse True and False alike); AUTO: see drafter_pairing.layout()."""
    model_dir, out = Path(model_dir), Path(out)
    check_switch("overwrite", overwrite)  # before check_output reads it
    inputs = {model_dir: "the model exported"}
    if drafter is not None and drafter != AUTO:
        inputs[Path(drafter)] = "the drafter attached"
    bundle_mod.check_output(out, overwrite, inputs)  # before any work
    check_options(quant, capacity, static_window, drafter, drafter_top_k, drafter_head_rows, drafter_head_context,
                  quant_options or {}, gemv_head)
    if progress is not None:  # the tokenizer's check and the graph's build come first: seconds on a blank screen
        progress(0, 1, "reading the model")
    drafter, gemv_head, drafter_head_rows = _resolve_options(model_dir, quant, static_window, drafter, drafter_top_k,
                                                             drafter_head_rows, drafter_head_context,
                                                             quant_options or {}, gemv_head)
    if quant == "qdq":
        return _export_qdq(model_dir, out, capacity, overwrite, progress, static_window, quant_options or {})
    if quant != "fp32":
        return _export_quantized(model_dir, out, quant, capacity, overwrite, progress, static_window,
                                 quant_options or {}, drafter, drafter_top_k, drafter_head_rows,
                                 drafter_head_context)
    cfg, build = load_config(model_dir)
    capacity = resolve_capacity(capacity, cfg)
    tokenizer = check_tokenizer(model_dir, cfg.vocab_size)
    chat = chat_template.find(model_dir)  # a broken one fails before any weight is written
    ckpt = Checkpoint(model_dir)
    phi3.split_fused(cfg, ckpt)
    cfg = own_head(cfg, ckpt)
    if static_window is not None:
        from .static import build_static

        graph, contract_json = build_static(cfg, None, capacity, static_window)
    else:
        check_head_size(cfg, model_dir)
        graph, contract = build(cfg, capacity)
        contract_json = contract.to_json()
        if gemv_head:
            keep_table = _drafter_needs_rows(drafter, drafter_head_rows)
            use_gemv_head(graph, keep_table)
    check_weights(graph, ckpt, model_dir, getattr(cfg, "ignored_on_load", ()))
    write_drafter = None
    if drafter is not None:
        write_drafter = _check_drafter(Path(drafter), contract_json, drafter_top_k, drafter_head_rows,
                                       drafter_head_context, model_dir=model_dir)
    with bundle_mod.atomic_dir(out, overwrite) as tmp:
        builder.save(graph, tmp / "target.onnx", ckpt.__getitem__, builder.phase(progress, "target weights"),
                     read_rows=ckpt.rows)
        write_tokenizer(tokenizer, tmp / "tokenizer.json")  # compact: loads faster (tokenizer_copy.py)
        chat = chat_template.write(chat, tmp)
        graphs = {"target": {"file": "target.onnx", "quant": quant, "contract": contract_json,
                             **({"gemv_head": {"kept_table": keep_table}} if gemv_head else {})}}
        if static_window is None and build in VERIFY_BUILDS:
            verify = build(cfg, capacity, in_place=False)
            if gemv_head:  # the same parameters as the target's
                use_gemv_head(verify[0], keep_table)
            graphs[VERIFY] = write_verify(tmp, verify)
        if write_drafter is not None:
            graphs.update(write_drafter(tmp, builder.phase(progress, "MTP drafter weights")))
        bundle_mod.write_manifest(tmp, {"model": model_facts(cfg),
                                        "source": source_facts(model_dir, parameter_count(graph, ckpt)),
                                        "tokenizer": "tokenizer.json", "graphs": graphs,
                                        **({"chat": chat} if chat else {})})
    return out


def check_options(quant: str, capacity: int | None, static_window: int | None, drafter, drafter_top_k: int | None,
                  drafter_head_rows: str, drafter_head_context: int | None, quant_options: dict,
                  gemv_head: bool | str) -> None:
    """export()'s options checked against each other, as far as they can be without the model: the CLI runs this
    before a GGUF file's import (minutes for a big model). The model's own limits, and the options of the drafter
    AUTO finds for it, are checked after (_resolve_options, each format's export)."""
    if quant not in QUANTS:
        raise ArgumentError("quant", quant, f"is not supported (choose from {', '.join(QUANTS)})")
    check_switch("gemv_head", gemv_head, auto=True)  # before it is compared with AUTO and read as on or off
    if capacity is not None:
        check_capacity(capacity)
    from ..drafter.export import CONTEXT, TOP_K

    for (name, flag), value in ((TOP_K, drafter_top_k), (CONTEXT, drafter_head_context)):
        if value is not None:  # before they are compared with a number or found to need a drafter
            check_whole(name, value, flag)
    if static_window is not None:  # before qdq's --calibration-tokens, whose default is a multiple of it
        from .static import check_verify_window

        check_verify_window(static_window)
    if quant == "qdq" and drafter not in (None, AUTO):
        raise ArgumentError("drafter", os.fspath(drafter), "applies to fp32, fp16, int8 and int4 bundles: a qdq "
                            "bundle has no MTP drafter (attach none, or export a static fp32 bundle)")
    if quant == "qdq" or drafter != AUTO:  # the drafter is known without the model: a qdq bundle has none
        _check_drafter_options(None if quant == "qdq" else drafter, drafter_top_k, drafter_head_rows,
                               drafter_head_context, quant_options.get("drafter_quant"),
                               "a qdq bundle has none" if quant == "qdq" else None)
    only_qdq = [k for k in quant_options if k in ("activation_bits", "calibration_method", "qdq_ops")]
    if only_qdq and quant != "qdq":
        raise _option_error(quant_options, only_qdq[0], f"applies to qdq bundles only, not {quant}")
    if gemv_head != AUTO and (quant != "fp32" or static_window is not None):  # False too: they store rows only
        raise SwitchError("gemv_head", gemv_head, "applies to dynamic fp32 bundles (not "
                          f"{'static' if static_window is not None else quant} ones)",
                          "--gemv-head" if gemv_head else "--no-gemv-head")
    # AUTO is fp32 rows in these bundles (layout())
    if drafter_head_rows not in (AUTO, "fp32") and (quant == "qdq" or static_window is not None):
        raise ArgumentError("drafter_head_rows", drafter_head_rows, "applies to dynamic bundles (a static bundle's "
                            "drafter scores fp32 rows of the table)", "--draft-head-rows")
    if quant == "qdq":
        _qdq_settings(static_window, quant_options)
    elif quant != "fp32":
        _quant_scheme(quant, static_window, quant_options)
    else:
        _refuse_quant_options(quant_options, static_window)
    _check_calibration_file(quant_options.get("calibration"))


def _check_calibration_file(source) -> None:
    """A calibration text file that cannot be read, is empty or is not text is refused by its reading alone
    (calibration_text's own message): before a GGUF file's import, not minutes later when the quantized export
    reads it. Only tokenizing it needs the model (_export_quantized)."""
    from ..calibration import activations as A

    if source is not None and str(source) != A.CORPORA:
        A.calibration_text(source)


def _resolve_options(model_dir: Path, quant: str, static_window: int | None, drafter, drafter_top_k: int | None,
                     drafter_head_rows: str, drafter_head_context: int | None, quant_options: dict,
                     gemv_head: bool | str) -> tuple:
    """-> (drafter, gemv_head, drafter_head_rows), the AUTO ones resolved for the model (after check_options)."""
    if drafter == AUTO:  # static fp32 bundles too: their drafter runs beside the static target (e.g. on the CPU)
        drafter = shipped_drafter(model_dir) if quant != "qdq" else None
        _check_drafter_options(drafter, drafter_top_k, drafter_head_rows, drafter_head_context,
                               quant_options.get("drafter_quant"))
    return (drafter, *layout(quant, static_window, drafter, drafter_top_k, drafter_head_rows, gemv_head))


def _refuse_quant_options(quant_options: dict, static_window: int | None) -> None:
    """An fp32 export takes no quantization option: the first one given is named."""
    if quant_options:
        key = next(iter(quant_options))
        if static_window is not None and key in QDQ_OPTIONS:  # "int8 / int4 only" sent a static export to
            # options that refuse a static graph (the user forgot quant qdq)
            raise _option_error(quant_options, key, "applies to qdq, the quantization of a static graph (or to "
                                "int8 / int4, which are not static)")
        raise _option_error(quant_options, key, "applies to int8 / int4 bundles only")


def _option_error(quant_options: dict, key: str, rule: str) -> ArgumentError:
    """The refusal of quant_options[key]: `qdq_ops='all' ...` from Python (the key as quantize_bundle's keyword, as
    quant_options.py names its options), `--qdq-ops 'all' ...` from the CLI. An on/off option (gptq=False:
    --no-gptq), a list of patterns (--keep-8bit, repeated) or None (--calibration none) is named by its flag alone
    from the CLI (SwitchError): the user did not write the value Python shows."""
    value, flag = quant_options[key], "--" + key.replace("_", "-")
    if value is None or isinstance(value, (bool, tuple, list)):
        return SwitchError(key, value, rule, flag)
    return ArgumentError(key, os.fspath(value) if isinstance(value, os.PathLike) else value, rule, flag)


def source_facts(model_dir: Path, parameters: int) -> dict:
    """The model a bundle was exported from, by content (config.json, tokenizer.json, each weight file's header and
    samples of every tensor: drafter.cache.target_identity, as train-drafter's caches know their target), and its
    parameter count, never by its path: the same checkpoint anywhere makes the same bundle."""
    from ..drafter.cache import target_identity

    return {"model": target_identity(model_dir), "parameters": parameters}


def parameter_count(graph: builder.GraphBuilder, ckpt: Checkpoint) -> int:
    """The checkpoint's parameters the target holds, each tensor once (a tied head is its table), as transformers
    counts them; a multimodal checkpoint's vision tower, which the graph leaves out, not at all."""
    return sum(math.prod(ckpt.shape(key)) for key in {key for p in graph.params.values() for key in builder.sources(p)})


def check_head_size(cfg, model_dir: Path) -> None:
    """The dynamic graphs attend with ONNX Runtime's GroupQueryAttention, which refuses a head size that is not a
    multiple of 8 at the first forward (not at load): such a bundle would fail its first token."""
    for d in dict.fromkeys(getattr(cfg, "head_dims", None) or [cfg.head_dim]):  # Gemma 4: one per layer
        if d % 8:
            raise EdgemtpError(f"{model_dir / 'config.json'}: head_dim {d} is not supported by the dynamic graphs "
                               "(ONNX Runtime's GroupQueryAttention needs a multiple of 8); a static export "
                               "builds standard-op graphs")


VERIFY = "verify"  # the manifest's name for the batched verify graph
VERIFY_GRAPH = "target_verify.onnx"
VERIFY_BUILDS = (gemma3.build, llama.build)  # architectures with one (Gemma 4's KV sharing needs GQA)



def write_verify(bundle_dir: Path, graph_and_contract) -> dict:
    """The batched verify graph: the target's layers reading the cache and returning only the new K/V rows
    (components.window_attention), for passes of several rows x several new positions, which ONNX
    Runtime's CPU GroupQueryAttention refuses. Its initializers point at the target's bytes in
    target.onnx.data: no weight is written twice. Returns the manifest's graph entry."""
    graph, contract = graph_and_contract
    onnx.save(builder.share_weights(graph, Path(bundle_dir) / "target.onnx"), str(Path(bundle_dir) / VERIFY_GRAPH))
    return {"file": VERIFY_GRAPH, "quant": "fp32", "contract": contract.to_json()}




def _export_quantized(model_dir, out, quant, capacity, overwrite, progress, static_window, options, drafter,
                      drafter_top_k, drafter_head_rows="fp32", drafter_head_context=None) -> Path:
    """fp32 export into a scratch directory, then the quantizer rewrites it into `out` (atomically)."""
    from ..calibration import activations as A
    from ..checkpoint import open_tokenizer
    from ..scratch import scratch_beside
    from .quantize import (check_calibration_taken, check_patterns_change, check_patterns_match, check_shapes,
                           check_widths, check_window, fit_head, quantize_bundle)

    sch = _quant_scheme(quant, static_window, options)  # before the fp32 export, which takes minutes at E2B scale
    cfg, build = load_config(model_dir)
    check_head_size(cfg, Path(model_dir))  # before the block sizes: no block size makes such a bundle run
    if sch is not None:
        check_shapes(sch, cfg.hidden_size)
        graph = build(cfg, resolve_capacity(capacity, cfg))[0].model().graph  # building reads no weight
        check_widths(sch, graph)
    if options.get("keep_8bit"):  # against the graph's weight names (building it reads no weight), lm_head's
        cfg = own_head(cfg, Checkpoint(model_dir))  # too where the checkpoint unties it
        built = build(cfg, resolve_capacity(capacity, cfg))[0]
        check_patterns_match(tuple(options["keep_8bit"]), list(built.params))
        graph = built.model().graph
        check_patterns_change(sch, graph)
    source = options.get("calibration", A.CORPORA)
    if sch is not None:  # as quantize_bundle checks it, on the head as packed
        check_calibration_taken(fit_head(sch, graph), source)
    # a file shorter than a calibration window, before the fp32 export (check_options read it already)
    if source is not None and str(source) != A.CORPORA and sch is not None and sch.needs_activations:
        text = A.calibration_text(source)
        ids = text.token_ids(open_tokenizer(Path(model_dir) / "tokenizer.json"))
        check_window(text, ids, resolve_capacity(capacity, cfg), cfg.bos_token_id is not None)
    with scratch_beside(out, "fp32") as scratch:  # the directories made for the output go again if it fails
        fp32 = export(model_dir, Path(scratch) / "fp32", "fp32", capacity, progress=progress, drafter=drafter,
                      drafter_top_k=drafter_top_k, drafter_head_rows=drafter_head_rows if drafter else AUTO,
                      drafter_head_context=drafter_head_context, gemv_head=False)
        return quantize_bundle(fp32, out, quant, overwrite=overwrite, progress=progress, **options)


def _quant_scheme(quant: str, static_window: int | None, options: dict):
    """An fp16 / int8 / int4 export's options checked -> the quantization scheme (None for fp16)."""
    from .quantize import check_options

    if static_window is not None:
        raise ArgumentError("quant", quant, "makes no static graph: static graphs are fp32 or qdq")
    if quant == "fp16" and options:  # fp16 rounds every weight; no option of int8 / int4 applies
        raise _option_error(options, next(iter(options)), "applies to int8 / int4 bundles only")
    return check_options(quant, **options)


QDQ_OPTIONS = ("activation_bits", "calibration_method", "calibration", "calibration_tokens", "qdq_ops")


def _export_qdq(model_dir, out, capacity, overwrite, progress, static_window, options) -> Path:
    """A static fp32 export into a scratch directory, then onnxruntime's static QDQ quantization
    (8-bit weights per channel, 8- or 16-bit activations) calibrated on real text run through it."""
    from ..calibration import activations as A
    from ..scratch import scratch_beside
    from .qdq import WindowReader, quantize_static_qdq

    bits, method, ops, source, tokens = _qdq_settings(static_window, options)
    text = A.calibration_text(source, max_chars=QDQ_TEXT_CHARS)
    with scratch_beside(out, "fp32") as scratch:  # the directories made for the output go again if it fails
        fp32 = bundle_mod.load(export(model_dir, Path(scratch) / "fp32", "fp32", capacity, progress=progress,
                                      static_window=static_window), verify=False)
        entry = fp32.graph("target")
        # short pieces of many documents: the windows come from every part of the text, not one file
        pieces = [t[i:i + QDQ_PIECE_CHARS] for t in text.texts for i in range(0, len(t), 4 * QDQ_PIECE_CHARS)]
        reader = WindowReader(entry.path, entry.contract, fp32.tokenizer_path, pieces,
                              max_windows=max(1, tokens // static_window), per_text=QDQ_WINDOWS_PER_PIECE)
        with bundle_mod.atomic_dir(Path(out), overwrite) as tmp:
            quantize_static_qdq(entry.path, tmp / "target.onnx", reader, activation_bits=bits, method=method,
                                ops=ops)
            shutil.copyfile(fp32.tokenizer_path, tmp / "tokenizer.json")
            chat = chat_template.write(chat_template.find(model_dir), tmp)
            target = {**fp32.manifest["graphs"]["target"], "quant": "qdq", "quantization": {
                "format": "qdq", "weight_bits": 8, "activation_bits": bits, "method": method, "ops": ops,
                "calibration": text.source, "calibration_windows": reader.count, "calibration_sha256": text.sha256}}
            bundle_mod.write_manifest(tmp, {"model": fp32.model, "source": fp32.manifest["source"],
                                            "tokenizer": "tokenizer.json", "graphs": {"target": target},
                                            **({"chat": chat} if chat else {})})
    return Path(out)


def _qdq_settings(static_window: int | None, options: dict) -> tuple:
    """A qdq export's options checked -> (activation bits, calibration method, ops, calibration, tokens)."""
    from ..calibration import activations as A
    from .qdq import METHODS, OPS

    if static_window is None:  # from Python only: the CLI's qdq export is static with or without --static
        raise ArgumentError("quant", "qdq", "makes static NPU graphs: give their verify window too (K+1 positions "
                            "a pass)")
    wrong = [k for k in options if k not in QDQ_OPTIONS]
    if wrong:
        raise _option_error(options, wrong[0], "applies to int8 / int4 bundles, not qdq")
    bits = options.get("activation_bits", QDQ_ACTIVATION_BITS)
    method = options.get("calibration_method", "minmax")
    if bits not in (8, 16):
        raise _option_error(options, "activation_bits", "must be 8 or 16")
    if method not in METHODS:
        raise _option_error(options, "calibration_method", f"must be one of {', '.join(METHODS)}")
    ops = options.get("qdq_ops", "weights")
    if ops not in OPS:
        raise _option_error(options, "qdq_ops", f"must be one of {', '.join(OPS)}")
    source = options.get("calibration", A.CORPORA)
    if source is None:
        raise ArgumentError("quant", "qdq", "needs calibration text (a text file or corpora, not none)")
    tokens = options.get("calibration_tokens", QDQ_WINDOWS * static_window)
    if tokens < static_window:
        raise _option_error(options, "calibration_tokens", f"must be at least the verify window ({static_window})")
    return bits, method, ops, source, tokens


# calibration samples by default. Gemma 3 270M's qdq export peaks at 5.8 GB RSS with 16 or 64 of them (7.0 GB
# before the reader's session kept no packed weights, session 37): quantize_static's copies of the float graph
QDQ_WINDOWS = 64
# --activation-bits by default: Gemma 3 270M's top-1 agreement 0.915 at 16 bits, 0.645 at 8 (docs/measurements.md)
QDQ_ACTIVATION_BITS = 16
QDQ_WINDOWS_PER_PIECE = 4
QDQ_PIECE_CHARS = 400
QDQ_TEXT_CHARS = 400_000


def model_facts(cfg) -> dict:
    return {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers, "bos_token_id": cfg.bos_token_id,
            "eos_token_ids": list(cfg.eos_token_ids)}


__all__ = ["export", "load_config", "TextConfig", "QUANTS"]
