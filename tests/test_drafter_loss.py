"""Value tests for the drafter training's shared negatives (loss.sample_negatives) and their seed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgemtp.drafter import train as T  # noqa: E402
from edgemtp.drafter.loss import sample_negatives  # noqa: E402

VOCAB = np.arange(1000, 1100)  # a shortlist apart from the batch's tokens: where each negative came from shows


def batch(seen: int, rows: int = 2) -> dict:
    """Windows [rows, L] whose target top-3 tokens are 0..seen-1 (each row the same ones)."""
    length = max(5, -(-seen // 3))
    top = np.resize(np.arange(seen), length * 3).reshape(1, length, 3).repeat(rows, 0)
    return {"ids": torch.zeros(rows, length, dtype=torch.int64), "top_ids": torch.from_numpy(top)}


def draw(b: dict, n: int, seed: int) -> torch.Tensor:
    return sample_negatives(b, n, VOCAB, torch.Generator().manual_seed(seed))


def test_negatives_follow_the_generators_seed():
    b = batch(15)
    assert torch.equal(draw(b, 16, 7), draw(b, 16, 7))
    assert not torch.equal(draw(b, 16, 7), draw(b, 16, 8))


@pytest.mark.parametrize("n", [16, 17])
def test_half_the_negatives_are_the_batchs_tokens_half_the_shortlists(n):
    out = draw(batch(15), n, 0)
    assert torch.equal(out, torch.unique(out))  # no negative twice (sorted)
    hard, easy = out[out < 1000], out[out >= 1000]
    assert len(hard) == n // 2 and bool((hard < 15).all())  # distinct tokens of the batch's top-k
    assert bool(torch.isin(easy, torch.from_numpy(VOCAB)).all())
    assert n - n // 2 - 2 <= len(easy) <= n - n // 2  # drawn with replacement: a repeat or two merges


def test_a_batch_with_few_tokens_gives_all_of_them_and_fills_up_from_the_shortlist():
    out = draw(batch(5), 40, 0)
    assert out[out < 1000].tolist() == list(range(5))
    assert 30 <= len(out[out >= 1000]) <= 35  # 35 draws from 100 ids


def test_negatives_are_spread_evenly_over_the_batch_and_the_shortlist():
    counts = np.zeros(1100, np.int64)
    for seed in range(300):  # 10 of the batch's 100 tokens and 10 draws from the 100 of the shortlist each
        counts[draw(batch(100), 20, seed).numpy()] += 1
    hard, easy = counts[:100], counts[1000:]
    assert hard.sum() == 3000 and 10 <= hard.min() and hard.max() <= 60  # 30 each on average
    assert 2700 <= easy.sum() <= 3000 and 10 <= easy.min() and easy.max() <= 60
    assert abs(np.average(np.arange(100), weights=hard) - 49.5) < 3
    assert abs(np.average(np.arange(100), weights=easy) - 49.5) < 3
    assert counts[100:1000].sum() == 0


def test_each_training_step_draws_its_own_negatives_from_the_seed(monkeypatch):
    drawn = []

    def loss_fn(model, emb, b, spec, negatives):
        drawn.append(negatives)
        return model.weight.sum() * 0, {}

    monkeypatch.setattr(T, "loss_fn", loss_fn)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cache = {k: v.numpy() for k, v in batch(40, rows=4).items()}  # every row the same tokens
    spec = T.TrainSpec(batch=2, negatives=16)
    for seed, step in [(0, 0), (0, 0), (1, 0), (0, 1), (1, 1)]:
        T._train_step(model, opt, None, cache, step, 10, spec, VOCAB, seed)
    assert torch.equal(drawn[0], drawn[1])  # a resumed run draws what the first run drew
    others = [tuple(d.tolist()) for d in drawn[1:]]
    assert len(set(others)) == 4  # (seed 0, step 1) and (seed 1, step 0) too
