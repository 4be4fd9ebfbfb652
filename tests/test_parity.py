"""Parity against transformers on tiny random configs: prefill, then decode steps past 2x the window."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgemtp.exporters import export  # noqa: E402
from edgemtp.runtime.engine import Engine  # noqa: E402

from .reference import assert_chunked_prefill_matches, gemv_ifs, reference_logits, save_tiny  # noqa: E402

WINDOW = 8
CHUNKS = [5, 1, 3, 1, 1, 4] + [1] * 10 + [3] + [1] * 4  # prefill, decode steps and multi-token (verify-like) steps


def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=96 if kind == "llama_hd24" else 64, intermediate_size=96,
                  num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1 if kind == "gemma3_text_mqa" else 2,
                  max_position_embeddings=256)
    if kind.startswith("gemma3_text"):
        cfg = transformers.Gemma3TextConfig(**common, head_dim=32, sliding_window=WINDOW,
                                            layer_types=["sliding_attention", "full_attention"] * 2,
                                            query_pre_attn_scalar=24, final_logit_softcapping=30.0)
        model = transformers.Gemma3ForCausalLM(cfg)
    elif kind == "gemma3_multimodal":  # Gemma 3 4B's layout: model_type gemma3, text_config, a vision tower
        text = dict(common, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4))
    elif kind.startswith("gemma2"):
        # no q/k norms; attention scores capped at 1 (tanh(s), with larger weights: so that the cap shows);
        # gemma2_mqa: one KV head (window views, as Gemma 3 270M)
        cfg = transformers.Gemma2Config(**(common | ({"num_key_value_heads": 1} if kind == "gemma2_mqa" else {})),
                                        head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                        attn_logit_softcapping=1.0, final_logit_softcapping=30.0,
                                        initializer_range=0.3)
        model = transformers.Gemma2ForCausalLM(cfg)
    elif kind == "ministral3":  # YaRN, and queries scaled past the original length (16 here: within the test)
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.5}
        model = transformers.Ministral3ForCausalLM(transformers.Ministral3Config(
            **common, head_dim=32, rope_parameters=rope, initializer_range=0.1, pad_token_id=0))
    elif kind == "mistral3_multimodal":  # Ministral 3's layout: model_type mistral3, text_config, a vision tower
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "llama_4_scaling_beta": 0.5}
        text = dict(common, model_type="ministral3", head_dim=32, rope_parameters=rope, pad_token_id=0)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14, head_dim=8)
        model = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
            text_config=text, vision_config=vision, image_token_index=95))
    elif kind == "granite":  # llama with multipliers: embeddings, residual branches, attention scores, logits
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(
            **common, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
            logits_scaling=4.0, attention_bias=True, initializer_range=0.1))
    elif kind in ("qwen3_yarn", "llama_yarn"):
        # YaRN: frequencies blended over a ramp, cos and sin scaled (qwen3_yarn: Qwen's documented setting, the
        # default betas and attention factor; llama_yarn: DeepSeek-style mscale / mscale_all_dim, other betas, no
        # truncation; larger weights: sharper attention, so that the rotation shows)
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
        if kind == "llama_yarn":
            rope.update(mscale=1.0, mscale_all_dim=0.5, beta_fast=16.0, beta_slow=2.0, truncate=False)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_parameters=rope,
                                                                           initializer_range=0.2))
        else:
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32, rope_parameters=rope,
                                                                           initializer_range=0.2))
    elif kind.startswith("llama"):
        # llama_nope: 'proportional' RoPE rotating no pair (0 was read as unset, 1, and every pair rotated)
        rope = {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.0} \
            if kind == "llama_nope" else {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}
        # llama_bias: larger weights, or q and k are mostly their biases and a layer without RoPE hides
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, attention_bias=kind == "llama_bias",
                                       rope_parameters=rope, initializer_range=0.1 if kind == "llama_bias" else 0.02)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind.startswith("mistral"):  # every layer slides; mistral_nowindow: sliding_window null; mistral_wide: 24
        window = {"mistral_nowindow": None, "mistral_wide": 3 * WINDOW}.get(kind, WINDOW)
        cfg = transformers.MistralConfig(**common, sliding_window=window,
                                         initializer_range=0.1, tie_word_embeddings=False)
        model = transformers.MistralForCausalLM(cfg)
    elif kind.startswith("phi3"):
        # fused qkv_proj / gate_up_proj; tied but phi3_sliding. phi3: 3/4 of each head of 16 rotated (apply_rope);
        # phi3_longrope: heads of 32 rotated by GroupQueryAttention from LongRoPE's short factors, cos and sin
        # scaled by its attention factor (max_position_embeddings 4x the original 64: 1.155); phi3_sliding: that
        # and a window on every layer (sliding_window)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
        extra = {"tie_word_embeddings": True}
        if kind != "phi3":
            short = (1.0 + 0.5 * torch.rand(16)).tolist()  # one per rotated pair
            rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": [4.0] * 16}
            extra = dict(num_attention_heads=2, num_key_value_heads=1, original_max_position_embeddings=64,
                         tie_word_embeddings=kind == "phi3_longrope")
        if kind == "phi3_sliding":
            extra.update(sliding_window=WINDOW, initializer_range=0.1)
        cfg = transformers.Phi3Config(**(common | extra), rope_parameters=rope, pad_token_id=0, eos_token_id=1)
        model = transformers.Phi3ForCausalLM(cfg)
    elif kind.startswith("smollm3"):
        # the 4th layer without RoPE; smollm3_sliding: that layer slides too (use_sliding_window), and every
        # layer has attention biases; smollm3_types: layer_types names the 4th sliding without use_sliding_window
        # (transformers' mask still slides it by sliding_window)
        extra = {"smollm3_sliding": dict(use_sliding_window=True, sliding_window=WINDOW, attention_bias=True,
                                         initializer_range=0.1),
                 "smollm3_types": dict(use_sliding_window=False, sliding_window=WINDOW, initializer_range=0.1,
                                       layer_types=["full_attention"] * 3 + ["sliding_attention"])}.get(kind, {})
        model = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**common, **extra, pad_token_id=0,
                                                                           bos_token_id=1, eos_token_id=2))
    elif kind.startswith("qwen3"):
        # per-head q/k norms; head_dim 32 (not hidden / heads), 24 for qwen3_hd24 (q and k normed and rotated
        # before GroupQueryAttention, which refuses to rotate that size); qwen3_bias: attention_bias on q/k/v
        # and o_proj; qwen3_sliding: layers 2 and 3 slide
        extra = {"qwen3_bias": dict(attention_bias=True, initializer_range=0.1),  # larger: as llama_bias
                 "qwen3_sliding": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                       initializer_range=0.1)}.get(kind, {})
        cfg = transformers.Qwen3Config(**common, head_dim=24 if kind == "qwen3_hd24" else 32,
                                       tie_word_embeddings=kind != "qwen3_bias", **extra)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        # transformers' qwen2 has q/k/v biases whatever attention_bias says; qwen2_sliding: layers 2 and 3 slide
        # (use_sliding_window from max_window_layers on), qwen2_sliding_types: layer_types alternate
        # (larger weights: sharper attention, so that a missing window shows well past the tolerance)
        sliding = {"qwen2_sliding": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
                   "qwen2_sliding_types": dict(use_sliding_window=True, sliding_window=WINDOW,
                                               layer_types=["sliding_attention", "full_attention"] * 2)}
        sliding = {k: {**v, "initializer_range": 0.1} for k, v in sliding.items()}
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False, **sliding.get(kind, {}),
                                       **({"attention_bias": False} if kind == "qwen2_bias_false" else {}))
        model = transformers.Qwen2ForCausalLM(cfg)
    _randomize_norms(model)
    return model.eval()


def _randomize_norms(model) -> None:
    """Random init leaves norms at 0/1, which would hide a (1 + w) mistake. Each is spread around its own
    init (1 for a w * x norm, 0 for Gemma's (1 + w) and for biases): a list of model types centred qwen2's and
    ministral3's w * x norms at 0, which shrank their activations until attention was near uniform and a
    layer without RoPE moved qwen2's logits by 1e-4 (the tolerance is 1e-3)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.3 + p.mean())


SLIDING_KINDS = {"qwen2_sliding", "qwen2_sliding_types", "qwen3_sliding", "mistral", "phi3_sliding", "smollm3_sliding",
                 "smollm3_types"}


@pytest.mark.parametrize("kind", ["gemma3_text", "gemma3_text_mqa", "llama", "llama_hd24", "llama_bias", "llama_nope",
                                  "qwen2", "qwen2_sliding", "qwen2_sliding_types",
                                  "qwen2_bias_false", "gemma3_text_mqa+gemv", "qwen2+gemv",
                                  "qwen3", "qwen3_hd24", "qwen3_bias", "qwen3_sliding", "qwen3_bias+gemv",
                                  "mistral", "mistral_nowindow", "phi3", "phi3_longrope", "phi3_sliding",
                                  "gemma2", "gemma2_mqa", "smollm3", "smollm3_sliding",
                                  "smollm3_types", "gemma3_multimodal", "qwen3_yarn", "llama_yarn", "granite",
                                  "ministral3", "mistral3_multimodal"])
def test_logits_match_transformers(kind, tmp_path, monkeypatch):
    """Sliding layers read their buffers from TargetContract.window_offset on, which moves 5 times over these steps:
    in place with one KV head (gemma3_text_mqa, as Gemma 3 270M), a copy with two (the rest; the Llama family's
    sliding layers too: qwen2/qwen3/smollm3 sliding, mistral, phi3_sliding). Graphs with no sliding layer have no
    window inputs (their contract is the one older runtimes read).
    llama_hd24: head size 24, which
    GroupQueryAttention refuses to rotate itself (q and k are rotated before it). +gemv: export --gemv-head,
    whose one-position passes take the transposed head (tied in Gemma 3, lm_head in Qwen2). llama_bias: llama's
    attention_bias, biases on q/k/v and o_proj. qwen2_bias_false: config.json says attention_bias false, which
    transformers' qwen2 ignores (q/k/v biases all the same). qwen3: q and k RMS-normed per head before RoPE.
    mistral: a window on every layer. phi3: fused weights, partial RoPE, LongRoPE (see tiny()). gemma2: Gemma 3
    without q/k norms, attention scores soft-capped. smollm3: a layer without RoPE; smollm3_types: a sliding
    layer named by layer_types alone (was read as a full one). gemma3_multimodal: the text tower of a
    Gemma3ForConditionalGeneration checkpoint (model.language_model.*, a vision tower beside it).
    Then the runtime's prefill over the same ids in chunks of 10 (past the window, at moving window offsets)."""
    kind, _, head = kind.partition("+")
    model = tiny(kind)
    model_dir = save_tiny(model, tmp_path / "model")
    export(model_dir, tmp_path / "bundle", capacity=64, gemv_head=head == "gemv")
    engine = Engine.load(tmp_path / "bundle")
    contract = engine.target.contract
    assert contract.window_views == any(s.window for s in contract.kv)
    assert contract.window_views == (kind.startswith("gemma") or kind in SLIDING_KINDS), [s.window for s in contract.kv]
    assert gemv_ifs(tmp_path / "bundle") == (head == "gemv")  # else a +gemv case is its plain one over again
    if contract.window_views:
        assert {contract.window_offset(n) for n in range(sum(CHUNKS))} == {0, 4, 8, 12, 16, 20}
    ids = np.random.default_rng(1).integers(0, 96, size=(1, sum(CHUNKS)))
    ref = reference_logits(model, ids, CHUNKS)
    with torch.no_grad():  # the state an MTP drafter reads: transformers' last hidden state, after the final norm
        want_hidden = model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states[-1][0].numpy()
    cache = engine.target.new_cache(1)
    start = 0
    for n, want in zip(CHUNKS, ref):
        got, hidden = engine.target.forward(ids[:, start:start + n], cache, n_logits=n)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=f"{kind} at position {start}")
        np.testing.assert_allclose(hidden[0], want_hidden[start:start + n], atol=1e-3, rtol=0,
                                   err_msg=f"{kind}'s hidden state at position {start}")
        start += n
    assert start > 2 * WINDOW
    # several KV heads on the sliding layers: the one-row passes from an offset on bound copies (kv_cache's shadows)
    assert bool(cache._shadows) == (contract.window_views and any(s.window and s.num_heads > 1 for s in contract.kv))
    assert_chunked_prefill_matches(engine.target, ids, np.concatenate(ref, axis=1), want_hidden, monkeypatch, 10)


