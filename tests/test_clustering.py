"""Table tests for the clustered head's maths (numpy) and its ONNX graph, on tiny synthetic tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgemtp.calibration import clustering as cl
from edgemtp.errors import EdgemtpError
from edgemtp.exporters import builder, head

D = 16
EMBED = "model.embed_tokens.weight"


def table(vocab: int, seed: int = 0) -> np.ndarray:
    """[V, D] unit-ish rows with some cluster structure (like a real embedding table)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(2, vocab // 20), D))
    rows = centers[rng.integers(0, len(centers), vocab)] + 0.5 * rng.standard_normal((vocab, D))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def hidden(n: int, seed: int = 1) -> np.ndarray:
    return (3.0 * np.random.default_rng(seed).standard_normal((n, D))).astype(np.float32)


@pytest.mark.parametrize("vocab,clusters,sizes", [
    (10, 3, [4, 3, 3]), (9, 3, [3, 3, 3]), (5, 5, [1] * 5), (7, 1, [7]), (11, 4, [3, 3, 3, 2]),
])
def test_cluster_sizes(vocab, clusters, sizes):
    assert cl.cluster_sizes(vocab, clusters).tolist() == sizes


@pytest.mark.parametrize("vocab,clusters", [(1000, 10), (1003, 10), (50, 7), (64, 64), (20, 1), (257, 16)])
def test_ordering_is_a_permutation_with_equal_sizes(vocab, clusters):
    t = cl.cluster_vocab(table(vocab), clusters, seed=0)
    per = -(-vocab // clusters)
    assert t.token_ordering.shape == t.token_mask.shape == (clusters, per)
    assert t.centroids.shape == (clusters, D)
    assert sorted(t.token_ordering[t.token_mask].tolist()) == list(range(vocab))
    assert t.token_mask.sum(axis=1).tolist() == cl.cluster_sizes(vocab, clusters).tolist()
    assert t.vocab_size == vocab
    # padding slots repeat a real token of their own cluster
    for c in range(clusters):
        assert set(t.token_ordering[c]) == set(t.token_ordering[c][t.token_mask[c]])
    assert (t.cluster_of()[t.token_ordering] == np.arange(clusters)[:, None]).all()


def test_divisible_vocab_has_no_padding():
    t = cl.cluster_vocab(table(640), 32, seed=0)
    assert t.token_mask.all() and t.token_ordering.shape == (32, 20)


def test_balanced_assignment_is_exact_even_when_every_row_prefers_one_cluster():
    rows = np.tile(np.eye(4, dtype=np.float32)[:1], (12, 1)) + 0.01 * np.arange(12)[:, None]
    cents = np.eye(4, dtype=np.float32)
    assign = cl.balanced_assign(rows, cents, np.array([3, 3, 3, 3]))
    assert np.bincount(assign, minlength=4).tolist() == [3, 3, 3, 3]


def test_layout_rejects_wrong_counts():
    with pytest.raises(ValueError):
        cl.layout(np.array([0, 0, 0, 1]), np.array([2, 2]))


def test_deterministic_for_a_seed():
    e = table(500)
    a, b = cl.cluster_vocab(e, 20, seed=3), cl.cluster_vocab(e, 20, seed=3)
    assert np.array_equal(a.token_ordering, b.token_ordering)
    assert np.array_equal(a.centroids, b.centroids)
    c = cl.cluster_vocab(e, 20, seed=4)
    assert not np.array_equal(a.token_ordering, c.token_ordering)


@pytest.mark.parametrize("vocab,clusters,top_k,name,flag", [
    (100, 10, 11, "top_k=11 ", "--top-k 11 "), (100, 10, 0, "top_k=0 ", "--top-k 0 "),
    (100, 101, 1, "clusters=101 ", "--clusters 101 "), (100, 0, 1, "clusters=0 ", "--clusters 0 "),
])
def test_bad_sizes_are_rejected_clearly(vocab, clusters, top_k, name, flag):
    """Named as the argument from Python (top_k=11), as the flag from the CLI (--top-k 11)."""
    from edgemtp.errors import ArgumentError

    with pytest.raises(ArgumentError) as caught:
        cl.check_sizes(vocab, clusters, top_k)
    assert str(caught.value).startswith(name) and caught.value.cli_message().startswith(flag)


def test_top_k_above_clusters_is_rejected_by_the_head():
    e = table(100)
    t = cl.cluster_vocab(e, 10)
    with pytest.raises(EdgemtpError, match="^top_k=11 "):
        cl.clustered_logits(hidden(2), e, t, top_k=11)


@pytest.mark.parametrize("vocab,clusters", [(1000, 10), (1003, 10), (50, 7), (20, 1)])
def test_all_clusters_give_the_full_argmax(vocab, clusters):
    e, h = table(vocab), hidden(64)
    t = cl.cluster_vocab(e, clusters)
    assert np.array_equal(cl.clustered_argmax(h, e, t, top_k=clusters), (h @ e.T).argmax(axis=1))


def test_clustered_logits_are_exact_and_padding_is_minus_inf():
    e, h = table(1003), hidden(8)
    t = cl.cluster_vocab(e, 10)
    ids, logits = cl.clustered_logits(h, e, t, top_k=3)
    full = h @ e.T
    valid = np.isfinite(logits)
    assert (~valid).sum(axis=1).max() <= 3 and valid.sum(axis=1).min() >= 3 * 100
    picked = np.argsort(-(h @ t.centroids.T), axis=1, kind="stable")[:, :3]  # the 3 best-scored clusters
    assert np.array_equal(ids, t.token_ordering[picked].reshape(len(h), -1))
    assert np.array_equal(valid, t.token_mask[picked].reshape(len(h), -1)) and not valid.all()  # -inf: padding only
    np.testing.assert_allclose(logits[valid], np.take_along_axis(full, ids, 1)[valid], rtol=1e-5, atol=1e-5)


# --- the ONNX graphs -------------------------------------------------------------------------------

def session(b: builder.GraphBuilder, weights: dict, tmp_path) -> ort.InferenceSession:
    path = tmp_path / f"{b.name}.onnx"
    builder.save(b, path, weights.__getitem__)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def head_weights(e: np.ndarray, t: cl.HeadTables) -> dict:
    return {EMBED: e, "centroids": t.centroids, "token_ordering": t.token_ordering, "token_mask": t.token_mask}


@pytest.mark.parametrize("vocab,clusters,top_k,cap", [
    (1000, 10, 3, None), (1003, 10, 4, 30.0), (50, 7, 2, 5.0), (200, 1, 1, None), (1003, 10, 10, None),
])
def test_onnx_clustered_head_equals_numpy(vocab, clusters, top_k, cap, tmp_path):
    e, h = table(vocab), hidden(32)
    t = cl.cluster_vocab(e, clusters)
    shape = head.ClusteredShape(vocab, D, clusters, top_k)
    sess = session(head.clustered_graph(shape, EMBED, n_top=2, cap=cap), head_weights(e, t), tmp_path)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {head.INPUT: h})))
    ids, logits = cl.clustered_logits(h, e, t, top_k, softcap=cap)
    assert np.array_equal(out[head.CANDIDATE_IDS], ids)
    np.testing.assert_allclose(out[head.CANDIDATE_LOGITS], logits, rtol=1e-5, atol=1e-5)
    best = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    assert np.array_equal(out[head.TOKEN_IDS], np.take_along_axis(ids, best, 1))
    np.testing.assert_allclose(out[head.TOKEN_LOGITS], np.take_along_axis(logits, best, 1), rtol=1e-5, atol=1e-5)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(out[head.TOKEN_PROBS], np.take_along_axis(probs, best, 1), rtol=1e-4, atol=1e-6)


