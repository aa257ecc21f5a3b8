"""Expert-parallel dispatch over a process group: each token crosses the wire once per destination rank.

    x_RD, counts, meta = d.dispatch(x_TD, weights_TK, ids_TK)   # rows for this rank's local slots, by slot
    y_RD = experts(x_RD, counts)
    y_TD = d.combine(y_RD, meta)                                # sum_k weights_TK[t, k] * expert_{ids[t, k]}(x_t)

Dispatch (DeepEP's rule, DESIGN.md): a token goes once to every rank that holds at least one of its K
experts, with a [2K] side row: the gate weights of the experts that rank serves and their local slots
(-1 for the others). The receiver expands each row to its local experts; combine sums those experts'
outputs weighted by the gate weights into one row per (token, rank) (a batched GEMV, fp32 accumulation)
and sends it back; the source adds the rows of its token's destinations (fp32). With top-8 on one shard
that is 8x fewer bytes than sending a row per assignment. Forward and backward are exact: the backward
of an all-to-all is the all-to-all with the split sizes swapped, and the gate weights travel inside the
autograd graph, so their gradients come back too.

FP8 dispatch (`dispatch_dtype=torch.float8_e4m3fn`, DeepSeek-V3's recipe): the token rows cross the wire
as e4m3 with one fp32 scale per 1 x 128 tile along D (`dsray.fp8.quantize_fp8_rows`), as raw uint8 bytes
(gloo cannot send float8; NCCL takes the same bytes), the scales appended to the fp32 side rows; the
receiver dequantises to the model dtype before the experts. Combine (the weighted rows coming back) stays
in the model dtype. Backward is straight-through w.r.t. the quantisation, as DeepSeek-V3 trains: the
gradient of the received rows goes back in the model dtype, unquantised, as if the rows had been sent
exactly (d dequant(quant(x)) / dx := I). Per element |received - x| <= 2^-4 |x| + 2^-10 scale, at most
2^-4 of the tile's max magnitude (`quantize_fp8_rows`). At D = 7168, K = 8 a row costs 7168 + 224
(scales) + 64 (side row) bytes instead of 14336 + 64 in bf16: 0.52x.

Per call: one all-to-all of an int64 [W, S + 7] count-and-header matrix (the only host sync), then one
`_Exchange` (rows and side rows) out and one all-to-all of weighted rows back. Every rank of the group
calls dispatch/combine in lockstep (same layers, same order); ranks with no tokens pass x [0, D].
The header makes every rank raise the same error (placement version, dtype, width, grad mode, bad ids)
instead of some of them hanging in the next collective.

Replica choice (deterministic): the i-th assignment of expert e on source rank s, counting assignments
in row-major (t, k) order, goes to replica `(i + s) % n_replicas[e]` of e (replicas in rank order).

Shape legend: T tokens here, K top-k, D hidden, N kept assignments, P (token, destination) pairs sent,
M pairs received, R rows for local slots, W ranks, S = max slots on any rank, B = ceil(D / 128) scale tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dsray.fp8 import ACT_BLOCK, dequantize_fp8_rows, quantize_fp8_rows
from dsray.model.dispatch import check_inputs, kept_assignments, weighted_sum
from dsray.parallel.placement import Placement, RouteTable


@dataclass(frozen=True, eq=False)
class DispatchMeta:
    """What `combine` (and autograd) needs from one `dispatch` call. Returned, never kept on self."""

    n_tokens: int  # T
    pos_R: Tensor  # (m*K + k) of each slot-ordered local row
    w_MK: Tensor  # gate weights of the received pairs (0 where another rank serves the expert)
    tok_P: Tensor  # source token of each sent pair
    send_splits: tuple[int, ...]  # pairs sent to each rank
    recv_splits: tuple[int, ...]  # pairs received from each rank
    needs_grad: bool  # some rank records autograd for this layer: combine must too
    rows_sent: int  # P: (token, destination rank) rows this rank sent, its own rank included
    # Payload bytes of those P rows in dispatch, exactly: token rows (P*D*element size of the wire
    # dtype) + side rows (P*2K*4) + fp8 scales (P*ceil(D/128)*4). Not counted: the count/header
    # exchange (W*(S+7)*8) and combine's way back (P rows of D in the model dtype, received here).
    bytes_sent: int


def _all_to_all(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv, send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows of x go out in `send` splits, come in as `recv`; backward swaps them."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (send, recv), group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        send, recv = ctx.splits
        return _all_to_all(grad, recv, send, ctx.group), None, None, None


class _Exchange(torch.autograd.Function):
    """Token rows and side rows out in one autograd node, so that every rank's backward issues the two
    reverse all-to-alls in the same order whatever its graph looks like.

    With `fp8`, x goes out as e4m3 bytes with its 1 x 128 scales appended to the side rows and comes in
    dequantised to x's dtype; backward is straight-through (the gradient goes back unquantised)."""

    @staticmethod
    def forward(ctx, x_PD: Tensor, side_P2K: Tensor, send: list[int], recv: list[int], group, fp8: bool):
        ctx.splits, ctx.group = (send, recv), group
        ctx.shapes = (x_PD.shape[1:], x_PD.dtype, side_P2K.shape[1:], side_P2K.dtype)
        if not fp8:
            return _all_to_all(x_PD, send, recv, group), _all_to_all(side_P2K, send, recv, group)
        q_PD, scale_PB = quantize_fp8_rows(x_PD)
        q_MD = _all_to_all(q_PD.view(torch.uint8), send, recv, group).view(torch.float8_e4m3fn)
        side_MC = _all_to_all(torch.cat([side_P2K, scale_PB], dim=1), send, recv, group)
        n_side = side_P2K.shape[1]
        x_MD = dequantize_fp8_rows(q_MD, side_MC[:, n_side:].contiguous(), x_PD.dtype)
        return x_MD, side_MC[:, :n_side].contiguous()

    @staticmethod
    def backward(ctx, g_x: Tensor | None, g_side: Tensor | None):
        send, recv = ctx.splits
        (xs, xd, ss, sd), M = ctx.shapes, sum(recv)
        dev = (g_x if g_x is not None else g_side).device
        g_x = g_x if g_x is not None else torch.zeros((M, *xs), dtype=xd, device=dev)
        g_side = g_side if g_side is not None else torch.zeros((M, *ss), dtype=sd, device=dev)
        return (_all_to_all(g_x, recv, send, ctx.group), _all_to_all(g_side, recv, send, ctx.group),
                None, None, None, None)