@pytest.mark.parametrize("kind", ["qwen2_sliding", "qwen3_sliding", "mistral", "phi3_sliding", "gemma2",
                                  "gemma3_text", "smollm3_sliding", "ministral3"])
def test_sliding_qwen_verify_graph_matches_transformers(kind, tmp_path):
    """The batched verify graph (several rows x several new positions) windows qwen2's, qwen3's and mistral's
    sliding layers as transformers does (qwen3 normalizing q and k before rotating them itself): rows of different
    lengths past twice the window, each against its own reference. gemma3_text: Gemma 3's q/k norms, taken per head
    before this graph rotates q and k (in the target graph GroupQueryAttention rotates them)."""
    model = tiny(kind)
    export(save_tiny(model, tmp_path / "model"), tmp_path / "bundle", capacity=64)
    engine = Engine.load(tmp_path / "bundle")
    windows = {"mistral": [WINDOW] * 4, "phi3_sliding": [WINDOW] * 4, "gemma2": [WINDOW, None] * 2,
               "gemma3_text": [WINDOW, None] * 2,
               "smollm3_sliding": [None, None, None, WINDOW], "ministral3": [None] * 4}.get(
        kind, [None, None, WINDOW, WINDOW])
    assert [s.window for s in engine.target.contract.kv] == windows
    rows = np.random.default_rng(3).integers(0, 96, size=(2, 27))
    lengths = (24, 17)
    cache = engine.target.new_cache(2)
    for r, n in enumerate(lengths):
        engine.target.forward(rows[r:r + 1, :n], cache, rows=slice(r, r + 1))
    new = np.stack([rows[r, n:n + 3] for r, n in enumerate(lengths)])
    got, _ = engine.target.forward(new, cache, n_logits=3)  # two rows, three positions: the verify graph
    assert engine.target._verify is not None
    for r, n in enumerate(lengths):
        want = reference_logits(model, rows[r:r + 1, :n + 3], [n + 3])[0][0, n:]
        np.testing.assert_allclose(got[r], want, atol=1e-3, rtol=0, err_msg=f"row {r}")


