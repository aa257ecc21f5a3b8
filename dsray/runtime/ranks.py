"""The Ray actors that hold the model: DriverRank (tokens, attention, dense parts) and ExpertShard.

Each rank gets exactly one actor call per engine step (train_step / forward / generate on drivers,
train_step / serve on shards); inside it ranks run the layers in lockstep and meet only in collectives
of one torch.distributed group (gloo on CPU, NCCL on GPU). Ranks 0..D-1 are drivers, D..D+S-1 shards.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dsray.config import ModelConfig
from dsray.model.moe import RoutedExperts
from dsray.parallel.dispatch import AllToAllDispatcher
from dsray.parallel.ep import A2ATimer, EPRouted, expert_pass, vote
from dsray.parallel.placement import Placement

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    load_experts: bool = True  # False: a shard added by Engine.scale, filled by reconfigure()
    optim: dict[str, float] = field(default_factory=lambda: {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95,
                                                               "weight_decay": 0.1, "eps": 1e-8,
                                                               "clip_grad_norm": 0.0})

    @property
    def world_size(self) -> int:
        return self.n_drivers + self.n_shards


class _Rank:
    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.cfg = ModelConfig.from_dict(spec.config)
        torch.set_num_threads(max(1, spec.threads))
        self.dtype = DTYPES[spec.dtype]
        self.device = torch.device("cuda", 0) if spec.device == "cuda" else torch.device("cpu")
        if spec.device == "cuda":
            torch.cuda.set_device(self.device)
        self.world = None
        self.drivers_group = None
        self.shards_group = None
        self.optimizer: torch.optim.Optimizer | None = None

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
        """Join the world group (and the driver / shard subgroups). Scaling calls it again with the
        new shard count and placement after `shutdown()` left the old group."""
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
        self._after_group()
        return True

    def _after_group(self) -> None:
        pass

    def ping(self) -> int:
        return self.spec.rank

    def shutdown(self) -> bool:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.world = self.drivers_group = self.shards_group = None
        return True

    def _optim(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        o = self.spec.optim
        return torch.optim.AdamW(params, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                                 weight_decay=o["weight_decay"])

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

    def _set_lr(self, lr: float | None) -> None:
        if lr is not None and self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr


class DriverRank(_Rank):
    """Embedding, MLA attention (latent KV cache), gate with the Router's bias, shared experts, dense
    layers, norm, lm head, MTP. With no shards (S == 0, single process) it also runs the experts."""

    def __init__(self, spec: RankSpec) -> None:
        super().__init__(spec)
        from dsray.model import Transformer
        from dsray.model.hf import load_pretrained

        local_experts = spec.n_shards == 0
        if spec.checkpoint:
            self.model = load_pretrained(Transformer, spec.checkpoint, dtype=self.dtype, device=self.device,
                                         expert_impl=spec.expert_impl, experts=local_experts)
        else:
            self.model = Transformer.from_config(self.cfg, spec.seed, self.dtype, spec.expert_impl,
                                                 device=self.device, experts=local_experts, mtp=spec.has_mtp)
        assert len(self.model.mtp) == (self.cfg.num_nextn_predict_layers if spec.has_mtp else 0)
        self.timer = A2ATimer()
        self.step_done = -1
        self.last_result: dict[str, Any] | None = None

    def _after_group(self) -> None:
        placement = Placement.from_dict(self.spec.placement)
        self.dispatcher = AllToAllDispatcher(placement, self.world)
        for layer, moe in zip(self.cfg.moe_layers, self.model.moe_modules()):
            moe.routed = EPRouted(self.dispatcher, None, layer, self.timer)

    def set_placement(self, placement: dict[str, Any]) -> int:
        """A new placement at a step boundary: drivers only re-route (they host no experts)."""
        self.spec.placement = placement
        self._after_group()
        return int(placement.get("version", 0))

    def _distributed(self) -> bool:
        return self.world is not None

    def _set_bias(self, bias_LE: np.ndarray | None) -> None:
        if bias_LE is None:
            return
        mods = self.model.moe_modules()
        with torch.no_grad():
            for moe, b in zip(mods, bias_LE):
                moe.gate.e_score_correction_bias.copy_(torch.tensor(np.asarray(b), dtype=torch.float32))

    def state_bias(self) -> np.ndarray:
        return np.stack([m.gate.e_score_correction_bias.cpu().numpy() for m in self.model.moe_modules()])

    # ---- training --------------------------------------------------------------------------------
    def train_step(self, step: int, ids: torch.Tensor, bias_LE: np.ndarray | None, n_tokens: int,
                   lr: float | None, mtp_weight: float, seq_aux_alpha: float = 0.0,
                   n_sequences: int | None = None) -> dict[str, Any]:
        # Idempotent by step: a retried call returns the recorded result instead of stepping twice.
        if step == self.step_done and self.last_result is not None:
            return self.last_result
        t0 = time.perf_counter()
        self._set_bias(bias_LE)
        model = self.model.train()
        if self.optimizer is None:
            self.optimizer = self._optim([p for p in model.parameters() if p.requires_grad])
        self._set_lr(lr)
        self.optimizer.zero_grad(set_to_none=True)
        model.pop_expert_counts()
        out = model.loss(ids.to(self.device), mtp_weight=mtp_weight, n_tokens=n_tokens,
                         seq_aux_alpha=seq_aux_alpha, n_sequences=n_sequences)
        out["total"].backward()
        if self._distributed() and self.spec.n_drivers > 1:
            self._allreduce_dense_grads()
        params = [p for p in model.parameters() if p.requires_grad]
        # Dense grads are identical on every driver after the all-reduce: count them on driver 0 only.
        grad_norm = self._clip_grads(params, [1.0 if self.spec.rank == 0 else 0.0] * len(params))
        self.optimizer.step()
        counts = model.pop_expert_counts().cpu().numpy()
        self.step_done = step
        self.last_result = {
            "loss": out["loss"].item(), "mtp_loss": out["mtp_loss"].item() if "mtp_loss" in out else None,
            "counts": counts, "a2a": self.timer.pop(), "seconds": time.perf_counter() - t0,
            "grad_norm": grad_norm,
            "balance_loss": out["balance_loss"].item() if "balance_loss" in out else None,
        }
        return self.last_result

    def _allreduce_dense_grads(self) -> None:
        # Each driver's loss is already divided by the global token count, so a SUM gives the full grad.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.drivers_group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def grads(self) -> dict[str, torch.Tensor]:
        """Dense gradients of the last step (tests compare them with a single-process reference).
        Only meaningful before the optimizer clears them, so train_step keeps them until the next step."""
        return {n: p.grad.detach().cpu().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    # ---- inference -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, bias_LE: np.ndarray | None, last_only: bool = False) -> dict[str, Any]:
        self._set_bias(bias_LE)
        model = self.model.eval()
        model.pop_expert_counts()
        if not self._distributed():
            logits = model(ids.to(self.device))
        else:
            vote(True, self.world, self._vote_device())
            logits = model(ids.to(self.device)) if ids.shape[0] else None
            if logits is None:
                self._idle_pass()
            vote(False, self.world, self._vote_device())
        if logits is not None and last_only:
            logits = logits[:, -1:]
        return {"logits": None if logits is None else logits.float().cpu(),
                "counts": model.pop_expert_counts().cpu().numpy(), "a2a": self.timer.pop()}

    def _vote_device(self) -> torch.device:
        return self.device if self.spec.device == "cuda" else torch.device("cpu")

    def _idle_pass(self) -> None:
        n = len([layer for layer in self.cfg.moe_layers if layer < self.cfg.num_hidden_layers])
        expert_pass(self.dispatcher, [None] * n, self.cfg.hidden_size, self.cfg.num_experts_per_tok,
                    self.device, self.dtype, grad=False)

    @torch.inference_mode()
    def generate(self, prompts: list[torch.Tensor], bias_LE: np.ndarray | None, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, seed: int | None = None) -> dict[str, Any]:
        """Latent-cache decoding of `prompts` (1-D id tensors, any lengths). Prompts of one length decode
        together as a batch; groups run one after another. Drivers vote before every pass so that all
        ranks (shards, drivers that finished early or hold no prompts) run the same lockstep passes."""
        from dsray.model.sampling import sample_next

        self._set_bias(bias_LE)
        model = self.model.eval()
        model.pop_expert_counts()
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(int(p.shape[0]), []).append(i)
        groups = [idx for _, idx in sorted(by_len.items())] if max_new_tokens > 0 else []
        results: list[torch.Tensor | None] = [p.cpu() for p in prompts] if max_new_tokens == 0 else [None] * len(prompts)
        g, state = 0, None
        while True:
            want = g < len(groups)
            if self._distributed():
                if not vote(want, self.world, self._vote_device()):
                    break
                if not want:
                    self._idle_pass()
                    continue
            elif not want:
                break
            if state is None:  # start the next length group: its prefill is this pass
                ids = torch.stack([prompts[i] for i in groups[g]]).to(self.device)
                B = ids.shape[0]
                state = {"cache": model.new_cache(B, ids.shape[1] + max_new_tokens), "out": [ids], "feed": ids,
                         "pos": 0, "n": 0, "done": torch.zeros(B, dtype=torch.bool, device=self.device)}
            logits = model(state["feed"], state["cache"], state["pos"])[:, -1]
            state["pos"] += state["feed"].shape[1]
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            if eos_token_id is not None:
                nxt = torch.where(state["done"], torch.full_like(nxt, eos_token_id), nxt)
                state["done"] |= nxt == eos_token_id
            state["out"].append(nxt[:, None])
            state["n"] += 1
            state["feed"] = nxt[:, None]
            if state["n"] >= max_new_tokens or (eos_token_id is not None and bool(state["done"].all())):
                rows = torch.cat(state["out"], dim=1).cpu()
                for r, i in enumerate(groups[g]):
                    results[i] = rows[r]
                g, state = g + 1, None
        return {"ids": results, "counts": model.pop_expert_counts().cpu().numpy(), "a2a": self.timer.pop()}

    # ---- state -----------------------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """Dense weights under checkpoint keys, and optimizer moments under the same keys."""
        from dsray.model.hf import hf_state_dict

        weights = {k: v.detach().cpu().contiguous() for k, v in hf_state_dict(self.model).items()}
        optim: dict[str, torch.Tensor] = {}
        step = 0
        if self.optimizer is not None:
            names = {id(p): n for n, p in self.model.named_parameters()}
            from dsray.model.hf import to_hf_name

            for p, st in self.optimizer.state.items():
                key = to_hf_name(names[id(p)], self.cfg)
                for moment in ("exp_avg", "exp_avg_sq"):
                    optim[f"{key}.{moment}"] = st[moment].detach().cpu().contiguous()
                step = int(st["step"])
        return {"weights": weights, "optim": optim, "optim_step": step}

    def import_optimizer(self, optim: dict[str, torch.Tensor], step: int) -> bool:
        from dsray.model.hf import to_hf_name

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._optim(params)
        for n, p in self.model.named_parameters():
            key = to_hf_name(n, self.cfg)
            if f"{key}.exp_avg" in optim:
                self.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                           "exp_avg": optim[f"{key}.exp_avg"].to(p.device),
                                           "exp_avg_sq": optim[f"{key}.exp_avg_sq"].to(p.device)}
        return True

    def memory(self) -> dict[str, int]:
        return self._memory(self.model.parameters())


class ExpertShard(_Rank):
    """Routed experts of every MoE layer that the placement gives this rank: weights, grads, AdamW."""

    def __init__(self, spec: RankSpec) -> None:
        super().__init__(spec)
        cfg = self.cfg
        self.layers = [layer for layer in cfg.moe_layers
                       if spec.has_mtp or layer < cfg.num_hidden_layers]
        self._build_slots()
        if spec.load_experts:
            self._load()
        self.step_done = -1
        self.last_result: dict[str, Any] | None = None
        self.passes = 0

    def _build_slots(self) -> None:
        """One stacked RoutedExperts per MoE layer for the experts the placement gives this rank."""
        cfg, spec = self.cfg, self.spec
        self.local = Placement.from_dict(spec.placement).local_experts(spec.rank)
        self.experts = torch.nn.ModuleList(
            RoutedExperts(len(self.local), cfg.hidden_size, cfg.moe_intermediate_size, spec.expert_impl)
            for _ in self.layers).to(self.device, self.dtype)

    def reconfigure(self, placement: dict[str, Any], states: dict[str, torch.Tensor], optim_step: int) -> dict:
        """Adopt a new placement at a step boundary. `states` holds, under checkpoint keys, the weights
        (and AdamW moments as `<key>.exp_avg` / `<key>.exp_avg_sq`, when training has begun) of every
        expert this rank hosts under the new placement: weights and optimizer state move with the expert."""
        self.spec.placement = placement
        self._build_slots()
        need = len(self.layers) * len(self.local) * 3
        got = self.import_state(states)
        if got != need:
            raise RuntimeError(f"shard rank {self.spec.rank}: placement v{placement.get('version')} needs {need} "
                               f"expert tensors, received {got}")
        self.optimizer = None
        if any(k.endswith(".exp_avg") for k in states):
            self.import_optimizer(states, optim_step)
        if self.world is not None:
            self._after_group()
        return self.memory()

    def _load(self) -> None:
        """Straight from the checkpoint folder (only this shard's experts are read) or deterministic init."""
        from dsray.model.hf import EXPERT_PROJS, expert_key
        from dsray.model.init import init_expert

        if self.spec.checkpoint:
            from dsray.checkpoint import CheckpointReader

            reader = CheckpointReader(self.spec.checkpoint)
            keys = [expert_key(layer, e, p) for layer in self.layers for e in self.local for p in EXPERT_PROJS]
            tensors = reader.get_many(keys, device=self.device)
            get = lambda layer, e, p: tensors.pop(expert_key(layer, e, p))  # noqa: E731
        else:
            get = lambda layer, e, p: init_expert(self.cfg, layer, e, p, self.spec.seed)  # noqa: E731
        with torch.no_grad():
            for layer, mod in zip(self.layers, self.experts):
                for p in EXPERT_PROJS:
                    w = getattr(mod, p)
                    if len(self.local):
                        w.copy_(torch.stack([get(layer, e, p) for e in self.local]).to(w))
        self.experts.to(self.dtype)

    def _after_group(self) -> None:
        self.dispatcher = AllToAllDispatcher(Placement.from_dict(self.spec.placement), self.world)
        self.placement = self.dispatcher.placement

    def train_step(self, step: int, lr: float | None) -> dict[str, Any]:
        if step == self.step_done and self.last_result is not None:
            return self.last_result
        t0 = time.perf_counter()
        if self.optimizer is None:
            self.optimizer = self._optim(list(self.experts.parameters()))
        self._set_lr(lr)
        self.optimizer.zero_grad(set_to_none=False)
        h = expert_pass(self.dispatcher, list(self.experts), self.cfg.hidden_size, self.cfg.num_experts_per_tok,
                        self.device, self.dtype, grad=True)
        h.backward(torch.zeros_like(h))
        for p in self.experts.parameters():
            if p.grad is None:  # no rows reached this layer's slots: a zero grad, so AdamW state stays aligned
                p.grad = torch.zeros_like(p)
        self._sum_replica_grads()
        # A replicated expert's grad sits (identically) on each copy: weigh each slot 1 / copies.
        per_slot = 1.0 / self.placement.n_replicas[list(self.local)].double().to(self.device)
        params = [p for mod in self.experts for p in (mod.gate_proj, mod.up_proj, mod.down_proj)]
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
        for mod in self.experts:
            for p in (mod.gate_proj, mod.up_proj, mod.down_proj):
                buf = torch.zeros((len(replicated), *p.shape[1:]), device=p.device, dtype=torch.float32)
                for slot, e in enumerate(self.local):
                    if e in index:
                        buf[index[e]] += p.grad[slot].float()
                dist.all_reduce(buf, group=self.shards_group)
                for slot, e in enumerate(self.local):
                    if e in index:
                        p.grad[slot].copy_(buf[index[e]])

    @torch.inference_mode()
    def serve(self) -> int:
        """Forward-only lockstep passes over the main MoE layers until the drivers vote to stop."""
        n = 0
        main = [mod for layer, mod in zip(self.layers, self.experts) if layer < self.cfg.num_hidden_layers]
        vdev = self.device if self.spec.device == "cuda" else torch.device("cpu")
        while vote(False, self.world, vdev):
            expert_pass(self.dispatcher, main, self.cfg.hidden_size, self.cfg.num_experts_per_tok,
                        self.device, self.dtype, grad=False)
            n += 1
        self.passes += n
        return n

    def grads(self) -> dict[str, torch.Tensor]:
        from dsray.model.hf import expert_key

        out = {}
        for layer, mod in zip(self.layers, self.experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                g = getattr(mod, p).grad
                if g is None:
                    continue
                for slot, e in enumerate(self.local):
                    out[expert_key(layer, e, p)] = g[slot].detach().cpu().clone()
        return out

    def export_state(self) -> dict[str, Any]:
        """Weights and AdamW moments by (layer, expert) under checkpoint keys."""
        from dsray.model.hf import expert_key

        weights, optim, step = {}, {}, 0
        for layer, mod in zip(self.layers, self.experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                param = getattr(mod, p)
                st = self.optimizer.state.get(param) if self.optimizer is not None else None
                for slot, e in enumerate(self.local):
                    key = expert_key(layer, e, p)
                    weights[key] = param[slot].detach().cpu().contiguous()
                    if st:
                        optim[f"{key}.exp_avg"] = st["exp_avg"][slot].detach().cpu().contiguous()
                        optim[f"{key}.exp_avg_sq"] = st["exp_avg_sq"][slot].detach().cpu().contiguous()
                        step = int(st["step"])
        return {"weights": weights, "optim": optim, "optim_step": step}

    def import_state(self, weights: dict[str, torch.Tensor]) -> int:
        """Overwrite hosted experts from tensors keyed like the checkpoint (`expert_key(layer, e, proj)`);
        keys for experts this shard does not host are ignored. Returns how many tensors were taken."""
        from dsray.model.hf import expert_key

        taken = 0
        with torch.no_grad():
            for layer, mod in zip(self.layers, self.experts):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    param = getattr(mod, p)
                    for slot, e in enumerate(self.local):
                        t = weights.get(expert_key(layer, e, p))
                        if t is None:
                            continue
                        if tuple(t.shape) != tuple(param.shape[1:]):
                            raise ValueError(f"{expert_key(layer, e, p)}: shape {tuple(t.shape)}, expected "
                                             f"{tuple(param.shape[1:])}")
                        param[slot].copy_(t)
                        taken += 1
        return taken

    def import_optimizer(self, optim: dict[str, torch.Tensor], step: int) -> bool:
        from dsray.model.hf import expert_key

        self.optimizer = self._optim(list(self.experts.parameters()))
        for layer, mod in zip(self.layers, self.experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                param = getattr(mod, p)
                keys = [expert_key(layer, e, p) for e in self.local]
                if keys and all(f"{k}.exp_avg" in optim for k in keys):
                    self.optimizer.state[param] = {
                        "step": torch.tensor(float(step)),
                        "exp_avg": torch.stack([optim[f"{k}.exp_avg"] for k in keys]).to(param),
                        "exp_avg_sq": torch.stack([optim[f"{k}.exp_avg_sq"] for k in keys]).to(param)}
        return True

    def memory(self) -> dict[str, int]:
        return {**self._memory(self.experts.parameters()), "slots": len(self.local)}
