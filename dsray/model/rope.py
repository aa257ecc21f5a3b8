"""RMSNorm and rotary embeddings (HF's interleaved DeepSeek layout, YaRN scaling)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsray.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as HF does (bit-for-bit parity in fp32).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's long-context fix)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if cfg.rope_type == "yarn" and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """inv_freq [rope_dim/2] and the factor that scales cos/sin (YaRN's attention_factor; 1 otherwise)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if cfg.rope_type != "yarn":
        return 1.0 / pos_freqs, 1.0
    rs = cfg.rope_scaling
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    attn = rs.get("attention_factor")
    if attn is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attn = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
        else:
            attn = yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        # The dimension whose wavelength completes `rot` rotations over the original context.
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn)


class Rotary(nn.Module):
    """cos/sin tables for given positions; applied to the rope part of q and k."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] -> cos/sin [S, rope/2]; per-row positions [B, S] -> [B, S, rope/2]."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        cos = (freqs.cos() * self.attention_factor).to(dtype)
        sin = (freqs.sin() * self.attention_factor).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., S, rope] with pairs (x0,x1),(x2,x3)... interleaved, cos/sin [S, rope/2].

    Output is de-interleaved (all rotated evens, then all odds) exactly as HF's V3 code produces; q and k
    get the same permutation, so q·k is unchanged, and the latent cache stores k_pe in this layout.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