def test_reused_bindings_equal_fresh_ones(tmp_path, monkeypatch):
    """Small passes keep their IOBinding in the cache (runtime/target.py, _Pass): the same logits as binding
    everything afresh, bit for bit, as the window offset moves and n_logits changes, and an array handed
    out by one step is not overwritten by the next."""
    import edgemtp.runtime.target as T

    model = tiny("gemma3_text_mqa")
    export(save_tiny(model, tmp_path / "model"), tmp_path / "bundle", capacity=64)
    engine = Engine.load(tmp_path / "bundle")
    ids = np.random.default_rng(2).integers(0, 96, size=(1, sum(CHUNKS)))

    def run():
        cache, start, outs = engine.target.new_cache(1), 0, []
        for n in CHUNKS:
            logits, hidden = engine.target.forward(ids[:, start:start + n], cache, n_logits=n)
            outs.append((logits, logits.copy(), hidden.copy()))
            start += n
        return cache, outs

    cache, reused = run()
    assert len(cache.passes) >= 3  # decode steps, 3- and 4-token windows, n_logits 1 / 3 / 4
    monkeypatch.setattr(T, "REUSED_PASS_MAX", 0)
    cache, fresh = run()
    assert not cache.passes
    for (kept, at_once, hidden), (_, want, want_hidden) in zip(reused, fresh):
        np.testing.assert_array_equal(kept, at_once)  # not overwritten by later steps
        np.testing.assert_array_equal(at_once, want)
        np.testing.assert_array_equal(hidden, want_hidden)



