"""Engine.load(reuse_prefix=True): a generation keeps its KV cache, and the next prompt that starts with the
same tokens runs only the rest; the output is what a fresh engine generates, token for token."""

from __future__ import annotations

import numpy as np
import pytest

from edgemtp.runtime.engine import Draft, Engine, new_stats
from edgemtp.runtime.sampling import Sampling


@pytest.fixture(scope="module")
def engines(tiny_gemma3):
    bundle = tiny_gemma3[2]
    return Engine.load(bundle, reuse_prefix=True), Engine.load(bundle)


@pytest.mark.parametrize("draft", [None, Draft("lookup", 3)], ids=["plain", "lookup"])
def test_a_conversation_reuses_its_past_and_generates_the_same(engines, draft):
    """Turn after turn, each prompt is the conversation so far plus new words: the reusing engine runs only
    the new tokens (cached_tokens: the previous prompt and all but the last generated token) and generates
    exactly what the fresh engine generates from the whole prompt; greedy and seeded sampling."""
    reuse, fresh = engines
    for sampling in (Sampling(), Sampling(temperature=0.9, top_p=0.95, seed=4)):
        text, ids = "t1 t2 t3 t4", []
        reuse.kept.held = None
        for turn, words in enumerate(["t5 t6", "t7 t8 t9 t10", "t11"]):
            got = reuse.generate(text, 6, sampling, draft)
            want = fresh.generate(text, 6, sampling, draft)
            assert got.tokens == want.tokens and got.text == want.text
            prompt = reuse.encode(text)
            assert got.stats.cached_tokens == (len(ids) - 1 if turn else 0)
            assert got.stats.prefill_tokens == len(prompt) - got.stats.cached_tokens
            ids = prompt + got.tokens
            text = f"{text} {got.text} {words}"


def test_a_prompt_that_parts_early_reuses_only_the_common_start(engines):
    """The same prompt again runs its last token only; another one from its third token on reruns the rest;
    an unrelated one runs whole."""
    reuse, fresh = engines
    reuse.kept.held = None
    first = reuse.generate("t3 t4 t5 t6 t7", 4)
    again = reuse.generate("t3 t4 t5 t6 t7", 4)
    assert again.tokens == first.tokens and (again.stats.cached_tokens, again.stats.prefill_tokens) == (4, 1)
    other = reuse.generate("t3 t4 t9 t9 t9 t9", 4)
    assert other.tokens == fresh.generate("t3 t4 t9 t9 t9 t9", 4).tokens and other.stats.cached_tokens == 2
    unrelated = reuse.generate("t8 t3 t4", 4)
    assert unrelated.tokens == fresh.generate("t8 t3 t4", 4).tokens and unrelated.stats.cached_tokens == 0


def test_a_prompt_that_agrees_again_after_it_parted_reuses_only_the_common_start(engines):
    """A prompt that differs from the kept one in its second token only, the same after it: the positions after
    the difference were computed over another token, so only the first one is reused, and the tokens are a fresh
    engine's (counting every agreeing position, not the run before the first difference, reused 4)."""
    reuse, fresh = engines
    reuse.kept.held = None
    reuse.generate("t3 t4 t5 t6 t7", 4)
    other = reuse.generate("t3 t9 t5 t6 t7 t8", 4)
    assert other.stats.cached_tokens == 1 and other.tokens == fresh.generate("t3 t9 t5 t6 t7 t8", 4).tokens


@pytest.mark.parametrize("draft", [None, Draft("lookup", 3)], ids=["plain", "lookup"])
def test_a_prompt_that_fills_the_cache_runs_over_the_kept_one(engines, draft):
    """A generation run to the capacity keeps a cache that is full (64 positions: the prompt and all but the last
    token generated). Those 64 tokens as the next prompt run only their last over it and give their one token; the
    same with its last token changed, or all but its last two, give a fresh engine's tokens; one token more is
    refused and leaves the kept cache in use."""
    from edgemtp.errors import EdgemtpError

    reuse, fresh = engines
    reuse.kept.held = None
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 96, size=58)]
    first = list(reuse.token_stream(prompt, 100, draft=draft))
    assert first == list(fresh.token_ids(prompt, 100)) and len(prompt) + len(first) == 65
    full = (prompt + first)[:64]
    stats = new_stats(draft)
    assert list(reuse.token_stream(full, 5, draft=draft, stats=stats)) == list(fresh.token_ids(full, 5))
    assert (stats.cached_tokens, stats.prefill_tokens, stats.stop_reason) == (63, 1, "KV capacity reached")
    for other in (full[:-1] + [full[-1] % 95 + 1], full[:-2]):
        assert list(reuse.token_stream(other, 5, draft=draft)) == list(fresh.token_ids(other, 5))
    with pytest.raises(EdgemtpError, match="prompt of 65 tokens does not fit the bundle's KV capacity of 64"):
        reuse.token_stream(prompt + first, 5, draft=draft)
    stats = new_stats(draft)
    assert list(reuse.token_stream(full[:-2], 1, draft=draft, stats=stats)) == list(fresh.token_ids(full[:-2], 1))
    assert stats.cached_tokens == 61


