"""Gemma 4 assistant (gemma4_assistant) drafter: parity with transformers' MTP candidate generator, pairing."""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgemtp import bundle as bundle_mod  # noqa: E402
from edgemtp.drafter import assistant as A  # noqa: E402
from edgemtp.runtime.drafter_session import DrafterSession  # noqa: E402
from edgemtp.errors import ArgumentError, EdgemtpError  # noqa: E402
from edgemtp.exporters import export  # noqa: E402
from edgemtp.runtime.engine import Engine  # noqa: E402
from edgemtp.runtime import target as target_mod  # noqa: E402
from edgemtp.runtime.session import make_session  # noqa: E402

from .cli_errors import assert_one_line_error  # noqa: E402
from .reference import save_tiny  # noqa: E402
from .test_parity_gemma4 import TEXT, WINDOW, F, S, _randomize, tiny  # noqa: E402

LENGTHS = (21, 6)  # committed cache lengths of the two rows: past 2x the window, and inside it
K = 4
CENTROIDS, TOP_K = 8, 2  # 96 tokens in 8 clusters of 12: 24 candidates per step
# the assistant reads the target's layer 3 (sliding: 2 KV heads x 16) and layer 4 (full: 1 x 32, k_eq_v)
ASSISTANT = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                 attention_k_eq_v=True, layer_types=[S, S, S, F], sliding_window=WINDOW,
                 hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, max_position_embeddings=256,
                 initializer_range=0.1, rope_parameters=TEXT["rope_parameters"])


def tiny_assistant(ordered: bool):
    cfg = transformers.Gemma4AssistantConfig(text_config=dict(ASSISTANT), backbone_hidden_size=TEXT["hidden_size"],
                                             use_ordered_embeddings=ordered, num_centroids=CENTROIDS,
                                             centroid_intermediate_top_k=TOP_K)
    torch.manual_seed(1)
    model = transformers.Gemma4AssistantForCausalLM(cfg)
    _randomize(model)
    if ordered:  # transformers initialises the ordering to zeros
        model.masked_embedding.token_ordering.copy_(torch.randperm(ASSISTANT["vocab_size"]))
    return model.eval()


@dataclass
class Pair:
    target_dir: Path
    assistants: dict  # use_ordered_embeddings -> (assistant, its directory, bundle, reference drafts per row)
    ids: np.ndarray  # row b: prompt ids[b, :LENGTHS[b]], then the last token ids[b, LENGTHS[b]]
    prefills: list  # row b: transformers' target output over its prompt (hidden states, shared KV)
    exact: dict  # (use_ordered_embeddings, source) -> the float64 reference's steps per row (Exact)


@dataclass
class Exact:
    """transformers' drafter in float64, step by step (each step fed the last one's token and hidden state)."""
    tokens: np.ndarray  # [K] draft ids
    logits: np.ndarray  # [K, V]
    hidden_out: np.ndarray  # [K, Hb]: each step's next hidden state, the next step's input


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on a shared machine
    try:
        return _pair(tmp_path_factory.mktemp("assistant"))
    finally:
        torch.set_num_threads(threads)


def _pair(root: Path) -> Pair:
    target = tiny("gemma4_text")
    target_dir = save_tiny(target, root / "target")
    ids = np.random.default_rng(4).integers(3, TEXT["vocab_size"], size=(len(LENGTHS), max(LENGTHS) + 1))
    prefills = _prefills(target, ids)
    target64 = copy.deepcopy(target).double()
    # the float64 reference is fed transformers' float32 target outputs as they are (the "transformers" source:
    # only the drafter graph's rounding is measured) or its float64 target's (the "bundle" source: the exported
    # target's rounding counts too)
    fed64 = {"transformers": [_double(p) for p in prefills], "bundle": _prefills(target64, ids)}
    out, exacts = {}, {}
    for ordered in (False, True):
        name = "ordered" if ordered else "full"
        model = tiny_assistant(ordered)
        model.save_pretrained(root / name)
        bundle = export(target_dir, root / f"bundle_{name}", capacity=64, drafter=root / name)
        refs = [reference(target, model, ids[b], n, prefills[b]) for b, n in enumerate(LENGTHS)]
        out[ordered] = model, root / name, bundle, refs
        model64 = copy.deepcopy(model).double()
        for source, fed in fed64.items():
            exacts[ordered, source] = [exact(target64, model64, ids[b], n, fed[b]) for b, n in enumerate(LENGTHS)]
    return Pair(target_dir, out, ids, prefills, exacts)