def context_ids(h: np.ndarray, e: np.ndarray, width: int, seed: int = 2) -> np.ndarray:
    """[N, W] recent ids as a runtime passes them: -1 where the history is short, repeats, and the full
    head's argmax at every other row (the copy the context is there for)."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, len(e), (len(h), width))
    ctx[:, 1] = ctx[:, 2]  # a repeat
    ctx[::3, 0] = -1
    ctx[::2, -1] = (h @ e.T).argmax(1)[::2]
    return ctx


@pytest.mark.parametrize("vocab,clusters,top_k,cap,int8", [
    (1000, 10, 1, None, False), (1003, 10, 2, 30.0, False), (1003, 10, 3, None, True), (200, 1, 1, None, False),
])
def test_onnx_clustered_head_with_context_equals_numpy(vocab, clusters, top_k, cap, int8, tmp_path):
    e, h = table(vocab), hidden(32)
    t = cl.cluster_vocab(e, clusters)
    ctx = context_ids(h, e, 6)
    ctx[1, 3] = t.token_ordering[cl.select_clusters(h[1:2], t.centroids, top_k)[0, 0], 0]  # a cluster candidate
    shape = head.ClusteredShape(vocab, D, clusters, top_k, context=6)
    sess = session(head.clustered_graph(shape, EMBED, n_top=2, cap=cap,
                                        int8_ordering=t.token_ordering if int8 else None), head_weights(e, t), tmp_path)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {head.INPUT: h, head.CONTEXT_IDS: ctx})))
    ids, logits = cl.clustered_logits(h, e, t, top_k, softcap=cap, context=ctx)
    assert np.array_equal(out[head.CANDIDATE_IDS], ids)
    got = out[head.CANDIDATE_LOGITS]
    assert np.array_equal(np.isfinite(got), np.isfinite(logits))  # -1, repeats and cluster tokens: -inf
    assert not np.isfinite(logits[1, shape.cluster_candidates + 3]) and not np.isfinite(logits[::3, -6]).any()
    assert not np.isfinite(logits[:, shape.cluster_candidates + 1]).any()  # the first of a repeated pair
    live = np.isfinite(logits)
    assert all(len(set(i[v])) == v.sum() for i, v in zip(ids, live))  # each live token once
    ctx_part = np.s_[:, shape.cluster_candidates:]
    np.testing.assert_allclose(got[ctx_part][live[ctx_part]], logits[ctx_part][live[ctx_part]], rtol=1e-5, atol=1e-5)
    best = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    assert np.array_equal(out[head.TOKEN_IDS], np.take_along_axis(ids, best, 1))
    if not int8:
        np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(out[head.TOKEN_PROBS],
                                   np.take_along_axis(probs / probs.sum(1, keepdims=True), best, 1),
                                   rtol=1e-4, atol=1e-6)


def test_context_recovers_an_argmax_the_clusters_miss():
    e, h = table(1000), hidden(64)
    t = cl.cluster_vocab(e, 10)
    full = (h @ e.T).argmax(1)
    ctx = context_ids(h, e, 4)
    plain = cl.clustered_argmax(h, e, t, 1)
    with_ctx = cl.clustered_argmax(h, e, t, 1, context=ctx)
    assert (plain != full)[::2].sum() >= 5  # one cluster of ten often misses
    assert np.array_equal(with_ctx[::2], full[::2])  # the argmax in the context: found
    in_ctx = (ctx == full[:, None]).any(1)
    assert np.array_equal(with_ctx == full, (plain == full) | in_ctx)  # elsewhere nothing changes


@pytest.mark.parametrize("vocab,clusters", [(1000, 10), (1003, 10)])
def test_onnx_with_all_clusters_equals_the_full_head(vocab, clusters, tmp_path):
    e, h = table(vocab), hidden(64)
    t = cl.cluster_vocab(e, clusters)
    shape = head.ClusteredShape(vocab, D, clusters, clusters)
    clustered = session(head.clustered_graph(shape, EMBED), head_weights(e, t), tmp_path)
    full = session(head.full_graph(vocab, D, EMBED, with_logits=True), {EMBED: e}, tmp_path)
    got = clustered.run([head.TOKEN_IDS, head.TOKEN_PROBS], {head.INPUT: h})
    want = full.run([head.TOKEN_IDS, head.TOKEN_PROBS, head.LOGITS], {head.INPUT: h})
    assert np.array_equal(got[0][:, 0], (h @ e.T).argmax(axis=1))
    assert np.array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4)
    np.testing.assert_allclose(want[2], h @ e.T, rtol=1e-4, atol=1e-4)


def int8_error_bound(h: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """h [N, d], rows [N, K, d] -> [N, K] bound on |int8 dot - exact dot|: each factor is off by at most
    half its quantization step (rows: max |row| / 127 per row; h: its range over all N / 255)."""
    s_r = np.abs(rows).max(axis=-1) / 127
    s_h = (max(h.max(), 0) - min(h.min(), 0)) / 255
    return (np.abs(h)[:, None, :].sum(-1) * s_r / 2 + np.abs(rows).sum(-1) * s_h / 2
            + rows.shape[-1] * s_r * s_h / 4)


def test_int8_blocks_hold_each_clusters_rows_transposed():
    e = table(1003)
    t = cl.cluster_vocab(e, 10)
    shape = head.ClusteredShape(1003, D, 10, 3)
    blocks = head.int8_blocks(t.token_ordering, shape, chunk=3, step=1003)(e)
    scales = head.int8_block_scales(t.token_ordering, shape, step=1003)(e)
    assert blocks.shape == (10, D, shape.per_cluster) and blocks.dtype == np.uint8
    q = blocks.astype(np.int32) - head.INT8_ZERO
    rows = e[t.token_ordering]  # [C, M, D]
    back = q.transpose(0, 2, 1) * scales[..., None]
    assert np.all(np.abs(back - rows) <= scales[..., None] / 2 + 1e-7)
    assert np.array_equal(np.abs(q).max(axis=1), np.full((10, shape.per_cluster), 127))
    # from a transposed view (the table of a --gemv-head target, stored [D, V]): the same bytes
    view = np.ascontiguousarray(e.T).T
    assert not view.flags.c_contiguous
    for step in (100, 4096):  # rows rounded 100 at a time (the last block short), or all at once
        for w in (e, view):
            assert np.array_equal(head.int8_blocks(t.token_ordering, shape, chunk=3, step=step)(w), blocks)
            assert np.array_equal(head.int8_block_scales(t.token_ordering, shape, step=step)(w), scales)


def _mapped_kb(path) -> int:
    """Resident KB of this process's mappings of `path` (Linux: /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:  # closed here: a run under -W error::ResourceWarning fails on one left open
        for line in f:
            first = line.split()[0]
            if "-" in first and ":" not in first:  # a mapping's header line: address range ... path
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_int8_rows_from_a_mapped_transposed_table_read_the_file_not_the_mapping(tmp_path):
    # the default export makes the drafter's int8 rows from the target's transposed table, memory-mapped
    # ([D, V] in its data file, at an offset): the same bytes as from memory, and no page of it mapped
    e = table(20000)
    t = cl.cluster_vocab(e, 20)
    shape = head.ClusteredShape(20000, D, 20, 3)
    path = tmp_path / "target.onnx.data"
    with open(path, "wb") as f:
        f.write(b"\1" * 4096)
        np.ascontiguousarray(e.T).tofile(f)
    mapped = np.memmap(path, np.float32, "r", 4096, (D, 20000)).T
    for step in (1000, 4096):
        assert np.array_equal(head.int8_blocks(t.token_ordering, shape, step=step)(mapped),
                              head.int8_blocks(t.token_ordering, shape, step=step)(e))
        assert np.array_equal(head.int8_block_scales(t.token_ordering, shape, step=step)(mapped),
                              head.int8_block_scales(t.token_ordering, shape, step=step)(e))
    assert _mapped_kb(path) == 0  # 1,250 KB when the slabs were read through the mapping
    assert np.array_equal(np.asarray(mapped[:3]), e[:3]) and _mapped_kb(path) > 0  # the probe sees pages


