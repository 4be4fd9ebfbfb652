"""The MTP drafter as a torch module (training engine and parity reference; never used by the runtime).

Follows transformers' `Gemma4AssistantForCausalLM` (DESIGN.md §2), with the head tied to the TARGET's
embedding table so the drafter ships only its narrow layers:

    e     = E[last_token] * sqrt(Hb)                         [B, P, Hb]  E: the target's embedding
    x     = pre_projection(concat(e, last_hidden))           [B, P, H]   last_hidden: target, post-final-norm
    x     = layer_i(x) for each drafter layer                 Q-only attention to the target's KV
    state = post_projection(norm(x))                          [B, P, Hb]  -> next step's last_hidden
    logits = softcap(state @ E^T)                             [B, P, V]   the target's own head

Gemma 4's assistant has its own draft-width tied head; ours reads logits off `state`, which is trained to
live in the target's last-hidden space (the target's logits are that space times E^T), so no extra
vocab-sized table is needed. Each layer's query sits at the committed length L (the position of the last
token, which is not in the cache) and attends to the target's cache positions j < L (sliding layers also
j > L - window) of the target's last layer of the same attention type. Drafted tokens are never written
to any cache. Shapes: B rows, P query positions per row (1 at inference, many in training), T cache
positions, Hb backbone hidden, H draft hidden, N query heads, Nk KV heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import holds, non_finite
from ..errors import EdgemtpError, missing
from ..exporters.rotary import inv_freq
from ..scratch import as_open_makes
from . import WEIGHTS, DrafterConfig, load_config

__all__ = ["DrafterConfig", "MTPDrafter", "TargetView", "draft", "load", "load_config", "make_view", "save",
           "widen_mlp"]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, w initialised to ones (Gemma 4's convention, no `1 + w`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class QOnlyAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden, cfg.num_heads * cfg.head_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x, k, v, bias, cos, sin):
        """x [B, P, H]; k, v [B, Nk, T, D]; bias [B, 1, P, T] additive; cos/sin [B, P, 1, D/2] -> [B, P, H]."""
        B, P, _ = x.shape
        n, nk, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q = rope(self.q_norm(self.q_proj(x).view(B, P, n, d)), cos, sin)
        q = q.view(B, P, nk, n // nk, d).permute(0, 2, 3, 1, 4)  # [B, Nk, G, P, D]: head h reads kv h // G
        scores = q @ k.unsqueeze(2).transpose(-1, -2) * self.cfg.attention_scale  # [B, Nk, G, P, T]
        probs = torch.softmax(scores + bias.unsqueeze(1), dim=-1)
        out = (probs @ v.unsqueeze(2)).permute(0, 3, 1, 2, 4).reshape(B, P, n * d)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)
        # the target's activation, as the exported graph's gated_mlp applies it (a llama-family target's silu:
        # trained with GELU, such a drafter once drafted from other maths than it learned)
        self.act = F.silu if cfg.hidden_activation == "silu" else \
            partial(F.gelu, approximate="tanh" if "tanh" in cfg.hidden_activation else "none")

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    """Gemma sandwich norms around a Q-only attention and a gated MLP."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        h, eps = cfg.hidden, cfg.rms_norm_eps
        self.self_attn, self.mlp = QOnlyAttention(cfg), MLP(cfg)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(h, eps), RMSNorm(h, eps)

    def forward(self, x, k, v, bias, cos, sin):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), k, v, bias, cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class _Body(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_norm_eps)


@dataclass
class TargetView:
    """What the drafter reads of the target for one set of queries (fixed across the K draft steps).

    kv: layer type -> (k, v) [B, Nk, T, D]; bias: layer type -> [B, 1, P, T]; cos/sin: type -> [B, P, 1, D/2]."""

    kv: dict
    bias: dict
    cos: dict
    sin: dict


class MTPDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden, cfg.hidden, bias=False)
        self.model = _Body(cfg)
        self.post_projection = nn.Linear(cfg.hidden, cfg.backbone_hidden, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def step(self, token_embeds: torch.Tensor, last_hidden: torch.Tensor, view: TargetView) -> torch.Tensor:
        """One draft step: token_embeds (already scaled) and last_hidden [B, P, Hb] -> state [B, P, Hb]."""
        x = self.pre_projection(torch.cat([token_embeds, last_hidden], dim=-1))
        for t, layer in zip(self.cfg.layer_types, self.model.layers):
            k, v = view.kv[t]
            x = layer(x, k, v, view.bias[t], view.cos[t], view.sin[t])
        return self.post_projection(self.model.norm(x))

    def logits(self, state: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """state [.., Hb] @ embedding[rows]^T -> [.., rows] (pass a row subset for a restricted head)."""
        return softcap(state @ embedding.T, self.cfg.final_logit_softcapping)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(x / cap) * cap if cap else x


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of the first R dims: x [B, P, N, D], cos/sin [B, P, 1, R/2] (as rotary.apply_rope;
    R < D for a target with partial RoPE, the other dims pass through)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def make_view(cfg: DrafterConfig, kv: dict, positions: torch.Tensor, cache_len: int) -> TargetView:
    """positions [B, P] int64: each query's committed length L (it sees cache rows j < L, and j > L - window
    on sliding layers). kv: type -> (k, v) [B, Nk, T, D] with T = cache_len."""
    keys = torch.arange(cache_len)
    pos = positions.unsqueeze(-1)  # [B, P, 1]
    bias, cos, sin = {}, {}, {}
    for t in set(cfg.layer_types):
        ok = keys < pos
        if cfg.window(t):
            ok &= keys > pos - cfg.window(t)
        bias[t] = torch.where(ok, 0.0, torch.finfo(torch.float32).min).unsqueeze(1)
        angles = positions.unsqueeze(-1).float() * torch.from_numpy(inv_freq(cfg.rope[t], cfg.head_dim))
        scale = cfg.rope[t].scale  # longrope's attention factor (1 otherwise)
        cos[t], sin[t] = (torch.cos(angles) * scale).unsqueeze(2), (torch.sin(angles) * scale).unsqueeze(2)
    return TargetView(kv, bias, cos, sin)


def draft(model: MTPDrafter, embedding: torch.Tensor, token: torch.Tensor, last_hidden: torch.Tensor,
          view: TargetView, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy drafting of k tokens: token [B, P], last_hidden [B, P, Hb] -> (tokens [B, P, k],
    logits [B, P, k, V]) with the full tied head (the reference the ONNX graph is checked against)."""
    tokens, logits = [], []
    for _ in range(k):
        state = model.step(embedding[token] * model.cfg.embed_scale, last_hidden, view)
        lg = model.logits(state, embedding)
        token, last_hidden = lg.argmax(-1), state
        tokens.append(token)
        logits.append(lg)
    return torch.stack(tokens, -1), torch.stack(logits, -2)


def widen_mlp(model: MTPDrafter, intermediate: int, seed: int = 0) -> MTPDrafter:
    """A copy of `model` whose MLPs have `intermediate` units, computing the same function.

    The new units' gate and up rows start random (the spread of the existing rows, so they get gradients at
    once) and their down-projection columns start at zero, so the widened drafter drafts exactly what the
    narrow one did and training grows the new capacity from there (fine-tuning a shipped drafter into a
    larger one instead of training it again from scratch)."""
    cfg = model.cfg
    if intermediate < cfg.intermediate:
        raise ValueError(f"cannot narrow the MLP from {cfg.intermediate} to {intermediate} units")
    wide = MTPDrafter(dataclasses.replace(cfg, intermediate=intermediate))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    extra = intermediate - cfg.intermediate
    for name, w in list(state.items()):
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            new = torch.randn(extra, w.shape[1], generator=gen) * w.std()
            state[name] = torch.cat([w, new], 0)
        elif name.endswith("mlp.down_proj.weight"):
            state[name] = torch.cat([w, torch.zeros(w.shape[0], extra)], 1)
    wide.load_state_dict(state)
    return wide.train(model.training)


def save(model: MTPDrafter, out_dir: Path, dtype=torch.float16, extra: dict | None = None) -> None:
    """config.json + model.safetensors (fp16 by default: the shipped weights)."""
    from safetensors.torch import save as safetensors_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({**model.cfg.to_json(), **(extra or {})}, indent=2) + "\n")
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    # written by Python, not by safetensors' save_file, whose full disk is its own SafetensorError (a traceback)
    (out_dir / WEIGHTS).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    as_open_makes(out_dir / WEIGHTS)


def load(drafter_dir: Path) -> MTPDrafter:
    from safetensors.torch import load_file

    model = MTPDrafter(load_config(drafter_dir))
    path = Path(drafter_dir) / WEIGHTS
    if not path.is_file():
        raise EdgemtpError(f"{path}: {missing(path)} (a drafter directory needs config.json and {WEIGHTS})")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise EdgemtpError(f"{path}: not a valid safetensors file ({e})") from None
    state = {k: v.float() for k, v in state.items()}
    for name, v in state.items():  # NaN or inf: a damaged file, which would train and draft NaN
        bad = non_finite(v.numpy())
        if bad is not None:
            raise EdgemtpError(f"{path}: tensor '{name}' {holds(bad)}: a damaged drafter (weights must be finite "
                               "numbers)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise EdgemtpError(f"{path}: weights do not fit config.json ({str(e).splitlines()[0]})") from None
    return model.eval()


def target_embedding(target_dir: Path) -> torch.Tensor:
    """The target's input embedding [V, Hb] (float32), copied from its safetensors (a checkpoint's fp32
    tensors are read-only memory maps, which torch will not wrap as writable tensors)."""
    from ..checkpoint import Checkpoint

    return torch.from_numpy(np.array(Checkpoint(target_dir)["model.embed_tokens.weight"], np.float32))
