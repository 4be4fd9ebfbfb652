"""Gemma 4 target parity against transformers, every E2B/E4B feature on, past 2x the sliding window."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from edgemtp.errors import EdgemtpError
from edgemtp.exporters import export, gemma4, load_config

WINDOW = 8
CHUNKS = [5, 1, 3, 1, 1, 4] + [1] * 10 + [3] + [1] * 4  # prefill, decode steps and multi-token (verify-like) steps
S, F = "sliding_attention", "full_attention"
# layers 5-7 are KV-shared: 5 and 6 read layer 3's cache, 7 reads layer 4's (k_eq_v, other head dim)
LAYER_TYPES = [S, F, S, S, F, S, S, F]
TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=len(LAYER_TYPES),
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=LAYER_TYPES,
            sliding_window=WINDOW, num_kv_shared_layers=3, use_double_wide_mlp=True,
            hidden_size_per_layer_input=8, vocab_size_per_layer_input=96, final_logit_softcapping=3.0,
            max_position_embeddings=256, initializer_range=0.1,
            rope_parameters={S: {"rope_type": "default", "rope_theta": 10_000.0},
                             F: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                 "rope_theta": 10_000.0}})


def tiny(kind: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gemma4_text_mqa":  # one KV head on the sliding layers, as E2B: window views in place
        model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**{**TEXT, "num_key_value_heads": 1}))
    elif kind == "gemma4_text":
        model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**TEXT))
    else:  # the multimodal checkpoint layout: model.language_model.*, model_type gemma4 + text_config
        cfg = transformers.Gemma4Config(text_config=TEXT, vision_config=None, audio_config=None)
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    _randomize(model)
    return model.eval()


def _randomize(model) -> None:
    """Random init leaves norms at 1 and layer scalars at 1, which would hide a mistake in either."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.copy_(torch.empty_like(buf).uniform_(0.5, 1.5))


@pytest.mark.parametrize("kind", ["gemma4_text", "gemma4", "gemma4_text_mqa", "gemma4_text_mqa+gemv"])
def test_logits_match_transformers(kind, tmp_path, monkeypatch):
    """+gemv: export --gemv-head (one-position passes through the transposed head, before the soft-cap). Then the
    runtime's prefill over the same ids in chunks of 10 (past the window: KV-shared layers read the owners' cache
    the chunks wrote)."""
    from edgemtp.runtime.engine import Engine

    from .reference import assert_chunked_prefill_matches, gemv_ifs, reference_logits, save_tiny

    kind, _, head = kind.partition("+")
    model = tiny(kind)
    model_dir = save_tiny(model, tmp_path / "model")
    export(model_dir, tmp_path / "bundle", capacity=64, gemv_head=head == "gemv")
    engine = Engine.load(tmp_path / "bundle")
    contract = engine.target.contract
    assert gemv_ifs(tmp_path / "bundle") == (head == "gemv")  # else a +gemv case is its plain one over again
    assert [s.layer for s in contract.kv] == [0, 1, 2, 3, 4]  # shared layers own no cache
    heads = 1 if kind == "gemma4_text_mqa" else 2
    assert [(s.num_heads, s.head_dim, s.window) for s in contract.kv[:2]] == [(heads, 16, WINDOW), (1, 32, None)]
    assert contract.drafter_kv == {S: 3, F: 4}
    # the sliding owners' buffers (and so layers 5 and 6's reads) start there: in place with one KV head (E2B),
    # a copy with two (E4B: kv_cache's shadows)
    assert contract.window_views
    assert {contract.window_offset(n) for n in range(sum(CHUNKS))} == {0, 4, 8, 12, 16, 20}
    ids = np.random.default_rng(1).integers(0, 96, size=(1, sum(CHUNKS)))
    ref = reference_logits(model, ids, CHUNKS)
    cache = engine.target.new_cache(1)
    start, worst, hiddens = 0, 0.0, []
    for n, want in zip(CHUNKS, ref):
        got, hidden = engine.target.forward(ids[:, start:start + n], cache, n_logits=n)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=f"{kind} at position {start}")
        worst = max(worst, float(np.abs(got - want).max()))
        hiddens.append(hidden)
        start += n
    assert start > 2 * WINDOW
    assert bool(cache._shadows) == (heads > 1)
    assert np.ptp(np.concatenate(ref, axis=1)) > 1.0  # logits spread enough for the tolerance to mean something
    # last_hidden_state is what transformers' MTP candidate generator hands the drafter: hidden_states[-1]
    # (post final norm for Gemma 4)
    want_hidden = _hf_last_hidden(model, ids)
    np.testing.assert_allclose(np.concatenate(hiddens, axis=1), want_hidden, atol=1e-3, rtol=0)
    assert_chunked_prefill_matches(engine.target, ids, np.concatenate(ref, axis=1), want_hidden[0], monkeypatch, 10)
    print(f"{kind}: max |logits - transformers| = {worst:.2e}")