def test_a_target_on_a_device_provider_binds_each_pass_afresh(tmp_path):
    """A provider that copies inputs to its device at bind time (CUDA, DirectML) would read a kept pass's first
    numbers at every step: the ids and positions written in place after it, and the KV cache as it was then (the
    steps since, which the pass wrote back, unread). Only a target on the CPU keeps its passes; elsewhere each
    pass binds afresh, and its logits are the CPU's."""
    from edgemtp.runtime.target import Target

    from .device_session import DeviceSession

    export(save_tiny(tiny("gemma3_text_mqa"), tmp_path / "model"), tmp_path / "bundle", capacity=64)
    cpu = Engine.load(tmp_path / "bundle").target
    device = Target(DeviceSession(cpu.session), cpu.contract)
    ids = np.random.default_rng(3).integers(0, 96, size=(1, sum(CHUNKS)))
    caches, start = (cpu.new_cache(1), device.new_cache(1)), 0
    for n in CHUNKS:
        want, got = (t.forward(ids[:, start:start + n], c, n_logits=n)[0] for t, c in zip((cpu, device), caches))
        np.testing.assert_array_equal(got, want, err_msg=f"at position {start}")
        start += n
    assert not caches[1].passes


def _parity_with_config(model, tmp_path, patch) -> None:
    """config.json patched as a checkpoint may have it, transformers' model reloaded from it, logits compared."""
    model_dir = save_tiny(model, tmp_path / "model")
    path = model_dir / "config.json"
    hf = json.loads(path.read_text())
    patch(hf)
    path.write_text(json.dumps(hf))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    exported_logits_match(model, model_dir, tmp_path, vocab=96)


def exported_logits_match(model, model_dir, tmp_path, vocab: int, name: str = "") -> None:
    """`model_dir` exported (capacity 64) gives transformers' `model`'s logits within 1e-3 over CHUNKS of random
    ids: a prefill, decode steps and multi-token steps."""
    export(model_dir, tmp_path / "bundle", capacity=64)
    engine = Engine.load(tmp_path / "bundle")
    ids = np.random.default_rng(1).integers(0, vocab, size=(1, sum(CHUNKS)))
    cache, start = engine.target.new_cache(1), 0
    for n, want in zip(CHUNKS, reference_logits(model, ids, CHUNKS)):
        got, _ = engine.target.forward(ids[:, start:start + n], cache, n_logits=n)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=f"{name} at position {start}")
        start += n


@pytest.mark.parametrize("case", ["top_level", "missing", "missing_factor"])
def test_yarn_original_length_read_as_transformers(case, tmp_path):
    """standardize_rope_params: a top-level original_max_position_embeddings wins over the parameters' (was
    ignored: logits off by several units); none at all is max_position_embeddings (was refused), and yarn
    without a factor takes max_position_embeddings / original_max_position_embeddings."""
    torch.manual_seed(0)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters=rope, initializer_range=0.2))
    _randomize_norms(model)

    def patch(hf):
        rp = hf["rope_parameters"]
        if case == "top_level":
            hf["original_max_position_embeddings"], rp["original_max_position_embeddings"] = 8, 64
        else:
            del rp["original_max_position_embeddings"]
            hf["max_position_embeddings"] = 16
            if case == "missing_factor":
                hf["max_position_embeddings"] = 64
                rp["original_max_position_embeddings"] = 16
                rp["factor"] = None
    _parity_with_config(model, tmp_path, patch)