@pytest.mark.parametrize("draft", [None, Draft("lookup", 3)], ids=["plain", "lookup"])
def test_a_one_prompt_batch_reuses_and_keeps_as_generate_does(engines, draft):
    """generate_batch with one prompt is a one-prompt generation: it runs over the kept cache and keeps its
    own; a batch of several prompts neither uses nor replaces what is kept."""
    reuse, fresh = engines
    reuse.kept.held = None
    first = reuse.generate_batch(["t3 t4 t5 t6"], 5, draft=draft)[0]
    assert first.tokens == fresh.generate("t3 t4 t5 t6", 5).tokens and first.stats.cached_tokens == 0
    text = f"t3 t4 t5 t6 {first.text} t7"
    several = reuse.generate_batch([text, "t9 t8"], 5, draft=draft)
    assert [g.tokens for g in several] == [fresh.generate(t, 5).tokens for t in (text, "t9 t8")]
    assert several[0].stats.cached_tokens == 0
    again = reuse.generate_batch([text], 5, draft=draft)[0]
    assert again.tokens == several[0].tokens
    assert again.stats.cached_tokens == len(reuse.encode("t3 t4 t5 t6")) + len(first.tokens) - 1
    assert reuse.generate(text, 5).stats.cached_tokens == len(reuse.encode(text)) - 1  # kept by the batch


def test_a_stream_left_early_keeps_what_it_ran(engines):
    """A consumer that stops reading a stream: the cache keeps the tokens generated so far, and the next
    prompt extending them is right."""
    reuse, fresh = engines
    reuse.kept.held = None
    ids = []
    for token in reuse.token_stream(reuse.encode("t2 t4 t6"), 10):
        ids.append(token)
        if len(ids) == 3:
            break
    follow = "t2 t4 t6 " + reuse.decode(ids) + " t9"
    got = reuse.generate(follow, 5)
    assert got.tokens == fresh.generate(follow, 5).tokens and got.stats.cached_tokens == 3 + 2


def test_the_kept_cache_holds_no_pass_outputs(engines):
    """Between calls the kept cache holds its KV buffers, not the last logits of each pass shape it ran: its kept
    IOBindings held one [1, width, vocab] logits array per verify width (measured on Gemma 3 270M, K = 8
    adaptive: 29 MB, up to 136 MB at K = 15, a 262k vocabulary's 1 MB a position). The next turn is still right."""
    reuse, fresh = engines
    reuse.kept.held = None
    text = "t1 t2 t3 t1 t2 t3 t1"
    for draft in (None, Draft("lookup", 4), Draft("lookup", 6, adaptive=True)):
        first = reuse.generate(text, 12, draft=draft)
        cache = reuse.kept.held[0]
        held = [o for p in cache.passes.values() for o in p.io.get_outputs()[-len(p.names):]]
        assert sum(o.numpy().nbytes for o in held) == 0, f"{draft}: {len(held)} outputs held"
        follow = f"{text} {first.text} t4"
        assert reuse.generate(follow, 6, draft=draft).tokens == fresh.generate(follow, 6, draft=draft).tokens

@pytest.mark.parametrize("draft", [None, Draft("lookup", 3)], ids=["plain", "lookup"])
@pytest.mark.parametrize("after", [False, True], ids=["before-a-pass", "after-a-pass"])
def test_ctrl_c_inside_a_pass_keeps_what_was_run(engines, monkeypatch, draft, after):
    """Ctrl-C (`edgemtp chat` stops the reply and goes on) mostly lands inside a pass, not while the consumer
    reads a token: the cache is kept all the same (it was dropped, and the next turn ran the whole conversation
    again), holding the prompt and the tokens whose pass ended, and what follows is a fresh engine's."""
    reuse, fresh = engines
    reuse.kept.held = None
    calls, forward = [], reuse.target.forward

    def interrupted(*args, **kwargs):  # a signal is raised between bytecodes: before ONNX Runtime's run or after
        calls.append(1)
        out = forward(*args, **kwargs) if after or len(calls) < 4 else None
        if len(calls) == 4:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(reuse.target, "forward", interrupted)
    prompt, shown = reuse.encode("t2 t4 t6 t8"), []
    with pytest.raises(KeyboardInterrupt):
        for token in reuse.token_stream(prompt, 12, draft=draft):
            shown.append(token)
    monkeypatch.undo()
    cache, ids = reuse.kept.held
    run = min(len(ids), len(prompt) + len(shown))  # the last token shown may not have run yet
    assert ids[:run] == (prompt + shown)[:run] and run >= len(prompt) + len(shown) - 1
    assert int(cache.lengths[0]) == len(ids) > len(prompt)
    follow = "t2 t4 t6 t8 " + reuse.decode(shown) + " t9"
    got = reuse.generate(follow, 5, draft=draft)
    assert got.tokens == fresh.generate(follow, 5, draft=draft).tokens
    assert got.stats.cached_tokens >= len(prompt) + len(shown) - 1