def _prefills(target, ids: np.ndarray) -> list:
    with torch.no_grad():
        return [target(input_ids=torch.from_numpy(ids[b:b + 1, :n]), output_hidden_states=True,
                       return_shared_kv_states=True) for b, n in enumerate(LENGTHS)]


def _double(prefill):
    """A target's prefill output with the tensors the drafter reads in float64."""
    return SimpleNamespace(hidden_states=(prefill.hidden_states[-1].double(),),
                           shared_kv_states={t: tuple(x.double() for x in kv)
                                             for t, kv in prefill.shared_kv_states.items()})


def reference(target, assistant, ids: np.ndarray, n: int, prefill):
    """transformers' SinglePositionMultiTokenCandidateGenerator after the target's prefill of ids[:n], the
    last token being ids[n] -> (draft tokens [K], logits [K, V])."""
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    gen = SinglePositionMultiTokenCandidateGenerator(assistant, target.get_input_embeddings(),
                                                     transformers.GenerationConfig(max_length=256))
    gen.num_assistant_tokens = K
    seq = torch.from_numpy(ids[None, :n + 1])
    with torch.no_grad():
        cand, logits = gen.get_candidates(seq, {"attention_mask": torch.ones_like(seq)}, prefill,
                                          is_first_iteration=False, n_last_matches=0)
    return cand[0, n + 1:].numpy(), logits[0].float().numpy()


def exact(target64, assistant64, ids: np.ndarray, n: int, prefill64) -> Exact:
    """reference() with the target and assistant in float64 (copies turned .double(), a float64 prefill)."""
    seen = []
    hook = assistant64.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        tokens, _ = reference(target64, assistant64, ids, n, prefill64)
    finally:
        hook.remove()
    return Exact(tokens, np.stack([o.logits[0, 0].numpy() for o in seen]),
                 np.stack([o.last_hidden_state[0, 0].numpy() for o in seen]))


def from_transformers(bundle, prefills):
    """What transformers' target hands the drafter after each row's prefill, laid out as the runtime's
    cache: ({layer: (keys, values) [B, Nk, capacity, D]}, hidden [B, 1, Hb])."""
    contract = bundle_mod.load(bundle).target_contract
    kv = {s.layer: tuple(np.zeros((len(LENGTHS), s.num_heads, contract.capacity, s.head_dim), np.float32)
                         for _ in range(2)) for s in contract.kv if s.layer in contract.drafter_kv.values()}
    for b, (n, out) in enumerate(zip(LENGTHS, prefills)):
        for t, layer in contract.drafter_kv.items():
            for buf, x in zip(kv[layer], out.shared_kv_states[t]):
                buf[b, :, :n] = x[0].numpy()
    return kv, np.concatenate([out.hidden_states[-1][:, -1:].numpy() for out in prefills])


def from_bundle(bundle, ids):
    """The same from the exported target (ORT) and its KVCache."""
    engine = Engine.load(bundle)
    cache = engine.target.new_cache(len(LENGTHS))
    hidden = []
    for b, n in enumerate(LENGTHS):
        _, h = target_mod.prefill(engine.target, ids[b, :n].tolist(), cache, b)  # PREFILL_CHUNK a pass
        hidden.append(h[:, -1:])
    return {layer: (cache.keys[layer], cache.values[layer]) for layer in cache.keys}, np.concatenate(hidden)


def draft(bundle, ids, inputs, k: int = K, graph: Path | None = None, fed: list[Exact] | None = None) -> list[dict]:
    """k greedy steps of the bundle's drafter.onnx (or `graph`) for both rows at once, fed its own draft ids
    and next_hidden_state; or with `fed` (each row's Exact), the float64 reference's previous ones (rounded to
    float32), so that each step's difference from that reference is its own, not the last steps' amplified."""
    b = bundle_mod.load(bundle)
    session = make_session(graph or b.graph("drafter").path, "cpu", 1)
    kv, hidden = inputs
    feed = {}
    for layer in b.graph("drafter").contract["kv_layers"]:
        feed[f"past_key_values.{layer}.key"], feed[f"past_key_values.{layer}.value"] = kv[layer]
    names = [o.name for o in session.get_outputs()]
    token = ids[np.arange(len(LENGTHS)), list(LENGTHS)][:, None]
    steps = []
    for i in range(k):
        if fed and i:
            token = np.array([[e.tokens[i - 1]] for e in fed])
            hidden = np.stack([e.hidden_out[i - 1][None] for e in fed]).astype(np.float32)
        out = dict(zip(names, session.run(None, {"input_ids": token, "last_hidden_state": hidden,
                                                 "position_ids": np.array(LENGTHS)[:, None], **feed})))
        token, hidden = out[A.DRAFT_IDS], out[A.NEXT_HIDDEN]
        steps.append(out)
    return steps