def test_several_rows_of_several_positions_in_one_forward_call(tmp_path):
    """Target.forward with 2 rows x 3 new positions over a past: ONNX Runtime's CPU GroupQueryAttention refuses
    that pass ("batch_size must be 1 when sequence_length > 1 and past context is given"), and the call was its
    traceback; it runs row by row, each row's logits, hidden state and cache what a lone row's call gives."""
    from edgemtp.runtime.engine import Engine

    from .reference import save_tiny

    export(save_tiny(tiny("gemma4_text"), tmp_path / "model"), tmp_path / "bundle", capacity=64)
    target = Engine.load(tmp_path / "bundle").target
    assert not target.multi_row_verify
    ids = np.random.default_rng(3).integers(0, 96, size=(2, 12))
    both, alone = target.new_cache(2), target.new_cache(2)
    for cache in (both, alone):
        for r, n in enumerate((8, 5)):  # rows of different lengths
            target.forward(ids[r:r + 1, :n], cache, rows=slice(r, r + 1))
    got, hidden = target.forward(np.stack([ids[0, 8:11], ids[1, 5:8]]), both, n_logits=3)
    for r, n in enumerate((8, 5)):
        want, want_hidden = target.forward(ids[r:r + 1, n:n + 3], alone, rows=slice(r, r + 1), n_logits=3)
        np.testing.assert_array_equal(got[r], want[0])
        np.testing.assert_array_equal(hidden[r], want_hidden[0])
    assert list(both.lengths) == [11, 8]
    step = np.array([[ids[0, 11]], [ids[1, 8]]])  # the next step reads what the call wrote
    np.testing.assert_array_equal(target.forward(step, both)[0], target.forward(step, alone)[0])