@pytest.mark.parametrize("vocab,clusters,top_k,cap", [(1000, 10, 3, None), (1003, 10, 4, 30.0), (200, 1, 1, None)])
def test_int8_rows_score_the_same_candidates_within_the_rounding_bound(vocab, clusters, top_k, cap, tmp_path):
    e, h = table(vocab), hidden(32)
    t = cl.cluster_vocab(e, clusters)
    shape = head.ClusteredShape(vocab, D, clusters, top_k)
    sess = session(head.clustered_graph(shape, EMBED, n_top=2, cap=cap, int8_ordering=t.token_ordering),
                   head_weights(e, t), tmp_path)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {head.INPUT: h})))
    ids, logits = cl.clustered_logits(h, e, t, top_k, softcap=cap)
    assert np.array_equal(out[head.CANDIDATE_IDS], ids)
    got = out[head.CANDIDATE_LOGITS]
    real = np.isfinite(logits)
    assert np.array_equal(np.isfinite(got), real)  # padding slots stay -inf
    bound = int8_error_bound(h, e[ids])  # the soft-cap is 1-Lipschitz: the bound holds after it too
    err = np.abs(got - np.where(real, logits, 0))
    assert np.all(err[real] <= bound[real] * 1.001 + 1e-5)
    # the best RESCORE candidates by int8 logit are exact; the others really are the int8 ones
    exact = np.isclose(got, logits, rtol=1e-5, atol=1e-5) & real
    assert np.all(exact.sum(axis=1) >= min(head.RESCORE, shape.candidates))
    assert (err[real] > 1e-4).any()
    best = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    assert np.array_equal(out[head.TOKEN_IDS], np.take_along_axis(ids, best, 1))
    np.testing.assert_allclose(out[head.TOKEN_LOGITS], np.take_along_axis(logits, best, 1), rtol=1e-5, atol=1e-5)


def padded_near_tie() -> tuple[np.ndarray, cl.HeadTables, np.ndarray]:
    """96 tokens in 7 clusters (14 slots, the last two clusters 13 tokens and one padding slot each).
    The picked cluster 6 holds a token B whose int8 logit rounds below seven others' (one of which its
    padding slot repeats) while its exact logit is above theirs: B is the 9th slot by int8 logit,
    the 8th real candidate."""
    vocab, clusters, per = 96, 7, 14
    e = np.zeros((vocab, D), np.float32)
    e[:, 3] = 1.0  # the rest: logit 0 (h reads dimensions 0 and 1 only)
    ordering = np.arange(clusters * per).reshape(clusters, per) % vocab
    ordering[5] = [*range(70, 83), 70]
    ordering[6] = [*range(83, 96), 83]  # the padding slot repeats token 83
    mask = np.ones((clusters, per), bool)
    mask[5:, -1] = False
    ordering[:5] = np.arange(70).reshape(5, per)
    others, b_token = list(range(83, 90)), 90
    for i, t in enumerate(others):  # int8 grid 1/127: int8 and exact logit 129/127
        e[t, :3] = [1.0, 2 / 127, 0.1 * i]
    e[b_token, :3] = [124 / 127, 5.9 / 127, 4.0]  # int8 grid 4/127: int8 logit 128/127, exact 129.9/127
    centroids = np.zeros((clusters, D), np.float32)
    centroids[:, 2] = -1.0
    centroids[6] = 0
    centroids[6, :2] = 1.0
    h = np.zeros((1, D), np.float32)
    h[0, :2] = 1.0  # on uint8's grid: quantized exactly
    return e, cl.HeadTables(centroids, ordering, mask), h


def test_int8_rows_rescore_real_candidates_not_padding(tmp_path):
    """A padding slot repeats a token of its cluster. Rescored before masking, the repeat took one of the
    RESCORE exact places, and a real candidate whose int8 logit was 8th among real ones kept it: the drafted
    token was not the best of the candidates by exact logit (a near-tie the rescore is there for)."""
    e, t, h = padded_near_tie()
    shape = head.ClusteredShape(96, D, 7, 1)
    assert shape.padded and shape.per_cluster == 14
    sess = session(head.clustered_graph(shape, EMBED, int8_ordering=t.token_ordering), head_weights(e, t), tmp_path)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {head.INPUT: h})))
    ids, logits = cl.clustered_logits(h, e, t, 1)
    assert np.array_equal(out[head.CANDIDATE_IDS], ids) and ids[0, 0] == ids[0, -1] == 83
    assert ids[0, logits[0].argmax()] == 90
    assert out[head.TOKEN_IDS][0, 0] == 90
    got = out[head.CANDIDATE_LOGITS]
    assert np.array_equal(np.isfinite(got), np.isfinite(logits))


