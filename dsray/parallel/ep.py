"""Expert parallelism glue: the routed path for token ranks and the lockstep pass for expert ranks.

Every rank of the group runs the MoE layers in the same order and meets the others only in the
dispatcher's collectives. Token ranks (drivers) plug `EPRouted` into each `MoE.routed`; ranks without
tokens (expert shards, idle drivers) run `expert_pass`, which walks the same layers with an empty
[0, D] hidden state so that forward and backward collectives line up on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dsray.model.moe import RoutedExperts, combine_weighted


class A2ATimer:
    """Wall time of dispatch and combine per layer (host clock; on CUDA it measures launch + sync
    points inside the collective, good enough for dashboards, not for kernel profiling)."""

    def __init__(self) -> None:
        self.samples: dict[tuple[int, str], list[float]] = {}

    def add(self, layer: int, phase: str, seconds: float) -> None:
        self.samples.setdefault((layer, phase), []).append(seconds)

    def pop(self) -> dict[tuple[int, str], list[float]]:
        out, self.samples = self.samples, {}
        return out


class EPRouted:
    """`MoE.routed` for a rank that holds tokens: dispatch -> local experts (if any) -> combine -> weigh."""

    def __init__(self, dispatcher, experts: RoutedExperts | None, layer: int, timer: A2ATimer | None = None):
        self.dispatcher, self.experts, self.layer, self.timer = dispatcher, experts, layer, timer

    def __call__(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        x_RD, counts, meta = self.dispatcher.dispatch(x_TD, ids_TK)
        t1 = time.perf_counter()
        y_RD = self.experts(x_RD, counts) if self.experts is not None else x_RD[:0] * 0
        t2 = time.perf_counter()
        y_TKD = self.dispatcher.combine(y_RD, meta)
        if self.timer is not None:
            self.timer.add(self.layer, "dispatch", t1 - t0)
            self.timer.add(self.layer, "combine", time.perf_counter() - t2)
        return combine_weighted(y_TKD, weights_TK)


def expert_pass(dispatcher, experts: Sequence[RoutedExperts | None], dim: int, top_k: int,
                device: torch.device, dtype: torch.dtype, grad: bool) -> torch.Tensor:
    """One lockstep pass over `experts` (one entry per MoE layer, in forward order) with no tokens.

    With grad=True the returned [0, D] tensor carries the whole chain; `h.backward(torch.zeros_like(h))`
    then replays the collectives in reverse layer order, meeting the token ranks' backward."""
    with torch.set_grad_enabled(grad):
        h = torch.zeros(0, dim, device=device, dtype=dtype, requires_grad=grad)
        ids = torch.zeros(0, top_k, device=device, dtype=torch.int64)
        for ex in experts:
            x_RD, counts, meta = dispatcher.dispatch(h, ids)
            y_RD = ex(x_RD, counts) if ex is not None else x_RD[:0] * 0
            h = h + dispatcher.combine(y_RD, meta).sum(dim=1)
    return h


def vote(want: bool, group=None, device: torch.device | str = "cpu") -> bool:
    """All ranks agree whether another lockstep pass follows: true if any rank wants one."""
    t = torch.tensor([1 if want else 0], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())  # host sync
