"""Routed experts: E SwiGLU experts with stacked weights ([E, I, D] / [E, D, I]).

Rows arrive grouped by expert (`counts[e]` rows each, contiguous). Two interchangeable implementations
with one signature, tested against each other: "loop" (the readable reference) and "grouped"
(`torch._grouped_mm` on CUDA bf16 and for CPU inference, padded batched bmm elsewhere).

Shape legend: R rows (grouped by expert), D hidden, I moe_intermediate_size, E local experts (slots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_IMPLS = ("grouped", "loop")


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; rows arrive grouped by expert (`counts[e]` rows each)."""

    def __init__(self, n_experts: int, dim: int, inter: int, impl: str = "grouped") -> None:
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl={impl!r}: expected one of {EXPERT_IMPLS}")
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter))
        self.impl = impl

    @property
    def n_experts(self) -> int:
        return self.gate_proj.shape[0]

    def forward(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        assert len(counts) == self.n_experts and sum(counts) == x_RD.shape[0], (counts, x_RD.shape)
        if self.impl == "loop":
            return self._loop(x_RD, counts)
        if hasattr(torch, "_grouped_mm") and x_RD.shape[0] and self._grouped_mm_ok(x_RD):
            return self._grouped_mm(x_RD, counts)
        return self._batched(x_RD, counts)

    def _grouped_mm_ok(self, x_RD: torch.Tensor) -> bool:
        if x_RD.is_cuda:
            return x_RD.dtype == torch.bfloat16
        # CPU (torch 2.13): forward only, and only with 16-byte-aligned rows; its backward fails.
        needs_grad = torch.is_grad_enabled() and (x_RD.requires_grad or self.gate_proj.requires_grad)
        row_bytes = {x_RD.shape[1] * x_RD.element_size(), self.gate_proj.shape[1] * x_RD.element_size()}
        return not needs_grad and x_RD.dtype == torch.float32 and all(b % 16 == 0 for b in row_bytes)

    def _loop(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs = []
        for e, x in enumerate(x_RD.split(counts)):
            h = F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e])
            outs.append(F.linear(h, self.down_proj[e]))
        return torch.cat(outs) if outs else _empty_rows(x_RD)

    def _grouped_mm(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        offs = torch.tensor(counts, device=x_RD.device).cumsum(0).to(torch.int32)
        gate = torch._grouped_mm(x_RD, self.gate_proj.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(x_RD, self.up_proj.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offs)

    def _batched(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # Pad each expert's rows to the largest group and run three bmm's: [E, Cmax, D] x [E, D, I].
        E, cmax = self.n_experts, max(counts, default=0)
        if cmax == 0:
            return _empty_rows(x_RD)
        counts_E = torch.tensor(counts, device=x_RD.device)
        expert_R = torch.repeat_interleave(torch.arange(E, device=x_RD.device), counts_E)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        slot_R = torch.arange(x_RD.shape[0], device=x_RD.device) - starts_E[expert_R]
        flat_R = expert_R * cmax + slot_R
        xp = x_RD.new_zeros(E * cmax, x_RD.shape[1]).index_copy(0, flat_R, x_RD).view(E, cmax, -1)
        h = F.silu(torch.bmm(xp, self.gate_proj.transpose(1, 2))) * torch.bmm(xp, self.up_proj.transpose(1, 2))
        y = torch.bmm(h, self.down_proj.transpose(1, 2))
        return y.reshape(E * cmax, -1).index_select(0, flat_R)


def _empty_rows(x_RD: torch.Tensor) -> torch.Tensor:
    # Zero rows, but still in x_RD's autograd graph: expert parallelism runs backward collectives through
    # this node on ranks that received nothing, so it must exist (in and out width are both D).
    return x_RD[:0] * 0