# config.json values that once exported with other logits than transformers', without an error
VARIANTS = {
    # partial_rotary_factor 0: full layers rotate nothing (read as 1, they rotated every pair)
    "nope_full_layers": ({"rope_parameters": {**TEXT["rope_parameters"], F: {
        "rope_type": "proportional", "partial_rotary_factor": 0.0, "rope_theta": 10_000.0}}}, {}, None),
    # tie_word_embeddings true beside an lm_head.weight of its own: transformers does not tie them (it warns)
    # and takes lm_head.weight, which the export left out for the embedding
    "own_lm_head": ({"tie_word_embeddings": False}, {"tie_word_embeddings": True}, None),
    # a multimodal checkpoint's image / video / audio placeholder ids in the vocabulary (as in Gemma 4's):
    # transformers embeds them as the pad token (their own embedding rows were used)
    "multimodal_placeholders": ({"pad_token_id": 5}, {}, {"image_token_id": 90, "video_token_id": 91,
                                                          "audio_token_id": 3, "boi_token_id": 93,
                                                          "eoi_token_id": 94, "boa_token_id": 95,
                                                          "eoa_token_index": 89}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_transformers(variant, tmp_path):
    """Transformers' reference is the model it loads from the directory edgemtp exports."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgemtp.runtime.engine import Engine

    from .reference import reference_logits, save_tiny

    changes, saved, multimodal = VARIANTS[variant]
    torch.manual_seed(0)
    if multimodal is None:
        cls = transformers.Gemma4ForCausalLM
        model = cls(transformers.Gemma4TextConfig(**{**TEXT, **changes}))
    else:
        cls = transformers.Gemma4ForConditionalGeneration
        model = cls(transformers.Gemma4Config(text_config={**TEXT, **changes}, vision_config=None,
                                              audio_config=None, **multimodal))
    _randomize(model)
    model_dir = save_tiny(model.eval(), tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **saved}))
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    export(model_dir, tmp_path / "bundle", capacity=64)
    engine = Engine.load(tmp_path / "bundle")
    ids = np.random.default_rng(1).integers(0, 96, size=(1, sum(CHUNKS)))
    ids[0, [2, 7, 20]] = 90, 91, 3  # every placeholder: in the prefill, a 3-token step, a decode step
    cache, start = engine.target.new_cache(1), 0
    for n, want in zip(CHUNKS, reference_logits(model, ids, CHUNKS)):
        got, _ = engine.target.forward(ids[:, start:start + n], cache, n_logits=n)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=f"{variant} at position {start}")
        start += n


def test_own_head_unties_only_other_values(tmp_path):
    """An lm_head.weight equal to the embedding keeps the head tied (one table in the bundle), as transformers
    ties equal weights."""
    from safetensors.numpy import save_file

    from edgemtp.checkpoint import Checkpoint
    from edgemtp.exporters.checkpoint_checks import own_head

    cfg = gemma4.parse_config(_hf_text(), "config.json")
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_file({"model.embed_tokens.weight": table}, str(tmp_path / "model.safetensors"))
    assert own_head(cfg, Checkpoint(tmp_path)).tie_word_embeddings
    save_file({"lm_head.weight": table.copy()}, str(tmp_path / "head.safetensors"))
    assert own_head(cfg, Checkpoint(tmp_path)).tie_word_embeddings
    save_file({"lm_head.weight": table + 1}, str(tmp_path / "head.safetensors"))
    assert not own_head(cfg, Checkpoint(tmp_path)).tie_word_embeddings


def test_kv_shared_layers_leftover_weights_are_expected(tmp_path):
    """Google's E2B checkpoint keeps k_proj / v_proj / k_norm of its KV-shared layers, which transformers skips
    on load (`_keys_to_ignore_on_load_unexpected`): no warning that config.json may be another checkpoint's,
    the same logits. A tensor transformers would not skip (full layer 4's v_proj under attention_k_eq_v)
    still warns."""
    import warnings

    from safetensors.numpy import save_file

    from edgemtp.runtime.engine import Engine

    from .reference import save_tiny

    model_dir = save_tiny(tiny("gemma4_text"), tmp_path / "model")
    export(model_dir, tmp_path / "plain", capacity=64)
    rng = np.random.default_rng(0)
    leftovers = {f"model.layers.{i}.self_attn.{name}.weight": rng.standard_normal(shape).astype(np.float32)
                 for i, d, nk in ((5, 16, 2), (6, 16, 2), (7, 32, 1))
                 for name, shape in (("k_proj", (nk * d, 64)), ("v_proj", (nk * d, 64)), ("k_norm", (d,)))}
    save_file(leftovers, str(model_dir / "shared_kv.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the export
        export(model_dir, tmp_path / "bundle", capacity=64)
    ids = np.random.default_rng(1).integers(0, 96, size=(1, 12))
    targets = [Engine.load(tmp_path / b).target for b in ("plain", "bundle")]
    plain, got = (t.forward(ids, t.new_cache(1), n_logits=12)[0] for t in targets)
    np.testing.assert_array_equal(got, plain)
    save_file({"model.layers.4.self_attn.v_proj.weight": np.zeros((32, 64), np.float32)},
              str(model_dir / "other.safetensors"))
    with pytest.warns(UserWarning, match=r"1 checkpoint tensor\(s\) unused .*: model.layers.4.self_attn.v_proj"):
        export(model_dir, tmp_path / "other", capacity=64)


def _hf_last_hidden(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states[-1].numpy()


def _hf_text(**changes) -> dict:
    return {"model_type": "gemma4_text", **TEXT, **changes}


def test_config_errors_list_every_problem(tmp_path):
    hf = _hf_text(num_kv_shared_layers=8, hidden_activation="relu",
                  per_layer_config={"1": {"head_dim": 32, "intermediate_size": 7}})
    with pytest.raises(EdgemtpError) as e:
        gemma4.parse_config(hf, "model/config.json")
    msg = str(e.value)
    for part in ("model/config.json", "num_kv_shared_layers", "hidden_activation", "intermediate_size",
                 "full_attention layers differ"):
        assert part in msg, msg
    # values that once exported as they came: a string for a flag (read as true), a NaN-making epsilon
    hf = _hf_text(attention_k_eq_v="no", rms_norm_eps=-1.0, final_logit_softcapping=0, layer_types="full_attention",
                  rope_parameters={**TEXT["rope_parameters"], F: {"rope_type": "proportional", "rope_theta": 1e4,
                                                                  "partial_rotary_factor": 1.5, "factor": 0}})
    with pytest.raises(EdgemtpError) as e:
        gemma4.parse_config(hf, "model/config.json")
    for part in ("'attention_k_eq_v' should be true or false, got 'no'", "'rms_norm_eps' -1.0 must not be negative",
                 "'final_logit_softcapping' 0.0 must be positive", "'layer_types' should be a list",
                 "'rope_parameters.full_attention.partial_rotary_factor' 1.5 must be in [0, 1]",
                 "'rope_parameters.full_attention.factor' 0.0 must be positive"):  # was read as 1
        assert part in str(e.value), str(e.value)


def test_pad_outside_a_table_is_refused_where_placeholders_read_it():
    """A multimodal config's placeholders read pad_token_id's rows of the token and per-layer tables: one
    outside either exported and then failed in ONNX Runtime when a placeholder came (transformers refuses
    it). A text-only graph never reads it."""
    multimodal = {"model_type": "gemma4", "image_token_id": 90, "text_config": _hf_text(pad_token_id=96)}
    with pytest.raises(EdgemtpError, match=r"config.json \(text_config\): field 'pad_token_id' 96 outside the "
                                           r"vocabulary table \(vocab_size 96\).*placeholders \[90\]"):
        gemma4.parse_config(multimodal, "config.json")
    multimodal["text_config"] = _hf_text(pad_token_id=60, vocab_size_per_layer_input=50)
    with pytest.raises(EdgemtpError, match="'pad_token_id' 60 outside the per-layer embedding table "
                                           r"\(vocab_size_per_layer_input 50\)"):
        gemma4.parse_config(multimodal, "config.json")
    multimodal["text_config"] = _hf_text(pad_token_id=5)
    assert gemma4.parse_config(multimodal, "config.json").pad_token_id == 5
    assert gemma4.parse_config(_hf_text(pad_token_id=96), "config.json").placeholder_ids == ()


def test_multimodal_config_reads_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gemma4", "text_config": _hf_text(vocab_size=0)}))
    with pytest.raises(EdgemtpError, match=r"config.json \(text_config\).*vocab_size"):
        load_config(tmp_path)
    # the multimodal config's own fields are named as its own, beside its text_config's, in one error
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gemma4", "image_token_id": "abc", "tie_word_embeddings": "yes",
         "text_config": _hf_text(vocab_size=0)}))
    with pytest.raises(EdgemtpError) as e:
        load_config(tmp_path)
    assert re.fullmatch(r".*config.json: field 'image_token_id' should be an integer, got 'abc'; field "
                        r"'tie_word_embeddings' should be true or false, got 'yes'; .*config.json \(text_config\): "
                        r".*vocab_size.*", str(e.value)), str(e.value)
    # transformers ties by the multimodal config's flag, true by default, not by text_config's
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gemma4", "text_config": _hf_text(tie_word_embeddings=False)}))
    assert load_config(tmp_path)[0].tie_word_embeddings
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": _hf_text()}))
    cfg, _ = load_config(tmp_path)
    # old-style config (global_head_dim, num_global_key_value_heads) resolved per layer
    assert cfg.head_dims == (16, 32, 16, 16, 32, 16, 16, 32) and cfg.kv_heads == (2, 1, 2, 2, 1, 2, 2, 1)
    assert [cfg.kv_owner(i) for i in range(8)] == [0, 1, 2, 3, 4, 3, 3, 4]
    assert [cfg.mlp_width(i) for i in range(8)] == [48] * 5 + [96] * 3



@pytest.mark.parametrize("args", [["--static"], ["--quant", "qdq"]])
def test_static_graphs_are_refused_naming_both_flags(tmp_path, args):
    """Gemma 4 has no static graph: `export --quant qdq` (which implies --static) said "static export supports
    ...", which a user who gave no --static could not place; the refusal names both flags that ask for one."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    from .cli_errors import assert_one_line_error
    from .reference import save_tiny

    model_dir = save_tiny(tiny("gemma4_text"), tmp_path / "model")
    r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(tmp_path / "bundle"), *args])
    assert_one_line_error(r, "--static", "--quant qdq", "gemma3_text", "not 'gemma4_text'")
    assert not (tmp_path / "bundle").exists()