@pytest.mark.parametrize("case", ["truncate_false", "missing_original"])
def test_gemma3_yarn_full_layers_as_transformers(case, tmp_path):
    """Gemma 3 with YaRN on its full layers (rope_parameters per layer type): transformers reads `truncate` from
    the outer dict, which never has it, so the ramp's bounds are always rounded (truncate false was honoured:
    logits off by 0.05), and a missing original_max_position_embeddings is max_position_embeddings (was
    refused)."""
    torch.manual_seed(0)
    full = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 16,
            "beta_fast": 8.0, "beta_slow": 0.5}
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, head_dim=32, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2, initializer_range=0.2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "full_attention": full}))
    _randomize_norms(model)

    def patch(hf):
        rp = hf["rope_parameters"]["full_attention"]
        if case == "truncate_false":
            rp["truncate"] = False
        else:
            del rp["original_max_position_embeddings"]
    _parity_with_config(model, tmp_path, patch)


@pytest.mark.parametrize("case", ["theta_top_level", "full_only", "scaling_over_parameters"])
def test_gemma3_rope_fields_merged_as_transformers(case, tmp_path):
    """Gemma3TextConfig's RoPE: rope_parameters per layer type, a base neither gives from the top-level
    rope_theta (full layers) and rope_local_base_freq (sliding layers), and rope_scaling, where set, updated into
    the full layers' parameters. Those bases were taken as 1e6 and 1e4, and rope_scaling beside rope_parameters
    ignored: logits off by 0.3 to 0.8."""
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, head_dim=32, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2, initializer_range=0.1))
    _randomize_norms(model)

    def patch(hf):
        rp = hf["rope_parameters"]
        if case == "theta_top_level":
            del rp["full_attention"]["rope_theta"], rp["sliding_attention"]["rope_theta"]
            hf.update(rope_theta=300.0, rope_local_base_freq=50.0)
        elif case == "full_only":
            del rp["sliding_attention"]
            hf["rope_local_base_freq"] = 50.0
        else:
            hf["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
    _parity_with_config(model, tmp_path, patch)


# Published config.json files as their checkpoints ship them (transformers 4.x spellings), sizes shrunk (hidden,
# heads in their ratio, head_dim, layers, vocab, sliding windows to WINDOW, LongRoPE's factors to every 6th) and
# token ids renumbered below the vocabulary; every other field as published.
PUBLISHED = {
    "Llama-3.1-8B": {  # rope_scaling (not rope_parameters) of type llama3, rope_theta beside it, untied head
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 96, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 1, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 160},
    "Phi-3.5-mini-instruct": {  # LongRoPE as "type", auto_map, a window far past any context
        "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "microsoft/Phi-3.5-mini-instruct--configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "microsoft/Phi-3.5-mini-instruct--modeling_phi3.Phi3ForCausalLM"},
        "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 131072,
        "model_type": "phi3", "num_attention_heads": 2, "num_hidden_layers": 4, "num_key_value_heads": 2,
        "original_max_position_embeddings": 4096, "pad_token_id": 2, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": [1.0800000429153442, 1.6200000047683716, 7.700000286102295,
                                         30.420001983642578, 50.340003967285156, 62.61000442504883,
                                         63.93000411987305, 64.12000274658203],
                         "short_factor": [1.0, 1.0499999523162842, 1.1599998474121094, 1.7899998426437378,
                                          1.9899996519088745, 2.0199997425079346, 2.0299997329711914,
                                          2.189999580383301],
                         "type": "longrope"},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3", "use_cache": True, "vocab_size": 160},
    "gemma-3-1b-it": {  # sliding_window_pattern, no layer_types; rope_local_base_freq; an eos list
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 1, "cache_implementation": "hybrid", "eos_token_id": [2, 3],
        "final_logit_softcapping": None, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 72, "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 6, "num_key_value_heads": 1,
        "pad_token_id": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": WINDOW, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 160},
    "gemma-3-27b-it": {  # a text_config left to Gemma3TextConfig's defaults but for linear scaling (full layers)
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 150, "eoi_token_index": 151,
        "eos_token_id": [1, 2], "image_token_index": 152, "initializer_range": 0.02, "mm_tokens_per_image": 4,
        "model_type": "gemma3",
        "text_config": {"head_dim": 16, "hidden_size": 42, "intermediate_size": 96, "model_type": "gemma3_text",
                        "num_attention_heads": 2, "num_hidden_layers": 6, "num_key_value_heads": 1,
                        "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": WINDOW, "vocab_size": 160},
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
        "vision_config": {"hidden_size": 16, "image_size": 28, "intermediate_size": 32,
                          "model_type": "siglip_vision_model", "num_attention_heads": 2, "num_hidden_layers": 1,
                          "patch_size": 14, "vision_use_head": False}},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_json_matches_transformers(name, tmp_path):
    """config.json as published, not as save_pretrained rewrites it (every other case here): transformers' model is
    the one it loads from that file, random weights larger than its init so that RoPE scaling and windows show."""
    hf = PUBLISHED[name]
    cls = transformers.AutoModelForImageTextToText if "text_config" in hf else transformers.AutoModelForCausalLM
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(0)
    model = cls.from_config(transformers.AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    _randomize_norms(model)
    save_tiny(model, model_dir)
    (model_dir / "config.json").write_text(json.dumps(hf))
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    exported_logits_match(model, model_dir, tmp_path, vocab=160, name=name)


def test_gemma3_missing_max_positions_is_transformers_default():
    """Gemma3TextConfig's max_position_embeddings is 131,072 where config.json has none (was 32,768 here): the
    length --max-context may reach, and the original length of a YaRN without one (its slow pairs' frequencies
    were up to 2x off transformers')."""
    from edgemtp.config import FULL, parse_gemma3
    from edgemtp.exporters.rotary import inv_freq

    hf = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                               "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}})
    cfg = parse_gemma3(json.loads(json.dumps(hf)), "x")  # a copy: transformers fills in the dicts it is given
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**hf))
    assert cfg.max_position_embeddings == model.config.max_position_embeddings == 131_072
    want = dict(model.model.rotary_emb.named_buffers())["full_attention_inv_freq"].numpy()
    np.testing.assert_allclose(inv_freq(cfg.rope[FULL], 32), want, rtol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_head_size_groupqueryattention_refuses_is_named_at_export(kind, tmp_path):
    """ONNX Runtime's GroupQueryAttention runs only head sizes that are multiples of 8, and says so at the first
    forward, not at load: a head of 18 exported a bundle that failed its first token with an ONNX Runtime
    traceback. The dynamic export is refused naming head_dim; the static graph (standard ops) matches
    transformers."""
    from edgemtp.errors import EdgemtpError

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=18)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]))
    _randomize_norms(model)
    model_dir = save_tiny(model.eval(), tmp_path / "model")
    for quant in ("fp32", "fp16", "int8"):
        with pytest.raises(EdgemtpError, match=r"config.json: head_dim 18 is not supported by the dynamic graphs "
                                               r"\(ONNX Runtime's GroupQueryAttention needs a multiple of 8\)"):
            export(model_dir, tmp_path / quant, quant, capacity=64)
        assert not (tmp_path / quant).exists()
    engine = Engine.load(export(model_dir, tmp_path / "static", capacity=64, static_window=5))
    ids = np.random.default_rng(1).integers(0, 96, size=(1, 12))
    cache, start = engine.target.new_cache(1), 0
    for n, want in zip([5, 1, 1, 5], reference_logits(model, ids, [5, 1, 1, 5])):
        got, _ = engine.target.forward(ids[:, start:start + n], cache, n_logits=n)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=f"at position {start}")
        start += n


