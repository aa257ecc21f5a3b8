"""DeepSeek-V3 model math in pure torch, single device (no ray, no torch.distributed)."""

from dsray.model.mla import MLA, LatentCache
from dsray.model.experts import RoutedExperts
from dsray.model.moe import MLP, Gate, MoE, RouteLog
from dsray.model.rope import RMSNorm, Rotary, apply_rope
from dsray.model.transformer import DecoderLayer, MTPBlock, Transformer

__all__ = ["MLA", "LatentCache", "MLP", "Gate", "MoE", "RouteLog", "RoutedExperts", "RMSNorm", "Rotary", "apply_rope",
           "DecoderLayer", "MTPBlock", "Transformer"]
