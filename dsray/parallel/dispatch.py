"""Token dispatchers: the `dispatch` and `combine` seams of the MoE.

    x_RD, counts, meta = d.dispatch(x_TD, ids_TK)   # rows for this rank's local slots, grouped by slot
    y_RD = experts(x_RD, counts)                     # grouped GEMM over contiguous per-slot blocks
    y_TKD = d.combine(y_RD, meta)                    # row (t, k) = expert ids_TK[t, k] applied to x_TD[t]
    y_TD = (y_TKD * weights_TK[..., None]).sum(1)   # weighting stays outside: gate grads are plain autograd

Shape legend: T tokens on this rank, K experts per token (top-k), D hidden size, N = T*K assignments,
R rows received by this rank (sum of `counts`), W ranks in the group, S = max slots on any rank.

Dropless (no capacity). `meta` carries everything combine needs, so one dispatcher can interleave
several micro-batches. Both directions are differentiable: the backward of an all-to-all is the
all-to-all with the split sizes swapped, so backward issues exactly the forward's collectives in
reverse order on every rank, provided every rank runs the same layers in lockstep and backpropagates
through them (expert-only ranks do so with an empty [0, D] hidden state, see `AllToAllDispatcher`).

Replica choice (deterministic, no randomness): the i-th assignment of expert e on source rank s,
counting assignments in row-major (t, k) order, goes to replica `(i + s) % n_replicas[e]` of e
(replicas in rank order). Each rank spreads its rows over replicas to within one row, and the offset
by `s` rotates which replica gets the extra row, so replicas share load evenly across source ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dsray.parallel.placement import Placement, RouteTable


@dataclass(frozen=True, eq=False)
class DispatchMeta:
    """What `combine` (and autograd) needs from one `dispatch` call. Returned, never kept on self."""

    n_tokens: int  # T
    top_k: int  # K
    counts: tuple[int, ...]  # rows per local slot, in slot order
    inv_order_N: Tensor  # y_sorted[inv_order_N] puts sent rows back in (t, k) row-major order
    inv_perm_R: Tensor  # y_RD[inv_perm_R] puts slot-ordered rows back in (source rank, slot) order
    send_splits: tuple[int, ...] = ()  # rows sent to each rank by dispatch (all-to-all only)
    recv_splits: tuple[int, ...] = ()  # rows received from each rank by dispatch (all-to-all only)
    needs_grad: bool = False  # some rank records autograd for this layer: combine must too


def _check_inputs(x_TD: Tensor, ids_TK: Tensor) -> None:
    if x_TD.dim() != 2 or ids_TK.dim() != 2 or x_TD.shape[0] != ids_TK.shape[0]:
        raise ValueError(f"expected x_TD [T, D] and ids_TK [T, K], got {tuple(x_TD.shape)} and {tuple(ids_TK.shape)}")
    if ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
        raise ValueError(f"ids_TK must be an integer tensor, got {ids_TK.dtype}")


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _rows_back(y_RD: Tensor, meta: DispatchMeta) -> None:
    if y_RD.dim() != 2 or y_RD.shape[0] != sum(meta.counts):
        raise ValueError(f"y_RD must be [{sum(meta.counts)}, D] (sum of counts), got {tuple(y_RD.shape)}")


class LocalDispatcher:
    """World of one: every expert lives in this process, in the slot order of `placement.slots[rank]`.

    Pure data movement (a stable sort by slot), so running experts through it is bit-identical to
    applying each expert to its tokens in token order. The single-process reference for the
    all-to-all dispatcher.
    """

    def __init__(self, placement: Placement, rank: int = 0) -> None:
        local = placement.local_experts(rank)
        if len(local) != placement.n_experts:
            raise ValueError(
                f"LocalDispatcher: rank {rank} hosts {len(local)} of {placement.n_experts} experts; it needs all"
            )
        self.placement = placement
        self.rank = rank
        self._slot_of = torch.empty(placement.n_experts, dtype=torch.int64)
        self._slot_of[torch.tensor(local, dtype=torch.int64)] = torch.arange(len(local))
        self._slot_of_by_device: dict[torch.device, Tensor] = {}

    def dispatch(self, x_TD: Tensor, ids_TK: Tensor) -> tuple[Tensor, list[int], DispatchMeta]:
        _check_inputs(x_TD, ids_TK)
        T, K = ids_TK.shape
        dev = x_TD.device
        slot_of = self._slot_of_by_device.get(dev)
        if slot_of is None:
            slot_of = self._slot_of_by_device.setdefault(dev, self._slot_of.to(dev))
        E = self.placement.n_experts
        ids_N = ids_TK.reshape(-1).to(device=dev, dtype=torch.int64)
        n_bad = ((ids_N < 0) | (ids_N >= E)).sum().view(1)
        slot_N = slot_of[ids_N.clamp(0, E - 1)]
        order_N = torch.sort(slot_N, stable=True).indices  # stable: token order within a slot
        *counts, bad = torch.cat([torch.bincount(slot_N, minlength=E), n_bad]).tolist()  # host sync
        if bad:
            raise ValueError(f"ids_TK has {bad} expert id(s) outside [0, {E})")
        x_RD = x_TD.index_select(0, order_N // K) if K else x_TD[:0]
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        meta = DispatchMeta(n_tokens=T, top_k=K, counts=tuple(counts), inv_order_N=_inverse(order_N), inv_perm_R=empty)
        return x_RD, counts, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta) -> Tensor:
        _rows_back(y_RD, meta)
        return y_RD.index_select(0, meta.inv_order_N).view(meta.n_tokens, meta.top_k, *y_RD.shape[1:])


class _AllToAll(torch.autograd.Function):
    """Rows of x_ND go out in `send_splits`, come in as `recv_splits`; backward swaps them."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _all_to_all(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        send_splits, recv_splits = ctx.splits
        return _all_to_all(grad_MD, recv_splits, send_splits, ctx.group), None, None, None