def test_activations_are_transformers():
    """Each MLP activation the graph builds against transformers' own (ACT2FN): the tanh GELU and the exact one
    differ by 3e-4 at most, below what a tiny model's logits show, so they are compared here, on [-6, 6]."""
    import onnxruntime as ort
    from transformers.activations import ACT2FN

    from edgemtp.config import ACTIVATIONS
    from edgemtp.exporters.builder import FLOAT, GraphBuilder
    from edgemtp.exporters.components import activation

    x = np.linspace(-6, 6, 97, dtype=np.float32)
    fns = {**ACT2FN, "gelu_tanh": ACT2FN["gelu_pytorch_tanh"]}  # not an ACT2FN key: the tanh GELU, as named
    for act in ACTIVATIONS:
        b = GraphBuilder("act")
        b.output(activation(b, b.input("x", FLOAT, [97]), act), "y", FLOAT, [97])
        got = ort.InferenceSession(b.model().SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]
        np.testing.assert_allclose(got, fns[act](torch.from_numpy(x)).numpy(), atol=2e-6, rtol=0, err_msg=act)


@pytest.mark.parametrize("kind", ["gemma3_text", "gemma2", "qwen3", "phi3", "granite"])
def test_verify_graph_params_mean_what_the_targets_do(kind, tmp_path):
    """The verify graph's initializers point at the target's bytes by name (builder.share_weights): a parameter
    the verify graph declares with another transform (a (1 + w) norm read as w, a transposed weight read as
    stored) or shape would silently get the target's, whatever its own said. Every name they share is declared
    the same way."""
    from edgemtp.exporters import load_config

    tiny(kind).config.save_pretrained(tmp_path)
    cfg, build = load_config(tmp_path)
    target, verify = build(cfg, 64)[0].params, build(cfg, 64, in_place=False)[0].params
    assert set(verify) <= set(target)
    for name, p in verify.items():
        assert p == target[name], name


