"""What export checks of a checkpoint against the graph config.json describes, before writing anything: the
tensors the graph needs (present, of the right shape), those it leaves unread, and whose head it uses."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..errors import EdgemtpError, app_stacklevel
from . import builder

FLOATS = ("F32", "BF16", "F16")  # the checkpoint dtypes of weights


def own_head(cfg, ckpt: Checkpoint):
    """cfg, untied when tie_word_embeddings is true but the checkpoint has an lm_head.weight of other values:
    transformers then does not tie them (it warns) and its logits come from lm_head.weight."""
    head, emb = "lm_head.weight", "model.embed_tokens.weight"
    if not getattr(cfg, "tie_word_embeddings", False) or head not in ckpt or emb not in ckpt or ckpt.equal(head, emb):
        return cfg
    return dataclasses.replace(cfg, tie_word_embeddings=False)


def check_weights(graph: builder.GraphBuilder, ckpt: Checkpoint, model_dir: Path,
                  ignored: tuple[str, ...] = ()) -> None:
    """Every parameter the graph needs exists with the right element count, before writing anything; a
    warning names the text model's tensors the graph leaves unread (but those under the `ignored` name
    prefixes, which transformers skips on load too)."""
    missing = [key for p in graph.params.values() for key in builder.sources(p) if key not in ckpt]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise EdgemtpError(f"{model_dir}: checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
    for p in graph.params.values():  # each part of a joined parameter (q/k/v, gate/up) on its own
        for key, want in zip(builder.sources(p), builder.part_shapes(p)):
            # a quantized checkpoint's integers (bitsandbytes' I8 weights beside their scales) are not the
            # model's values: cast to float, they exported as another model
            if np.issubdtype(p.dtype, np.floating) and ckpt.dtype(key) not in FLOATS:
                raise EdgemtpError(f"{model_dir}: tensor '{key}' is {ckpt.dtype(key)}, not floating-point weights "
                                   f"(a quantized checkpoint? export reads {', '.join(FLOATS)} weights)")
            have = ckpt.shape(key)
            # the checkpoint's own layout where the transform is known (a transposed [in, out] Linear weight
            # of a square-compatible size passes "either order" and failed mid-export as a ValueError)
            exact = {None: want, builder.plus_one: want, builder.transpose: want[::-1]}.get(p.transform)
            if exact is not None and tuple(have) != tuple(exact):
                raise EdgemtpError(f"{model_dir}: tensor '{key}' has shape {list(have)}, config.json implies "
                                   f"{list(exact)}")
            if sorted(have) != sorted(want):
                raise EdgemtpError(f"{model_dir}: tensor '{key}' has shape {list(have)}, config.json implies "
                                   f"{' x '.join(map(str, want))} (in either order)")
    unread = unused_tensors(graph, ckpt, ignored)
    if unread:
        more = f" (and {len(unread) - 3} more)" if len(unread) > 3 else ""
        warnings.warn(f"{model_dir}: {len(unread)} checkpoint tensor(s) unused by the model config.json describes: "
                      f"{', '.join(unread[:3])}{more}; the export leaves them out, as transformers would (is "
                      "config.json this checkpoint's?)", stacklevel=app_stacklevel())


def unused_tensors(graph: builder.GraphBuilder, ckpt: Checkpoint, ignored: tuple[str, ...] = ()) -> list[str]:
    """The checkpoint's text-model tensors no parameter reads: a layer beyond num_hidden_layers, a norm or bias
    of another architecture (a Qwen3 checkpoint's q_norm under model_type qwen2) would otherwise go unseen.
    Left aside: a multimodal checkpoint's other towers, lm_head.weight equal to a tied embedding (own_head),
    the rotary inverse frequencies older checkpoints saved (transformers recomputes them) and names under
    the `ignored` prefixes (the config's `ignored_on_load`: Gemma 4's KV-shared layers' K/V weights)."""
    used = {key for p in graph.params.values() for key in builder.sources(p)}
    return sorted(n for n in ckpt.keys() if n not in used and n not in ckpt.outside_text and
                  n != "lm_head.weight" and not n.endswith("rotary_emb.inv_freq") and not n.startswith(ignored))