def _all_to_all(x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    x_ND = x_ND.contiguous()
    out = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(out, x_ND, recv_splits, send_splits, group=group)
    return out


# Per-peer header sent with the counts, so that every rank sees every rank's state and all ranks
# raise the same error instead of some of them hanging in the next collective.
_H_VERSION, _H_GRAD, _H_BAD_IDS, _H_DTYPE, _H_WIDTH, _N_HEADER = 0, 1, 2, 3, 4, 5
_GRAD_OFF, _GRAD_NOT_NEEDED, _GRAD_NEEDED = 0, 1, 2  # autograd disabled / enabled, x needs no grad / x needs grad
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)


class AllToAllDispatcher:
    """Expert-parallel dispatch over `group` (gloo or NCCL) with `all_to_all_single` and split sizes.

    Every rank of `group` calls dispatch/combine in lockstep (same layers, same order); ranks with no
    tokens pass x [0, D] and ids [0, K]. For training, each rank backpropagates through every layer,
    expert-only ranks included: start from `h = torch.zeros(0, D, requires_grad=True)`, run the layers
    with `h = h + y_TKD.sum(1)` and finish with `h.backward(torch.zeros(0, D))`, so their backward
    collectives meet the token ranks' ones. `experts(x_RD, counts)` must keep y_RD in the autograd graph
    of x_RD even when it has no rows (a slice or matmul of x_RD does; `new_zeros` does not).

    Per call: one all-to-all of an int64 [W, S + 5] count-and-header matrix (the only host sync), one all-to-all
    of the rows each way. Placement ranks are ranks of `group`.
    """

    def __init__(self, placement: Placement, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if placement.world_size != self.world_size:
            raise ValueError(
                f"placement.world_size is {placement.world_size} but the process group has {self.world_size} ranks"
            )
        self.placement = placement
        self.n_local = len(placement.local_experts(self.rank))
        backend = str(dist.get_backend(group))
        # The count matrix must live where the backend can send it: CUDA for NCCL, CPU for gloo;
        # for a mixed backend ("cpu:gloo,cuda:nccl") next to the tokens.
        if backend == "nccl":
            self._count_device: torch.device | None = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            self._count_device = torch.device("cpu")
        else:
            self._count_device = None
        self._tables: dict[torch.device, RouteTable] = {}

    def _table(self, device: torch.device) -> RouteTable:
        table = self._tables.get(device)
        if table is None:
            table = self._tables.setdefault(device, self.placement.route_table(device))
        return table

    def dispatch(self, x_TD: Tensor, ids_TK: Tensor) -> tuple[Tensor, list[int], DispatchMeta]:
        _check_inputs(x_TD, ids_TK)
        T, K = ids_TK.shape
        W, E = self.world_size, self.placement.n_experts
        dev = x_TD.device
        rt = self._table(dev)
        S = rt.max_slots
        ids_N = ids_TK.reshape(-1).to(device=dev, dtype=torch.int64)
        N = ids_N.numel()

        # Bad ids are reported through the count exchange (all ranks raise together); clamp meanwhile.
        bad_ids = ((ids_N < 0) | (ids_N >= E)).any() if N else torch.zeros((), dtype=torch.bool, device=dev)
        ids_N = ids_N.clamp(0, E - 1)

        # Replica choice: i-th assignment of expert e on this rank -> replica (i + rank) % n_replicas[e].
        if rt.max_replicas > 1:
            sorted_e, by_e = torch.sort(ids_N, stable=True)
            per_e = torch.bincount(ids_N, minlength=E)
            first = torch.cumsum(per_e, 0) - per_e  # index of expert e's first assignment in sorted order
            i_sorted = torch.arange(N, device=dev) - first[sorted_e]
            i_N = torch.empty_like(i_sorted)
            i_N[by_e] = i_sorted
            rep_N = (i_N + self.rank) % rt.n_replicas[ids_N]
        else:
            rep_N = torch.zeros_like(ids_N)
        key_N = rt.rank_ER[ids_N, rep_N] * S + rt.slot_ER[ids_N, rep_N]  # destination (rank, slot)
        order_N = torch.sort(key_N, stable=True).indices  # stable: (t, k) order within a slot

        grad_on = torch.is_grad_enabled()
        grad_mode = _GRAD_NEEDED if grad_on and x_TD.requires_grad else (_GRAD_NOT_NEEDED if grad_on else _GRAD_OFF)
        cdev = self._count_device or dev
        send_WC = torch.empty((W, S + _N_HEADER), dtype=torch.int64, device=cdev)
        send_WC[:, :S] = torch.bincount(key_N, minlength=W * S).view(W, S).to(cdev)
        send_WC[:, S + _H_VERSION] = self.placement.version
        send_WC[:, S + _H_GRAD] = grad_mode
        send_WC[:, S + _H_BAD_IDS] = bad_ids.to(cdev)
        send_WC[:, S + _H_DTYPE] = _DTYPES.index(x_TD.dtype) if x_TD.dtype in _DTYPES else -1
        send_WC[:, S + _H_WIDTH] = x_TD.shape[1]
        recv_WC = torch.empty_like(send_WC)
        dist.all_to_all_single(recv_WC, send_WC, group=self.group)
        both = torch.stack([send_WC, recv_WC]).tolist()  # host sync (the only one)
        send_counts, recv_rows = both[0], both[1]
        needs_grad = self._check_header(recv_rows, S, grad_mode)

        send_splits = [sum(row[:S]) for row in send_counts]
        recv_WS = [row[:S] for row in recv_rows]
        recv_splits = [sum(row) for row in recv_WS]
        counts = [sum(recv_WS[src][s] for src in range(W)) for s in range(self.n_local)]

        x_ND = x_TD.index_select(0, order_N // K) if K else x_TD[:0]
        if needs_grad and not x_ND.requires_grad:
            # This rank's x needs no grad but another rank's does: record the collective anyway (on a
            # throwaway leaf) so that this rank's backward issues it too.
            x_ND = x_ND.detach().requires_grad_()
        x_MD = _AllToAll.apply(x_ND, send_splits, recv_splits, self.group)

        # Received rows are in (source rank, slot) order; regroup them into slot order.
        R = sum(recv_splits)
        recv_counts = recv_WC[:, :S].reshape(-1).to(dev)
        block_R = torch.repeat_interleave(torch.arange(W * S, device=dev), recv_counts, output_size=R)
        perm_R = torch.sort((block_R % S) * W + block_R // S, stable=True).indices
        x_RD = x_MD.index_select(0, perm_R)

        meta = DispatchMeta(
            n_tokens=T, top_k=K, counts=tuple(counts), inv_order_N=_inverse(order_N), inv_perm_R=_inverse(perm_R),
            send_splits=tuple(send_splits), recv_splits=tuple(recv_splits), needs_grad=needs_grad,
        )
        return x_RD, counts, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta) -> Tensor:
        _rows_back(y_RD, meta)
        if meta.needs_grad and not y_RD.requires_grad:
            raise RuntimeError(
                f"rank {self.rank}: combine got y_RD without autograd history although dispatch recorded it; "
                "experts() must keep y_RD in x_RD's graph (also with zero rows), or peers hang in backward"
            )
        y_MD = y_RD.index_select(0, meta.inv_perm_R)
        y_ND = _AllToAll.apply(y_MD, list(meta.recv_splits), list(meta.send_splits), self.group)
        return y_ND.index_select(0, meta.inv_order_N).view(meta.n_tokens, meta.top_k, *y_RD.shape[1:])

    def _check_header(self, recv_rows: list[list[int]], S: int, grad_mode: int) -> bool:
        """Same verdict on every rank: each rank sees the header of every rank."""
        versions = [row[S + _H_VERSION] for row in recv_rows]
        if len(set(versions)) != 1:
            raise RuntimeError(f"ranks dispatch with different placement versions (by rank): {versions}")
        dtypes = [_DTYPES[c] if c >= 0 else "other" for c in (row[S + _H_DTYPE] for row in recv_rows)]
        widths = [row[S + _H_WIDTH] for row in recv_rows]
        if len(set(dtypes)) != 1 or len(set(widths)) != 1:
            raise RuntimeError(f"ranks dispatch rows of different dtype or width (by rank): {dtypes}, D = {widths}")
        bad = [r for r, row in enumerate(recv_rows) if row[S + _H_BAD_IDS]]
        if bad:
            raise ValueError(f"ids_TK on rank(s) {bad} has expert ids outside [0, {self.placement.n_experts})")
        modes = [row[S + _H_GRAD] for row in recv_rows]
        if _GRAD_NEEDED in modes and _GRAD_OFF in modes:
            off = [r for r, m in enumerate(modes) if m == _GRAD_OFF]
            raise RuntimeError(
                f"rank(s) {off} dispatch with autograd disabled while other ranks record it; "
                "backward would hang: run every rank of the group in the same grad mode"
            )
        assert modes[self.rank] == grad_mode
        return _GRAD_NEEDED in modes
