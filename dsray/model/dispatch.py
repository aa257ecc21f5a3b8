"""The dispatch seam of the MoE, and its single-process implementation.

    x_RD, counts, meta = d.dispatch(x_TD, weights_TK, ids_TK)  # rows for this rank's local slots, by slot
    y_RD = experts(x_RD, counts)                                # grouped GEMM over contiguous per-slot blocks
    y_TD = d.combine(y_RD, meta)                                # sum_k weights_TK[t, k] * expert_{ids[t, k]}(x_t)

Every MoE goes through a dispatcher: `LocalDispatcher` (all experts in this process) by default, the
all-to-all one (`dsray.parallel.dispatch`) under expert parallelism; one process runs the same code path
as EP. The gate weighting belongs to the dispatcher because under EP it happens where the experts are
(each token crosses the wire once per destination rank, and comes back as one weighted row).
`meta` is returned, never kept on `self`, so micro-batches can interleave on one dispatcher.

`valid_T` (optional bool [T]) marks tokens that take part: the others (left padding of a batched
prompt) are routed nowhere, cost no expert compute and come back as zeros.

Shape legend: T tokens, K experts per token, D hidden, N = T*K assignments, R rows for local slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Dispatcher(Protocol):
    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor,
                 valid_T: Tensor | None = None) -> tuple[Tensor, list[int], object]: ...

    def combine(self, y_RD: Tensor, meta: object) -> Tensor: ...


def check_inputs(x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor) -> None:
    if x_TD.dim() != 2 or ids_TK.dim() != 2 or x_TD.shape[0] != ids_TK.shape[0] or weights_TK.shape != ids_TK.shape:
        raise ValueError(f"expected x_TD [T, D], weights_TK and ids_TK [T, K], got {tuple(x_TD.shape)}, "
                         f"{tuple(weights_TK.shape)} and {tuple(ids_TK.shape)}")
    if ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
        raise ValueError(f"ids_TK must be an integer tensor, got {ids_TK.dtype}")


def kept_assignments(ids_TK: Tensor, valid_T: Tensor | None) -> tuple[Tensor, Tensor]:
    """(n_N, ids_N): indices into the flattened (t, k) assignments that take part, and their expert ids."""
    K = ids_TK.shape[1]
    ids_N = ids_TK.reshape(-1).long()
    if valid_T is None:
        return torch.arange(ids_N.numel(), device=ids_N.device), ids_N
    n_N = valid_T.to(ids_N.device).repeat_interleave(K).nonzero().squeeze(1)
    return n_N, ids_N.index_select(0, n_N)


def weighted_sum(y_RD: Tensor, pos_R: Tensor, w_MK: Tensor) -> Tensor:
    """z_MD[m] = sum_k w_MK[m, k] * y at (m, k): rows `pos_R` = m*K + k, absent (m, k) count as zero.

    One batched GEMV ([M,1,K] x [M,K,D]) accumulates in fp32 inside the kernel and reads y once; an fp32
    copy of y (T*K*D*4 bytes, 1.9 GB for 8192 V3 tokens) would cost more than the expert GEMMs' epilogue."""
    M, K = w_MK.shape
    D = y_RD.shape[1]
    y_MKD = y_RD.new_zeros(M * K, D).index_copy(0, pos_R, y_RD).view(M, K, D)
    return torch.bmm(w_MK.to(y_RD.dtype)[:, None, :], y_MKD)[:, 0]


@dataclass(frozen=True, eq=False)
class LocalMeta:
    pos_R: Tensor  # (t*K + k) of each slot-ordered row
    weights_TK: Tensor


class LocalDispatcher:
    """World of one: expert e in local slot e. Pure data movement (a stable sort by expert), so experts
    through it are bit-identical to applying each expert to its tokens in token order."""

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor,
                 valid_T: Tensor | None = None) -> tuple[Tensor, list[int], LocalMeta]:
        check_inputs(x_TD, weights_TK, ids_TK)
        E, K = self.n_experts, ids_TK.shape[1]
        n_N, ids_N = kept_assignments(ids_TK, valid_T)
        bad = ((ids_N < 0) | (ids_N >= E)).sum().view(1)
        order = torch.sort(ids_N.clamp(0, E - 1), stable=True).indices  # stable: token order within an expert
        *counts, n_bad = torch.cat([torch.bincount(ids_N.clamp(0, E - 1), minlength=E), bad]).tolist()  # host sync
        if n_bad:
            raise ValueError(f"ids_TK has {n_bad} expert id(s) outside [0, {E})")
        pos_R = n_N.index_select(0, order)
        x_RD = x_TD.index_select(0, pos_R // K) if K else x_TD[:0]
        return x_RD, counts, LocalMeta(pos_R, weights_TK)

    def combine(self, y_RD: Tensor, meta: LocalMeta) -> Tensor:
        if y_RD.dim() != 2 or y_RD.shape[0] != meta.pos_R.numel():
            raise ValueError(f"y_RD must be [{meta.pos_R.numel()}, D], got {tuple(y_RD.shape)}")
        return weighted_sum(y_RD, meta.pos_R, meta.weights_TK)
