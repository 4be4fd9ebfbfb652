"""Commands that make things: import-gguf, export, cluster, train-drafter."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import ArgumentError, EdgemtpError, not_a_file
from .base import cli, needs_exporter, output_path, progress_bar, writable_dir


@cli.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(), callback=output_path,
              help="Model directory to write (config.json, model.safetensors, tokenizer.json).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier import at OUTPUT (a directory of only the files import-gguf writes); "
                   "the old one stays until the new one is complete.")
def import_gguf_cmd(gguf_file: Path, out: Path, overwrite: bool):
    """Convert a GGUF file into a Hugging Face style model directory (dequantized to fp32)."""
    needs_exporter("import-gguf")
    from ..gguf_import import check_target, import_gguf

    try:  # before the GGUF's read and its minutes of work; import_gguf checks it again, under the same rules
        check_target(out, overwrite, gguf_file)
    except ArgumentError:  # about --overwrite, which its CLI wording names
        raise
    except EdgemtpError as e:
        raise EdgemtpError(f"-o {e}") from None
    with progress_bar(f"importing {gguf_file.name}", show_what=True) as progress:
        import_gguf(gguf_file, out, progress=progress, overwrite=overwrite)
    click.echo(f"wrote {out}")


def quant_options(f):
    """`export`'s int8/int4 options (edgemtp.exporters.quantize.scheme checks them; unset: the preset's)."""
    for opt in reversed([
        click.option("--block-size", type=int, default=None,
                     help="Weight block size for every role: a power of two from 16 to 256 (default 32)."),
        click.option("--symmetric/--asymmetric", default=None,
                     help="Blocks without / with zero points (default: 8-bit symmetric, 4-bit asymmetric)."),
        click.option("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy level (default 4)."),
        click.option("--layer-bits", type=int, default=None,
                     help="int4: bits of the layers' weights, 4 or 8 (default 8)."),
        click.option("--keep-8bit", multiple=True, help="int4: weight-name pattern kept at 8 bits, e.g. "
                                                        "'*down_proj*' with --layer-bits 4, or 'lm_head*' "
                                                        "(repeatable; q/k/v and gate/up are joined weights, kept "
                                                        "whole when a pattern matches one part)."),
        click.option("--frequent-rows", type=int, default=None,
                     help="int4: head/table rows of the most frequent calibration tokens kept at 8 bits "
                          "(default 32768; 0: none)."),
        click.option("--gptq/--no-gptq", default=None, help="Round the weights (8-bit layers too) with GPTQ on "
                                                            "calibration activations (int8 and int4 default: on; off "
                                                            "with --calibration none)."),
        click.option("--two-pass", default=None, help="MatMulNBits activations in two int8 passes: none, head "
                                                      "or all (default; keeps speculative decoding exact)."),
        click.option("--layer-op", default=None,
                     help="8-bit layers as nbits (MatMulNBits, blocks of 32; default) or integer "
                          "(MatMulIntegerToFloat: int8 columns, activations in three 7-bit passes per row; "
                          "faster prefill and verify windows where ONNX Runtime runs it on AMX, for ~1 point of "
                          "top-1 agreement; --block-size, --symmetric, --accuracy-level and --two-pass then "
                          "apply to the head only)."),
        click.option("--head-op", default=None,
                     help="The logit head as nbits (MatMulNBits over the table; default) or integer "
                          "(MatMulIntegerToFloat over an int8 copy of the table, one scale per token, whose 8 "
                          "highest logits per position the table rescores: verify windows far cheaper where "
                          "ONNX Runtime runs it on AMX / VNNI; the bundle grows by vocab x hidden bytes; "
                          "--two-pass and --accuracy-level then apply to the layers only)."),
        click.option("--smooth", type=float, default=None, help="Activation smoothing alpha of the layers (0: off)."),
        click.option("--calibration", default=None, help="Calibration text: corpora (the offline corpora's "
                                                         "train split, default), a text file, or none."),
        click.option("--calibration-tokens", type=int, default=None, help="Tokens of activations to calibrate on "
                                                                          "(default 8192; qdq: 64 windows)."),
        click.option("--drafter-quant", default=None, help="int8 / int4 bundles: the drafter's own weights in fp32 "
                                                            "(default) or int8; its table is the target's."),
        click.option("--activation-bits", type=int, default=None, help="qdq: activation bits, 8 or 16 (default 16)."),
        click.option("--calibration-method", default=None, help="qdq: activation ranges by minmax (default), "
                                                                 "entropy or percentile."),
        click.option("--qdq-ops", default=None, help="qdq: weights (default: the weights' MatMul / Gemm / Gather "
                                                      "and their inputs quantized; attention's MatMuls, the "
                                                      "residual stream, norms and softmax float), matmul (every "
                                                      "MatMul, attention's too) or all (every op: for NPUs without "
                                                      "float ops, at a large loss on Gemma)."),
    ]):
        f = opt(f)
    return f


@cli.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(), callback=output_path, help="Bundle directory.")
@click.option("--quant", default="fp32", show_default=True,
              help="Weight format: fp32, fp16, int8 or int4 (weight-only, MatMulNBits), or qdq (static QDQ "
                   "graph for NPUs; implies --static).")
@click.option("--max-context", "capacity", default=None, type=int,
              help="KV capacity (prompt + generated tokens) the bundle is built for (default: 4096, or the "
                   "model's max_position_embeddings if smaller).")
@click.option("--static", "static", is_flag=True,
              help="NPU-ready graph: batch 1, fixed shapes, standard ONNX ops only.")
@click.option("--verify-window", default=5, show_default=True, type=int,
              help="With --static: positions per call (draft K + 1; prefill runs in chunks of it).")
@click.option("--drafter", default="auto", show_default=True,
              help="MTP drafter directory (ours, or a Gemma 4 assistant checkpoint) to put in the bundle; "
                   "auto: the drafter shipped for this model, recognised by its weights (not for --quant qdq); "
                   "none: no drafter.")
@click.option("--draft-top-k", default=None, type=int,
              help="Clusters the drafter's two-stage head scores exactly (default: its head tables' own, a Gemma 4 "
                   "assistant's centroid_intermediate_top_k; 0: full head).")
@click.option("--draft-head-rows", default="auto", show_default=True,
              help="How the drafter's two-stage head scores its candidates: fp32 rows of the target's table, "
                   "or int8 (a copy of the table in cluster order: V x hidden more bytes, a faster draft step); "
                   "auto: int8 in a dynamic fp32 bundle, whose table is stored transposed (--gemv-head), "
                   "fp32 otherwise.")
@click.option("--draft-head-context", default=None, type=int,
              help="Recent tokens the drafter's two-stage head also scores exactly, besides its clusters' "
                   "(default: 64 for edgemtp's drafters, 0 for a Gemma 4 assistant; 0: none).")
@click.option("--gemv-head/--no-gemv-head", default=None,
              help="fp32: store the LM head table transposed, for ONNX Runtime's matrix-vector kernel on "
                   "one-position passes (plain decode steps ~5% faster on Gemma 3 270M). Default: on for "
                   "dynamic fp32 bundles unless the drafter reads the table's rows (a Gemma 4 assistant, or "
                   "--draft-head-rows fp32); forced on, such a drafter's [V, hidden] table is kept as well.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
@quant_options
def export_cmd(model_dir: Path, out: Path, quant: str, capacity: int, static: bool, verify_window: int,
               drafter: str, draft_top_k: int | None, draft_head_rows: str, draft_head_context: int | None,
               gemv_head: bool | None, overwrite: bool, **quant_opts):
    """Export MODEL_DIR (config.json + *.safetensors + tokenizer.json) to an ONNX bundle.

    MODEL_DIR may be a .gguf file: it is imported first (as import-gguf does) into a scratch directory beside
    the output, deleted after the export (it takes the model's fp32 size on that disk meanwhile)."""
    needs_exporter("export")
    from ..exporters import AUTO, check_options, export, load_config, resolve_capacity

    # every flag the model is not needed for, and the output, are checked before a GGUF file's import (minutes)
    given = click.get_current_context().get_parameter_source("verify_window") == ParameterSource.COMMANDLINE
    if given and not (static or quant == "qdq"):
        raise EdgemtpError(f"--verify-window {verify_window} applies to a static graph: add --static")
    chosen = None if drafter == "none" else AUTO if drafter == "auto" else Path(drafter)
    if isinstance(chosen, Path) and not (chosen / "config.json").is_file():
        raise EdgemtpError(f"--drafter {drafter}: no config.json there (a drafter directory, auto or none)")
    options = {k: v for k, v in quant_opts.items() if v not in (None, ())}
    if options.get("calibration") == "none":
        options["calibration"] = None
    static_window = verify_window if static or quant == "qdq" else None
    gemv_head = AUTO if gemv_head is None else gemv_head
    check_options(quant, capacity, static_window, chosen, draft_top_k, draft_head_rows, draft_head_context, options,
                  gemv_head)
    inputs = {model_dir: "the model exported", **({chosen: "the drafter attached"} if isinstance(chosen, Path) else {})}
    check_bundle_output(out, overwrite, inputs)
    with model_source(model_dir, out) as source:
        if capacity is not None:
            resolve_capacity(capacity, load_config(source)[0], limit=True)
        with progress_bar("exporting", show_what=True) as progress:
            export(source, out, quant=quant, capacity=capacity, overwrite=overwrite, progress=progress,
                   static_window=static_window, drafter=chosen, drafter_top_k=draft_top_k,
                   drafter_head_rows=draft_head_rows, drafter_head_context=draft_head_context,
                   quant_options=options, gemv_head=gemv_head)
    click.echo(f"wrote {out}")


def check_bundle_output(out: Path, overwrite: bool, inputs: dict | None = None) -> None:
    """bundle.check_output, its refusal naming -o as import-gguf's, cluster's and train-drafter's do: export()'s
    own check is the Python API's, which has no -o. One about --overwrite names that flag instead (SwitchError)."""
    from ..bundle import check_output

    try:
        check_output(out, overwrite, inputs)
    except ArgumentError:  # about --overwrite, which its CLI wording names
        raise
    except EdgemtpError as e:
        raise EdgemtpError(f"-o {e}") from None


@contextlib.contextmanager
def model_source(model_dir: Path, out: Path):
    """MODEL_DIR itself, or the model directory of a GGUF file, imported for the export's length."""
    if not (model_dir.is_file() and model_dir.suffix.lower() == ".gguf"):
        yield model_dir
        return
    from ..gguf_import import import_gguf
    from ..scratch import scratch_beside

    with scratch_beside(out, "gguf") as scratch:  # the directories made for the output go again if it fails
        with progress_bar(f"importing {model_dir.name}", show_what=True) as progress:
            source = import_gguf(model_dir, scratch / "model", progress=progress)
        imported = f"{model_dir} (imported)"  # errors and warnings name the file the user gave, not the scratch
        shown = warnings.showwarning          # directory (deleted by the time they are read)
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *a, **k: shown(str(message).replace(str(source), imported), *a, **k)
            try:
                yield source
            except ArgumentError as e:  # still one, so that the CLI names the flag, not export()'s argument
                raise type(e)(e.name, e.value, e.rule.replace(str(source), imported), e.flag) from None
            except EdgemtpError as e:
                raise EdgemtpError(str(e).replace(str(source), imported)) from None


@cli.command("cluster")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(), callback=output_path,
              help="Directory for head.safetensors (centroids, token_ordering, token_mask).")
