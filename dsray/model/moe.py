"""Mixture-of-Experts: gate -> dispatch -> experts -> combine, plus shared experts.

Shape legend: T tokens (batch x seq flattened), D hidden, K experts per token, E routed experts,
I moe_intermediate_size, R routed rows (T*K assignments, grouped by expert).

Invariants worth restating:
- The per-expert bias (`e_score_correction_bias`, DeepSeek-V3 auxiliary-loss-free balancing) only
  *selects* experts. The weights that scale expert outputs are the unbiased scores.
- A group's score is the sum of its top-2 biased scores (noaux_tc), not its max.
- Every MoE layer counts tokens per expert (`tokens_per_expert`) so balancing can run outside the model.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsray.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts (HF names: gate_proj, up_proj, down_proj)."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Routing scores -> (weights_TK, ids_TK). Weight and bias are fp32 whatever the model dtype."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        # Buffer, not parameter: it is never trained by gradients, only nudged by the balancing rule.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, return_scores: bool = False):
        """(weights_TK, ids_TK), plus the unbiased scores_TE when asked (the balance loss needs them)."""
        cfg = self.cfg
        T, E, G, K = x_TD.shape[0], cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid() if cfg.scoring_func == "sigmoid" else logits_TE.softmax(dim=-1)
        choice_TE = scores_TE
        if cfg.topk_method == "noaux_tc":
            choice_TE = scores_TE + self.e_score_correction_bias  # bias selects, never weighs
        if cfg.topk_method in ("noaux_tc", "group_limited_greedy") and G > 1:
            grouped = choice_TE.view(T, G, E // G)
            if cfg.topk_method == "noaux_tc":
                group_score_TG = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_score_TG = grouped.amax(dim=-1)
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_score_TG.topk(cfg.topk_group, dim=-1, sorted=False).indices, True)
            choice_TE = choice_TE.masked_fill(~keep_TG[:, :, None].expand(T, G, E // G).reshape(T, E), float("-inf"))
        ids_TK = choice_TE.topk(K, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if cfg.norm_topk_prob and K > 1:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if return_scores:
            return weights_TK * cfg.routed_scaling_factor, ids_TK, scores_TE
        return weights_TK * cfg.routed_scaling_factor, ids_TK


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; rows arrive grouped by expert (`counts[e]` rows each).

    Two interchangeable implementations with one signature, tested against each other:
    "loop" (readable reference) and "grouped" (`torch._grouped_mm` on CUDA, batched bmm elsewhere).
    """

    def __init__(self, n_experts: int, dim: int, inter: int, impl: str = "grouped") -> None:
        super().__init__()
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


# The routed path: (x_TD, weights_TK, ids_TK) -> y_TD. Expert parallelism swaps in its own.
RoutedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: str = "grouped") -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, impl)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.routed: RoutedFn | None = None  # None: run self.experts in this process
        # DeepSeek-V3's complementary sequence-wise balance loss (alpha 0: off). Set by Transformer.loss;
        # the per-sequence terms of the last forward land in `balance_loss_B`.
        self.seq_aux_alpha = 0.0
        self.balance_loss_B: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        if self.seq_aux_alpha > 0 and torch.is_grad_enabled() and len(shape) == 3:
            weights_TK, ids_TK, scores_TE = self.gate(x_TD, return_scores=True)
            self.balance_loss_B = self.seq_balance_loss(scores_TE, ids_TK, shape[0])
        else:
            weights_TK, ids_TK = self.gate(x_TD)
            self.balance_loss_B = None
        with torch.no_grad():
            self.tokens_per_expert += torch.bincount(ids_TK.flatten(), minlength=self.cfg.n_routed_experts)
        routed = self.routed or self.local_routed
        y_TD = routed(x_TD, weights_TK, ids_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(shape)

    def seq_balance_loss(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor, B: int) -> torch.Tensor:
        """alpha * sum_i f_i * P_i per sequence (DeepSeek-V3 eq. 17-20): f_i = E/(K*S) * #tokens of the
        sequence routed to i (a constant), P_i = mean over the sequence of normalised scores s_i/sum_j s_j."""
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        S = scores_TE.shape[0] // B
        with torch.no_grad():
            hits_BE = torch.zeros(B, E, device=ids_TK.device).scatter_add_(
                1, ids_TK.reshape(B, S * K), torch.ones(B, S * K, device=ids_TK.device))
            f_BE = hits_BE * (E / (K * S))
        p_BE = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).view(B, S, E).mean(dim=1)
        return self.seq_aux_alpha * (f_BE * p_BE).sum(dim=-1)

    def local_routed(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        T, K = ids_TK.shape
        order_R = ids_TK.flatten().argsort(stable=True)  # assignment (t, k) -> row, grouped by expert
        counts = torch.bincount(ids_TK.flatten(), minlength=self.experts.n_experts).tolist()  # host sync
        y_RD = self.experts(x_TD[order_R // K], counts)
        y_TKD = torch.empty_like(y_RD).index_copy(0, order_R, y_RD).view(T, K, -1)
        return combine_weighted(y_TKD, weights_TK)

    def pop_counts(self) -> torch.Tensor:
        c = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        return c


def combine_weighted(y_TKD: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Sum over k of weights_TK[t, k] * y_TKD[t, k] as one batched GEMV ([T,1,K] x [T,K,D]).

    The matmul accumulates in fp32 inside the kernel and reads y_TKD once; an fp32 copy of y_TKD
    (T*K*D*4 bytes, 1.9 GB for 8192 V3 tokens) would cost more than the expert GEMMs' epilogue."""
    return torch.bmm(weights_TK.to(y_TKD.dtype)[:, None, :], y_TKD)[:, 0]