def test_gated_mlp_activations_are_transformers(tmp_path):
    """gated_mlp's activation against transformers' own, on [-6, 6]: gate(x) = x[0], up(x) = x[1] = 1 and
    down keeping the product, so the MLP's output is the activation itself. The exact GELU and the tanh one
    differ by 3e-4 at most, which no tiny model's logits show (gated_mlp spells them out apart from activation())."""
    import onnxruntime as ort
    from transformers.activations import ACT2FN

    from edgemtp.config import ACTIVATIONS
    from edgemtp.exporters import builder
    from edgemtp.exporters.builder import FLOAT, GraphBuilder
    from edgemtp.exporters.components import gated_mlp

    v = np.linspace(-6, 6, 97, dtype=np.float32)
    x = np.stack([v, np.ones_like(v)], axis=-1)[None]  # [1, 97, 2]
    weights = {"mlp.gate_proj.weight": np.array([[1, 0]], np.float32),
               "mlp.up_proj.weight": np.array([[0, 1]], np.float32),
               "mlp.down_proj.weight": np.array([[1], [0]], np.float32)}
    fns = {**ACT2FN, "gelu_tanh": ACT2FN["gelu_pytorch_tanh"]}
    for act in ACTIVATIONS:
        b = GraphBuilder("mlp")
        b.output(gated_mlp(b, b.input("x", FLOAT, [1, 97, 2]), "mlp.", 2, 1, act), "y", FLOAT, [1, 97, 2])
        builder.save(b, tmp_path / f"{act}.onnx", weights.__getitem__)
        got = ort.InferenceSession(str(tmp_path / f"{act}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]
        np.testing.assert_allclose(got[0, :, 0], fns[act](torch.from_numpy(v)).numpy(), atol=2e-6, rtol=0,
                                   err_msg=act)
        assert not got[0, :, 1].any()


def test_yarn_ramp_ends_at_the_last_rotated_pair(tmp_path):
    """YaRN's ramp ends at pair dim - 1 at most (transformers' find_correction_range): a small base and a long
    original length put beta_slow's pair past it (rope_theta 10, original 4096: pair 1.4 x dim), and beta_fast
    500 starts the ramp at pair 0, so that every rotated pair's frequency depends on where it ends."""
    from edgemtp.config import FULL
    from edgemtp.exporters import load_config
    from edgemtp.exporters.rotary import inv_freq

    rope = {"rope_type": "yarn", "rope_theta": 10.0, "factor": 4.0, "original_max_position_embeddings": 4096,
            "beta_fast": 500.0}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16384, rope_parameters=rope))
    model.config.save_pretrained(tmp_path)
    cfg, _ = load_config(tmp_path)
    want = dict(model.model.rotary_emb.named_buffers())["inv_freq"].numpy()
    np.testing.assert_allclose(inv_freq(cfg.rope[FULL], 32), want, rtol=1e-6)


def test_a_window_over_a_third_of_the_capacity_binds_no_copies(tmp_path):
    """Copies of the window's end (kv_cache's shadows) are made only where 1.5 windows are at most half the
    capacity: a wider window would add most of the buffers' memory again (Phi-3 mini 4k: its 32 sliding layers of
    32 KV heads over 2,047 of 4,096 positions, 2.5 GB more a row) to spare scoring a small share of the past. Such
    a cache binds the whole buffers (window 24, 1.5 windows 36 > 32 of capacity 64), with transformers' logits."""
    from edgemtp.contract import KVSlot
    from edgemtp.runtime.kv_cache import shadow_plan

    phi3_mini = tuple(KVSlot(i, 32, 96, 2047) for i in range(32))
    assert shadow_plan(phi3_mini, 4096) == ((), 3134)
    mistral_7b = tuple(KVSlot(i, 8, 128, 4096) for i in range(32))  # at a 32k capacity: copies of 19% of it
    assert shadow_plan(mistral_7b, 32768) == (mistral_7b, 6208)
    model = tiny("mistral_wide")
    export(save_tiny(model, tmp_path / "model"), tmp_path / "bundle", capacity=64)
    target = Engine.load(tmp_path / "bundle").target
    ids = np.random.default_rng(3).integers(0, 96, size=(1, 62))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids)).logits.numpy()[0]
    cache = target.new_cache(1)
    assert target.contract.window_views and target.contract.window_offset(61) == 36
    assert cache.shadowed == () and cache.unviewable
    start = 0
    for n in [20, 1, 3] + [1] * 30 + [4, 1, 3]:
        got, _ = target.forward(ids[:, start:start + n], cache, n_logits=n)
        np.testing.assert_allclose(got[0], want[start:start + n], atol=1e-3, rtol=0, err_msg=f"at {start}")
        start += n
    assert start == 62 and not cache._shadows and not cache._window_views