@click.option("--clusters", default=2048, show_default=True, type=int, help="k-means clusters of the vocabulary.")
@click.option("--top-k", default=32, show_default=True, type=int, help="Clusters scored exactly per step.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the k-means initialisation.")
@click.option("--calibration", default=None, type=click.Path(path_type=Path),
              help="Final hidden states [N, d] (.npy/.npz) to learn centroids from, instead of the model's own "
                   "on the offline corpora; none: the embedding table alone (much lower recall).")
@click.option("--report", "report_hidden", default=None, type=click.Path(path_type=Path),
              help="Held-out hidden states (.npy/.npz): print recall and softmax mass for k in 8,16,32,64, "
                   "and the full vs clustered head (fp32 and int8 rows) timed on them.")
@click.option("--positions", default=None, type=int,
              help="Calibration positions collected from the offline corpora when no --calibration is given "
                   "(default 32768; more: higher held-out recall, longer run), or drafter states with --drafter "
                   "(default 73728).")
@click.option("--drafter", "drafter_dir", default=None, type=click.Path(path_type=Path),
              help="Calibrate on this drafter's own states (a train-drafter output directory, with its cache/) "
                   "instead of MODEL_DIR's final hidden states: tables for that drafter's head.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT/head.safetensors.")
def cluster_cmd(model_dir, out, clusters, top_k, seed, calibration, report_hidden, positions, drafter_dir, overwrite):
    """Build the two-stage (clustered) logit head of MODEL_DIR by k-means over its vocabulary."""
    needs_exporter("cluster", "cluster", {"sklearn": "scikit-learn"})
    from ..calibration.clustering import check_sizes
    from ..calibration.collect import POSITIONS
    from ..calibration.head_report import HEAD_FILE, NO_CALIBRATION, check_head_dir, cluster_model, recall_report
    from ..calibration.model_files import head_shape, logit_softcap

    if positions is not None and (positions < 512 or calibration is not None):
        raise EdgemtpError(f"--positions {positions}: " + ("at least 512" if positions < 512 else
                                                           "applies only without --calibration"))
    if drafter_dir is not None and calibration is not None:
        raise EdgemtpError("--drafter and --calibration: give one source of calibration states")
    check_seed(seed)
    # what the run writes and everything it reads are checked before it: k-means and a drafter's states
    # take minutes
    if (out / HEAD_FILE).is_dir():
        raise EdgemtpError(f"-o {out}: {out / HEAD_FILE} is a directory (the tables are written to that name)")
    # as export's bundle: tables that took minutes (a drafter's, fitted on its own states) are not replaced by a
    # run given the wrong -o. lexists: a dangling link there would pass .exists() and fail only at the final
    # placement, after the k-means, as "written by another run meanwhile"
    if os.path.lexists(out / HEAD_FILE) and not overwrite:
        raise EdgemtpError(f"-o {out}: {out / HEAD_FILE} already exists (use --overwrite to replace it)")
    check_head_dir(out)
    writable_dir(out, "-o")
    vocab, hidden_size = head_shape(model_dir)
    softcap = logit_softcap(model_dir)  # a damaged config.json
    check_sizes(vocab, clusters)  # a count no --top-k makes work is named before --top-k's default
    if top_k > clusters and click.get_current_context().get_parameter_source("top_k") == ParameterSource.DEFAULT:
        raise EdgemtpError(f"--clusters {clusters} is fewer than --top-k's default of {top_k}: give --top-k too "
                           f"(at most {clusters})")
    check_sizes(vocab, clusters, top_k)
    no_calibration = calibration is not None and str(calibration) == NO_CALIBRATION
    states = {flag: hidden_file(flag, path, hidden_size) for flag, path in
              (("--calibration", None if no_calibration else calibration), ("--report", report_hidden))
              if path is not None}
    with progress_bar("clustering the vocabulary", show_what=drafter_dir is not None) as progress:
        if drafter_dir is not None:
            if importlib.util.find_spec("torch") is None:  # the drafter runs in torch, as in training
                raise EdgemtpError("--drafter needs torch: pip install 'edgemtp[train]'")
            from ..drafter import head_fit
            path = head_fit.fit_head(drafter_dir, model_dir, out, clusters, top_k, positions or head_fit.POSITIONS,
                                     seed, progress, overwrite=overwrite)
        else:
            path = cluster_model(model_dir, out, clusters, top_k, seed, progress,
                                 NO_CALIBRATION if no_calibration else states.get("--calibration"),
                                 positions=positions or POSITIONS, source=str(calibration) if calibration else None,
                                 overwrite=overwrite)
    click.echo(f"wrote {path}", err=report_hidden is not None)  # a report's JSON is stdout's only text
    if report_hidden:
        report = recall_report(model_dir, path, states["--report"], softcap=softcap, speed=True)
        click.echo(json.dumps(report, indent=2))