SOURCES = ["transformers", "bundle"]  # the drafter fed transformers' target, or the exported target end to end


def _inputs(source, pair: Pair, bundle):
    return from_transformers(bundle, pair.prefills) if source == "transformers" else from_bundle(bundle, pair.ids)


# How far a step may be from the float64 reference, fed its previous token and hidden state (draft()'s `fed`):
# with transformers' float32 target outputs, which the reference gets too, the drafter graph's own rounding
# (<= 1.4e-5 seen over 11 prompts); with the exported target's, its outputs' rounding (~2e-5 from float64, as
# transformers' own float32 target's) amplified by one step (<= 8e-5 seen). Logits here reach ~2.5.
EXACT_ATOL = {"transformers": 5e-5, "bundle": 3e-4}


def check_steps(pair: Pair, ordered: bool, source: str, inputs=None) -> float:
    """Fed `source`'s inputs (or `inputs`, from the exported target), the drafter's own chained steps give
    transformers' draft ids; each step fed the float64 reference's previous token and hidden state gives that
    reference's scores (the clustered head: of its candidates, which are the tokens the reference scatters
    logits to) and next hidden state within EXACT_ATOL[source]. -> the largest difference from float64.

    Not transformers' float32 logits of its chained steps: the steps amplify a difference (up to ~10x a step
    here), and those logits are themselves up to 7e-4 off float64 by the fourth step, as ours: the difference
    between the two told more of the rounding than of a mistake."""
    _, _, bundle, refs = pair.assistants[ordered]
    inputs = _inputs(source, pair, bundle) if inputs is None else inputs
    exacts, tol = pair.exact[ordered, source], EXACT_ATOL[source]
    steps = draft(bundle, pair.ids, inputs)
    fed = draft(bundle, pair.ids, inputs, fed=exacts)
    worst = 0.0
    for b, ((want_tokens, _), e) in enumerate(zip(refs, exacts)):
        np.testing.assert_array_equal([s[A.DRAFT_IDS][b, 0] for s in steps], want_tokens, err_msg=f"row {b}")
        np.testing.assert_array_equal(e.tokens, want_tokens, err_msg=f"row {b}: float64 drafts")
        for i, (s, want) in enumerate(zip(fed, e.logits)):
            if ordered:  # transformers fills every non-candidate with (min over candidates) - 1
                cand, got = s[A.CANDIDATE_IDS][b, 0], s[A.CANDIDATE_LOGITS][b, 0]
                assert cand.shape == (TOP_K * 96 // CENTROIDS,)
                np.testing.assert_array_equal(np.sort(cand), np.flatnonzero(want > want.min()))
            else:
                cand, got = np.arange(len(want)), s[A.LOGITS][b, 0]
            where = f"row {b} step {i}"
            np.testing.assert_allclose(got, want[cand], atol=tol, rtol=0, err_msg=f"{where}: logits")
            np.testing.assert_allclose(s[A.NEXT_HIDDEN][b, 0], e.hidden_out[i], atol=tol, rtol=0,
                                       err_msg=f"{where}: next hidden state")
            worst = max(worst, float(np.abs(got - want[cand]).max()),
                        float(np.abs(s[A.NEXT_HIDDEN][b, 0] - e.hidden_out[i]).max()))
        assert np.ptp(e.logits) > 1.0  # spread enough for the tolerance to mean something
    return worst


@pytest.mark.parametrize("source", SOURCES)
def test_full_head_matches_transformers(pair, source):
    worst = check_steps(pair, False, source)
    print(f"full head, {source} inputs: max |logits, next hidden - transformers float64| = {worst:.2e}")


@pytest.mark.parametrize("source", SOURCES)
def test_clustered_head_matches_transformers(pair, source):
    """Candidates = the tokens transformers scatters logits to; their logits and the draft ids agree."""
    worst = check_steps(pair, True, source)
    print(f"clustered head, {source} inputs: max |candidate logits, next hidden - transformers float64| = "
          f"{worst:.2e}")


def test_a_prefill_in_chunks_hands_the_drafter_what_one_pass_does(pair, monkeypatch):
    """The runtime's prefill PREFILL_CHUNK = 5 positions a pass (its 512 made small: row 0's 21 span five chunks
    and the window twice over): the cache and last hidden state the drafter reads are one pass's, and its drafts
    transformers' (check_steps: the tokens, and float64 logits step by step). (Its chained logits were 1.03e-3 off
    transformers' float32 ones by the fourth step, one pass's 8.5e-4: rounding that the steps amplify.)"""
    for ordered in (False, True):
        bundle = pair.assistants[ordered][2]
        want_kv, want_hidden = from_bundle(bundle, pair.ids)
        monkeypatch.setattr(target_mod, "PREFILL_CHUNK", 5)
        kv, hidden = from_bundle(bundle, pair.ids)
        monkeypatch.undo()
        np.testing.assert_allclose(hidden, want_hidden, atol=1e-4, rtol=0)
        for layer in bundle_mod.load(bundle).target_contract.drafter_kv.values():
            for got, want in zip(kv[layer], want_kv[layer]):
                np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"layer {layer}")
        check_steps(pair, ordered, "bundle", (kv, hidden))


