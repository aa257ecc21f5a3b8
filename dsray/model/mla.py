"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Shape legend: B batch, S new tokens, L cached length (prefix + new), H heads, D hidden,
C kv_lora_rank (latent), R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim.

Two paths with one set of weights:
- naive (training / prefill without cache): decompress c_kv through kv_b_proj into per-head k_nope and v.
- absorbed (with a LatentCache): the cache holds only c_kv [C] and k_pe [R] per token per layer; W_uk is
  folded into q and W_uv into the output, so nothing per-head is ever materialised for cached tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsray.config import ModelConfig
from dsray.model.rope import RMSNorm, apply_rope, softmax_scale


@dataclass
class LatentCache:
    """Per-layer latent KV cache: c_kv [B, max_len, C] and k_pe [B, max_len, R]; nothing else."""

    c_kv: list[torch.Tensor]
    k_pe: list[torch.Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, n_layers: int, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> "LatentCache":
        mk = lambda n: torch.zeros(batch, max_len, n, dtype=dtype, device=device)  # noqa: E731
        return cls([mk(cfg.kv_lora_rank) for _ in range(n_layers)], [mk(cfg.qk_rope_head_dim) for _ in range(n_layers)])

    @property
    def max_len(self) -> int:
        return self.c_kv[0].shape[1] if self.c_kv else 0

    def values_per_token_per_layer(self) -> int:
        return self.c_kv[0].shape[-1] + self.k_pe[0].shape[-1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.c_kv + self.k_pe)


def attention_mask(start: int, end: int, n_keys: int, pad_B: torch.Tensor | None,
                   device: torch.device | None = None) -> torch.Tensor:
    """Bool [B or 1, 1, end - start, n_keys]: query column start+i sees key columns <= start+i that are
    not left padding. A padding query sees itself only (its output is never used; no all-masked row)."""
    device = pad_B.device if pad_B is not None else device
    q = torch.arange(start, end, device=device)[:, None]
    k = torch.arange(n_keys, device=device)[None, :]
    causal = k <= q
    if pad_B is None:
        return causal[None, None]
    real = k[None] >= pad_B[:, None, None]
    return ((causal[None] & real) | (k[None] == q[None]))[:, None]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = h
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=bias)
        self.scale = softmax_scale(cfg)

    def _q(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x_BSD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, layer: int = 0, start_pos: int = 0,
                pad_B: torch.Tensor | None = None) -> torch.Tensor:
        """cos/sin [S, R/2], or [B, S, R/2] for per-row positions. `pad_B`: left-padding columns per row
        (batched prompts of different lengths); those keys are masked out for every query."""
        cfg = self.cfg
        B, S, _ = x_BSD.shape
        H, N, R, C, V = self.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        q_BHSK = self._q(x_BSD).view(B, S, H, N + R).transpose(1, 2)
        q_nope, q_pe = q_BHSK.split([N, R], dim=-1)
        per_row = cos.dim() == 3
        q_pe = apply_rope(q_pe, cos[:, None] if per_row else cos, sin[:, None] if per_row else sin)
        ckv_BSC, k_pe_BSR = self.kv_a_proj_with_mqa(x_BSD).split([C, R], dim=-1)
        ckv_BSC = self.kv_a_layernorm(ckv_BSC)
        k_pe_BSR = apply_rope(k_pe_BSR, cos, sin)  # one rope key shared by all heads (the "MQA" part)

        if cache is None:
            kv = self.kv_b_proj(ckv_BSC).view(B, S, H, N + V).transpose(1, 2)
            k_nope, v_BHSV = kv.split([N, V], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            k = torch.cat([k_nope, k_pe_BSR[:, None].expand(B, H, S, R)], dim=-1)
            mask = None if pad_B is None else attention_mask(0, S, S, pad_B)
            o_BHSV = F.scaled_dot_product_attention(q, k, v_BHSV, attn_mask=mask, is_causal=S > 1 and mask is None,
                                                    scale=self.scale)
            return self.o_proj(o_BHSV.transpose(1, 2).reshape(B, S, H * V))

        # Absorbed path: append this chunk's latents, then attend over the whole cached prefix.
        end = start_pos + S
        if end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's max_len={cache.max_len}")
        cache.c_kv[layer][:B, start_pos:end] = ckv_BSC
        cache.k_pe[layer][:B, start_pos:end] = k_pe_BSR
        ckv_BLC = cache.c_kv[layer][:B, :end]
        kpe_BLR = cache.k_pe[layer][:B, :end]
        w_HKC = self.kv_b_proj.weight.view(H, N + V, C)
        w_uk_HNC, w_uv_HVC = w_HKC.split([N, V], dim=1)
        q_lat_BHSC = torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk_HNC)
        scores = (torch.einsum("bhsc,blc->bhsl", q_lat_BHSC, ckv_BLC)
                  + torch.einsum("bhsr,blr->bhsl", q_pe, kpe_BLR)) * self.scale
        scores = scores.masked_fill(~attention_mask(start_pos, end, end, pad_B, x_BSD.device), float("-inf"))
        p = scores.float().softmax(dim=-1).to(x_BSD.dtype)
        o_lat_BHSC = torch.einsum("bhsl,blc->bhsc", p, ckv_BLC)
        o_BHSV = torch.einsum("bhsc,hvc->bhsv", o_lat_BHSC, w_uv_HVC)
        return self.o_proj(o_BHSV.transpose(1, 2).reshape(B, S, H * V))