def hidden_file(flag: str, path: Path, hidden_size: int):
    """The hidden states [N, d] in a .npy / .npz file given to `flag`, read and checked."""
    from ..calibration.head_report import load_hidden

    if not path.is_file():
        raise EdgemtpError(f"{flag} {path}: {not_a_file(path)} (expected hidden states in .npy / .npz)")
    try:
        return load_hidden(path, hidden_size)
    except EdgemtpError as e:
        raise EdgemtpError(f"{flag} {e}") from None


def check_seed(seed: int) -> None:
    """k-means (scikit-learn) takes seeds below 2**32 only, and would say so after minutes of work."""
    if not 0 <= seed < 2**32:
        raise EdgemtpError(f"--seed {seed} must be between 0 and {2**32 - 1}")


@cli.command("train-drafter")
@click.argument("target_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(), callback=output_path,
              help="Drafter directory (config.json, model.safetensors, checkpoint.pt, train.log, cache/).")
@click.option("--data", default="code=256,docs=160,shakespeare=96", show_default=True,
              help="Training windows per offline corpus (domain=count, comma-separated); domain=START:STOP "
                   "takes the windows domain=STOP draws beyond the first START (fresh windows for --init).")
@click.option("--heldout", default="code=3,docs=2,shakespeare=1", show_default=True,
              help="Held-out windows per corpus, for the acceptance shown while training.")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Tokens per window.")