def test_int8_rows_rescoring_more_places_than_live_candidates_leaves_padding_minus_inf(tmp_path):
    """A tiny head (2 slots per cluster, one cluster kept) rescores both slots of a padded cluster: the
    padding slot must stay -inf, not take its token's exact logit."""
    e, h = table(95), hidden(4)
    t = cl.cluster_vocab(e, 48)
    padded = np.flatnonzero(~t.token_mask.all(1))
    centroids = t.centroids.copy()
    centroids[padded] = 10 * h[0]  # the padded cluster is picked for the first position
    t = t.with_centroids(centroids)
    shape = head.ClusteredShape(95, D, 48, 1)
    assert shape.padded and shape.cluster_candidates < head.RESCORE
    sess = session(head.clustered_graph(shape, EMBED, int8_ordering=t.token_ordering), head_weights(e, t), tmp_path)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {head.INPUT: h})))
    ids, logits = cl.clustered_logits(h, e, t, 1)
    assert not np.isfinite(logits).all()
    assert np.array_equal(np.isfinite(out[head.CANDIDATE_LOGITS]), np.isfinite(logits))
    np.testing.assert_allclose(out[head.CANDIDATE_LOGITS], logits, rtol=1e-5, atol=1e-5)


def test_gemma4_keys_bind_a_flat_ordering(tmp_path):
    """A Gemma 4 assistant stores token_ordering flat [V]; the graph views it as [C, M]."""
    e, h = table(640), hidden(4)
    t = cl.cluster_vocab(e, 32)
    shape = head.ClusteredShape(640, D, 32, 4)
    weights = {EMBED: e, "masked_embedding.centroids.weight": t.centroids,
               "masked_embedding.token_ordering": t.token_ordering.reshape(-1)}
    sess = session(head.clustered_graph(shape, EMBED, keys=head.GEMMA4_KEYS), weights, tmp_path)
    (got,) = sess.run([head.TOKEN_IDS], {head.INPUT: h})
    assert np.array_equal(got[:, 0], cl.clustered_argmax(h, e, t, 4))


# --- calibration and the CLI-facing functions ------------------------------------------------------

def calibration_data(e: np.ndarray, n: int = 600):
    from edgemtp.calibration import centroids as ce
    h = hidden(n, seed=5)
    ids, probs, lse = ce.full_head_top(h, e, top=8)
    return h, ids, probs, lse


