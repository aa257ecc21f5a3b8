"""Deterministic initialisation keyed by checkpoint name, so any process can build any slice alone.

A driver rank initialises only the dense weights and an expert shard only its own experts, and together
they hold exactly what `Transformer.from_config(cfg, seed)` builds in one process: each tensor (each
routed expert's projection separately) draws from a generator seeded by (seed, its checkpoint key).
"""

from __future__ import annotations

import zlib

import torch

from dsray.config import ModelConfig


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight") or "layernorm" in name


def init_tensor(key: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    if is_norm(key):
        return torch.ones(shape)
    if key.endswith("e_score_correction_bias"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    return torch.randn(shape, generator=g) * std


def init_expert(cfg: ModelConfig, layer: int, expert: int, proj: str, seed: int) -> torch.Tensor:
    """One routed expert's projection; `layer` is the checkpoint layer index (MTP: L + k)."""
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    shape = (d, i) if proj == "down_proj" else (i, d)
    return init_tensor(f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", shape, cfg.initializer_range, seed)
