"""Where generation's time goes in its stats, on a clock of the test's own: every path (plain and drafting; generate,
stream and generate_batch; a kept cache's next turn) splits it at the same place. The prefill pass gives the first
token's logits, and prefill_s runs until that token is sampled (its time to first token); decode_s runs from there
to the last token's sampling, over the decode_tokens it produced."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgemtp.runtime import engine as engine_mod
from edgemtp.runtime import speculative as spec_mod
from edgemtp.runtime.engine import Draft, Engine, new_stats

PASS_S = 1.0  # each target pass
FIRST_SAMPLE_S = 100.0  # sampling a prompt's first token, from its prefill's logits
SAMPLE_S = 10.0  # sampling any later token one by one (plain decoding; drafting's rounds choose theirs in acceptance)

DRAFTS = [None, Draft("lookup", 3)]
DRAFT_IDS = ["plain", "lookup"]


@pytest.fixture(scope="module")
def engines(tiny_gemma3):
    bundle = tiny_gemma3[2]
    return Engine.load(bundle), Engine.load(bundle, reuse_prefix=True)


class Clock:
    """The runtime's perf_counter, moved on only by target passes and token sampling, each taking a known time."""

    def __init__(self):
        self.now, self.passes, self.picks, self.after_prefill = 0.0, 0, 0, False

    def read(self) -> float:
        return self.now

    def install(self, monkeypatch, engine: Engine) -> "Clock":
        forward, prefill, pick = engine.target.forward, engine_mod.prefill, engine_mod.pick

        def timed_forward(*args, **kwargs):
            self.now += PASS_S
            self.passes += 1
            return forward(*args, **kwargs)

        def timed_prefill(*args, **kwargs):
            out = prefill(*args, **kwargs)
            self.after_prefill = True
            return out

        def timed_pick(*args, **kwargs):
            self.now += FIRST_SAMPLE_S if self.after_prefill else SAMPLE_S
            self.after_prefill = False
            self.picks += 1
            return pick(*args, **kwargs)

        monkeypatch.setattr(engine.target, "forward", timed_forward)
        for module in (engine_mod, spec_mod):
            monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=self.read))
            monkeypatch.setattr(module, "prefill", timed_prefill)
            monkeypatch.setattr(module, "pick", timed_pick)
        return self


def check_split(stats, clock: Clock, rows: int, tokens: int) -> None:
    """`rows` prompts, one prefill pass each, gave `tokens` tokens in all: their first tokens' sampling is in
    prefill_s, every later pass and sampling in decode_s, and tokens_per_s counts the tokens after the first."""
    assert stats.prefill_s == rows * (PASS_S + FIRST_SAMPLE_S)
    assert stats.decode_s == (clock.passes - rows) * PASS_S + (clock.picks - rows) * SAMPLE_S
    assert stats.decode_tokens == tokens - rows
    assert stats.tokens_per_s == (stats.decode_tokens / stats.decode_s if stats.decode_s else 0.0)


@pytest.mark.parametrize("draft", DRAFTS, ids=DRAFT_IDS)
def test_generate_and_stream_put_the_first_tokens_sampling_in_prefill_s(engines, draft, monkeypatch):
    """Plain decoding counted sampling the first token in decode_s (and left the last one's out), where drafting
    counted it in prefill_s: the two's figures, which users compare, were not on the same clock."""
    engine = engines[0]
    clock = Clock().install(monkeypatch, engine)
    gen = engine.generate("t1 t2 t3 t1 t2 t3 t1 t2", 12, draft=draft)
    assert len(gen.tokens) > 2
    check_split(gen.stats, clock, 1, len(gen.tokens))

    clock = Clock().install(monkeypatch, engine)
    stats = new_stats(draft)
    pieces = list(engine.stream("t1 t2 t3 t1 t2 t3 t1 t2", 12, draft=draft, stats=stats))
    assert "".join(pieces) == gen.text
    check_split(stats, clock, 1, len(gen.tokens))