@pytest.mark.parametrize("ordered", [False, True])
def test_runtime_session_runs_the_graph(pair, ordered):
    """DrafterSession binds the target's KVCache read-only and gets what the plain run gets."""
    _, _, bundle, _ = pair.assistants[ordered]
    ids, loaded = pair.ids, bundle_mod.load(bundle)
    session = DrafterSession.load(loaded, threads=1)
    engine = Engine.load(bundle)
    cache = engine.target.new_cache(len(LENGTHS))
    hidden = [engine.target.forward(ids[b:b + 1, :n], cache, rows=slice(b, b + 1))[1][0, -1]
              for b, n in enumerate(LENGTHS)]
    keys = {layer: k.copy() for layer, k in cache.keys.items()}
    last = ids[np.arange(len(LENGTHS)), list(LENGTHS)]
    tokens, logits = session.draft(last, np.stack(hidden), cache, slice(0, len(LENGTHS)), K)
    want = draft(bundle, ids, from_bundle(bundle, ids))
    np.testing.assert_array_equal(tokens, np.stack([s[A.DRAFT_IDS][:, 0] for s in want], 1))
    if ordered:  # candidates scattered over the vocabulary, -inf elsewhere
        cand = np.stack([s[A.CANDIDATE_IDS][:, 0] for s in want], 1)  # [B, K, N]
        np.testing.assert_allclose(np.take_along_axis(logits, cand, -1),
                                   np.stack([s[A.CANDIDATE_LOGITS][:, 0] for s in want], 1), atol=1e-6)
        assert (np.isfinite(logits).sum(-1) == cand.shape[-1]).all()
    else:
        np.testing.assert_allclose(logits, np.stack([s[A.LOGITS][:, 0] for s in want], 1), atol=1e-6)
    assert (cache.lengths == LENGTHS).all() and all(np.array_equal(cache.keys[i], k) for i, k in keys.items())


@pytest.mark.parametrize("ordered", [False, True])
def test_bundle_loads_and_shares_the_target_embedding(pair, ordered):
    assistant, _, bundle, _ = pair.assistants[ordered]
    b = bundle_mod.load(bundle)
    g = b.graph("drafter")
    assert g.contract["kind"] == "mtp" and g.contract["kv_layers"] == [3, 4]
    n = TOP_K * 96 // CENTROIDS
    assert g.contract["head"] == ({"kind": "clustered", "clusters": CENTROIDS, "top_k": TOP_K, "candidates": n,
                                   "rows": "fp32", "context": 0}
                                  if ordered else {"kind": "full"})
    assert g.contract["outputs"][-1] == A.NEXT_HIDDEN
    model = onnx.load(str(g.path), load_external_data=False)
    emb = next(t for t in model.graph.initializer if t.name == A.TARGET_EMBEDDING)
    assert {e.key: e.value for e in emb.external_data}["location"] == "target.onnx.data"
    # its own weights (head table included), no copy of the target's [96, 64] embedding
    own = sum(p.numel() for p in assistant.state_dict().values()) - 96 * 32  # lm_head is tied
    assert (bundle / "drafter.onnx.data").stat().st_size < 4 * own + 64 * 80


def test_unshared_embedding_is_copied(pair, tmp_path):
    """share_embedding=False: a standalone drafter.onnx.data holding the target's embedding too."""
    _, drafter_dir, bundle, _ = pair.assistants[False]
    loaded = bundle_mod.load(bundle)
    cfg = A.load_config(drafter_dir, loaded.target_contract)
    A.write(tmp_path, drafter_dir, loaded.graph("target").path, cfg, share_embedding=False)
    shared = (bundle / "drafter.onnx.data").stat().st_size
    assert (tmp_path / "drafter.onnx.data").stat().st_size >= shared + 96 * 64 * 4
    inputs = from_bundle(bundle, pair.ids)
    got = draft(bundle, pair.ids, inputs, graph=tmp_path / "drafter.onnx")
    for s, want in zip(got, draft(bundle, pair.ids, inputs)):
        np.testing.assert_array_equal(s[A.LOGITS], want[A.LOGITS])


