"""Runs an MTP drafter graph on the target's KV cache: the drafting side of speculative decoding.

The graph (edgemtp/drafter/export.py builds ours, drafter/assistant.py a Gemma 4 assistant's) reads the
target's cache buffers read-only; one call is one draft step for B rows. Its I/O names are the contract's
(edgemtp/contract.py): inputs input_ids, last_hidden_state, position_ids, context_ids (a head with a
context) and past_key_values.{l}.key/value; outputs draft_ids, next_hidden_state and the logits (full
head) or candidate_ids / candidate_logits (clustered head)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .. import bundle as bundle_mod
from .. import contract as C
from ..contract import (CANDIDATE_IDS, CANDIDATE_LOGITS, CONTEXT_IDS, DRAFT_IDS, INPUT_IDS, LAST_HIDDEN, LOGITS,
                        NEXT_HIDDEN, POSITION_IDS)
from ..errors import EdgemtpError
from .binding import KeptBinding, reads_in_place


class DrafterSession:
    """Runs a drafter graph on the target's KVCache (numpy + onnxruntime; implements runtime.drafting.Drafter).

    Both heads give the same step results: draft ids, the next state, and logits over the whole vocabulary
    (a clustered head's candidates scattered into -inf elsewhere: the drafter's q is 0 outside them, which
    rejection sampling handles like any other q)."""

    def __init__(self, session, kv_layers: Sequence[int], vocab_size: int, head: dict | None = None):
        self.session, self.kv_layers, self.vocab_size = session, sorted(kv_layers), vocab_size
        self.head = head or {"kind": "full"}
        self.clustered = self.head["kind"] == "clustered"
        self.context = int(self.head.get("context", 0))  # recent token ids the head also scores
        self.outputs = [DRAFT_IDS, CANDIDATE_IDS, CANDIDATE_LOGITS, NEXT_HIDDEN] if self.clustered \
            else [DRAFT_IDS, LOGITS, NEXT_HIDDEN]
        self.keeps_binding = reads_in_place(session)  # steps keep their binding (_step) on the CPU only

    @classmethod
    def load(cls, bundle: bundle_mod.Bundle, provider: str = "cpu", threads: int | None = None,
             graph: str = "drafter", initializers: dict | None = None) -> "DrafterSession":
        g = bundle.graph(graph)
        return cls.open(g.path, g.contract, provider, threads, initializers)

    @classmethod
    def open(cls, path: Path, contract: dict, provider: str = "cpu", threads: int | None = None,
             initializers: dict | None = None) -> "DrafterSession":
        """A drafter graph file with its manifest contract (what write() returns under "contract"): ours or a
        Gemma 4 assistant's, which share the I/O contract but not the config. `initializers`: see
        make_session (the target's head table on 2 MB pages: head_pages.py)."""
        from .session import make_session

        session = make_session(path, provider, threads, spin=False, initializers=initializers)
        drafter = cls(session, contract["kv_layers"], int(contract["config"]["vocab_size"]), contract.get("head"))
        problem = drafter.graph_mismatch()
        if problem:
            raise EdgemtpError(f"{path}: the graph does not match its manifest contract ({problem})")
        return drafter

    def graph_mismatch(self) -> str:
        """What the graph lacks of the inputs this session binds and the outputs it reads, or what it needs
        that the contract does not give ('' if nothing): a drafter graph swapped or a contract edited after
        export would otherwise fail inside ONNX Runtime's run."""
        have_in = {i.name for i in self.session.get_inputs()}
        have_out = {o.name for o in self.session.get_outputs()}
        feeds = [INPUT_IDS, LAST_HIDDEN, POSITION_IDS, *([CONTEXT_IDS] if self.context else [])]
        feeds += [f(layer) for layer in self.kv_layers for f in (C.past_key, C.past_value)]
        missing = [n for n in feeds if n not in have_in] + [n for n in self.outputs if n not in have_out]
        if missing:
            return f"the graph has no {', '.join(missing[:3])}; the contract says head {self.head['kind']!r}, " \
                   f"kv_layers {self.kv_layers}, context {self.context}"
        unfed = sorted(have_in - set(feeds))
        return f"the graph's input {unfed[0]} is not in its contract" if unfed else ""

    def run(self, ids: np.ndarray, hidden: np.ndarray, cache, rows: slice,
            recent: np.ndarray | None = None) -> list[np.ndarray]:
        """One graph call for cache rows `rows`: the graph's outputs in `self.outputs` order. recent [b, W]:
        each row's most recent tokens, ids last (see recent_ids; only a head with a context reads it)."""
        feeds = {INPUT_IDS: ids, LAST_HIDDEN: hidden, POSITION_IDS: cache.lengths[rows][:, None]}
        if self.context:
            feeds[CONTEXT_IDS] = last_columns(ids if recent is None else recent, self.context)
        if not self.keeps_binding:
            return _step(self, cache.ort_values(rows), feeds).run(feeds)
        key = (id(self), rows.start, rows.stop, *(np.shape(v) for v in feeds.values()))
        step = cache.passes.get(key)
        if step is None:
            step = cache.passes[key] = _step(self, cache.ort_values(rows), feeds)
        return step.run(feeds)

    def head_step(self, ids: np.ndarray, hidden: np.ndarray, cache, rows: slice, recent: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """One step as the head gives it: (draft_ids [b, 1], logits [b, 1, N] over the ids the head scores,
        those ids [b, 1, N] (a clustered head's candidates) or None (a full head: the vocabulary), next_hidden_state
        [b, 1, Hb])."""
        out = self.run(ids, hidden, cache, rows, recent)
        return (out[0], out[2], out[1], out[3]) if self.clustered else (out[0], out[1], None, out[2])

    def step(self, ids: np.ndarray, hidden: np.ndarray, cache, rows: slice, full_logits: bool = True,
             recent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """ids [b, 1], hidden [b, 1, Hb] (queries at the rows' committed lengths), recent [b, >= 1] (see run)
        -> (draft_ids [b, 1], logits [b, 1, V] or None when not asked for, next_hidden_state [b, 1, Hb])."""
        ids, logits, candidates, state = self.head_step(ids, hidden, cache, rows, recent)
        if candidates is not None:
            logits = scatter(candidates, logits, self.vocab_size) if full_logits else None
        return ids, logits, state

    def draft(self, token: np.ndarray, hidden: np.ndarray, cache, rows: slice, k: int,
              full_logits: bool = True, recent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Greedy K-step draft for rows: token [b], hidden [b, Hb] -> (tokens [b, k], logits [b, k, V] or None).
        recent [b, W]: each row's most recent tokens ending with `token` (recent_ids of the histories); the
        drafts join it step by step. None: `token` alone."""
        ids, h = np.asarray(token, np.int64)[:, None], np.asarray(hidden, np.float32)[:, None]
        recent = ids if recent is None else np.asarray(recent, np.int64)
        tokens, logits = [], []
        for _ in range(k):
            ids, lg, h = self.step(ids, h, cache, rows, full_logits, recent)
            recent = np.concatenate([recent, ids], 1)[:, -max(self.context, 1):]  # run() pads it to W
            tokens.append(ids[:, 0])
            logits.append(None if lg is None else lg[:, 0])
        return np.stack(tokens, 1), (np.stack(logits, 1) if full_logits else None)

    def kind(self, history: Sequence[int]):
        """Drafter protocol (runtime.drafting.guess_kind): one kind of guess, each step a graph run."""
        from .drafting import Guess

        return Guess("mtp", False)

    def propose(self, history: Sequence[int], k: int, ctx=None):
        """Drafter protocol: greedy drafts (q None) or, when sampling, tokens drawn from q = distribution().
        With a repetition penalty the drafter's logits take it too, over the history and the drafts before: its
        guesses then follow the penalized target's (the graph's own argmax does not know the penalty).

        The draft ends after a token the drafter gave less than ctx.p_min probability (greedy: its softmax's top,
        over a clustered head's candidates; sampled: q's top). That token is kept, not dropped as llama.cpp's
        --draft-p-min does: its step is paid for, and its verify position costs little on a memory-bound
        target. Gemma 3 270M, T 0.8, top-p 0.95, K 4 (offline): p_min 0.2 kept 1.88 tokens a round for 2.84
        drafter steps, dropped 1.80 for the same steps; 0.3 kept 1.84 for 2.29."""
        from .acceptance import in_row
        from .sampling import Seen, distribution, draw, penalize

        if ctx is None or ctx.hidden is None or ctx.cache is None or k < 1:
            return [], None
        rows = slice(ctx.row, ctx.row + 1)
        ids, h = np.array([[history[-1]]], np.int64), np.asarray(ctx.hidden, np.float32).reshape(1, 1, -1)
        recent = np.asarray([history[-max(self.context, 1):]], np.int64)
        tokens, sampling = [], ctx.sampling
        history_seen = (Seen(history) if ctx.seen is None else ctx.seen) if sampling.penalized else None
        full = not sampling.greedy or sampling.penalized
        # q's rows written in place, not k rows of their own then np.stack'ed: the stack's 8 MB copy and page
        # faults (K 4, Gemma's 262,144 ids) cost 0.5 ms a round
        q = None if sampling.greedy else np.zeros((k, self.vocab_size))
        for i in range(k):
            ids, logits, candidates, h = self.head_step(ids, h, ctx.cache, rows, recent)
            if full and candidates is not None:
                logits = scatter(candidates, logits, self.vocab_size)
            seen = history_seen.plus(tokens) if sampling.penalized else ()
            if not sampling.greedy:
                # step i's BadLogits: the draft's i-th token (generation names its position)
                in_row(i, distribution, logits[0, 0], sampling, seen, out=q[i], source="the bundle's MTP drafter")
                ids = np.array([[draw(q[i], ctx.rng)]], np.int64)
            elif sampling.penalized:
                logits = penalize(logits[0, 0], sampling, seen)[None, None]
                ids = np.array([[np.argmax(logits)]], np.int64)
            tokens.append(int(ids[0, 0]))
            recent = np.concatenate([recent, ids], 1)[:, -max(self.context, 1):]
            if ctx.p_min and (top_probability(logits[0, 0]) if q is None else q[i].max()) < ctx.p_min:
                break
        return tokens, q


def _step(drafter: DrafterSession, kv: dict, feeds: dict) -> KeptBinding:
    """A binding for one drafter's steps over one cache's rows (runtime/binding.py): the KV buffers read as past."""
    types = {INPUT_IDS: np.int64, LAST_HIDDEN: np.float32, POSITION_IDS: np.int64, CONTEXT_IDS: np.int64}
    past = {}
    for layer in drafter.kv_layers:
        past[C.past_key(layer)], past[C.past_value(layer)] = kv[layer]
    return KeptBinding(drafter, drafter.session, {name: np.array(value, types[name]) for name, value in feeds.items()},
                       past, {}, tuple(drafter.outputs))


def recent_ids(histories: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """[b, width] int64: each history's last `width` tokens, -1 before a shorter one's first."""
    out = np.full((len(histories), width), -1, np.int64)
    for row, h in zip(out, histories):
        tail = list(h)[-width:] if width else []
        row[width - len(tail):] = tail
    return out


def last_columns(recent: np.ndarray, width: int) -> np.ndarray:
    """[b, n] token ids -> [b, width]: the last `width` columns, padded with -1 on the left when n < width."""
    r = np.asarray(recent, np.int64)[:, -width:]
    # filled by hand: np.pad took 16-19 us, every drafter step (1.8 us so)
    out = np.full((r.shape[0], width), -1, np.int64)
    out[:, width - r.shape[1]:] = r
    return out


def top_probability(logits: np.ndarray) -> float:
    """The largest probability of softmax(logits) (-inf: none)."""
    return float(1.0 / np.exp(logits - logits.max()).sum())


def scatter(ids: np.ndarray, logits: np.ndarray, vocab: int) -> np.ndarray:
    """Candidate logits [..., N] at token ids [..., N] -> [..., V] logits, -inf outside the candidates."""
    full = np.full((*ids.shape[:-1], vocab), -np.inf, np.float32)
    flat_full, flat_ids, flat_logits = full.reshape(-1, vocab), ids.reshape(-1, ids.shape[-1]), logits.reshape(
        -1, ids.shape[-1])
    for row, i, x in zip(flat_full, flat_ids, flat_logits):
        np.maximum.at(row, i, x)  # a padding slot may repeat a real id: its -inf must not win
    return full