def parse_dispatch_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """None (rows in the model dtype) or torch.float8_e4m3fn, given as the dtype or its name; anything
    else, or FP8 on a torch without float8, raises ValueError naming the value. Cheap: call it to
    validate user input before starting any rank."""
    if value is None:
        return None
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if value in ("float8_e4m3fn", "torch.float8_e4m3fn") or (fp8 is not None and value is fp8):
        if fp8 is None:
            raise ValueError(f"dispatch_dtype={value!r} needs torch.float8_e4m3fn, which torch "
                             f"{torch.__version__} does not have")
        return fp8
    raise ValueError(f"dispatch_dtype={value!r}: expected None or 'float8_e4m3fn' (torch.float8_e4m3fn)")


# Header columns after the S per-slot counts: pairs for that rank, then one copy of this rank's state.
_H_PAIRS, _H_VERSION, _H_GRAD, _H_BAD_IDS, _H_DTYPE, _H_WIDTH, _H_WIRE, _N_HEADER = 0, 1, 2, 3, 4, 5, 6, 7
_GRAD_OFF, _GRAD_NOT_NEEDED, _GRAD_NEEDED = 0, 1, 2  # autograd disabled / enabled, x needs no grad / needs grad
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class AllToAllDispatcher:
    """Expert-parallel dispatch over `group` (gloo or NCCL). Placement ranks are ranks of `group`.

    For training every rank backpropagates through every layer, expert-only ranks included: they start
    from `h = torch.zeros(0, D, requires_grad=True)`, run the layers with `h = h + combine(...)` and
    finish with `h.backward(torch.zeros(0, D))` (see `dsray.parallel.ep.expert_pass`), so their backward
    collectives meet the token ranks' ones. `experts(x_RD, counts)` must keep y_RD in the autograd graph
    of x_RD even when it has no rows (a slice or matmul of x_RD does; `new_zeros` does not)."""

    def __init__(self, placement: Placement, group: dist.ProcessGroup | None = None,
                 dispatch_dtype: torch.dtype | str | None = None) -> None:
        self.dispatch_dtype = parse_dispatch_dtype(dispatch_dtype)  # None: rows go in the model dtype
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if placement.world_size != self.world_size:
            raise ValueError(
                f"placement.world_size is {placement.world_size} but the process group has {self.world_size} ranks")
        self.placement = placement
        self.n_local = len(placement.local_experts(self.rank))
        backend = str(dist.get_backend(group))
        # The count matrix must live where the backend can send it: CUDA for NCCL, CPU for gloo.
        self._count_device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                              else torch.device("cpu") if backend == "gloo" else None)
        self._tables: dict[torch.device, RouteTable] = {}

    def _table(self, device: torch.device) -> RouteTable:
        if device not in self._tables:
            self._tables[device] = self.placement.route_table(device)
        return self._tables[device]

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor,
                 valid_T: Tensor | None = None) -> tuple[Tensor, list[int], DispatchMeta]:
        check_inputs(x_TD, weights_TK, ids_TK)
        T, K = ids_TK.shape
        W, E, dev = self.world_size, self.placement.n_experts, x_TD.device
        rt = self._table(dev)
        S = rt.max_slots
        n_N, ids_N = kept_assignments(ids_TK.to(dev), valid_T)
        N = ids_N.numel()
        # Bad ids are reported through the count exchange (all ranks raise together); clamp meanwhile.
        bad_ids = ((ids_N < 0) | (ids_N >= E)).any() if N else torch.zeros((), dtype=torch.bool, device=dev)
        ids_N = ids_N.clamp(0, E - 1)
        if rt.max_replicas > 1:  # i-th assignment of expert e here -> replica (i + rank) % n_replicas[e]
            sorted_e, by_e = torch.sort(ids_N, stable=True)
            per_e = torch.bincount(ids_N, minlength=E)
            i_sorted = torch.arange(N, device=dev) - (torch.cumsum(per_e, 0) - per_e)[sorted_e]
            i_N = torch.empty_like(i_sorted)
            i_N[by_e] = i_sorted
            rep_N = (i_N + self.rank) % rt.n_replicas[ids_N]
        else:
            rep_N = torch.zeros_like(ids_N)
        rank_N, slot_N = rt.rank_ER[ids_N, rep_N], rt.slot_ER[ids_N, rep_N]
        t_N, k_N = n_N // max(K, 1), n_N % max(K, 1)
        # One pair per (destination rank, token), sorted by rank then token: the all-to-all send order.
        keys_P, pair_N = torch.unique(rank_N * max(T, 1) + t_N, sorted=True, return_inverse=True)
        tok_P, rank_P = keys_P % max(T, 1), keys_P // max(T, 1)
        P = keys_P.numel()

        fp8 = self.dispatch_dtype is not None
        grad_on = torch.is_grad_enabled()
        needs = x_TD.requires_grad or weights_TK.requires_grad
        grad_mode = _GRAD_NEEDED if grad_on and needs else (_GRAD_NOT_NEEDED if grad_on else _GRAD_OFF)
        cdev = self._count_device or dev
        send_WC = torch.empty((W, S + _N_HEADER), dtype=torch.int64, device=cdev)
        send_WC[:, :S] = torch.bincount(rank_N * S + slot_N, minlength=W * S).view(W, S).to(cdev)
        send_WC[:, S + _H_PAIRS] = torch.bincount(rank_P, minlength=W).to(cdev)
        send_WC[:, S + _H_VERSION] = self.placement.version
        send_WC[:, S + _H_GRAD] = grad_mode
        send_WC[:, S + _H_BAD_IDS] = bad_ids.to(cdev)
        send_WC[:, S + _H_DTYPE] = _DTYPES.index(x_TD.dtype) if x_TD.dtype in _DTYPES else -1
        send_WC[:, S + _H_WIDTH] = x_TD.shape[1]
        send_WC[:, S + _H_WIRE] = 1 if fp8 else 0
        recv_WC = torch.empty_like(send_WC)
        dist.all_to_all_single(recv_WC, send_WC, group=self.group)
        sent, got = torch.stack([send_WC, recv_WC]).tolist()  # host sync (the only one)
        needs_grad = self._check_header(got, S, grad_mode)
        send = [row[S + _H_PAIRS] for row in sent]
        recv = [row[S + _H_PAIRS] for row in got]
        counts = [sum(got[src][s] for src in range(W)) for s in range(self.n_local)]

        x_PD = x_TD.index_select(0, tok_P)
        slot_PK = torch.full((P * K,), -1, dtype=torch.float32, device=dev).index_put_((pair_N * K + k_N,),
                                                                                       slot_N.float())
        w_PK = torch.zeros(P * K, dtype=torch.float32, device=dev).index_put(
            (pair_N * K + k_N,), weights_TK.reshape(-1).float().index_select(0, n_N))
        side_P2K = torch.cat([w_PK.view(P, K), slot_PK.view(P, K)], dim=1)
        if needs_grad and not (x_PD.requires_grad or side_P2K.requires_grad):
            # This rank needs no grad but another does: record the exchange anyway (on a throwaway
            # leaf) so that this rank's backward issues its reverse all-to-alls too.
            x_PD = x_PD.detach().requires_grad_()
        x_MD, side_M2K = _Exchange.apply(x_PD, side_P2K, send, recv, self.group, fp8)

        w_MK, slot_MK = side_M2K[:, :K], side_M2K[:, K:].detach().long()
        mk_R = (slot_MK.reshape(-1) >= 0).nonzero().squeeze(1)  # (m*K + k) served here, row-major
        pos_R = mk_R.index_select(0, torch.sort(slot_MK.reshape(-1).index_select(0, mk_R), stable=True).indices)
        x_RD = x_MD.index_select(0, pos_R // max(K, 1))
        meta = DispatchMeta(n_tokens=T, pos_R=pos_R, w_MK=w_MK, tok_P=tok_P, send_splits=tuple(send),
                            recv_splits=tuple(recv), needs_grad=needs_grad, rows_sent=P,
                            bytes_sent=P * self.row_bytes(x_TD.shape[1], K, x_TD.dtype))
        return x_RD, counts, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta) -> Tensor:
        if y_RD.dim() != 2 or y_RD.shape[0] != meta.pos_R.numel():
            raise ValueError(f"y_RD must be [{meta.pos_R.numel()}, D] (sum of counts), got {tuple(y_RD.shape)}")
        if meta.needs_grad and not y_RD.requires_grad:
            raise RuntimeError(
                f"rank {self.rank}: combine got y_RD without autograd history although dispatch recorded it; "
                "experts() must keep y_RD in x_RD's graph (also with zero rows), or peers hang in backward")
        z_MD = weighted_sum(y_RD, meta.pos_R, meta.w_MK)  # one gate-weighted row per received pair
        z_PD = _AllToAll.apply(z_MD, list(meta.recv_splits), list(meta.send_splits), self.group)
        out = torch.zeros(meta.n_tokens, y_RD.shape[1], dtype=torch.float32, device=y_RD.device)
        return out.index_add(0, meta.tok_P, z_PD.float()).to(y_RD.dtype)

    def row_bytes(self, D: int, K: int, dtype: torch.dtype) -> int:
        """Dispatch payload bytes per (token, destination) row: the token row in the wire dtype, its
        [2K] fp32 side row, and with FP8 its ceil(D / 128) fp32 scales."""
        if self.dispatch_dtype is None:
            return D * torch.empty((), dtype=dtype).element_size() + 2 * K * 4
        return D + 2 * K * 4 + -(-D // ACT_BLOCK) * 4

    def _check_header(self, got: list[list[int]], S: int, grad_mode: int) -> bool:
        """Same verdict on every rank: each rank sees the header of every rank."""
        versions = [row[S + _H_VERSION] for row in got]
        if len(set(versions)) != 1:
            raise RuntimeError(f"ranks dispatch with different placement versions (by rank): {versions}")
        dtypes = [_DTYPES[c] if c >= 0 else "other" for c in (row[S + _H_DTYPE] for row in got)]
        widths = [row[S + _H_WIDTH] for row in got]
        if len(set(dtypes)) != 1 or len(set(widths)) != 1:
            raise RuntimeError(f"ranks dispatch rows of different dtype or width (by rank): {dtypes}, D = {widths}")
        wires = [row[S + _H_WIRE] for row in got]
        if len(set(wires)) != 1:
            names = ["float8_e4m3fn" if w else "model dtype" for w in wires]
            raise RuntimeError(f"ranks dispatch with different dispatch_dtype (by rank): {names}")
        bad = [r for r, row in enumerate(got) if row[S + _H_BAD_IDS]]
        if bad:
            raise ValueError(f"ids_TK on rank(s) {bad} has expert ids outside [0, {self.placement.n_experts})")
        modes = [row[S + _H_GRAD] for row in got]
        if _GRAD_NEEDED in modes and _GRAD_OFF in modes:
            off = [r for r, m in enumerate(modes) if m == _GRAD_OFF]
            raise RuntimeError(f"rank(s) {off} dispatch with autograd disabled while other ranks record it; "
                               "backward would hang: run every rank of the group in the same grad mode")
        assert modes[self.rank] == grad_mode
        return _GRAD_NEEDED in modes