def _edited(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    change(hf)
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


@pytest.mark.parametrize("field, change", [
    ("backbone_hidden_size", lambda hf: hf.update(backbone_hidden_size=48)),
    ("text_config.vocab_size", lambda hf: hf["text_config"].update(vocab_size=128)),
    ("full_attention head_dim", lambda hf: hf["text_config"]["per_layer_config"]["3"].update(head_dim=16)),
    ("sliding_attention num_key_value_heads", lambda hf: hf["text_config"].update(num_key_value_heads=1)),
])
def test_mismatched_pair_is_refused(pair, tmp_path, field, change):
    drafter = _edited(pair.assistants[False][1], tmp_path / "drafter", change)
    with pytest.raises(EdgemtpError, match=f"{re.escape(str(drafter))}: gemma4_assistant does not match.*{field}"):
        export(pair.target_dir, tmp_path / "bundle", capacity=64, drafter=drafter)
    assert not (tmp_path / "bundle").exists()  # the bundle is written atomically


@pytest.mark.parametrize("ordered", [False, True])
def test_own_head_beside_a_tied_flag_is_the_head(pair, tmp_path, ordered):
    """tie_word_embeddings true and an lm_head.weight of other values: transformers does not tie them (it warns)
    and scores with lm_head.weight, full or masked head; the drafter scored with the embedding table (logits
    ~3 off)."""
    cfg = transformers.Gemma4AssistantConfig(text_config=dict(ASSISTANT), backbone_hidden_size=TEXT["hidden_size"],
                                             tie_word_embeddings=False, use_ordered_embeddings=ordered,
                                             num_centroids=CENTROIDS, centroid_intermediate_top_k=TOP_K)
    torch.manual_seed(1)
    model = transformers.Gemma4AssistantForCausalLM(cfg)
    _randomize(model)
    if ordered:
        model.masked_embedding.token_ordering.copy_(torch.randperm(ASSISTANT["vocab_size"]))
    model.save_pretrained(tmp_path / "untied")
    drafter = _edited(tmp_path / "untied", tmp_path / "drafter", lambda hf: hf.update(tie_word_embeddings=True))
    model = transformers.Gemma4AssistantForCausalLM.from_pretrained(drafter).eval()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    bundle = export(pair.target_dir, tmp_path / "bundle", capacity=64, drafter=drafter)
    target = transformers.AutoModelForCausalLM.from_pretrained(pair.target_dir).eval()
    steps = draft(bundle, pair.ids, from_transformers(bundle, pair.prefills))
    assert_drafts_are_transformers(steps, target, model, pair, clustered=ordered)


def assert_drafts_are_transformers(steps, target, assistant, pair: Pair, clustered: bool) -> None:
    """Each row's draft steps (draft()'s outputs) are transformers' drafts (reference()): the same tokens, and the
    logits of the clustered head's candidates (or of the whole vocabulary) within 1e-3."""
    for b, n in enumerate(LENGTHS):
        want_tokens, want_logits = reference(target, assistant, pair.ids[b], n, pair.prefills[b])
        np.testing.assert_array_equal([s[A.DRAFT_IDS][b, 0] for s in steps], want_tokens, err_msg=f"row {b}")
        for s, want in zip(steps, want_logits):
            cand, got = (s[A.CANDIDATE_IDS][b, 0], s[A.CANDIDATE_LOGITS][b, 0]) if clustered else \
                (np.arange(len(want)), s[A.LOGITS][b, 0])
            np.testing.assert_allclose(got, want[cand], atol=1e-3, rtol=0, err_msg=f"row {b}")


@pytest.mark.parametrize("field", ["tie_word_embeddings", "use_ordered_embeddings"])
def test_flag_given_as_a_string_is_refused(pair, tmp_path, field):
    """"false" was read as true: an untied assistant's head taken from its embedding table, or a clustered head
    asked of a checkpoint without one (transformers refuses a string there)."""
    drafter = _edited(pair.assistants[False][1], tmp_path / "drafter", lambda hf: hf.update({field: "false"}))
    with pytest.raises(EdgemtpError, match=f"config.json: field '{field}' should be true or false, got 'false'"):
        export(pair.target_dir, tmp_path / "bundle", capacity=64, drafter=drafter)


def test_layer_type_the_target_lacks_is_refused(pair, tmp_path):
    from dataclasses import replace

    _, drafter_dir, bundle, _ = pair.assistants[False]
    target = bundle_mod.load(bundle).target_contract
    only_full = replace(target, drafter_kv={F: 4})
    with pytest.raises(EdgemtpError, match="text_config.layer_types has sliding_attention layers"):
        A.load_config(drafter_dir, only_full)


def assert_greedy_mtp_is_lossless(bundle: Path) -> None:
    """`edgemtp generate --draft mtp` on the bundle gives plain greedy's tokens, and drafted some."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    args = ["generate", str(bundle), "--prompt", "t3 t9 t4 t1 t3 t9", "--max-new-tokens", "16", "--json"]
    plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
    mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", "mtp", "--draft-k", "3"]).stdout)
    assert mtp["tokens"] == plain["tokens"] and mtp["stats"]["drafted"] > 0


def test_generate_with_the_assistant_is_lossless(pair):
    """`edgemtp generate --draft mtp` on a target + assistant bundle gives plain greedy's tokens."""
    for ordered in (False, True):
        assert_greedy_mtp_is_lossless(pair.assistants[ordered][2])


def test_int8_head_rows_keep_the_candidates_and_stay_lossless(pair, tmp_path):
    """--draft-head-rows int8 with an ordered-embedding assistant: the first draft step's candidates are the fp32
    head's, their logits within int8 rounding, its best candidate the same; greedy MTP output equals plain."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    _, drafter_dir, fp32_bundle, _ = pair.assistants[True]
    out = tmp_path / "int8"
    r = CliRunner().invoke(cli, ["export", str(pair.target_dir), "-o", str(out), "--drafter", str(drafter_dir),
                                 "--max-context", "64", "--draft-head-rows", "int8"])
    assert r.exit_code == 0, r.output
    assert bundle_mod.load(out).graph("drafter").contract["head"]["rows"] == "int8"
    inputs = from_bundle(fp32_bundle, pair.ids)
    want, got = draft(fp32_bundle, pair.ids, inputs, k=1)[0], draft(out, pair.ids, inputs, k=1)[0]
    np.testing.assert_array_equal(got[A.CANDIDATE_IDS], want[A.CANDIDATE_IDS])
    spread = np.ptp(want[A.CANDIDATE_LOGITS])
    assert 0 < np.abs(got[A.CANDIDATE_LOGITS] - want[A.CANDIDATE_LOGITS]).max() < 0.05 * spread
    np.testing.assert_array_equal(got[A.DRAFT_IDS], want[A.DRAFT_IDS])
    assert_greedy_mtp_is_lossless(out)


W = 8  # recent tokens an assistant's clustered head scores on request


def full_logits(target, assistant, ids: np.ndarray, n: int, prefill) -> np.ndarray:
    """reference()'s draft steps with the exact logit of every token: the state transformers hands its masked
    embedding, times the assistant's whole head table -> [K, V]."""
    states = []
    hook = assistant.masked_embedding.register_forward_hook(lambda m, args, out: states.append(args[0]))
    try:
        reference(target, assistant, ids, n, prefill)
    finally:
        hook.remove()
    with torch.no_grad():
        return torch.cat([x.reshape(1, -1) for x in states]).matmul(assistant.lm_head.weight.T).numpy()


def test_head_context_on_an_assistant_scores_the_recent_tokens(pair, tmp_path):
    """--draft-head-context on an ordered-embedding assistant: per draft step (fed transformers' drafts), the
    cluster candidates and their logits stay transformers'; each recent token id not already a candidate (nor
    repeated later, nor padding) gets its exact logit; the draft is the best of all of them."""
    assistant, drafter_dir, _, refs = pair.assistants[True]
    out = export(pair.target_dir, tmp_path / "ctx", capacity=64, drafter=drafter_dir, drafter_head_context=W)
    g = bundle_mod.load(out).graph("drafter")
    n = TOP_K * 96 // CENTROIDS
    assert g.contract["head"]["context"] == W and g.contract["head"]["candidates"] == n + W
    assert g.contract["inputs"][-1] == "context_ids"
    session = make_session(g.path, "cpu", 1)
    kv, hidden = from_transformers(out, pair.prefills)
    feed = {f"past_key_values.{layer}.{kind}": kv[layer][i] for layer in g.contract["kv_layers"]
            for i, kind in enumerate(("key", "value"))}
    names = [o.name for o in session.get_outputs()]
    target = transformers.AutoModelForCausalLM.from_pretrained(pair.target_dir).eval()
    full = [full_logits(target, assistant, pair.ids[b], m, pair.prefills[b]) for b, m in enumerate(LENGTHS)]
    history = [list(pair.ids[b, :m + 1]) for b, m in enumerate(LENGTHS)]
    seen = {"scored": 0, "masked": 0, "padding": 0}
    for step in range(K):
        recent = np.full((len(LENGTHS), W), -1, np.int64)
        for b, h in enumerate(history):
            recent[b, W - min(W, len(h)):] = h[-W:]
        token = np.array([[h[-1]] for h in history])
        got = dict(zip(names, session.run(None, {"input_ids": token, "last_hidden_state": hidden,
                                                 "position_ids": np.array(LENGTHS)[:, None],
                                                 "context_ids": recent, **feed})))
        hidden = got[A.NEXT_HIDDEN]
        for b, (want_tokens, want_logits) in enumerate(refs):
            cand, logits, exact = got[A.CANDIDATE_IDS][b, 0], got[A.CANDIDATE_LOGITS][b, 0], full[b][step]
            clusters = np.flatnonzero(want_logits[step] > want_logits[step].min())  # transformers' candidates
            np.testing.assert_array_equal(np.sort(cand[:n]), clusters)
            np.testing.assert_allclose(logits[:n], exact[cand[:n]], atol=1e-3, rtol=0)
            for j, t in enumerate(recent[b]):
                if t < 0 or t in cand[:n] or t in recent[b, j + 1:]:
                    assert logits[n + j] == -np.inf, (step, b, j, t)
                    seen["padding" if t < 0 else "masked"] += 1
                else:
                    assert cand[n + j] == t and abs(logits[n + j] - exact[t]) <= 1e-3, (step, b, j, t)
                    seen["scored"] += 1
            live = np.unique(np.concatenate([cand[:n], recent[b][recent[b] >= 0]]))
            assert got[A.DRAFT_IDS][b, 0] == live[np.argmax(exact[live])]
            history[b].append(int(want_tokens[step]))  # teacher-forced: transformers' trajectory
    assert all(seen.values()), seen  # every case met


def test_generate_with_a_head_context_is_lossless(pair, tmp_path):
    from click.testing import CliRunner

    from edgemtp.cli import cli

    out = tmp_path / "ctx"
    r = CliRunner().invoke(cli, ["export", str(pair.target_dir), "-o", str(out), "--drafter",
                                 str(pair.assistants[True][1]), "--max-context", "64", "--draft-head-context", str(W)])
    assert r.exit_code == 0, r.output
    assert_greedy_mtp_is_lossless(out)


FULL_HEAD = "needs the clustered head, and this assistant has use_ordered_embeddings false, so its full head scores " \
    "every token"


def assert_refused_both_ways(pair, tmp_path, ordered: bool, keyword: str, value, message: str) -> None:
    """export(..., keyword=value) with the assistant drafter refuses it as `keyword=value message` from Python,
    `--flag value message` from the CLI (errors.ArgumentError), and writes nothing."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    drafter, flag = pair.assistants[ordered][1], {"drafter_top_k": "--draft-top-k",
                                                  "drafter_head_context": "--draft-head-context"}[keyword]
    with pytest.raises(ArgumentError) as e:
        export(pair.target_dir, tmp_path / "b", capacity=64, drafter=drafter, **{keyword: value})
    assert (str(e.value), e.value.cli_message()) == (f"{keyword}={value} {message}", f"{flag} {value} {message}")
    r = CliRunner().invoke(cli, ["export", str(pair.target_dir), "-o", str(tmp_path / "b"), "--drafter",
                                 str(drafter), "--max-context", "64", flag, str(value)])
    assert_one_line_error(r, exact=f"{flag} {value} {message}")
    assert not (tmp_path / "b").exists()


def test_head_context_needs_the_ordered_head(pair, tmp_path):
    assert_refused_both_ways(pair, tmp_path, False, "drafter_head_context", 8, FULL_HEAD)


@pytest.mark.parametrize("top_k", [0, 4])
def test_draft_top_k_sets_the_assistants_clusters(pair, tmp_path, top_k):
    """--draft-top-k on an ordered-embedding assistant: k clusters scored (transformers with that
    centroid_intermediate_top_k), or 0: the full head over the assistant's table (use_ordered_embeddings off). It
    was ignored: the bundle kept the checkpoint's k."""
    assistant, drafter_dir, _, _ = pair.assistants[True]
    out = export(pair.target_dir, tmp_path / "b", capacity=64, drafter=drafter_dir, drafter_top_k=top_k)
    head = bundle_mod.load(out).graph("drafter").contract["head"]
    assert head == ({"kind": "full"} if top_k == 0 else {"kind": "clustered", "clusters": CENTROIDS, "top_k": top_k,
                                                           "candidates": top_k * 96 // CENTROIDS, "rows": "fp32",
                                                           "context": 0})
    model = transformers.Gemma4AssistantForCausalLM.from_pretrained(drafter_dir).eval()
    if top_k:
        model.masked_embedding.centroid_intermediate_top_k = top_k
    else:
        model.config.use_ordered_embeddings = False
    target = transformers.AutoModelForCausalLM.from_pretrained(pair.target_dir).eval()
    steps = draft(out, pair.ids, from_transformers(out, pair.prefills))
    assert_drafts_are_transformers(steps, target, model, pair, clustered=bool(top_k))


@pytest.mark.parametrize("ordered, top_k, message", [
    (True, 9, "must be 0 (the full head) or between 1 and the head's 8 clusters"),
    (True, -1, "must be 0 (the full head) or between 1 and the head's 8 clusters"),
    (False, 2, FULL_HEAD),
])
def test_draft_top_k_the_assistant_cannot_take_is_refused(pair, tmp_path, ordered, top_k, message):
    assert_refused_both_ways(pair, tmp_path, ordered, "drafter_top_k", top_k, message)


def test_int8_head_rows_need_the_ordered_head(pair, tmp_path):
    from click.testing import CliRunner

    from edgemtp.cli import cli

    r = CliRunner().invoke(cli, ["export", str(pair.target_dir), "-o", str(tmp_path / "b"), "--drafter",
                                 str(pair.assistants[False][1]), "--max-context", "64", "--draft-head-rows", "int8"])
    assert_one_line_error(r, "--draft-head-rows 'int8'", "needs a clustered head")
    assert not (tmp_path / "b").exists()


def test_accepted_drafts_leave_the_assistant_plain_decodings_state(pair, monkeypatch):
    """The accept path of a target + assistant bundle (the random assistant's own drafts are never accepted):
    drafts replaced by plain greedy's next tokens (all K right in odd calls, only the first in even ones) are
    accepted, and the tokens stay plain greedy's. At every draft call the assistant sees what it sees when each
    round commits one token (drafts always wrong): the same cache length, the target's hidden state at that
    position, and, from the shared KV cache, the same own drafts."""
    from edgemtp.runtime.drafter_session import DrafterSession
    from edgemtp.runtime.requests import Draft

    engine = Engine.load(pair.assistants[True][2])
    prompt = [int(t) for t in pair.ids[0, :LENGTHS[0]]]
    n, k = 16, 3
    plain = list(engine.token_ids(prompt, n))
    own_propose = DrafterSession.propose

    def run(choose) -> tuple[list[int], dict, object]:
        seen = {}  # history length -> (cache length, hidden, the assistant's own drafts)

        def propose(self, history, k, ctx=None):
            own, q = own_propose(self, history, k, ctx)
            seen[len(history)] = (int(ctx.cache.lengths[ctx.row]), np.array(ctx.hidden, copy=True), own)
            return choose(len(seen), plain[len(history) - len(prompt):][:k]), q

        monkeypatch.setattr(DrafterSession, "propose", propose)
        from edgemtp.runtime.speculative import SpecStats

        stats = SpecStats()
        tokens = list(engine.token_stream(prompt, n, draft=Draft("mtp", k), stats=stats))
        return tokens, seen, stats

    def wrong(truth):
        return [(truth[0] + 1) % 96] if truth else []

    one_by_one, reference, ref_stats = run(lambda call, truth: wrong(truth))
    oracle, seen, stats = run(lambda call, truth: truth if call % 2 else truth[:1] + wrong(truth[1:]))
    assert one_by_one == plain and oracle == plain
    assert ref_stats.accepted == 0 and sorted(reference) == list(range(len(prompt) + 1, len(prompt) + n - 1))
    # (no draft when one token is left)
    assert stats.drafted > stats.accepted > stats.rounds // 2  # every round took 1+ drafts, odd calls all K
    assert len(seen) < len(reference) and set(seen) < set(reference)
    for h, (length, hidden, own) in seen.items():
        ref_length, ref_hidden, ref_own = reference[h]
        assert length == ref_length == h - 1
        np.testing.assert_allclose(hidden, ref_hidden, rtol=1e-4, atol=1e-4 * np.abs(ref_hidden).max())
        assert own == ref_own, f"history length {h}"
