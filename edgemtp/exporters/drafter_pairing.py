"""A target bundle's MTP drafter: the one shipped for the model (AUTO), the checks that a drafter and its head
options fit the target before anything is written, and the head table's layout the two share (layout())."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ArgumentError, EdgemtpError

if TYPE_CHECKING:
    from . import Progress

AUTO = "auto"  # drafter=AUTO: attach the shipped drafter trained for this model, when there is one


def layout(quant: str, static_window: int | None, drafter, top_k: int | None, head_rows: str,
           gemv_head: bool | str) -> tuple[bool, str]:
    """(gemv_head, head_rows) with AUTO resolved. A dynamic fp32 bundle stores its head table transposed
    (exporters/gemv_head.py: plain decode steps ~5% faster, no bigger on disk) unless its drafter needs the
    table's rows, and our drafters' clustered heads then score int8 rows (a V x hidden copy in cluster
    order, 168 MB for Gemma 3 270M, and a faster draft step than fp32 rows: docs/measurements.md, "Session 21"), since
    gathering thousands of fp32 rows as columns of the transposed table would be slow. Quantized and static
    bundles keep the row-major table and fp32 rows."""
    from ..drafter import assistant
    from ..drafter.export import HEAD_FILE

    dynamic_fp32 = quant == "fp32" and static_window is None
    if head_rows == AUTO:
        ours = drafter is not None and not assistant.is_assistant(Path(drafter))
        clustered = ours and top_k != 0 and (Path(drafter) / HEAD_FILE).is_file()
        head_rows = "int8" if dynamic_fp32 and clustered and gemv_head in (AUTO, True) else "fp32"
    if gemv_head == AUTO:
        gemv_head = dynamic_fp32 and not _drafter_needs_rows(drafter, head_rows)
    return bool(gemv_head), head_rows


def _drafter_needs_rows(drafter, head_rows: str) -> bool:
    """Whether a --gemv-head export keeps the [V, H] table beside the transposed one, for its drafter. Our
    drafters read the transposed table's columns when their clustered head scores int8 rows (which the
    exporter makes from the table), since then they gather only a few columns per step (the rescored and
    recent-token candidates, the input token); with fp32 rows they gather thousands, which as columns
    (one cache line per number) would be far slower than as rows. A Gemma 4 assistant keeps the rows."""
    from ..drafter import assistant

    return drafter is not None and (head_rows != "int8" or assistant.is_assistant(Path(drafter)))


def _check_drafter_options(drafter, top_k, head_rows, context, drafter_quant, why_none: str | None = None) -> None:
    """Options of the drafter's head need a drafter: given without one they would be silently ignored.
    `why_none`: why there is none, when not the default reason (a qdq bundle's shipped drafter is left out).
    The refusals name export()'s arguments from Python, their flags from the CLI (ArgumentError)."""
    from ..drafter.export import CONTEXT, HEAD_ROWS, ROWS, TOP_K

    if head_rows not in (AUTO, *HEAD_ROWS):
        raise ArgumentError(ROWS[0], head_rows, f"must be one of {AUTO}, {', '.join(HEAD_ROWS)}", ROWS[1])
    if drafter is not None:
        if top_k == 0 and context:  # the recent tokens are scored beside a clustered head's candidates
            raise ArgumentError(CONTEXT[0], context, "needs the clustered head, and a top k of 0 clusters keeps the "
                                "full head, which scores every token", CONTEXT[1])
        return
    options = ((TOP_K, top_k), (CONTEXT, context), (("drafter_quant", "--drafter-quant"),
                                                    drafter_quant), (ROWS, None if head_rows == AUTO else head_rows))
    given = [(names, value) for names, value in options if value is not None]
    if given:
        (name, flag), value = given[0]
        raise ArgumentError(name, value, "applies to a bundle with an MTP drafter, and none is attached "
                            f"({why_none or 'no drafter is shipped for this model, or none was asked for'})", flag)


def shipped_drafter(model_dir: Path) -> Path | None:
    """The drafter shipped with edgemtp for this model (recognised by its weights), if any."""
    from ..drafter import match_shipped
    from . import load_config

    load_config(model_dir)  # an unsupported or broken model directory reports that, not a drafter problem
    return match_shipped(model_dir)


def _check_drafter(drafter_dir: Path, target_contract: dict, top_k: int | None, head_rows: str = "fp32",
                   context: int | None = None, model_dir: Path | None = None):
    """Refuses a drafter made for another target before anything is written; returns write(tmp, progress)
    -> the manifest's drafter graph entries. `model_dir`: the target's checkpoint, which the drafter's
    fingerprint (train-drafter writes one) must recognise where it can be compared."""
    from ..contract import TargetContract
    from ..drafter import assistant, trained_for_another
    from ..drafter import load_config as load_drafter_config
    from ..drafter.export import (CONTEXT, DEFAULT_CONTEXT, check_context, check_head_rows, head_shape, write,
                                  write_full_head)

    t = TargetContract.from_json(target_contract)
    if assistant.is_assistant(drafter_dir):
        # refuses an assistant made for another target; --draft-top-k applies to its head as to ours
        cfg = assistant.load_config(drafter_dir, t).with_top_k(top_k)
        context = context or 0  # by default, the head as Google ships it (and transformers runs it)
        check_context(context)
        check_head_rows(head_rows, cfg.head(context))  # and a context without a clustered head
        return lambda tmp, progress=None: {"drafter": assistant.write(tmp, drafter_dir, tmp / "target.onnx", cfg,
                                                                     head_rows=head_rows, context=context,
                                                                     progress=progress)}
    cfg = load_drafter_config(drafter_dir)
    if not cfg.fits(t):
        raise EdgemtpError(f"{drafter_dir}: drafter does not match this target (drafter: backbone hidden "
                           f"{cfg.backbone_hidden}, vocab {cfg.vocab_size}, KV layers {cfg.target_kv}; target: "
                           f"hidden {t.hidden_size}, vocab {t.vocab_size}, KV layers {t.drafter_kv})")
    if model_dir is not None and trained_for_another(drafter_dir, model_dir):
        # the same sizes, other weights: it would attach and draft tokens the target rarely accepts
        raise EdgemtpError(f"{drafter_dir}: drafter was trained for another model (its fingerprint's embedding rows "
                           f"differ from {model_dir}'s); train one for this model with edgemtp train-drafter")
    head = head_shape(drafter_dir, cfg, top_k, DEFAULT_CONTEXT if context is None else context)
    check_head_rows(head_rows, head)  # bad head tables or options fail here too
    if head is None and context:  # as with a top k of 0: the full head already scores the recent tokens
        raise ArgumentError(CONTEXT[0], context, f"needs the clustered head, and {drafter_dir} has no head tables, "
                            f"so its full head scores every token (`edgemtp cluster TARGET_DIR -o {drafter_dir} "
                            f"--drafter {drafter_dir}` writes them)", CONTEXT[1])
    context = head.context if head is not None else 0

    def write_graphs(tmp: Path, progress: Progress | None = None) -> dict:
        entry = write(tmp, drafter_dir, tmp / "target.onnx", top_k=top_k, head_rows=head_rows, context=context,
                      progress=progress)
        full = write_full_head(tmp, drafter_dir, entry)  # for profile's full vs clustered rows
        return {"drafter": entry, **({"drafter_full_head": full} if full else {})}
    return write_graphs
