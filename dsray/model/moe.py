"""Mixture-of-Experts: gate -> dispatch -> experts -> combine, plus shared experts.

Shape legend: T tokens (batch x seq flattened), D hidden, K experts per token, E routed experts,
B sequences.

Invariants worth restating:
- The per-expert bias (`e_score_correction_bias`, DeepSeek-V3 auxiliary-loss-free balancing) only
  *selects* experts. The weights that scale expert outputs are the unbiased scores.
- A group's score is the sum of its top-2 biased scores (noaux_tc), not its max.
- Routing replay (RL): given recorded ids, the experts are those ids while the weights are recomputed
  from the live scores, so gradients still reach the gate.
- What a forward learns about routing (per-expert counts, balance-loss terms, the chosen ids) goes into
  the `RouteLog` the caller passed and comes back to it; nothing is parked on the modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsray.config import ModelConfig
from dsray.model.dispatch import Dispatcher, LocalDispatcher
from dsray.model.experts import RoutedExperts


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
    """Routing scores -> (weights_TK, ids_TK, scores_TE). Weight and bias are fp32 whatever the model dtype."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        # Buffer, not parameter: it is never trained by gradients, only nudged by the balancing rule.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, replay_TK: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        T, E, G, K = x_TD.shape[0], cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid() if cfg.scoring_func == "sigmoid" else logits_TE.softmax(dim=-1)
        if replay_TK is not None:
            ids_TK = replay_TK.to(device=x_TD.device, dtype=torch.int64)
        else:
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
                choice_TE = choice_TE.masked_fill(~keep_TG[:, :, None].expand(T, G, E // G).reshape(T, E),
                                                  float("-inf"))
            ids_TK = choice_TE.topk(K, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if cfg.norm_topk_prob and K > 1:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * cfg.routed_scaling_factor, ids_TK, scores_TE


@dataclass
class RouteLog:
    """Routing facts of one forward call, appended by each MoE layer in forward order (main layers,
    then MTP blocks). Pass one per call (and per micro-batch); read it after the call."""

    seq_aux_alpha: float = 0.0  # > 0 (with grad): DeepSeek-V3's sequence-wise balance loss terms
    record: bool = False  # keep each layer's ids_TK (rollout routing for RL)
    replay: Sequence[torch.Tensor] | None = None  # per MoE layer: ids_TK to use instead of the gate's choice
    counts: list[torch.Tensor] = field(default_factory=list)  # per layer [E]: assignments of valid tokens
    balance: list[torch.Tensor] = field(default_factory=list)  # per layer [B]
    ids: list[torch.Tensor] = field(default_factory=list)  # per layer [T, K] when `record`

    def counts_LE(self) -> torch.Tensor:
        return torch.stack(self.counts) if self.counts else torch.zeros(0, 0)

    def routing(self, batch: int) -> torch.Tensor:
        """Recorded ids as [B, S, n_layers, K] (logical expert ids)."""
        return torch.stack(self.ids, dim=1).view(batch, -1, len(self.ids), self.ids[0].shape[-1])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: str = "grouped") -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts: RoutedExperts | None = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size,
                                                           cfg.moe_intermediate_size, impl)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        # Local by default; expert parallelism (dsray.parallel.ep.apply_ep) swaps in its own.
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.n_routed_experts)

    def forward(self, x: torch.Tensor, log: RouteLog | None = None, valid: torch.Tensor | None = None
                ) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        valid_T = None if valid is None else valid.reshape(-1)
        replay = log.replay[len(log.counts)] if log is not None and log.replay is not None else None
        if replay is not None:
            replay = replay.reshape(-1, self.cfg.num_experts_per_tok)
        weights_TK, ids_TK, scores_TE = self.gate(x_TD, replay)
        if log is not None:
            self._record(log, ids_TK, scores_TE, valid_T, x.shape[0] if x.dim() == 3 else 1)
        y_TD = self.routed(x_TD, weights_TK, ids_TK, valid_T)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(x.shape)

    def routed(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> torch.Tensor:
        x_RD, counts, meta = self.dispatcher.dispatch(x_TD, weights_TK, ids_TK, valid_T)
        y_RD = self.experts(x_RD, counts) if self.experts is not None else x_RD[:0] * 0
        return self.dispatcher.combine(y_RD, meta)

    def _record(self, log: RouteLog, ids_TK: torch.Tensor, scores_TE: torch.Tensor, valid_T: torch.Tensor | None,
                B: int) -> None:
        E = self.cfg.n_routed_experts
        with torch.no_grad():
            counted = ids_TK if valid_T is None else ids_TK[valid_T.to(ids_TK.device)]
            log.counts.append(torch.bincount(counted.flatten(), minlength=E))
        if log.record:
            log.ids.append(ids_TK.detach())
        if log.seq_aux_alpha > 0 and torch.is_grad_enabled():
            log.balance.append(self.seq_balance_loss(scores_TE, ids_TK, B, log.seq_aux_alpha))

    def seq_balance_loss(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor, B: int, alpha: float) -> torch.Tensor:
        """alpha * sum_i f_i * P_i per sequence (DeepSeek-V3 eq. 17-20): f_i = E/(K*S) * #tokens of the
        sequence routed to i (a constant), P_i = mean over the sequence of normalised scores s_i/sum_j s_j."""
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        S = scores_TE.shape[0] // B
        with torch.no_grad():
            hits_BE = torch.zeros(B, E, device=ids_TK.device).scatter_add_(
                1, ids_TK.reshape(B, S * K), torch.ones(B, S * K, device=ids_TK.device))
            f_BE = hits_BE * (E / (K * S))
        p_BE = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).view(B, S, E).mean(dim=1)
        return alpha * (f_BE * p_BE).sum(dim=-1)