@pytest.mark.parametrize("extra", [0, 3])
def test_window_copies_of_two_kv_heads_match_transformers(extra, tmp_path, monkeypatch):
    """Sliding layers with 2 KV heads: a one-row pass from TargetContract.window_offset on binds copies of the
    window's end (kv_cache's shadows), filled from the buffers, its new rows copied back. Shadows with little room
    (SHADOW_EXTRA 0 or 3 positions past 1.5 windows) make a long one-row pass bind the whole buffers; batched
    passes (the verify graph, decode steps of 2 rows) write the buffers and leave the shadows stale; a rollback
    re-runs positions. Every pass's logits are transformers' for its positions."""
    from edgemtp.runtime import kv_cache

    monkeypatch.setattr(kv_cache, "SHADOW_EXTRA", extra)
    model = tiny("gemma3_text")
    model_dir = save_tiny(model, tmp_path / "model")
    export(model_dir, tmp_path / "bundle", capacity=64)
    target = Engine.load(tmp_path / "bundle").target
    ids = np.random.default_rng(2).integers(0, 96, size=(2, 60))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids)).logits.numpy()
    cache = target.new_cache(2)
    assert cache.shadow_room == WINDOW + WINDOW // 2 + extra
    fills = []
    fill = cache.before_pass
    monkeypatch.setattr(cache, "before_pass", lambda rows, offset: fills.append(
        (rows.start, offset, cache._shadow_from.get(rows.start))) or fill(rows, offset))

    def run(rows: slice, n: int) -> None:  # each row's next n tokens (rows' lengths differ)
        starts = [int(cache.lengths[b]) for b in range(rows.start, rows.stop)]
        got, _ = target.forward(np.stack([ids[b, s:s + n] for b, s in zip(range(rows.start, rows.stop), starts)]),
                                cache, rows=rows, n_logits=n)
        for i, (b, s) in enumerate(zip(range(rows.start, rows.stop), starts)):
            np.testing.assert_allclose(got[i], want[b, s:s + n], atol=1e-3, rtol=0, err_msg=f"row {b} at {s}, {n} new")

    both, row0, row1 = slice(0, 2), slice(0, 1), slice(1, 2)
    run(both, 5)  # 2 rows x 5 positions: the verify graph, which writes the buffers
    for _ in range(10):
        run(both, 1)  # decode steps of 2 rows: the whole buffers
    for n in [1, 1, 3, 1, 4, 1, 1, 2, 1, 1]:
        run(row0, n)  # from an offset on: the shadows
    cache.rollback(0, int(cache.lengths[0]) - 3)  # rejected drafts: the same positions again
    run(row0, 3)
    run(row1, 12)  # 12 new positions past an offset: no room in the small shadows
    run(both, 1)
    for _ in range(3):
        run(row0, 1)  # the batched step wrote the buffers: the shadows are filled again
    run(row1, 1)
    assert int(cache.lengths[0]) > 3 * WINDOW
    offsets = [(b, offset, held) for b, offset, held in fills if offset]
    assert offsets and all(b in (0, 1) for b, _, _ in offsets)
    # a fill where the shadows held another offset or none (stale), kept where they held the pass's offset
    assert any(held is None for _, _, held in offsets) and any(held == offset for _, offset, held in offsets)
    one_row_from_0 = [b for b, offset, _ in fills[-6:] if not offset]  # the 12 new positions of row 1, the 2 rows
    assert one_row_from_0 == [1, 0], fills[-6:]
    # a batched step between two one-row passes from the same offset (row 0 at 36 and 38: offset 28) leaves the
    # shadows stale: the second must fill them again, or it reads position 37 as the shadows held it (unwritten)
    run(row0, 1)
    run(row0, 1)
    run(both, 1)
    run(row0, 1)
    assert fills[-3:] == [(0, 28, 24), (0, 0, 28), (0, 28, None)], fills[-3:]


def test_window_copies_interrupted_while_filled_are_filled_again(tiny_gemma3, monkeypatch):
    """A Ctrl-C landing in before_pass's copies (KeptCache keeps a cache a Ctrl-C stopped, for the next chat turn)
    leaves a row's shadows half filled from the new offset: they must not still count as holding the old one,
    which a rollback's next pass (from the old offset) would read without filling them again."""
    model, _, bundle_dir = tiny_gemma3
    target = Engine.load(bundle_dir).target
    ids = np.random.default_rng(5).integers(0, 96, size=(1, 24))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids)).logits.numpy()
    cache = target.new_cache(1)
    target.forward(ids[:, :12], cache)  # one row from position 0: the whole buffers
    for n in range(12, 16):
        target.forward(ids[:, n:n + 1], cache)  # from offset 4 (window 8, half-window steps): the shadows
    assert cache._shadow_from == {0: 4} and target.contract.window_offset(16) == 8

    class Interrupted(dict):  # the values buffers: the keys' copy from offset 8 done, then Ctrl-C
        def __getitem__(self, layer):
            raise KeyboardInterrupt

    values, cache.values = cache.values, Interrupted(cache.values)
    with pytest.raises(KeyboardInterrupt):
        target.forward(ids[:, 16:17], cache)
    cache.values = values
    assert int(cache.lengths[0]) == 16
    cache.rollback(0, 14)  # the next turn's common prefix: from offset 4 again
    got, _ = target.forward(ids[:, 14:18], cache, n_logits=4)
    np.testing.assert_allclose(got[0], want[0, 14:18], atol=1e-3, rtol=0)