def test_an_error_inside_a_generation_keeps_no_cache(engines, monkeypatch):
    """A generation that fails (an error, not Ctrl-C) may have left its state half done: nothing is kept, neither
    its cache nor the one it took, whose positions after the common start it wrote over. The first prompt's next
    turn then runs whole and is a fresh engine's (reusing the cache taken, it read the failed prompt's keys)."""
    reuse, fresh = engines
    reuse.kept.held = None
    first = reuse.generate("t3 t4 t5 t6 t7", 4)
    calls, forward = [], reuse.target.forward

    def failing(*args, **kwargs):  # the prefill runs, then the first decode step fails
        calls.append(1)
        out = forward(*args, **kwargs)
        if len(calls) == 2:
            raise RuntimeError("a pass failed")
        return out

    monkeypatch.setattr(reuse.target, "forward", failing)
    with pytest.raises(RuntimeError, match="a pass failed"):
        reuse.generate("t3 t9 t9 t9 t9 t9", 4)
    monkeypatch.undo()
    assert reuse.kept.held is None
    follow = f"t3 t4 t5 t6 t7 {first.text} t8"
    got = reuse.generate(follow, 4)
    assert got.stats.cached_tokens == 0 and got.tokens == fresh.generate(follow, 4).tokens


def test_off_by_default_and_on_for_static_targets(engines, tiny_gemma3, tmp_path):
    """Without reuse_prefix (the default: repeated prompts measure their whole prefill) nothing is kept; a
    static (NPU) target keeps its cache as a dynamic one does (until session 35 it did not)."""
    from edgemtp.exporters import export

    _, fresh = engines
    fresh.generate("t3 t4 t5", 3)
    assert fresh.generate("t3 t4 t5", 3).stats.cached_tokens == 0 and fresh.kept.held is None
    static = Engine.load(export(tiny_gemma3[1], tmp_path / "s", capacity=64, static_window=3), reuse_prefix=True)
    first = static.generate("t3 t4 t5", 3)
    again = static.generate("t3 t4 t5", 3)
    assert again.stats.cached_tokens == 2 and again.tokens == first.tokens  # the last prompt token runs again


def test_reuse_prefix_switched_after_load(tiny_gemma3):
    """Engine.reuse_prefix, an attribute apps may set after load, turns keeping on and off: off, the cache kept
    so far is let go (the next generation ran over it, cached_tokens 2, and its memory stayed held until then);
    a value that is not a bool is refused, as Engine.load refuses it (a truthy "no" turned keeping on)."""
    from edgemtp.errors import ArgumentError

    engine = Engine.load(tiny_gemma3[2])
    engine.reuse_prefix = True
    first = engine.generate("t3 t4 t5", 3)
    assert engine.reuse_prefix and engine.generate("t3 t4 t5", 3).stats.cached_tokens == 2
    engine.reuse_prefix = False
    assert engine.kept.held is None
    off = engine.generate("t3 t4 t5", 3)
    assert off.tokens == first.tokens and off.stats.cached_tokens == 0 and engine.kept.held is None
    with pytest.raises(ArgumentError, match="reuse_prefix='no' must be True or False"):
        engine.reuse_prefix = "no"
    assert not engine.reuse_prefix


def test_reuse_prefix_switched_off_while_a_generation_keeps_its_cache(tiny_gemma3):
    """reuse_prefix switched off from another thread while a generation keeps its cache (after it saw keeping on,
    before it stored the cache): the cache stayed held on an engine with reuse_prefix off, and the next
    generation ran over it (cached_tokens 2); now it is let go."""
    import threading

    engine = Engine.load(tiny_gemma3[2], reuse_prefix=True)
    engine.generate("t3 t4 t5", 3)

    class SwitchedOffOnClear(dict):  # the kept cache's bindings are let go between the check and the store
        def clear(self):
            super().clear()
            switch = threading.Thread(target=setattr, args=(engine, "reuse_prefix", False))
            switch.start()
            switch.join(60)

    engine.kept.held[0].passes = SwitchedOffOnClear()
    engine.generate("t3 t4 t5", 3)
    assert not engine.reuse_prefix and engine.kept.held is None
    assert engine.generate("t3 t4 t5", 3).stats.cached_tokens == 0
