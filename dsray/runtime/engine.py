"""Engine: the job driver's API. Starts the Router, D DriverRanks and S ExpertShards, and drives steps.

    with Engine.from_config("debug", num_drivers=2, num_shards=3) as eng:
        out = eng.train_step(batch)          # one actor call per rank per step
        ids = eng.generate(prompt_ids, 32)
        eng.save("ckpt/")

It joins a cluster when RAY_ADDRESS is set (as inside `ray job submit`) and starts an embedded local
Ray otherwise. Every actor and the placement group are removed on shutdown, on error and on Ctrl-C.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsray.config import ModelConfig, resolve_config
from dsray.files import read_json_object
from dsray.parallel.placement import Placement
from dsray.runtime.cluster import Resources, check_fits, connect, wait_placed
from dsray.runtime.ranks import DTYPES, RankSpec

log = logging.getLogger(__name__)
NAMESPACE = "dsray"


def router_name(engine: str) -> str:
    return f"dsray-router-{engine}"


class Engine:
    def __init__(self, config: ModelConfig, *, checkpoint: str | os.PathLike | None = None, seed: int = 0,
                 num_drivers: int = 1, num_shards: int = 1, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 placement: str | Placement | dict | list = "linear", name: str = "dsray", gamma: float = 1e-3,
                 lr: float = 1e-3, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 mtp_weight: float = 0.3, clip_grad_norm: float = 0.0, seq_aux_alpha: float = 0.0,
                 expert_impl: str = "grouped",
                 threads: int = 1,
                 driver_resources: Resources | dict | None = None,
                 shard_resources: Resources | dict | list | None = None, strategy: str = "PACK",
                 step_timeout_s: float = 600.0, init_timeout_s: float = 300.0, metrics: bool = True,
                 resume_optimizer: bool = True, address: str | None = None,
                 wait_for_nodes_s: float = 0.0) -> None:
        # ---- validate everything before any actor starts ----------------------------------------
        if num_drivers < 1:
            raise ValueError(f"num_drivers={num_drivers}: expected >= 1")
        if num_shards < 0:
            raise ValueError(f"num_shards={num_shards}: expected >= 0")
        if num_shards == 0 and num_drivers != 1:
            raise ValueError("num_shards=0 runs the experts inside the single driver; it needs num_drivers=1")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r}: expected 'cpu' or 'cuda'")
        dtype_name = str(dtype).removeprefix("torch.")
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        if gamma < 0:
            raise ValueError(f"gamma={gamma}: expected >= 0")
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"strategy={strategy!r}: expected a Ray placement strategy")
        if not config.has_moe and num_shards:
            raise ValueError("this config has no MoE layers: use num_shards=0")
        self.cfg, self.name = config, name
        self._strategy = strategy
        self.D, self.S = num_drivers, num_shards
        self.ray_how = "not started"
        self.device, self.dtype = device, dtype_name
        self.mtp_weight, self.lr = mtp_weight, lr
        self.step_timeout_s, self.init_timeout_s = step_timeout_s, init_timeout_s
        self.checkpoint = str(Path(checkpoint).resolve()) if checkpoint else None
        self.has_mtp = config.num_nextn_predict_layers > 0
        if self.checkpoint:
            from dsray.checkpoint import CheckpointReader

            reader = CheckpointReader(self.checkpoint)  # fails fast on a missing/bad folder
            self.has_mtp = self.has_mtp and f"model.layers.{config.num_hidden_layers}.eh_proj.weight" in reader
        world = self.D + self.S
        shard_ranks = list(range(self.D, world))
        self.placement = self._placement(placement, shard_ranks, world) if self.S else None
        self.moe_layers = [layer for layer in config.moe_layers
                           if self.has_mtp or layer < config.num_hidden_layers]
        drv_res = Resources.of(driver_resources, device)
        if isinstance(shard_resources, list):
            if len(shard_resources) != self.S:
                raise ValueError(f"shard_resources has {len(shard_resources)} entries for num_shards={self.S}")
            shard_res = [Resources.of(r, device) for r in shard_resources]
        else:
            shard_res = [Resources.of(shard_resources, device)] * self.S
        if seq_aux_alpha < 0:
            raise ValueError(f"seq_aux_alpha={seq_aux_alpha}: expected >= 0 (DeepSeek-V3 used 1e-4; 0 disables)")
        self.seq_aux_alpha = seq_aux_alpha
        if clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm={clip_grad_norm}: expected >= 0 (0 disables)")
        optim = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "weight_decay": weight_decay, "eps": 1e-8,
                 "clip_grad_norm": clip_grad_norm}
        conf = config.to_dict()
        self._specs = [RankSpec(rank=r, n_drivers=self.D, n_shards=self.S, config=conf,
                                placement=self.placement.to_dict() if self.placement else None,
                                has_mtp=self.has_mtp, checkpoint=self.checkpoint, seed=seed, dtype=dtype_name,
                                device=device, expert_impl=expert_impl, threads=threads, optim=optim)
                       for r in range(world)]

        # ---- start ------------------------------------------------------------------------------
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray, self._remove_pg = ray, remove_placement_group
        self._closed = False
        self.drivers: list = []
        self.shards: list = []
        self.router = None
        self.pg = None
        self._shard_res = shard_res
        self._extra_pgs: list = []
        self._broken = False
        self._own_ray, how = connect(address, int(sum(b.num_cpus for b in [drv_res] * self.D + shard_res)) + 1)
        log.info("dsray: %s", how)
        self.ray_how = how
        atexit.register(self.shutdown)
        try:
            if router_name(name) in named_actors():
                raise ValueError(f"an engine named {name!r} is already running on this cluster; pick another name")
            bundles = [drv_res.bundle()] * self.D + [r.bundle() for r in shard_res]
            check_fits(bundles, strategy, wait_for_nodes_s)
            self.pg = placement_group(bundles, strategy=strategy, name=f"dsray-{name}-{uuid.uuid4().hex[:6]}")
            wait_placed(self.pg, bundles, init_timeout_s)
            self._pg_strategy = PlacementGroupSchedulingStrategy
            for r, spec in enumerate(self._specs):
                res = drv_res if r < self.D else shard_res[r - self.D]
                (self.drivers if r < self.D else self.shards).append(self._start_rank(spec, res, self.pg, r))
            self.nodes = self._wait([a.node_info.remote() for a in self.ranks], init_timeout_s, "start ranks")
            if world > 1:
                self._init_group()
            stats = self._load_router_state()
            bias = ray.get(self.drivers[0].state_bias.remote(), timeout=init_timeout_s)
            self.router = ray.remote(_router_cls()).options(
                name=router_name(name), namespace=NAMESPACE, num_cpus=0, max_concurrency=4,
            ).remote(name, self.moe_layers, config.n_routed_experts, self.placement.to_dict() if self.placement
                     else {"version": 0}, gamma=gamma, bias=bias.tolist(), step=stats.get("step", 0),
                     history=stats.get("history"), metrics=metrics)
            self._bias = bias
            self._step = stats.get("step", 0)
            if self.checkpoint and resume_optimizer and (Path(self.checkpoint) / "optimizer.safetensors").exists():
                self._import_optimizer(Path(self.checkpoint))
            self._report_placement()
        except BaseException:
            self.shutdown(graceful=False)
            raise

    # ---- construction helpers ----------------------------------------------------------------------
    def _start_rank(self, spec: RankSpec, res: Resources, pg, bundle: int):
        from dsray.runtime.ranks import DriverRank, ExpertShard

        driver = spec.rank < self.D
        env = {"env_vars": {"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}}
        return self._ray.remote(DriverRank if driver else ExpertShard).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=res.resources or None,
            scheduling_strategy=self._pg_strategy(pg, placement_group_bundle_index=bundle),
            name=f"dsray-{self.name}-{'driver' if driver else 'shard'}-{spec.rank}-{uuid.uuid4().hex[:4]}",
            namespace=NAMESPACE, runtime_env=env, max_restarts=0,
        ).remote(spec)

    def _init_group(self, **changes: Any) -> None:
        """Rank 0 reports (addr, port); every rank joins the world group (bounded wait)."""
        addr, port = self._ray.get(self.drivers[0].master_addr.remote(), timeout=self.init_timeout_s)
        self._wait([a.init_process_group.remote(addr, port, self.step_timeout_s, **changes) for a in self.ranks],
                   self.init_timeout_s, "init process group")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kw: Any) -> "Engine":
        """Load a HF deepseek_v3 folder: drivers read the dense weights, each shard only its experts."""
        return cls(ModelConfig.from_pretrained(path), checkpoint=path, **kw)

    @classmethod
    def from_config(cls, config: str | os.PathLike | ModelConfig, seed: int = 0, **kw: Any) -> "Engine":
        """A fresh model from a preset name, config.json path or ModelConfig; each rank initialises its
        own slice deterministically (same weights as `Transformer.from_config(cfg, seed)`)."""
        return cls(resolve_config(config), seed=seed, **kw)

    def _placement(self, spec, shard_ranks: list[int], world: int) -> Placement:
        E = self.cfg.n_routed_experts
        if isinstance(spec, Placement):
            p = spec
        elif spec == "linear":
            p = Placement.linear(E, shard_ranks, world)
        elif spec in ("round_robin", "round-robin"):
            p = Placement.round_robin(E, shard_ranks, world)
        elif isinstance(spec, dict) and "slots" in spec:
            p = Placement.from_dict(spec)
        elif isinstance(spec, (dict, list)):
            # explicit table: shard index (0..S-1) -> experts
            items = spec.items() if isinstance(spec, dict) else enumerate(spec)
            table = {self.D + int(k): list(v) for k, v in items}
            p = Placement.from_table(table, E, world)
        else:
            raise ValueError(f"placement={spec!r}: expected 'linear', 'round_robin', a Placement or a table")
        if p.world_size != world or any(p.local_experts(r) for r in range(self.D)):
            raise ValueError(f"placement must put experts only on shard ranks {shard_ranks} of a world of {world}")
        return p

    @property
    def num_drivers(self) -> int:
        return self.D

    @property
    def num_shards(self) -> int:
        return self.S

    @property
    def ranks(self) -> list:
        return self.drivers + self.shards

    def _load_router_state(self) -> dict[str, Any]:
        if not self.checkpoint:
            return {}
        f = Path(self.checkpoint) / "dsray_router.json"
        if not f.exists():
            return {}
        return read_json_object(f, "router statistics")

    def _import_optimizer(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state_file = folder / "dsray_state.json"
        step = read_json_object(state_file, "dsray state").get("optim_step", 0) if state_file.exists() else 0
        optim = load_file(folder / "optimizer.safetensors")  # safetensors: never unpickles
        self._wait([a.import_optimizer.remote(optim, step) for a in self.ranks], self.init_timeout_s,
                   "restore optimizer")

    def _report_placement(self) -> None:
        mem = self._wait([s.memory.remote() for s in self.shards], self.step_timeout_s, "shard memory")
        shards = {str(self.D + j): {"node": self.nodes[self.D + j]["ip"], **m} for j, m in enumerate(mem)}
        self._ray.get(self.router.set_placement.remote(self.placement.to_dict() if self.placement
                                                       else {"version": 0}, shards), timeout=60)

    # ---- waiting with timeouts and health checks ---------------------------------------------------
    def _wait(self, futures: list, timeout: float, what: str) -> list:
        """All results, or a RuntimeError naming the failed/stuck ranks; the first failure aborts at once
        (its peers would otherwise sit in a collective until the process-group timeout)."""
        ray = self._ray
        index = {f: i for i, f in enumerate(futures)}
        pending, deadline = list(futures), time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                stuck = sorted(index[f] for f in pending)
                alive = self._health()
                self._broken = True
                raise RuntimeError(f"{what}: rank(s) {stuck} did not finish within {timeout:.0f}s; "
                                   f"rank liveness {alive}")
            try:
                ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - re-raised with context
                self._broken = True
                raise RuntimeError(f"{what}: rank {index[ready[0]]} failed: {e}") from e
        return ray.get(futures)

    def _health(self) -> dict[int, bool]:
        pings = {i: a.ping.remote() for i, a in enumerate(self.ranks)}
        ready, _ = self._ray.wait(list(pings.values()), num_returns=len(pings), timeout=5)
        return {i: f in ready for i, f in pings.items()}

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError(f"engine {self.name!r} is shut down")
        if self._broken:
            raise RuntimeError(f"engine {self.name!r} failed in an earlier step; shut it down and start again")

    def _ids(self, ids: torch.Tensor | list, min_len: int = 1) -> torch.Tensor:
        t = torch.as_tensor(ids)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.dtype.is_floating_point:
            raise ValueError(f"input_ids: expected integer ids [batch, seq], got {tuple(t.shape)} {t.dtype}")
        if t.shape[1] < min_len:
            raise ValueError(f"input_ids: sequences need at least {min_len} tokens, got {t.shape[1]}")
        if t.numel() and (t.min() < 0 or t.max() >= self.cfg.vocab_size):
            raise ValueError(f"input_ids: ids must be in [0, {self.cfg.vocab_size}), got "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t.long()

    def _split(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.tensor_split(ids, self.D))

    # ---- steps --------------------------------------------------------------------------------------
    def train_step(self, batch: torch.Tensor, lr: float | None = None) -> dict[str, Any]:
        """One optimizer step over `batch` [B, S] (B >= num_drivers): data-parallel over drivers, experts
        on shards. Returns loss, mtp_loss, per-layer counts, MaxVio, step time, tokens/s."""
        self._check()
        ids = self._ids(batch, 2)
        if ids.shape[0] < self.D:
            raise ValueError(f"batch of {ids.shape[0]} sequences for {self.D} driver ranks: need >= 1 each")
        t0 = time.perf_counter()
        n_tokens = ids.shape[0] * (ids.shape[1] - 1)
        step = self._step
        lr = self.lr if lr is None else lr
        futs = [d.train_step.remote(step, part, self._bias, n_tokens, lr, self.mtp_weight, self.seq_aux_alpha,
                                    ids.shape[0]) for d, part in zip(self.drivers, self._split(ids))]
        futs += [s.train_step.remote(step, lr) for s in self.shards]
        res = self._wait(futs, self.step_timeout_s, f"train step {step}")
        drv = res[:self.D]
        counts = np.sum([r["counts"] for r in drv], axis=0)
        loss = float(sum(r["loss"] for r in drv))
        mtp = float(sum(r["mtp_loss"] for r in drv)) if drv[0]["mtp_loss"] is not None else None
        seconds = time.perf_counter() - t0
        rep = self._ray.get(self.router.report.remote(
            "train", counts, loss=loss, mtp_loss=mtp, step_seconds=seconds, tokens=int(ids.numel()),
            a2a=drv[0]["a2a"]), timeout=60)
        self._bias = rep["bias"]
        self._step = rep["step"]
        return {"step": self._step, "loss": loss, "mtp_loss": mtp, "counts": counts,
                "grad_norm": drv[0]["grad_norm"] or None,
                "balance_loss": (float(sum(r["balance_loss"] for r in drv))
                                 if drv[0]["balance_loss"] is not None else None),
                "maxvio_batch": rep["maxvio_batch"], "maxvio_window": rep["maxvio_window"],
                "step_time_s": seconds, "tokens_per_s": ids.numel() / seconds,
                "shard_memory": [r for r in res[self.D:]]}

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V] (fp32 on CPU); last_only=True returns [B, 1, V] (B*S*V*4 bytes otherwise
        travel back through Ray: 256 MiB for 8x1024 tokens of an 8k vocab)."""
        self._check()
        ids = self._ids(input_ids)
        t0 = time.perf_counter()
        futs = [d.forward.remote(part, self._bias, last_only) for d, part in zip(self.drivers, self._split(ids))]
        futs += [s.serve.remote() for s in self.shards]
        res = self._wait(futs, self.step_timeout_s, "forward")[:self.D]
        self._report("forward", res, ids.numel(), time.perf_counter() - t0)
        return torch.cat([r["logits"] for r in res if r["logits"] is not None])

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | list, max_new_tokens: int, temperature: float | None = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | tuple | None = None,
                 seed: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Prompt + new ids. A [B, S] tensor gives a [B, S + n] tensor (rows that stop at eos are padded
        with eos); a list of prompts of any lengths gives a list of 1-D tensors in the same order.
        Greedy at temperature 0, else sampled (top-k / top-p; `seed` makes it repeatable for a given
        number of drivers)."""
        self._check()
        temperature = 0.0 if temperature is None else temperature
        eos_token_id = None if eos_token_id == () else eos_token_id
        as_list = isinstance(input_ids, (list, tuple))
        prompts = [self._ids(p)[0] for p in input_ids] if as_list else list(self._ids(input_ids))
        if not prompts:
            raise ValueError("input_ids: no prompts")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 0")
        longest = max(p.shape[0] for p in prompts)
        if longest + max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt + max_new_tokens = {longest + max_new_tokens} exceeds "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        t0 = time.perf_counter()
        # Contiguous blocks of prompts per driver keep each driver's length groups large.
        parts = [list(range(len(prompts)))[k::self.D] for k in range(self.D)] if as_list else \
            [list(c) for c in torch.tensor_split(torch.arange(len(prompts)), self.D)]
        parts = [[int(i) for i in part] for part in parts]
        futs = [d.generate.remote([prompts[i] for i in part], self._bias, max_new_tokens, temperature, top_k,
                                  top_p, eos_token_id, None if seed is None else seed + k)
                for k, (d, part) in enumerate(zip(self.drivers, parts))]
        futs += [s.serve.remote() for s in self.shards]
        res = self._wait(futs, self.step_timeout_s, "generate")[:self.D]
        outs: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        for part, r in zip(parts, res):
            for i, row in zip(part, r["ids"]):
                outs[i] = row
        new = sum(o.shape[0] - p.shape[0] for o, p in zip(outs, prompts))
        self._report("generate", res, int(new), time.perf_counter() - t0)
        if as_list:
            if eos_token_id is not None:  # batch-mates kept decoding: cut each row after its first eos
                for i, (o, p) in enumerate(zip(outs, prompts)):
                    hit = (o[p.shape[0]:] == eos_token_id).nonzero()
                    if len(hit):
                        outs[i] = o[:p.shape[0] + int(hit[0]) + 1]
            return outs
        width = max(o.shape[0] for o in outs)
        pad = eos_token_id if eos_token_id is not None else 0
        return torch.stack([torch.nn.functional.pad(o, (0, width - o.shape[0]), value=pad) for o in outs])

    def _report(self, mode: str, res: list[dict], tokens: int, seconds: float) -> None:
        counts = np.sum([r["counts"] for r in res], axis=0)
        self._ray.get(self.router.report.remote(mode, counts, step_seconds=seconds, tokens=tokens,
                                                a2a=res[0]["a2a"]), timeout=60)

    # ---- placement changes (step boundaries) -----------------------------------------------------
    def set_placement(self, placement: Placement | dict | list | str) -> Placement:
        """Move to a new expert placement between steps: weights and AdamW state move with each expert
        (replicas get copies), drivers re-route, the Router records the new version. No step is lost
        or repeated: the next train_step continues from the same state."""
        self._check()
        if not self.S:
            raise ValueError("set_placement needs expert shards (num_shards >= 1)")
        new = self._placement(placement, list(range(self.D, self.D + self.S)), self.D + self.S)
        new = Placement(new.n_experts, new.slots, version=max(new.version, self.placement.version + 1))
        states, step = self._gather_expert_states()
        self._apply_placement(new, states, step)
        return new

    def rebalance(self, n_extra_slots: int) -> Placement:
        """EPLB-style: give the hottest experts (by the Router's moving-average load over all MoE
        layers) `n_extra_slots` replicas on the least-loaded shards."""
        stats = self.stats()
        load = np.asarray(stats["ema_counts"], dtype=np.float64).sum(axis=0)
        return self.set_placement(self.placement.rebalanced(load.tolist(), n_extra_slots))

    def scale(self, num_shards: int, placement: str | dict | list = "linear") -> Placement:
        """Change the number of expert shards while the engine runs: new shard actors start (their own
        placement group), removed ones stop, every rank joins a new process group, and experts with
        their optimizer state are redistributed by `placement` over the new shards."""
        self._check()
        if num_shards < 1 or not self.S:
            raise ValueError(f"scale: num_shards={num_shards}; scaling needs >= 1 shard before and after")
        if num_shards == self.S:
            return self.placement
        ray = self._ray
        from ray.util.placement_group import placement_group

        states, step = self._gather_expert_states()
        # Leave the old group everywhere (no collective is in flight between steps).
        self._wait([a.shutdown.remote() for a in self.ranks], self.step_timeout_s, "leave process group")
        old_S, world = self.S, self.D + num_shards
        new = self._placement(placement, list(range(self.D, world)), world)
        new = Placement(new.n_experts, new.slots, version=self.placement.version + 1)
        if num_shards < old_S:
            for a in self.shards[num_shards:]:
                ray.kill(a, no_restart=True)
            self.shards = self.shards[:num_shards]
            self.nodes = self.nodes[:world]
            self._specs = self._specs[:world]
        else:
            res = self._shard_res[-1]
            bundles = [res.bundle()] * (num_shards - old_S)
            pg = placement_group(bundles, strategy=self._strategy)
            self._extra_pgs.append(pg)
            ready, _ = ray.wait([pg.ready()], timeout=self.init_timeout_s)
            if not ready:
                self._broken = True
                raise RuntimeError(f"scale: {len(bundles)} more shard bundle(s) {bundles[0]} not placed within "
                                   f"{self.init_timeout_s:.0f}s; cluster has {ray.available_resources()}")
            base = self._specs[-1]
            for i, r in enumerate(range(self.D + old_S, world)):
                spec = RankSpec(**{**base.__dict__, "rank": r, "n_shards": num_shards,
                                   "placement": new.to_dict(), "load_experts": False})
                self._specs.append(spec)
                self.shards.append(self._start_rank(spec, res, pg, i))
            self.nodes += self._wait([a.node_info.remote() for a in self.shards[old_S:]], self.init_timeout_s,
                                     "start new shards")
        self.S = num_shards
        for spec in self._specs:
            spec.n_shards = num_shards
        self._shard_res = (self._shard_res + [self._shard_res[-1]] * num_shards)[:num_shards]
        self._init_group(n_shards=num_shards, placement=new.to_dict())
        self._apply_placement(new, states, step)
        return new

    def _gather_expert_states(self) -> tuple[dict[str, torch.Tensor], int]:
        # Between steps, through the object store: this is the rare control path, not the token path.
        parts = self._wait([s.export_state.remote() for s in self.shards], self.step_timeout_s, "export experts")
        states: dict[str, torch.Tensor] = {}
        for p in parts:
            for k, v in p["weights"].items():
                states.setdefault(k, v)
            for k, v in p["optim"].items():
                states.setdefault(k, v)
        return states, max(p["optim_step"] for p in parts)

    def _apply_placement(self, new: Placement, states: dict[str, torch.Tensor], step: int) -> None:
        from dsray.model.hf import EXPERT_PROJS, expert_key

        futs = []
        for j, shard in enumerate(self.shards):
            mine = {}
            for layer in self.moe_layers:
                for e in new.local_experts(self.D + j):
                    for proj in EXPERT_PROJS:
                        k = expert_key(layer, e, proj)
                        for key in (k, f"{k}.exp_avg", f"{k}.exp_avg_sq"):
                            if key in states:
                                mine[key] = states[key]
            futs.append(shard.reconfigure.remote(new.to_dict(), mine, step))
        futs += [d.set_placement.remote(new.to_dict()) for d in self.drivers]
        self._wait(futs, self.step_timeout_s, f"placement v{new.version}")
        self.placement = new
        for spec in self._specs:
            spec.placement = new.to_dict()
        self._report_placement()

    # ---- state --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        self._check()
        return self._ray.get(self.router.stats.remote(), timeout=60)

    def bias(self) -> np.ndarray:
        return np.asarray(self._bias)

    def grads(self) -> dict[str, torch.Tensor]:
        """Gradients of the last train step under checkpoint keys: dense from driver 0 (identical on every
        driver after the all-reduce), experts from the shards. For tests and debugging."""
        from dsray.model.hf import to_hf_name

        dense = self._ray.get(self.drivers[0].grads.remote(), timeout=60)
        out = {to_hf_name(k, self.cfg): v for k, v in dense.items()}
        for part in self._ray.get([s.grads.remote() for s in self.shards], timeout=60):
            out.update(part)
        return out

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """HF folder (official key layout, bias = the Router's) + optimizer.safetensors + dsray_router.json."""
        from dsray.checkpoint import save_checkpoint

        self._check()
        path = Path(path)
        from dsray.files import check_checkpoint_target

        check_checkpoint_target(path, overwrite)  # before the (long) gather
        parts = self._wait([self.drivers[0].export_state.remote()] + [s.export_state.remote() for s in self.shards],
                           self.step_timeout_s, "save")
        weights: dict[str, torch.Tensor] = {}
        optim: dict[str, torch.Tensor] = {}
        for p in parts:
            for k, v in p["weights"].items():
                weights.setdefault(k, v)  # replicas hold identical copies
            for k, v in p["optim"].items():
                optim.setdefault(k, v)
        bias = self._bias
        for i, layer in enumerate(self.moe_layers):
            weights[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = torch.tensor(np.array(bias[i]), dtype=torch.float32)
        stats = self.stats()
        conf = self.cfg.to_dict()
        conf["num_nextn_predict_layers"] = self.cfg.num_nextn_predict_layers if self.has_mtp else 0
        conf["torch_dtype"] = self.dtype
        from dsray.checkpoint import staged_folder, write_part

        with staged_folder(path, overwrite) as tmp:
            save_checkpoint(weights, tmp / "model", conf, extra_json={
                "dsray_router.json": stats,
                "dsray_state.json": {"step": self._step, "optim_step": max(p["optim_step"] for p in parts),
                                     "engine": self.name, "num_drivers": self.D, "num_shards": self.S}})
            for f in (tmp / "model").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "model").rmdir()
            if optim:
                write_part(tmp / "optimizer.safetensors", optim)
        return path

    # ---- lifecycle ----------------------------------------------------------------------------------
    def shutdown(self, graceful: bool = True) -> None:
        """Stop every actor and the placement group; idempotent; safe after errors and Ctrl-C."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        ray = self._ray
        try:
            if graceful and not self._broken and self.ranks:
                waits = [a.shutdown.remote() for a in self.ranks]
                if self.router is not None:
                    waits.append(self.router.flush_metrics.remote())
                ray.wait(waits, num_returns=len(waits), timeout=10)
        except Exception:  # noqa: BLE001 - teardown continues regardless
            pass
        for a in self.ranks + ([self.router] if self.router is not None else []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        for pg in [self.pg, *getattr(self, "_extra_pgs", [])]:
            if pg is None:
                continue
            try:
                self._remove_pg(pg)
            except Exception:  # noqa: BLE001
                pass
        try:
            atexit.unregister(self.shutdown)
        except Exception:  # noqa: BLE001
            pass
        if self._own_ray:
            ray.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(graceful=exc[0] is None)


def _router_cls():
    from dsray.runtime.router import Router

    return Router


def named_actors() -> set[str]:
    """Names of the live named actors in dsray's namespace on the connected cluster."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE}


def attach_router(name: str):
    """The Router actor of a running engine, found by name on the cluster (for `dsray status` / `top`)."""
    import ray

    try:
        return ray.get_actor(router_name(name), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no running dsray engine named {name!r} on this cluster") from None