def test_full_head_top_matches_numpy():
    from edgemtp.calibration import centroids as ce
    e, h = table(300), hidden(10)
    ids, probs, lse = ce.full_head_top(h, e, top=5, block=3)
    z = h @ e.T
    assert np.array_equal(ids, np.argsort(-z, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(lse, np.log(np.exp(z).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(probs, np.exp(np.take_along_axis(z, ids, 1) - lse[:, None]), rtol=1e-4)


def test_trained_centroids_route_better_than_kmeans():
    from edgemtp.calibration import centroids as ce
    e = table(400)
    t = cl.cluster_vocab(e, 20)
    h, ids, probs, _ = calibration_data(e, 2000)
    cols, w = ce.targets(ids, probs, t.cluster_of())
    trained = t.with_centroids(ce.train_centroids(h[:1500], cols[:1500], w[:1500], t.centroids, epochs=10))
    full = (h[1500:] @ e.T).argmax(1)

    def recall(tables):
        return (cl.clustered_argmax(h[1500:], e, tables, 2) == full).mean()
    assert recall(trained) > recall(t)


def test_refined_tables_are_a_balanced_permutation():
    from edgemtp.calibration import centroids as ce
    e = table(203)
    h, ids, probs, _ = calibration_data(e)
    mass = ce.predicted_mass(ids, probs, len(e)) + 0.01
    t = cl.cluster_vocab_weighted(e, 10, ce.hidden_metric(h), mass.astype(np.float32))
    cols, w = ce.targets(ids, probs, t.cluster_of())
    t = t.with_centroids(ce.train_centroids(h, cols, w, t.centroids, epochs=1))
    assert sorted(t.token_ordering[t.token_mask].tolist()) == list(range(203))
    assert t.token_mask.sum(1).tolist() == cl.cluster_sizes(203, 10).tolist()
    r = ce.refine_assignment(t, h, ids, probs, min_mass=0.5)
    assert sorted(r.token_ordering[r.token_mask].tolist()) == list(range(203))


def groups_of(tables: cl.HeadTables, members: np.ndarray) -> set:
    return set(tables.cluster_of()[members].tolist())


@pytest.mark.parametrize("vocab,clusters,first", [(203, 10, 70), (200, 10, 40), (203, 10, 0), (203, 10, 203),
                                                  (64, 1, 10), (50, 50, 7),
                                                  # the first group spills into the short (M-1) clusters:
                                                  # ceil(first / M) clusters of them hold fewer than `first`
                                                  (203, 10, 84), (203, 10, 185), (50, 7, 16), (101, 10, 55)])
def test_tiered_assign_packs_each_group_into_clusters_of_its_own(vocab, clusters, first):
    rows = table(vocab)
    sizes = cl.cluster_sizes(vocab, clusters)
    a = cl.tiered_assign(rows, [np.arange(first), np.arange(first, vocab)], sizes, refine=1)
    assert np.bincount(a, minlength=clusters).tolist() == sizes.tolist()
    if first and clusters > 1:
        own = np.cumsum(sizes).searchsorted(first, side="left") + 1  # clusters the first group needs
        assert set(a[:first].tolist()) == set(range(own))
        # later tokens only fill the first group's slack (less than one cluster)
        assert (a[first:] < own).sum() == sizes[:own].sum() - first < sizes.max()


def test_in_domain_combines_mass_seen_tokens_and_spelling():
    from edgemtp.calibration import centroids as ce
    mass = np.array([0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    texts = ["abc", "\u4e2d", "\u4e2d\u6587", " x", "", "\ufffd"]
    assert ce.in_domain(mass).tolist() == [False, True, False, False, False, False]
    assert ce.in_domain(mass, seen=np.array([2])).tolist() == [False, True, True, False, False, False]
    assert ce.in_domain(mass, texts).tolist() == [True, True, False, True, False, False]
    assert ce.in_domain(mass, texts, chars={"\u4e2d", "\u6587"}).tolist() == [False, True, True, False, False, False]


@pytest.mark.parametrize("vocab,clusters", [(203, 10), (400, 16)])
def test_packed_tables_are_a_balanced_permutation_and_exact_with_all_clusters(vocab, clusters):
    from edgemtp.calibration import centroids as ce
    e = table(vocab)
    h, ids, probs, _ = calibration_data(e)
    domain = ce.in_domain(ce.predicted_mass(ids, probs, vocab))
    t = ce.packed_tables(e, clusters, h, ids, probs, domain, epochs=1)
    assert t.centroids.shape == (clusters, D)
    assert sorted(t.token_ordering[t.token_mask].tolist()) == list(range(vocab))
    assert t.token_mask.sum(1).tolist() == cl.cluster_sizes(vocab, clusters).tolist()
    held = hidden(40, seed=11)
    assert np.array_equal(cl.clustered_argmax(held, e, t, clusters), (held @ e.T).argmax(1))
    # in-domain tokens fill clusters of their own (but the boundary one)
    per = int(t.token_mask.sum(1).max())
    assert len(groups_of(t, np.flatnonzero(domain))) <= -(-int(domain.sum()) // per) + 1


def test_hit_scores_count_the_selected_clusters():
    from edgemtp.calibration import centroids as ce
    e = table(120)
    h, ids, probs, _ = calibration_data(e, 50)
    t = cl.cluster_vocab(e, 8)
    hits = ce.hit_scores(h, ids, probs, t.centroids, 3, 120).toarray()
    assert hits.shape == (120, 8)
    np.testing.assert_allclose(hits.sum(1), 3 * ce.predicted_mass(ids, probs, 120), rtol=1e-4)
    top = np.argsort(-(h @ t.centroids.T), axis=1)[:, :3]
    assert set(np.flatnonzero(ce.hit_scores(h[:1], ids[:1, :1], np.ones((1, 1), np.float32), t.centroids, 3,
                                            120).toarray()[ids[0, 0]]).tolist()) == set(top[0].tolist())


def test_swap_misplaced_moves_a_stranded_heavy_token_back():
    from edgemtp.calibration import centroids as ce
    e = table(300)
    h, ids, probs, _ = calibration_data(e, 1500)
    t = cl.cluster_vocab(e, 12)
    cols, w = ce.targets(ids, probs, t.cluster_of())
    t = t.with_centroids(ce.train_centroids(h, cols, w, t.centroids, epochs=5))
    mass = ce.predicted_mass(ids, probs, 300)
    heavy = int(np.argmax(mass))
    hits = ce.hit_scores(h, ids, probs, t.centroids, 2, 300).toarray()
    cur = t.cluster_of()
    worst = int(np.argmin(hits[heavy]))
    # strand the heavy token in the cluster least selected where it is predicted
    other = t.token_ordering[worst][t.token_mask[worst]][0]
    cur[heavy], cur[other] = worst, cur[heavy]
    stranded = cl.HeadTables(t.centroids, *cl.layout(cur, t.token_mask.sum(1)))
    fixed, moved = ce.swap_misplaced(stranded, h, ids, probs, k=2)
    assert moved >= 1
    assert sorted(fixed.token_ordering[fixed.token_mask].tolist()) == list(range(300))
    assert fixed.token_mask.sum(1).tolist() == t.token_mask.sum(1).tolist()
    after = fixed.cluster_of()[heavy]
    assert after != worst and hits[heavy, after] > hits[heavy, worst]
    unchanged, none = ce.swap_misplaced(fixed, h, ids, probs, k=2, min_mass=1e9)
    assert none == 0 and np.array_equal(unchanged.token_ordering, fixed.token_ordering)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_onnx_head_top_matches_numpy(softcap):
    from edgemtp.calibration import centroids as ce
    from edgemtp.calibration.collect import head_top
    e, h = table(300), hidden(20)
    ids, probs = head_top(h, e, 7, softcap, threads=1, progress=None, block=8)
    want_ids, want_probs, _ = ce.full_head_top(h, e, top=7, softcap=softcap)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-4, atol=1e-7)


def model_dir(tmp_path, e: np.ndarray):
    from safetensors.numpy import save_file
    d = tmp_path / "model"
    d.mkdir()
    save_file({EMBED: e}, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("calibrated", [False, True])
def test_cluster_model_writes_tables_and_reports(calibrated, tmp_path):
    from edgemtp.calibration import head_report as hr
    e = table(203)
    h, *_ = calibration_data(e)
    path = hr.cluster_model(model_dir(tmp_path, e), tmp_path / "out", clusters=10, top_k=3,
                            calibration=h if calibrated else "none")
    tables, meta = hr.load_head(path)
    assert meta["clusters"] == 10 and meta["top_k"] == 3
    assert meta["method"] == ("packed" if calibrated else "spherical-kmeans")
    assert meta["calibration_positions"] == (len(h) if calibrated else 0)
    assert sorted(tables.token_ordering[tables.token_mask].tolist()) == list(range(203))
    np.save(tmp_path / "held.npy", hidden(50, seed=9))
    report = hr.recall_report(tmp_path / "model", tmp_path / "out", tmp_path / "held.npy", top_ks=(1, 3, 10),
                              speed=True)
    assert report["k"][10]["recall"] == 1.0 and abs(report["k"][10]["mass"] - 1.0) < 1e-4
    assert 0 < report["k"][1]["recall"] <= report["k"][3]["recall"] <= 1.0
    assert report["k"][1]["mass"] <= report["k"][3]["mass"]
    speed = report["speed"]  # the graphs at the tables' k = 3, on the same 50 positions
    assert speed["positions"] == 50 and set(speed["ms"]) == {"full fp32", "clustered fp32 rows", "clustered int8 rows"}
    assert all(v > 0 for v in speed["ms"].values()) and speed["speedup"]["full fp32"] == 1.0
    agree = speed["agreement"]
    assert agree["full fp32"] == 1.0 and agree["clustered fp32 rows"] == report["k"][3]["recall"]
    assert agree["clustered int8 rows"] >= agree["clustered fp32 rows"] - 0.04


def test_head_tables_interrupted_leave_none_of_the_directories_made_for_them(tmp_path, monkeypatch):
    """`edgemtp cluster -o new1/new2/out` stopped while writing its tables (Ctrl-C, a full disk) removed the out
    directory it made but left the empty new1/new2 it had made above it (as exports did: scratch.parents_made)."""
    from edgemtp.calibration import head_report as hr

    tables, meta = hr.load_head(hr.cluster_model(model_dir(tmp_path, table(203)), tmp_path / "a", clusters=10,
                                                 top_k=3, calibration="none"))

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(hr, "as_open_makes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hr.save_head(tmp_path / "new1" / "new2" / "out", tables, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "model"]
    monkeypatch.undo()
    assert hr.save_head(tmp_path / "new1" / "new2" / "out", tables, meta).is_file()  # kept when it succeeds


def test_the_same_tables_make_the_same_head_file(tmp_path):
    """head.safetensors is cached and shipped by its hash: the same tables and metadata are the same bytes
    (safetensors keeps the metadata in a hash map, whose order changed with every file written)."""
    from edgemtp.calibration import head_report as hr
    path = hr.cluster_model(model_dir(tmp_path, table(203)), tmp_path / "a", clusters=10, top_k=3, calibration="none")
    tables, meta = hr.load_head(path)
    again = [hr.save_head(tmp_path / f"again{i}", tables, meta).read_bytes() for i in range(4)]
    assert again == [path.read_bytes()] * 4
    loaded, loaded_meta = hr.load_head(tmp_path / "again0")
    assert loaded_meta == meta and meta["seed"] == 0 and meta["method"] == "spherical-kmeans"
    for name in ("centroids", "token_ordering", "token_mask"):
        got, want = getattr(loaded, name), getattr(tables, name)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_head_records_where_its_calibration_states_came_from(tmp_path):
    """The tables' calibration_source names the states they were fitted on: a file by its path, states given as
    an array as such (or as the caller names them), not "file" whatever they were."""
    from edgemtp.calibration import head_report as hr
    e = table(203)
    h, *_ = calibration_data(e)
    np.save(tmp_path / "states.npy", h)
    d = model_dir(tmp_path, e)

    def source(out, calibration, **kw):
        return hr.load_head(hr.cluster_model(d, tmp_path / out, 10, 3, calibration=calibration, **kw))[1][
            "calibration_source"]

    assert source("f", tmp_path / "states.npy") == str(tmp_path / "states.npy")
    assert source("a", h) == "array"
    assert source("n", h, source="drafter states") == "drafter states"


def test_default_calibration_needs_a_real_model_directory(tmp_path):
    """Without --calibration the model itself is run: a bare table is a clear error, not a crash."""
    from edgemtp.calibration import head_report as hr
    with pytest.raises(EdgemtpError, match="--calibration"):
        hr.cluster_model(model_dir(tmp_path, table(203)), tmp_path / "out", clusters=10, top_k=3)


@pytest.mark.parametrize("kwargs,match", [
    ({"clusters": 10, "top_k": 11}, "^top_k=11 "),  # its argument, as a Python caller wrote it
    ({"clusters": 300, "top_k": 1}, "^clusters=300 "),
    ({"clusters": 10, "top_k": 2, "calibration": np.zeros((5, 3), np.float32)}, r"expected hidden states \[N, 16\]"),
    ({"clusters": 10, "top_k": 2, "calibration": np.full((5, 16), np.nan, np.float32)},
     "5 of 5 hidden states hold NaN or infinity"),
    ({"clusters": 10, "top_k": 2, "calibration": "missing.npy"}, "not found"),
])
def test_cluster_model_rejects_bad_input(kwargs, match, tmp_path):
    from edgemtp.calibration import head_report as hr
    with pytest.raises(EdgemtpError, match=match):
        hr.cluster_model(model_dir(tmp_path, table(203)), tmp_path / "out", **kwargs)


def test_missing_model_and_head_are_clear_errors(tmp_path):
    from edgemtp.calibration import head_report as hr
    with pytest.raises(EdgemtpError, match="safetensors"):
        hr.cluster_model(tmp_path, tmp_path / "out", clusters=2, top_k=1)
    with pytest.raises(EdgemtpError, match="edgemtp cluster"):
        hr.load_head(tmp_path / "nothing")


def _uneven(t: cl.HeadTables) -> cl.HeadTables:
    """t's 50 tokens in 7 clusters of 20, 10, 8, 5, 3, 2 and 2 tokens: [7, 20] tables, the head takes [7, 8]."""
    ids, sizes = np.sort(t.token_ordering[t.token_mask]), [20, 10, 8, 5, 3, 2, 2]
    ordering, mask, start = np.zeros((7, 20), np.int64), np.zeros((7, 20), bool), 0
    for c, n in enumerate(sizes):
        ordering[c] = ids[start]  # padding slots repeat the cluster's first token, as layout() does
        ordering[c, :n], mask[c, :n], start = ids[start:start + n], True, start + n
    return cl.HeadTables(t.centroids, ordering, mask)


def _spoiled(t: cl.HeadTables, slot, value) -> cl.HeadTables:
    ordering = t.token_ordering.copy()
    ordering[slot] = value
    return cl.HeadTables(t.centroids, ordering, t.token_mask)


@pytest.mark.parametrize("spoil, match", [
    (_uneven, r"token_ordering is \[7, 20\]: 50 tokens in 7 clusters take \[7, 8\]"),
    (lambda t: _spoiled(t, (6, 7), 50), r"token_ordering holds 50 at \[6, 7\], not a token id \(0..49\)"),
    (lambda t: _spoiled(t, (6, 7), -1), r"token_ordering holds -1 at \[6, 7\], not a token id \(0..49\)"),
    (lambda t: _spoiled(t, (0, 1), t.token_ordering[0, 0]),
     r"token_ordering's unmasked slots hold token \d+ twice and miss token \d+"),
])
def test_head_tables_the_head_cannot_take_are_refused(spoil, match, tmp_path):
    """Tables not as `edgemtp cluster` makes them (every token in one cluster, clusters of ceil(V / C) slots
    at most, padding slots masked but still token ids): the export failed with a numpy error (a traceback with
    --draft-head-rows int8), or ONNX Runtime's Gather at the first draft, or a token was never drafted."""
    from edgemtp.calibration import head_report as hr

    t = cl.cluster_vocab(table(50), 7, seed=0)
    assert t.token_ordering.shape == (7, 8) and not t.token_mask[6, 7]
    hr.save_head(tmp_path / "h", spoil(t), {"clusters": 7, "top_k": 2})
    with pytest.raises(EdgemtpError, match=match) as e:
        hr.load_head(tmp_path / "h")
    assert str(e.value).startswith(f"{tmp_path / 'h' / 'head.safetensors'}: ")


def test_recall_figures_count_the_context():
    from edgemtp.calibration.head_report import recall_figures

    e, h = table(1000), hidden(64)
    t = cl.cluster_vocab(e, 10)
    ctx = context_ids(h, e, 4)
    fig = recall_figures(h, e, t, top_ks=(1, 10), context=ctx)["k"]
    full = (h @ e.T).argmax(1)
    hit = cl.clustered_argmax(h, e, t, 1) == full
    assert fig[1]["recall"] == pytest.approx(hit.mean())
    assert fig[1]["recall_context"] == pytest.approx((hit | (ctx == full[:, None]).any(1)).mean())
    assert fig[1]["recall_context"] == pytest.approx(
        (cl.clustered_argmax(h, e, t, 1, context=ctx) == full).mean())  # the head the figure describes
    assert fig[10]["recall"] == fig[10]["recall_context"] == 1.0


def test_euclidean_augmentation_ranks_centroids_by_distance():
    rng = np.random.default_rng(3)
    rows, cents = rng.standard_normal((50, D)).astype(np.float32), 2 * rng.standard_normal((7, D)).astype(np.float32)
    aug, cent = cl.euclidean(rows, cents)
    dist = ((rows[:, None] - cents[None]) ** 2).sum(-1)
    np.testing.assert_allclose(aug @ cent.T, -0.5 * dist + 0.5 * (rows ** 2).sum(1)[:, None], rtol=1e-4, atol=1e-4)
    assert np.array_equal((aug @ cent.T).argmax(1), dist.argmin(1))


def test_member_means_are_the_weighted_means_of_each_cluster():
    rng = np.random.default_rng(4)
    rows, w = rng.standard_normal((30, D)).astype(np.float32), rng.uniform(0.1, 5, 30).astype(np.float32)
    assign = np.arange(30) % 4  # cluster 4 of 5 stays empty
    got = cl.member_means(rows, assign, 5, w)
    for c in range(4):
        np.testing.assert_allclose(got[c], np.average(rows[assign == c], axis=0, weights=w[assign == c]), rtol=1e-5,
                                   atol=1e-6)
    assert not got[4].any()
    np.testing.assert_allclose(np.linalg.norm(cl.member_means(rows, assign, 4, unit=True), axis=1), 1, rtol=1e-5)


def test_weighted_tables_centroids_are_the_weighted_mean_head_rows():
    e = table(203)
    w = np.random.default_rng(6).uniform(0.01, 10, 203).astype(np.float32)
    t = cl.cluster_vocab_weighted(e, 10, np.eye(D, dtype=np.float32), w)
    np.testing.assert_allclose(t.centroids, cl.member_means(e, t.cluster_of(), 10, w), rtol=1e-5, atol=1e-6)
    assert not np.allclose(t.centroids, cl.member_means(e, t.cluster_of(), 10), atol=1e-3)


def test_a_full_cluster_keeps_its_best_proposers():
    ids = np.array([[0, 1], [0, 1], [0, 1]])
    scores = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]], np.float32)
    room = np.array([2, 1])
    assert cl.place_in_rounds(ids, scores, room).tolist() == [1, 0, 0] and room.tolist() == [0, 0]


def test_balancing_moves_the_light_row_and_keeps_the_heavy_one():
    """Two rows want cluster 0, which has room for one: unweighted the closer one keeps it; weighted, the
    heavy one does, though it scores a little lower."""
    rows = np.array([[1.0, 0.0], [0.9, 0.1]], np.float32)
    cents, sizes = np.eye(2, dtype=np.float32), np.array([1, 1])
    assert cl.balanced_assign(rows, cents, sizes).tolist() == [0, 1]
    assert cl.balanced_assign(rows, cents, sizes, weights=np.array([1.0, 10.0], np.float32)).tolist() == [1, 0]


def test_targets_are_the_argmax_cluster_mixed_with_the_top_mass():
    from edgemtp.calibration import centroids as ce
    cluster_of = np.array([0, 1, 1, 2])
    ids = np.array([[3, 1, 2], [0, 3, 1]])
    probs = np.array([[0.5, 0.25, 0.25], [0.2, 0.2, 0.1]], np.float32)
    cols, w = ce.targets(ids, probs, cluster_of)
    assert cols.tolist() == [[2], [0]] and w.tolist() == [[1.0], [1.0]]
    cols, w = ce.targets(ids, probs, cluster_of, soft=0.5)
    assert cols.tolist() == [[2, 2, 1, 1], [0, 0, 2, 1]]
    np.testing.assert_allclose(w, [[0.5, 0.25, 0.125, 0.125], [0.5, 0.2, 0.2, 0.1]], rtol=1e-6)


def test_hidden_metric_is_the_square_root_of_the_second_moment():
    from edgemtp.calibration import centroids as ce
    h = hidden(200) @ np.random.default_rng(2).standard_normal((D, D)).astype(np.float32)
    m = ce.hidden_metric(h)
    np.testing.assert_allclose(m, m.T, atol=1e-4)
    np.testing.assert_allclose(m @ m, h.astype(np.float64).T @ h / len(h), rtol=1e-3, atol=1e-2)


def test_packed_tables_pack_the_given_domain():
    """The domain given (here not the predicted tokens) is what fills clusters of its own."""
    from edgemtp.calibration import centroids as ce
    e = table(203)
    h, ids, probs, _ = calibration_data(e)
    domain = np.zeros(203, bool)
    domain[::3] = True  # 68 tokens, predicted or not
    t = ce.packed_tables(e, 10, h, ids, probs, domain, epochs=1, swap=False)
    assert len(groups_of(t, np.flatnonzero(domain))) <= -(-68 // 21) + 1


def test_recall_figures_are_their_definitions_under_a_softcap():
    """mass: the softmax probability (of the softcapped logits) the k best clusters hold; mac_ratio: the full
    head's multiply-adds over the clustered head's (centroids, then k clusters of M rows)."""
    from edgemtp.calibration.head_report import recall_figures
    e, h = table(203), hidden(30)
    t = cl.cluster_vocab(e, 10)
    fig = recall_figures(h, e, t, top_ks=(1, 3), softcap=2.0)
    z = 2.0 * np.tanh((h @ e.T) / 2.0)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    m = t.per_cluster
    for k in (1, 3):
        picked = cl.select_clusters(h, t.centroids, k)
        inside = (t.cluster_of()[None, :, None] == picked[:, None, :]).any(2)  # [N, V]
        assert fig["k"][k]["mass"] == pytest.approx(float((p * inside).sum(1).mean()), rel=1e-4)
        assert fig["k"][k]["mac_ratio"] == pytest.approx(203 * D / (10 * D + k * m * D))
        assert fig["k"][k]["recall"] == pytest.approx((cl.clustered_argmax(h, e, t, k) == z.argmax(1)).mean())


def test_recall_report_refuses_tables_of_another_model(tmp_path):
    from edgemtp.calibration import head_report as hr
    hr.cluster_model(model_dir(tmp_path, table(203)), tmp_path / "out", clusters=10, top_k=3, calibration="none")
    (tmp_path / "other").mkdir()
    other = model_dir(tmp_path / "other", table(210))
    with pytest.raises(EdgemtpError, match="tables are for vocab 203 x hidden 16, the model .* has 210 x 16"):
        hr.recall_report(other, tmp_path / "out", hidden(5))


def swapped(monkeypatch, assign: list, mass: list, rows: dict, **kw) -> tuple[list, int]:
    """swap_misplaced on a hand-made hit matrix: every token is hit on all its mass in its own cluster (so it
    stays), except `rows` {token: [C] scores}. Returns (cluster of each token after, number of swaps)."""
    from scipy.sparse import csr_matrix

    from edgemtp.calibration import centroids as ce
    assign, mass = np.array(assign), np.array(mass, np.float64)
    hits = np.zeros((len(assign), assign.max() + 1))
    hits[np.arange(len(assign)), assign] = mass
    for t, row in rows.items():
        hits[t] = row
    monkeypatch.setattr(ce, "hit_scores", lambda *a, **k: csr_matrix(hits))
    sizes = np.bincount(assign)
    tables = cl.HeadTables(np.zeros((len(sizes), D), np.float32), *cl.layout(assign, sizes))
    out, swaps = ce.swap_misplaced(tables, hidden(1), np.zeros((1, 1), np.int64), np.ones((1, 1), np.float32),
                                   mass=mass, **kw)
    assert out.centroids is tables.centroids
    assert out.token_mask.sum(1).tolist() == sizes.tolist()
    return out.cluster_of().tolist(), swaps


# token 5 (cluster 2) is the only possible mover; cluster 1 holds token 2 (mass 0.5) and token 3 (0.25, the lightest)
SAME, MOVED = [0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 1]
EXACT = dict(min_mass=1.0, max_hit=0.75, gain=1.5)  # binary fractions: the boundaries compare exactly


@pytest.mark.parametrize("mover_mass, row, masses, kw, want", [
    (4.0, [0, 3, 2], {}, EXACT, MOVED),  # own 2 < 0.75*4; best 3 == 1.5*2: exactly `gain` better moves
    (4.0, [0, 2.75, 2], {}, EXACT, SAME),  # best < 1.5 * own
    (4.0, [0, 4.5, 3], {}, EXACT, SAME),  # own == 0.75*4: hit often enough, stays
    (4.0, [0, 4.5, 2.75], {}, EXACT, MOVED),  # own just under 0.75*4
    (1.0, [0, 0.75, 0.5], {}, EXACT, MOVED),  # mass == min_mass is a candidate
    (0.875, [0, 0.75, 0], {}, EXACT, SAME),  # mass < min_mass is not (though token 3 is lighter)
    (4.0, [0, 1, 0], {}, EXACT, MOVED),  # never hit in its own cluster: any hit elsewhere is a gain
    (4.0, [0, 0, 0], {}, EXACT, SAME),  # never hit anywhere: nowhere better to go
    (4.0, [0, 1, 2], {}, dict(EXACT, gain=1.0), SAME),  # its best cluster is its own: no swap, none counted
    (4.0, [0, 3, 2], {2: 8.0, 3: 4.0}, EXACT, SAME),  # the destination's lightest is as heavy as the mover
    (4.0, [0, 3, 2], {2: 8.0, 3: 3.5}, EXACT, MOVED),  # lighter: swaps, though a candidate itself
    (10.0, [0, 12, 7.5], {}, {}, MOVED),  # defaults: min_mass 1, max_hit 0.8, gain 1.5
    (10.0, [0, 13, 8.25], {}, {}, SAME),  # own > 0.8 * mass
    (10.0, [0, 11, 7.5], {}, {}, SAME),  # best < 1.5 * own
    (0.875, [0, 0.75, 0], {}, {}, SAME),  # mass < 1
], ids=[
    "gain-exactly-met", "below-gain", "max-hit-exactly-met", "under-max-hit", "min-mass-exactly",
    "below-min-mass", "never-hit-at-home", "never-hit", "best-is-home", "destination-as-heavy", "destination-lighter",
    "defaults-move", "defaults-max-hit", "defaults-gain", "defaults-min-mass"])
def test_swap_misplaced_rules(monkeypatch, mover_mass, row, masses, kw, want):
    mass = [0.125, 0.375, 0.5, 0.25, 0.0625, mover_mass]
    for t, m in masses.items():
        mass[t] = m
    after, swaps = swapped(monkeypatch, [0, 0, 1, 1, 2, 2], mass, {5: row}, **kw)
    assert (after, swaps) == (want, int(want == MOVED))


@pytest.mark.parametrize("mass, rows, want, swaps", [
    # A (0) gains 3.5 - 2 (ratio 1.75, sum 5.5), B (4) gains 4 - 0: B is first and takes cluster 1's one light
    # token 2; A then meets token 3, heavier than itself, and stays
    ([4, 0.5, 0.25, 8, 4, 0.125], {0: [2, 3.5, 0], 4: [0, 4, 0]}, [0, 0, 2, 1, 1, 2], 1),
    # with token 3 light too, A takes it
    ([4, 0.5, 0.25, 0.5, 4, 0.125], {0: [2, 3.5, 0], 4: [0, 4, 0]}, [1, 0, 2, 0, 1, 2], 2),
    # A (0, gain 2) comes first to cluster 2 but token 4 (mass 3) is too heavy for it; it is left there for
    # B (2, gain 1.5), which is heavier
    ([2, 0.125, 4, 0.25, 3, 8], {0: [0, 0, 2], 2: [0, 0, 1.5]}, [0, 0, 2, 1, 1, 2], 1),
])
def test_swap_misplaced_best_gain_first(monkeypatch, mass, rows, want, swaps):
    assert swapped(monkeypatch, [0, 0, 1, 1, 2, 2], mass, rows, **EXACT) == (want, swaps)


@pytest.mark.parametrize("mass, rows, want", [
    # B (2) moves to cluster 0 first; A (0), lighter than B and cluster 0's lightest, is a mover itself: B takes
    # token 1 instead, and A goes on to cluster 2
    ([2, 3, 4, 0.125, 0.25, 0.5], {0: [0, 0, 1], 2: [4, 0, 0]}, [2, 1, 0, 1, 0, 2]),
    # B (2) swaps with token 4 into cluster 2; token 4, now cluster 1's lightest, is locked there: A (0) takes
    # token 3 instead
    ([4, 0.125, 4, 0.5, 0.25, 8], {0: [0, 2, 0], 2: [0, 0, 4]}, [1, 0, 2, 0, 1, 2]),
])
def test_swap_misplaced_locks_movers_and_swapped_tokens(monkeypatch, mass, rows, want):
    assert swapped(monkeypatch, [0, 0, 1, 1, 2, 2], mass, rows, **EXACT) == (want, 2)


def test_a_damaged_npz_calibration_file_is_closed(tmp_path):
    """np.load hands its open file to NpzFile before the zip is read, so a damaged .npz (a zip's first bytes, then
    not a zip) was left to be closed where it was collected: a ResourceWarning (an app under -W error::ResourceWarning
    saw "Exception ignored"), and the descriptor held until then."""
    import gc
    import warnings

    from edgemtp.calibration import head_report as hr

    path = tmp_path / "damaged.npz"
    path.write_bytes(b"PK\x03\x04 not a zip file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:  # not pytest.raises: its record of the error would keep the file from being collected here
            hr.load_hidden(path, 16)
        except EdgemtpError as e:
            assert "not a .npy / .npz array file" in str(e)
        else:
            pytest.fail("a damaged .npz was read")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_calibration_files_are_read_by_what_they_hold_not_their_name(tmp_path):
    """A .npy array saved under a .npz name raised a TypeError (a traceback from `edgemtp cluster`: np.load gave
    an array, which the .npz branch opened as an archive), and a text file named .npz was called pickled data."""
    from edgemtp.calibration import head_report as hr

    states = np.arange(32, dtype=np.float32).reshape(2, 16)
    np.save(tmp_path / "states.npy", states)
    (tmp_path / "states.npy").rename(tmp_path / "states.npz")
    assert np.array_equal(hr.load_hidden(tmp_path / "states.npz", 16), states)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(EdgemtpError, match=r"text.npz: not a .npy / .npz array file \(it starts with neither"):
        hr.load_hidden(tmp_path / "text.npz", 16)