@pytest.mark.parametrize("draft", DRAFTS, ids=DRAFT_IDS)
def test_a_streams_first_token_comes_with_its_prefill_s_whole(engines, draft, monkeypatch):
    """When the reader holds the first token, prefill_s is its time to first token and nothing is decoded yet;
    one max new token leaves decode_s and tokens_per_s 0."""
    engine = engines[0]
    clock = Clock().install(monkeypatch, engine)
    stats = new_stats(draft)
    stream = engine.token_stream(engine.encode("t1 t2 t3 t1 t2"), 12, draft=draft, stats=stats)
    next(stream)
    assert (stats.prefill_s, stats.decode_s, stats.decode_tokens) == (PASS_S + FIRST_SAMPLE_S, 0.0, 0)
    stream.close()
    check_split(stats, clock, 1, 1)

    clock = Clock().install(monkeypatch, engine)
    gen = engine.generate("t1 t2 t3", 1, draft=draft)
    check_split(gen.stats, clock, 1, 1)
    assert gen.stats.tokens_per_s == 0.0


def test_a_plain_stream_counts_each_token_it_gave(engines, monkeypatch):
    """Read token by token, a plain stream's stats count the tokens given so far, each with its own sampling."""
    engine = engines[0]
    clock = Clock().install(monkeypatch, engine)
    stats = new_stats(None)
    stream = engine.token_stream(engine.encode("t1 t2 t3"), 6, stats=stats)
    given = [next(stream) for _ in range(3)]
    check_split(stats, clock, 1, len(given))
    assert stats.decode_s == 2 * (PASS_S + SAMPLE_S)
    stream.close()


@pytest.mark.parametrize("draft", DRAFTS, ids=DRAFT_IDS)
def test_a_batch_puts_each_rows_first_sampling_in_prefill_s(engines, draft, monkeypatch):
    engine = engines[0]
    clock = Clock().install(monkeypatch, engine)
    gens = engine.generate_batch(["t1 t2 t3 t1 t2", "t4 t5"], 8, draft=draft)
    check_split(gens[0].stats, clock, 2, sum(len(g.tokens) for g in gens))


@pytest.mark.parametrize("draft", DRAFTS, ids=DRAFT_IDS)
def test_a_kept_caches_next_turn_splits_as_a_fresh_one(engines, draft, monkeypatch):
    """reuse_prefix: the next turn's prefill runs only its new tokens, its first token's sampling still in
    prefill_s (generate, and generate_batch of one prompt, which goes through the drafting loop)."""
    engine = engines[1]
    engine.kept.held = None
    first = engine.generate("t1 t2 t3 t1 t2", 6, draft=draft)
    text = f"t1 t2 t3 t1 t2 {first.text} t7 t8"
    clock = Clock().install(monkeypatch, engine)
    gen = engine.generate(text, 6, draft=draft)
    assert gen.stats.cached_tokens > 0
    check_split(gen.stats, clock, 1, len(gen.tokens))

    clock = Clock().install(monkeypatch, engine)
    batch = engine.generate_batch([f"{text} {gen.text} t9"], 6, draft=draft)
    assert batch[0].stats.cached_tokens > 0
    check_split(batch[0].stats, clock, 1, len(batch[0].tokens))


def test_a_specstats_given_to_two_speculative_calls_adds_both(engines, monkeypatch):
    """Speculative.generate adds to the SpecStats it is given (prefill_s, decode_tokens, rounds...), but decode_s
    was the last call's alone: tokens_per_s counted both calls' tokens over one call's time, other_s went
    negative."""
    from edgemtp.runtime.drafting import PromptLookupDrafter
    from edgemtp.runtime.speculative import SpecStats, speculative_generate

    engine = engines[0]
    clock = Clock().install(monkeypatch, engine)
    stats, tokens = SpecStats(), 0
    for prompt in ("t1 t2 t3 t1 t2", "t4 t5 t4 t5"):
        tokens += len(speculative_generate(engine.target, PromptLookupDrafter(), [engine.encode(prompt)], 8, k=3,
                                           stats=stats)[0].tokens)
    check_split(stats, clock, 2, tokens)
    assert stats.other_s == 0.0 and stats.verify_s == stats.decode_s
