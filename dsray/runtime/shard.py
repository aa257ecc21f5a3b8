"""ExpertShard: the routed experts that the placement gives this rank, with their grads and AdamW state.

A shard never sees token ids: it meets the drivers in the dispatcher's collectives (`expert_pass`)
for exactly the lockstep layers of the step's mode, one actor call per step. Expert state moves shard
to shard (`export_experts` returns an object whose bytes stay on this node until the receiving shard
pulls them in `adopt`), and `save_part` writes this shard's experts into a checkpoint folder itself:
none of it passes through the job driver.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsray.parallel.ep import expert_pass, lockstep_layers, needs_grad, vote
from dsray.parallel.placement import Placement
from dsray.runtime.rank import Rank, RankSpec
from dsray.runtime.store import ExpertStore


class ExpertShard(Rank):
    def __init__(self, spec: RankSpec) -> None:
        super().__init__(spec)
        self.layers = lockstep_layers(self.cfg, spec.has_mtp, "train")  # every MoE layer any mode runs
        self._build()
        if spec.load_experts:
            self._load()
        self.passes = 0

    def _build(self) -> None:
        cfg, spec = self.cfg, self.spec
        self.placement = Placement.from_dict(spec.placement)
        self.store = ExpertStore(self.layers, self.placement.local_experts(spec.rank), cfg.hidden_size,
                                 cfg.moe_intermediate_size, spec.expert_impl, self.device, self.dtype)

    def _load(self) -> None:
        """Straight from the checkpoint folder (only this shard's experts are read) or deterministic init."""
        from dsray.model.init import init_expert
        from dsray.runtime.store import key

        if self.spec.checkpoint:
            from dsray.checkpoint import CheckpointReader

            keys = [key(layer, e, p) for layer, e, p, _ in self.store.entries()]
            tensors = CheckpointReader(self.spec.checkpoint).get_many(keys, device=self.device)
            self.store.load(lambda layer, e, p: tensors.pop(key(layer, e, p)))
        else:
            self.store.load(lambda layer, e, p: init_expert(self.cfg, layer, e, p, self.spec.seed))

    def _trainable(self) -> list[torch.nn.Parameter]:
        return self.store.params()

    # ---- steps -------------------------------------------------------------------------------------------
    def train_step(self, step: int, lr: float | None, mode: str = "train") -> dict[str, Any]:
        """One optimizer step of `mode` ("train": main + MTP layers, "grpo": main layers)."""
        if step == self.step_done and self.last_result is not None:
            return self.last_result  # idempotent by step: a retried call never steps twice
        t0 = time.perf_counter()
        if self.optimizer is None:
            self.optimizer = self._optim(self.store.params())
        self._set_lr(lr)
        self.optimizer.zero_grad(set_to_none=False)
        h = expert_pass(self.ep, self.store.by_layer, mode, self.device, self.dtype)
        h.backward(torch.zeros_like(h))
        for p in self.store.params():
            if p.grad is None:  # no rows reached this layer's slots: a zero grad keeps AdamW aligned
                p.grad = torch.zeros_like(p)
        self._sum_replica_grads()
        # A replicated expert's grad sits (identically) on each copy: weigh each slot 1 / copies.
        per_slot = 1.0 / self.placement.n_replicas[self.store.local].double().to(self.device)
        params = self.store.params()
        self._clip_grads(params, [per_slot.view(-1, 1, 1)] * len(params))
        self.optimizer.step()
        self.step_done = step
        self.last_result = {"seconds": time.perf_counter() - t0, **self.memory()}
        return self.last_result

    def _sum_replica_grads(self) -> None:
        """Replicas of one expert saw different tokens: add their grads so every copy takes the same step."""
        replicated = [e for e in range(self.placement.n_experts) if len(self.placement.replicas(e)) > 1]
        if not replicated or self.spec.n_shards < 2:
            return
        index = {e: i for i, e in enumerate(replicated)}
        for p in self.store.params():
            buf = torch.zeros((len(replicated), *p.shape[1:]), device=p.device, dtype=torch.float32)
            for slot, e in enumerate(self.store.local):
                if e in index:
                    buf[index[e]] += p.grad[slot].float()
            dist.all_reduce(buf, group=self.shards_group)
            for slot, e in enumerate(self.store.local):
                if e in index:
                    p.grad[slot].copy_(buf[index[e]])

    def serve(self, mode: str = "forward", reference: bool = False) -> int:
        """Lockstep passes until the drivers vote to stop: forward-only modes (forward, generate,
        logprobs) run under inference mode; `reference` serves the frozen reference policy."""
        assert not needs_grad(mode), mode
        if reference:
            self._swap_reference()
        try:
            with torch.inference_mode():
                n = 0
                while vote(False, self.world, self._vote_device()):
                    expert_pass(self.ep, self.store.by_layer, mode, self.device, self.dtype)
                    n += 1
        finally:
            if reference:
                self._swap_reference()
        self.passes += n
        return n

    # ---- state -------------------------------------------------------------------------------------------
    def grads(self) -> dict[str, torch.Tensor]:
        return self.store.grads()

    def export_experts(self, experts: list[int] | None = None) -> dict[str, Any]:
        """Weights and moments of some hosted experts (all when None), for a move or a snapshot."""
        return {"tensors": self.store.export(self.optimizer, None if experts is None else set(experts)),
                "optim_step": self._optim_step()}

    def adopt(self, placement: dict[str, Any], parts: list, optim_step: int) -> dict[str, Any]:
        """Rebuild for a new placement from `parts`: exports of other shards (object refs: fetched here,
        shard to shard) and/or of this one. Every expert this rank hosts under `placement` must be in them."""
        import ray

        states: dict[str, torch.Tensor] = {}
        for part in parts:
            part = ray.get(part) if isinstance(part, ray.ObjectRef) else part
            for k, v in part["tensors"].items():
                states.setdefault(k, v)
        self.spec.placement = placement
        self._build()
        self.optimizer = self.store.load_state(states, lambda: self._optim(self.store.params()), optim_step)
        if self.world is not None:
            self.set_placement(placement)
        return self.memory()

    def import_optimizer(self, folder: str, step: int) -> bool:
        from dsray.runtime.persist import read_optimizer

        keys = [f"{k}.{m}" for k in self.store.export(None) for m in ("exp_avg", "exp_avg_sq")]
        self.optimizer = self.store.load_moments(read_optimizer(folder, keys),
                                                 lambda: self._optim(self.store.params()), step)
        return True

    def save_part(self, folder: str, index: int, total: int) -> dict[str, Any]:
        """Write this shard's experts (each expert once: by its first replica) into `folder`."""
        from dsray.runtime.persist import write_rank_part

        owned = lambda e: self.placement.replicas(e)[0][0] == self.spec.rank  # noqa: E731
        tensors = self.store.export(self.optimizer, owned_only=owned)
        return write_rank_part(Path(folder), index, total, tensors, self._optim_step())

    def snapshot(self) -> dict[str, Any]:
        return {"tensors": self.store.export(self.optimizer), "optim_step": self._optim_step(),
                "placement": self.spec.placement, "step_done": self.step_done}

    def restore(self, snap: dict[str, Any]) -> bool:
        self.adopt(snap["placement"], [snap], snap["optim_step"])
        self.step_done, self.last_result = snap["step_done"], None
        return True

    def memory(self) -> dict[str, int]:
        return {**self._memory(self.store.params()), "slots": len(self.store.local)}