@click.option("--greedy-from", default=0, show_default=True, type=int,
              help="P > 0: keep each window's first P tokens and replace the rest by the target's own greedy "
                   "continuation (the text a drafter is judged on; every draft step's label is known on it).")
@click.option("--steps", default=400, show_default=True, type=int, help="Training steps (optimizer updates).")
@click.option("--batch", default=4, show_default=True, type=int, help="Windows per step.")
@click.option("--lr", default=1.5e-3, show_default=True, type=float, help="AdamW learning rate.")
@click.option("--draft-k", default=4, show_default=True, type=int, help="Draft steps unrolled in training.")
@click.option("--hidden", default=256, show_default=True, type=int, help="Drafter width (with --init: that drafter's).")
@click.option("--layers", default=4, show_default=True, type=int, help="Drafter layers (with --init: that drafter's).")
@click.option("--intermediate", default=None, type=int,
              help="MLP units per drafter layer (default 1024; with --init, that drafter's). With --init, a "
                   "larger value widens its MLPs (same drafts to start with; the new units are trained).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the corpus windows drawn, their order and the initial weights (0 to 2**32 - 1).")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT/checkpoint.pt.")
@click.option("--threads", default=1, show_default=True, type=int,
              help="torch threads for training (the target pass uses at least 2). The weights depend on it: "
                   "the same run on another number of threads trains other weights (config.json records it).")
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Start from this drafter's weights (e.g. a shipped drafter, to train it on more data).")
@click.option("--eval-every", default=60, show_default=True, type=int, help="Steps between held-out evaluations.")
@click.option("--head-clusters", default=None, type=int,
              help="After training, fit the clustered head's tables (head.safetensors) on the drafter's own "
                   "states, with this many clusters; 0: none (--init's tables are carried over). Default: 2048 "
                   "for vocabularies of 65,536 tokens or more, else 0.")
