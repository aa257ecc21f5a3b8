"""The expert store: how one shard's experts map to checkpoint keys, written once.

A shard holds, per MoE layer it serves, one stacked `RoutedExperts` over its local slots; slot i hosts
logical expert `local[i]`. Loading, export (save, moves, snapshots), import, gradients and the AdamW
moments all walk `entries()` = (layer, expert, proj, slot) and name tensors with `key()`:

    model.layers.{layer}.mlp.experts.{expert}.{proj}.weight              the weight (checkpoint layout)
    model.layers.{layer}.mlp.experts.{expert}.{proj}.weight.exp_avg      AdamW first moment
    model.layers.{layer}.mlp.experts.{expert}.{proj}.weight.exp_avg_sq   AdamW second moment

`EXPERT_PROJS` (dsray/model/hf.py) is the only spelling of the projection names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from dsray.model.experts import RoutedExperts
from dsray.model.hf import EXPERT_PROJS, expert_key
from dsray.runtime.rank import MOMENTS


def key(layer: int, expert: int, proj: str, moment: str | None = None) -> str:
    k = expert_key(layer, expert, proj)
    return k if moment is None else f"{k}.{moment}"


class ExpertStore:
    def __init__(self, layers: list[int], local: list[int], dim: int, inter: int, impl: str,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.layers, self.local = list(layers), list(local)
        self.modules = torch.nn.ModuleList(RoutedExperts(len(local), dim, inter, impl)
                                           for _ in layers).to(device, dtype)
        self.by_layer = dict(zip(self.layers, self.modules))

    def entries(self) -> Iterator[tuple[int, int, str, int]]:
        """(layer, logical expert, projection, slot) of every hosted expert tensor, in one fixed order."""
        for layer in self.layers:
            for proj in EXPERT_PROJS:
                for slot, e in enumerate(self.local):
                    yield layer, e, proj, slot

    def param(self, layer: int, proj: str) -> torch.nn.Parameter:
        return getattr(self.by_layer[layer], proj)

    def params(self) -> list[torch.nn.Parameter]:
        return [self.param(layer, proj) for layer in self.layers for proj in EXPERT_PROJS]

    def n_tensors(self) -> int:
        return len(self.layers) * len(EXPERT_PROJS) * len(self.local)

    # ---- weights -------------------------------------------------------------------------------------
    def load(self, get: Callable[[int, int, str], torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, e, proj, slot in self.entries():
                p = self.param(layer, proj)
                p[slot].copy_(get(layer, e, proj).to(p))

    def export(self, optimizer: torch.optim.Optimizer | None, experts: set[int] | None = None,
               owned_only: Callable[[int], bool] | None = None) -> dict[str, torch.Tensor]:
        """Weights (and moments, once training has begun) under checkpoint keys, as CPU tensors; only the
        given logical experts / those `owned_only` accepts (replicas write once) when set."""
        out: dict[str, torch.Tensor] = {}
        for layer, e, proj, slot in self.entries():
            if (experts is not None and e not in experts) or (owned_only is not None and not owned_only(e)):
                continue
            p = self.param(layer, proj)
            out[key(layer, e, proj)] = p[slot].detach().cpu().contiguous()
            st = optimizer.state.get(p) if optimizer is not None else None
            for m in MOMENTS if st else ():
                out[key(layer, e, proj, m)] = st[m][slot].detach().cpu().contiguous()
        return out

    def load_state(self, states: Mapping[str, torch.Tensor], make_optimizer: Callable[[], torch.optim.Optimizer],
                   optim_step: int) -> torch.optim.Optimizer | None:
        """Take every hosted tensor from `states` (all must be there); moments too when `states` has them.
        Returns the optimizer holding them (None before training began)."""
        missing = [key(layer, e, proj) for layer, e, proj, _ in self.entries() if key(layer, e, proj) not in states]
        if missing:
            raise RuntimeError(f"{len(missing)} hosted expert tensor(s) missing, e.g. {missing[:3]}")
        with torch.no_grad():
            for layer, e, proj, slot in self.entries():
                p, t = self.param(layer, proj), states[key(layer, e, proj)]
                if tuple(t.shape) != tuple(p.shape[1:]):
                    raise ValueError(f"{key(layer, e, proj)}: shape {tuple(t.shape)}, expected {tuple(p.shape[1:])}")
                p[slot].copy_(t)
        return self.load_moments(states, make_optimizer, optim_step)

    def load_moments(self, states: Mapping[str, torch.Tensor], make_optimizer: Callable[[], torch.optim.Optimizer],
                     optim_step: int) -> torch.optim.Optimizer | None:
        if not any(k.endswith(".exp_avg") for k in states):
            return None
        opt = make_optimizer()
        for layer in self.layers:
            for proj in EXPERT_PROJS:
                keys = [key(layer, e, proj) for e in self.local]
                p = self.param(layer, proj)
                if keys and all(f"{k}.exp_avg" in states for k in keys):
                    opt.state[p] = {"step": torch.tensor(float(optim_step)),
                                    **{m: torch.stack([states[f"{k}.{m}"] for k in keys]).to(p) for m in MOMENTS}}
        return opt

    def grads(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, e, proj, slot in self.entries():
            g = self.param(layer, proj).grad
            if g is not None:
                out[key(layer, e, proj)] = g[slot].detach().cpu().clone()
        return out

    def bytes_of(self, experts: set[int], with_moments: bool) -> int:
        """Bytes an export of these experts carries (weights, plus both moments when training began)."""
        per = sum(self.param(layer, proj)[0].numel() * self.param(layer, proj).element_size()
                  for layer in self.layers for proj in EXPERT_PROJS) if self.local else 0
        return per * len(experts & set(self.local)) * (3 if with_moments else 1)
