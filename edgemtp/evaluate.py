"""Quality of a bundle on a text: perplexity, and against a reference bundle top-1 agreement and KL.

    evaluate("bundles/int4", text, reference_bundle="bundles/fp32")

Like llama.cpp's `llama-perplexity --kl-divergence`: both bundles see the same token windows, and for
every scored position we compare the quantized model's next-token distribution Q with the
reference's P: KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)), and whether their argmax agrees.

Windows: the text is tokenized once (no special tokens) and cut into consecutive windows of
`window - 1` tokens, each preceded by BOS where the tokenizer puts one before a text (leading_bos; a fresh
KV cache per window, like independent documents); else of `window` tokens. Every token that has at least one
token before it in its window is scored. A window runs through the target in pieces of `step` positions: logits
over a 262k vocab cost 1 MB per position, so a whole 512-token window at once would hold half a gigabyte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArgumentError, EdgemtpError
from .runtime.engine import Engine
from .runtime.sampling import check_best, is_whole


DEFAULT_WINDOW = 512


@dataclass
class _Tally:
    """Per scored position: negative log-likelihoods (ours, reference), KL, argmax agreement."""

    nll: list = field(default_factory=list)
    ref_nll: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    agree: list = field(default_factory=list)


def evaluate(bundle_dir: str | Path, text: str, reference_bundle: str | Path | None = None,
             window: int | None = None, threads: int | None = None, *, step: int = 64, max_tokens: int | None = None,
             text_name: str = "the text", provider: str = "cpu", progress=None) -> dict:
    """Perplexity of `bundle_dir` on `text`; with `reference_bundle`, also top-1 agreement and KL.

    `window` (tokens per window, BOS included) defaults to min(512, the bundles' KV capacity);
    `max_tokens` caps the text's tokens (None: all); `text_name` names the text in errors (the CLI: its
    --text-file); `provider`: both bundles' execution provider (Engine.load's; an NPU's rounding shows here);
    `progress(done, total)` is called with 0 before the first window and after each one (the CLI's bar: a long
    text takes minutes).
    Returns a JSON-able dict: tokens (scored), windows, window, nll (mean, nats), perplexity; with a reference
    also reference_nll, reference_perplexity, perplexity_delta_pct, top1_agreement, kl_mean, kl_median, kl_p99,
    kl_max."""
    if not isinstance(text, str):
        raise ArgumentError("text", text, "must be a str")
    if max_tokens is not None and not (is_whole(max_tokens) and max_tokens >= 1):
        raise ArgumentError("max_tokens", max_tokens, "must be a whole number of at least 1 or None")
    for name, value in (("window", window), ("step", step)):
        if not (is_whole(value) or (name == "window" and value is None)):
            raise ArgumentError(name, value, "must be a whole number")
    engine = Engine.load(bundle_dir, provider=provider, threads=threads)
    ref = None
    if reference_bundle:
        try:
            ref = Engine.load(reference_bundle, provider=provider, threads=threads)
        except EdgemtpError as e:  # which of the two bundles is at fault
            raise EdgemtpError(f"--reference {reference_bundle}: {e}") from None
    if ref is not None:
        _check_same_vocab(engine, ref)
    if window is None:
        window = min([DEFAULT_WINDOW] + [e.capacity for e in (engine, ref) if e is not None])
    _check_window(window, step, engine, ref)
    tokens = engine.check_tokenizer_ids(engine.tokenizer.encode(text, add_special_tokens=False).ids[:max_tokens],
                                        text_name)
    bos = leading_bos(engine.tokenizer)
    if len(tokens) < (1 if bos is not None else 2):  # a token is scored when something comes before it
        why = "" if bos is not None else " (this model's tokenizer puts no BOS before a text: the first is not " \
            "scored)"
        raise EdgemtpError(f"{text_name} has {len(tokens)} token(s) to score"
                           f"{' (--max-tokens)' * (max_tokens is not None)}; "
                           f"perplexity needs at least {1 if bos is not None else 2}{why}")
    tally = _Tally()
    windows = text_windows(tokens, window, bos)
    if progress is not None:  # the bar at 0 now: a window's prefill takes seconds at 270M scale, the first longer
        progress(0, len(windows))
    for done, win in enumerate(windows, 1):
        _score_window(np.asarray(win, np.int64), engine, ref, step, tally)
        if progress is not None:
            progress(done, len(windows))
    return _summary(tally, len(windows), window, ref is not None)


def leading_bos(tokenizer) -> int | None:
    """The token the tokenizer puts before a text (as generate's prompts get it), or None where it puts none. Not
    the config's bos_token_id: SmolLM2's names <|im_start|>, which its tokenizer never adds, and scoring every
    window after it measured a text the model does not see (transformers' and llama.cpp's perplexity add a BOS
    only where the tokenizer does)."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    ids = tokenizer.encode("a").ids
    return ids[0] if len(ids) > len(plain) and ids[1:1 + len(plain)] == plain else None


def text_windows(tokens: list[int], window: int, bos: int | None) -> list[list[int]]:
    """Consecutive windows of at most `window` ids, each starting with `bos` if given; windows that
    would score nothing (a lone token without BOS) are dropped."""
    n = window - 1 if bos is not None else window
    wins = [([bos] if bos is not None else []) + tokens[i:i + n] for i in range(0, len(tokens), n)]
    return [w for w in wins if len(w) >= 2]


def _score_window(win: np.ndarray, engine: Engine, ref: Engine | None, step: int, tally: _Tally) -> None:
    caches = [engine.target.new_cache(1)] + ([ref.target.new_cache(1)] if ref else [])
    for start in range(0, len(win) - 1, step):
        piece = win[None, start:start + step]
        targets = win[start + 1:start + 1 + piece.shape[1]]  # the window's last position predicts nothing
        logp = _log_probs(engine, piece, caches[0], start)[:len(targets)]
        tally.nll.extend(-logp[np.arange(len(targets)), targets])
        if ref is None:
            continue
        ref_logp = _log_probs(ref, piece, caches[1], start)[:len(targets)]
        tally.ref_nll.extend(-ref_logp[np.arange(len(targets)), targets])
        tally.kl.extend(kl_divergence(ref_logp, logp))
        tally.agree.extend(ref_logp.argmax(-1) == logp.argmax(-1))


def _log_probs(engine: Engine, piece: np.ndarray, cache, start: int) -> np.ndarray:
    """The log-probabilities at each position of `piece` [1, S] (window positions start..start+S-1), refused
    where the logits hold NaN (an fp16 overflow on an NPU): the figures then read perplexity nan beside a top-1
    agreement that compared argmax's NaN ids. Refused too where they hold +inf (the same overflow): log-softmax
    took inf - inf, NaN again. Generation takes +inf ids as the certain ones, but here that would give an infinite
    perplexity and KL (or a made-up certainty) that measure the overflow, not the bundle's quality."""
    logits = engine.target.forward(piece, cache, n_logits=piece.shape[1])[0][0]
    best = logits.max(axis=-1)  # NaN where a row holds one, +inf where it holds +inf but no NaN
    if not np.isfinite(best).all():
        row = int(np.flatnonzero(~np.isfinite(best))[0])
        where = f"{engine.bundle.dir} (position {start + row} of a window)"
        if best[row] == np.inf:
            raise EdgemtpError(f"{where} gave logits that hold +inf, so no perplexity can be computed (a broken "
                               "bundle, or a value that overflowed in its graph)")
        check_best(best[row], where)
    return _log_softmax(logits)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """[n, V] fp32 logits -> fp64 log-probabilities (fp64 so that tiny KLs are not rounding noise)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row of log-probabilities [n, V] -> [n] (0 where P == Q). A token P gives probability 0 adds
    nothing: where both rule it out (-inf logits) its term was 0 * (-inf - -inf), NaN."""
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        terms = p * (logp - logq)
    terms[p == 0] = 0.0
    return np.maximum(terms.sum(axis=-1), 0.0)


def _summary(t: _Tally, windows: int, window: int, with_ref: bool) -> dict:
    nll = float(np.mean(t.nll))
    out = {"tokens": len(t.nll), "windows": windows, "window": window, "nll": nll, "perplexity": _exp(nll)}
    if with_ref:
        ref_nll = float(np.mean(t.ref_nll))
        kl = np.asarray(t.kl)
        out.update({
            "reference_nll": ref_nll, "reference_perplexity": _exp(ref_nll),
            "perplexity_delta_pct": _delta_pct(nll, ref_nll),
            "top1_agreement": float(np.mean(t.agree)),
            "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)),
            "kl_p99": float(np.quantile(kl, 0.99)), "kl_max": float(kl.max()),
        })
    return out


def _exp(nll: float) -> float:
    """exp(nll), inf past float's range (math.exp raises there): a token the bundle rules out (-inf logit) makes
    the mean NLL, and the perplexity, infinite."""
    return math.exp(nll) if nll < 709.0 else math.inf


def _delta_pct(nll: float, ref_nll: float) -> float:
    """100 * (perplexity / reference perplexity - 1), from the NLLs' difference: finite where both perplexities are
    past float's range (an NLL above ~709) but their ratio is not. Against an infinite reference NLL (it gave a
    token of the text probability 0) it is NaN, undefined: the ratio's limit, -100%, would call the bundle
    infinitely better, where only the reference's token is ruled out."""
    if ref_nll == math.inf:
        return math.nan
    return 100.0 * (math.expm1(nll - ref_nll) if nll - ref_nll < 709.0 else math.inf)


def finite_or_none(result: dict) -> dict:
    """The figures with None (JSON's null) for those that are not finite (an infinite perplexity, the delta against
    an infinite reference NLL): JSON has no Infinity or NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}


def _check_window(window: int, step: int, engine: Engine, ref: Engine | None) -> None:
    if window < 2:
        raise ArgumentError("window", window, "is too small (need at least 2 tokens)")
    if step < 1:
        raise ArgumentError("step", step, "must be at least 1")
    for e in (engine, ref):
        if e is not None and window > e.capacity:
            raise ArgumentError("window", window, f"exceeds the KV capacity {e.capacity} of bundle {e.bundle.dir}")


def _check_same_vocab(engine: Engine, ref: Engine) -> None:
    """KL and agreement compare distributions token by token: the vocabularies must be the same."""
    a, b = engine.bundle, ref.bundle
    if a.target_contract.vocab_size != b.target_contract.vocab_size:
        raise EdgemtpError(f"{b.dir}: reference vocabulary size {b.target_contract.vocab_size} differs from "
                           f"{a.dir}'s {a.target_contract.vocab_size}")
    sha = [x.manifest["files"][x.manifest["tokenizer"]]["sha256"] for x in (a, b)]
    if sha[0] != sha[1]:
        raise EdgemtpError(f"{b.dir}: reference bundle has a different tokenizer than {a.dir}")