@click.option("--head-top-k", default=None, type=int,
              help="Clusters the fitted head scores exactly (default 32; only with a head fitted).")
@click.option("--accept-weight", default=0.0, show_default=True, type=float,
              help="0..1: share of the loss weighted by what each draft is worth to tokens per round (how "
                   "likely a round starts at its position and its earlier drafts are accepted, times what the "
                   "later drafts add) rather than uniformly over positions.")
def train_drafter_cmd(target_dir, out, data, heldout, seq_len, greedy_from, steps, batch, lr, draft_k, hidden,
                      layers, intermediate, seed, resume, threads, init, eval_every, head_clusters, head_top_k,
                      accept_weight):
    """Distill an MTP drafter for TARGET_DIR (needs the `train` extra: torch, transformers).

    Labels are the target's own greedy predictions; the held-out acceptance (tokens per verify round at
    K = --draft-k) is printed as it trains. The target pass over the corpora is cached in OUTPUT/cache."""
    needs_exporter("train-drafter", "train")  # the extra with torch too
    try:
        from ..drafter.train import DataSpec, TrainSpec, train_drafter
    except ImportError as e:
        raise EdgemtpError(f"train-drafter needs torch and transformers: pip install 'edgemtp[train]' ({e})") from None
    # the values of --steps, --batch, --lr, --seq-len, --greedy-from, ... are checked by train_drafter (its
    # check_values), for Python callers too: its refusals name the flags here (ArgumentError.cli_message)
    source = click.get_current_context().get_parameter_source
    shaped = [f"--{n}" for n in ("hidden", "layers") if source(n) == ParameterSource.COMMANDLINE]
    if init is not None and shaped:
        raise EdgemtpError(f"{shaped[0]} with --init: the drafter keeps --init's shape (only --intermediate "
                           "widens it)")
    spec = DataSpec(seq_len=seq_len, train=domain_counts("--data", data, ranges=True),
                    heldout=domain_counts("--heldout", heldout), seed=seed, greedy_from=greedy_from)
    if init is not None and not (init / "config.json").is_file():
        raise EdgemtpError(f"--init {init}: not a drafter directory (no config.json)")
    train = TrainSpec(k=draft_k, batch=batch, lr=lr, eval_every=eval_every, accept_weight=accept_weight)
    writable_dir(out, "-o")  # before the target pass and the training, which take minutes
    with progress_bar("drafter", show_what=True) as progress:
        def show(step: int, total: int, record: dict) -> None:
            phase = record.get("phase")
            progress(step, total, f"loss {record['loss']:.3f}" if "loss" in record else
                     f"head tables: {record['what']}" if phase == "head" else
                     "target pass over the corpora (cached)" if phase == "target pass" else
                     "target's greedy continuations (cached)" if phase == "greedy continuation" else "training")
            if record.get("phase") == "eval":
                tpr = ", ".join(f"{k} {v['tokens_per_round']:.2f}" for k, v in record.items()
                                if isinstance(v, dict) and "tokens_per_round" in v)
                click.echo(f"step {step}: held-out tokens/round {tpr}", err=True)

        shape = dict(hidden=hidden, num_layers=layers)
        if intermediate is not None:
            shape["intermediate"] = intermediate
        report = train_drafter(target_dir, out, spec, steps=steps, seed=seed, resume=resume, progress=show,
                               shape=shape, spec=train, threads=threads, init=init, head_clusters=head_clusters,
                               head_top_k=head_top_k)
    click.echo(json.dumps({"heldout": report["heldout"], "train_s": report["train_s"]}))
    click.echo(f"wrote {out}", err=True)  # stdout holds the JSON alone, for a program reading it


def domain_counts(flag: str, value: str, ranges: bool = False) -> dict:
    """domain=N,... -> {domain: N}; with `ranges`, domain=START:STOP too -> {domain: [START, STOP]}."""
    from ..drafter.data import DOMAINS

    out, windows = {}, 0
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, _, count = part.partition("=")
        start, colon, stop = count.partition(":") if ranges and ":" in count else ("0", "", count)
        if name not in DOMAINS or not (start.isdigit() and stop.isdigit()) or (colon and int(start) >= int(stop)):
            form = "domain=count or domain=start:stop (start < stop)" if ranges else "domain=count"
            raise EdgemtpError(f"{flag} {part!r}: expected {form} with domain one of {', '.join(DOMAINS)}")
        if name in out:  # the last would win, while the windows were counted twice
            raise EdgemtpError(f"{flag} {value!r}: {name} is given twice")
        out[name] = [int(start), int(stop)] if colon else int(stop)
        windows += int(stop) - int(start)
    if not windows:
        raise EdgemtpError(f"{flag} {value!r} selects no windows")
    return out
