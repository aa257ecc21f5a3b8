"""What every rank actor shares: its spec, device, the process group, AdamW, global-norm clipping.

Ranks 0..D-1 are drivers (dsray/runtime/driver.py), D..D+S-1 expert shards (dsray/runtime/shard.py).
Each gets exactly one actor call per engine step; inside it ranks run the lockstep layers of the step's
mode (dsray.parallel.ep.lockstep_layers) and meet only in collectives of one torch.distributed group
(gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import abc
import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dsray.config import ModelConfig
from dsray.parallel.ep import A2ATimer, EPContext
from dsray.parallel.placement import Placement

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class RankSpec:
    """Everything a rank needs to build itself; plain data so it crosses the Ray boundary cheaply."""

    rank: int
    n_drivers: int
    n_shards: int
    config: dict[str, Any]
    placement: dict[str, Any] | None
    has_mtp: bool
    checkpoint: str | None = None  # HF folder to load from; None: deterministic init from `seed`
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    expert_impl: str = "grouped"
    threads: int = 1
    load_experts: bool = True  # False: a shard started by scale/recovery, filled by its peers
    optim: dict[str, float] = field(default_factory=lambda: {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95,
                                                               "weight_decay": 0.1, "eps": 1e-8,
                                                               "clip_grad_norm": 0.0})

    @property
    def world_size(self) -> int:
        return self.n_drivers + self.n_shards


class Rank(abc.ABC):
    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.cfg = ModelConfig.from_dict(spec.config)
        torch.set_num_threads(max(1, spec.threads))
        self.dtype = DTYPES[spec.dtype]
        self.device = torch.device("cuda", 0) if spec.device == "cuda" else torch.device("cpu")
        if spec.device == "cuda":
            torch.cuda.set_device(self.device)
        self.world = self.drivers_group = self.shards_group = None
        self.ep: EPContext | None = None
        self.timer = A2ATimer()
        self.optimizer: torch.optim.Optimizer | None = None
        self.step_done, self.last_result = -1, None
        self.held: dict[int, Any] = {}  # other ranks' snapshots kept here (recovery)

    # ---- process group ---------------------------------------------------------------------------
    def node_info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"rank": self.spec.rank, "node_id": ctx.get_node_id(), "pid": os.getpid(),
                "ip": ray.util.get_node_ip_address(), "gpus": ray.get_gpu_ids()}

    def master_addr(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def init_process_group(self, addr: str, port: int, timeout_s: float, n_shards: int | None = None,
                           placement: dict[str, Any] | None = None) -> bool:
        """Join the world group and the driver / shard subgroups. Scaling and recovery call it again
        (after `leave_group`) with the new shard count and placement."""
        if n_shards is not None:
            self.spec.n_shards = n_shards
        if placement is not None:
            self.spec.placement = placement
        backend = "nccl" if self.spec.device == "cuda" else "gloo"
        if addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.spec.rank,
                                world_size=self.spec.world_size, timeout=datetime.timedelta(seconds=timeout_s))
        self.world = dist.group.WORLD
        D, S = self.spec.n_drivers, self.spec.n_shards
        # new_group is collective: every rank creates both groups, in the same order.
        self.drivers_group = dist.new_group(list(range(D)))
        self.shards_group = dist.new_group(list(range(D, D + S)))
        self.set_placement(self.spec.placement)
        return True

    def set_placement(self, placement: dict[str, Any] | None) -> int:
        """Adopt a placement (a step boundary): the EP context every dispatcher is built from."""
        self.spec.placement = placement
        if self.world is not None and placement is not None:
            self.ep = EPContext(self.cfg, self.world, Placement.from_dict(placement), self.spec.has_mtp, self.timer)
            self._on_placement()
        return int((placement or {}).get("version", 0))

    def _on_placement(self) -> None:
        pass

    def ping(self) -> int:
        return self.spec.rank

    def leave_group(self) -> bool:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.world = self.drivers_group = self.shards_group = self.ep = None
        return True

    shutdown = leave_group

    def _vote_device(self) -> torch.device:
        return self.device if self.spec.device == "cuda" else torch.device("cpu")

    # ---- optimizer ---------------------------------------------------------------------------------
    def _optim(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        o = self.spec.optim
        return torch.optim.AdamW(params, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                                 weight_decay=o["weight_decay"])

    def _set_lr(self, lr: float | None) -> None:
        if lr is not None and self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr

    def _optim_step(self) -> int:
        st = next(iter(self.optimizer.state.values()), None) if self.optimizer is not None else None
        return int(st["step"]) if st else 0

    def _memory(self, params) -> dict[str, int]:
        """Bytes of weights and of optimizer state (AdamW moments) this rank holds."""
        w = sum(p.numel() * p.element_size() for p in params)
        o = 0
        if self.optimizer is not None:
            o = sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                    for t in st.values() if torch.is_tensor(t))
        return {"weights": w, "optimizer": o}

    def _clip_grads(self, params: list[torch.nn.Parameter], weights: list[float | torch.Tensor]) -> float:
        """Global-norm clipping across every rank: each rank adds its share of the squared norm, one
        world all-reduce, then every rank scales by the same coefficient. `weights` (one per param, a
        scalar or a per-slot tensor) make each gradient count once: dense grads only on driver 0, a
        replicated expert 1/copies on each copy. Returns the global norm (0.0 when clipping is off)."""
        max_norm = float(self.spec.optim.get("clip_grad_norm", 0.0))
        if max_norm <= 0:
            return 0.0
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p, w in zip(params, weights):
            if p.grad is not None:
                sq += (p.grad.double().pow(2) * w).sum()
        if self.world is not None:
            dist.all_reduce(sq, group=self.world)
        norm = float(sq.sqrt())  # host sync
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    # ---- reference policy (RL) -----------------------------------------------------------------------
    @abc.abstractmethod
    def _trainable(self) -> list[torch.nn.Parameter]:
        """The parameters this rank trains (driver: dense; shard: its experts)."""

    def set_reference(self) -> int:
        """Freeze a copy of this rank's trainable weights as the reference policy (+1x weights, no
        optimizer state); `_swap_reference` swaps storage pointers in and out, copying nothing."""
        self.reference = [p.detach().clone() for p in self._trainable()]
        return sum(t.numel() * t.element_size() for t in self.reference)

    def _swap_reference(self) -> None:
        ref = getattr(self, "reference", None)
        if ref is None:
            raise RuntimeError(f"rank {self.spec.rank}: no reference policy; call Engine.set_reference() first")
        with torch.no_grad():
            for i, p in enumerate(self._trainable()):
                p.data, ref[i] = ref[i], p.data

    # ---- peer-held snapshots (recovery) ---------------------------------------------------------------
    def hold(self, rank: int, snap: list) -> bool:
        """Keep a copy of another rank's snapshot on this rank's node (`snap` = [ObjectRef]: pulled here)."""
        import ray

        self.held[rank] = ray.get(snap[0])
        return True

    def held_snapshot(self, rank: int) -> dict[str, Any]:
        if rank not in self.held:
            raise RuntimeError(f"rank {self.spec.rank} holds no snapshot of rank {rank}")
        return self.held[rank]
