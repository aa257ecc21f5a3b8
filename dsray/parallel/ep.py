"""Expert parallelism applied to a model: one context object, one lockstep rule, one factory.

Every rank of the group runs the same MoE layers in the same order and meets the others only in the
dispatcher's collectives. Token ranks (drivers) run their `Transformer` with `apply_ep(model, ctx)`:
each MoE layer's dispatcher becomes the all-to-all one and its routed experts leave the driver. Ranks
without tokens (expert shards, drivers with nothing to do) run `expert_pass`, which walks the same layers
with an empty [0, D] hidden state so that forward and backward collectives line up on every rank.
Which layers those are is decided by `lockstep_layers`, and only there: two ranks that disagreed would
hang in a collective.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from dsray.config import ModelConfig
from dsray.model.experts import RoutedExperts
from dsray.parallel.dispatch import AllToAllDispatcher
from dsray.parallel.placement import Placement


MODES = ("train", "grpo", "logprobs", "forward", "generate")
_MTP_MODES = ("train",)  # the MTP blocks' loss trains them; every other mode uses the main model only


def lockstep_layers(cfg: ModelConfig, has_mtp: bool, mode: str) -> list[int]:
    """Checkpoint indices of the MoE layers every rank runs in `mode`, in forward order: the main layers,
    plus the MTP blocks' layers when training with MTP (their loss trains them)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    return [layer for layer in cfg.moe_layers
            if layer < cfg.num_hidden_layers or (mode in _MTP_MODES and has_mtp)]


def needs_grad(mode: str) -> bool:
    return mode in ("train", "grpo")


class A2ATimer:
    """Wall time of dispatch and combine per layer (host clock; on CUDA it measures launch + sync
    points inside the collective, good enough for dashboards, not for kernel profiling)."""

    def __init__(self) -> None:
        self.samples: dict[tuple[int, str], list[float]] = {}
        self.rows_sent = 0  # (token, destination) rows this rank sent in dispatch

    def add(self, layer: int, phase: str, seconds: float) -> None:
        self.samples.setdefault((layer, phase), []).append(seconds)

    def pop(self) -> dict[tuple[int, str], list[float]]:
        out, self.samples = self.samples, {}
        return out


@dataclass
class EPContext:
    """Everything a rank needs to take part in expert parallelism; passed in, never a global."""

    cfg: ModelConfig
    group: dist.ProcessGroup
    placement: Placement
    has_mtp: bool
    timer: A2ATimer = field(default_factory=A2ATimer)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def layers(self, mode: str) -> list[int]:
        return lockstep_layers(self.cfg, self.has_mtp, mode)


class _Timed:
    """A dispatcher that records each phase's wall time for one layer."""

    def __init__(self, inner: AllToAllDispatcher, layer: int, timer: A2ATimer) -> None:
        self.inner, self.layer, self.timer = inner, layer, timer

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, valid_T: Tensor | None = None):
        t0 = time.perf_counter()
        out = self.inner.dispatch(x_TD, weights_TK, ids_TK, valid_T)
        self.timer.add(self.layer, "dispatch", time.perf_counter() - t0)
        self.timer.rows_sent += out[2].rows_sent
        return out

    def combine(self, y_RD: Tensor, meta) -> Tensor:
        t0 = time.perf_counter()
        y = self.inner.combine(y_RD, meta)
        self.timer.add(self.layer, "combine", time.perf_counter() - t0)
        return y


def make_dispatcher(ctx: EPContext, layer: int) -> _Timed:
    """The one factory: the all-to-all dispatcher over the context's group, timed per layer."""
    return _Timed(AllToAllDispatcher(ctx.placement, ctx.group), layer, ctx.timer)


def apply_ep(model, ctx: EPContext) -> None:
    """Turn a token rank's `Transformer` into an EP participant: every MoE layer dispatches over the
    group and hosts no routed experts (they live on the shards)."""
    for layer, moe in zip(ctx.cfg.moe_layers, model.moe_modules()):
        moe.dispatcher = make_dispatcher(ctx, layer)
        moe.experts = None


def expert_pass(ctx: EPContext, experts: Mapping[int, RoutedExperts], mode: str,
                device: torch.device, dtype: torch.dtype) -> Tensor:
    """One lockstep pass over `mode`'s layers with no tokens; `experts` maps layer -> local experts
    (absent: a token rank with nothing to do this pass).

    In a grad mode the returned [0, D] tensor carries the whole chain; `h.backward(torch.zeros_like(h))`
    then replays the collectives in reverse layer order, meeting the token ranks' backward."""
    K, D = ctx.cfg.num_experts_per_tok, ctx.cfg.hidden_size
    grad = needs_grad(mode)
    with torch.set_grad_enabled(grad):
        h = torch.zeros(0, D, device=device, dtype=dtype, requires_grad=grad)
        ids = torch.zeros(0, K, device=device, dtype=torch.int64)
        w = torch.zeros(0, K, device=device, dtype=torch.float32)
        for layer in ctx.layers(mode):
            d = make_dispatcher(ctx, layer)
            x_RD, counts, meta = d.dispatch(h, w, ids)
            ex = experts.get(layer)
            h = h + d.combine(ex(x_RD, counts) if ex is not None else x_RD[:0] * 0, meta)
    return h


def vote(want: bool, group=None, device: torch.device | str = "cpu") -> bool:
    """All ranks agree whether another lockstep pass follows: true if any rank wants one."""
    t = torch.tensor([1 if want else 0], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())  # host sync
