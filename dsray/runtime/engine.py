"""Engine: the job driver's API. Starts the Router and one RankGroup (D DriverRanks + S ExpertShards),
and orchestrates steps; placement changes live in reshard.py, checkpoints in persist.py, failure
recovery in recovery.py.

    with Engine.from_config("debug", num_drivers=2, num_shards=3) as eng:
        out = eng.train_step(batch)          # one actor call per rank per step
        ids = eng.generate(prompt_ids, 32)
        eng.save("ckpt/")

The token path of one step: the Engine sends each driver its rows (and the Router's bias) and each
shard a bare "run this mode" call; drivers embed, attend, gate, and dispatch each token's hidden state
once to every shard holding one of its experts (all-to-all over one torch.distributed group); shards
run their experts and return one gate-weighted row per (token, shard); drivers finish the layer and
the next. Drivers return loss / logits / ids and per-expert counts; the Engine reports the counts to
the Router, whose new bias rides along with the next step's calls.

It joins a cluster when RAY_ADDRESS is set (as inside `ray job submit`) and starts an embedded local
Ray otherwise. Every actor and placement group is removed on shutdown, on error and on Ctrl-C.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dsray.config import GenerationConfig, ModelConfig, resolve_config
from dsray.files import read_json_object
from dsray.parallel.placement import Placement
from dsray.runtime.cluster import Resources, connect
from dsray.runtime.group import NAMESPACE, RankFailure, RankGroup
from dsray.runtime.policy_steps import PolicySteps
from dsray.runtime.rank import DTYPES, RankSpec
from dsray.runtime.reshard import Placements

log = logging.getLogger("dsray")


def router_name(engine: str) -> str:
    return f"dsray-router-{engine}"


class Engine(PolicySteps, Placements):
    def __init__(self, config: ModelConfig, *, checkpoint: str | os.PathLike | None = None, seed: int = 0,
                 num_drivers: int = 1, num_shards: int = 1, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 placement: str | Placement | dict | list = "linear", name: str = "dsray", gamma: float | None = None,
                 bias_rule: str = "prop", lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), mtp_weight: float = 0.3, clip_grad_norm: float = 0.0,
                 seq_aux_alpha: float = 0.0, expert_impl: str = "grouped", threads: int = 1,
                 driver_resources: Resources | dict | None = None,
                 shard_resources: Resources | dict | list | None = None, strategy: str = "PACK",
                 step_timeout_s: float = 600.0, init_timeout_s: float = 300.0, metrics: bool = True,
                 resume_optimizer: bool = True, address: str | None = None, wait_for_nodes_s: float = 0.0,
                 recovery: bool = True, snapshot_every: int = 1) -> None:
        from dsray.runtime.balance import BiasUpdater

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
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"strategy={strategy!r}: expected a Ray placement strategy")
        if not config.has_moe and num_shards:
            raise ValueError("this config has no MoE layers: use num_shards=0")
        if seq_aux_alpha < 0:
            raise ValueError(f"seq_aux_alpha={seq_aux_alpha}: expected >= 0 (DeepSeek-V3 used 1e-4; 0 disables)")
        if clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm={clip_grad_norm}: expected >= 0 (0 disables)")
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every={snapshot_every}: expected >= 0 (0: no in-memory snapshots)")
        self.cfg, self.name = config, name
        self.D, self.S = num_drivers, num_shards
        self.device, self.dtype = device, dtype_name
        self.dtype_bytes = torch.empty(0, dtype=DTYPES[dtype_name]).element_size()
        self.mtp_weight, self.lr, self.seq_aux_alpha = mtp_weight, lr, seq_aux_alpha
        self.step_timeout_s, self.init_timeout_s = step_timeout_s, init_timeout_s
        self.checkpoint = str(Path(checkpoint).resolve()) if checkpoint else None
        self.has_mtp = config.num_nextn_predict_layers > 0
        if self.checkpoint:
            from dsray.checkpoint import CheckpointReader

            reader = CheckpointReader(self.checkpoint)  # fails fast on a missing/bad folder
            self.has_mtp = self.has_mtp and f"model.layers.{config.num_hidden_layers}.eh_proj.weight" in reader
        self.generation = GenerationConfig.for_model(config, self.checkpoint)
        world = self.D + self.S
        self.placement = self.make_placement(placement, list(range(self.D, world)), world) if self.S else None
        from dsray.parallel.ep import lockstep_layers

        self.moe_layers = lockstep_layers(config, self.has_mtp, "train")
        BiasUpdater(len(self.moe_layers), config.n_routed_experts, bias_rule, gamma)  # validates rule and gamma
        drv_res = Resources.of(driver_resources, device)
        if isinstance(shard_resources, list):
            if len(shard_resources) != self.S:
                raise ValueError(f"shard_resources has {len(shard_resources)} entries for num_shards={self.S}")
            shard_res = [Resources.of(r, device) for r in shard_resources]
        else:
            shard_res = [Resources.of(shard_resources, device)] * self.S
        self.shard_resources = shard_res[-1] if shard_res else Resources.of(None, device)
        optim = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "weight_decay": weight_decay, "eps": 1e-8,
                 "clip_grad_norm": clip_grad_norm}
        specs = [RankSpec(rank=r, n_drivers=self.D, n_shards=self.S, config=config.to_dict(),
                          placement=self.placement.to_dict() if self.placement else None, has_mtp=self.has_mtp,
                          checkpoint=self.checkpoint, seed=seed, dtype=dtype_name, device=device,
                          expert_impl=expert_impl, threads=threads, optim=optim) for r in range(world)]
        self._step, self.optim_step, self.trained = 0, 0, False
        self._reports: list = []  # Router reports not yet confirmed (forward-only modes)
        self.recovery_enabled, self.snapshot_every = recovery, snapshot_every

        # ---- start ------------------------------------------------------------------------------
        import ray

        self._ray, self._closed, self._broken = ray, False, False
        self.group: RankGroup | None = None
        self.router = None
        self._own_ray, self.ray_how = connect(address, int(drv_res.num_cpus * self.D
                                                          + sum(r.num_cpus for r in shard_res)) + 1)
        log.info("dsray: %s", self.ray_how)
        atexit.register(self.shutdown)
        try:
            if router_name(name) in named_actors():
                raise ValueError(f"an engine named {name!r} is already running on this cluster; pick another name")
            self.group = RankGroup(name, specs, [drv_res] * self.D + shard_res, strategy=strategy,
                                   init_timeout_s=init_timeout_s, wait_for_nodes_s=wait_for_nodes_s)
            if world > 1:
                self.group.init_process_group(step_timeout_s)
            stats = self._load_json("dsray_router.json")
            self._bias = self.group.execute("state_bias", ranks=[0], timeout=init_timeout_s)[0]
            self._router_args = dict(engine=name, moe_layers=self.moe_layers, n_experts=config.n_routed_experts,
                                     gamma=gamma, bias_rule=bias_rule, metrics=metrics, lr=lr)
            self._start_router(self._bias.tolist(), stats.get("step", 0), stats.get("history"),
                               stats.get("balance"))
            self._step = stats.get("step", 0)
            from dsray.runtime.persist import has_optimizer

            if self.checkpoint and resume_optimizer and has_optimizer(self.checkpoint):
                step = self._load_json("dsray_state.json").get("optim_step", 0)
                self.group.execute("import_optimizer", [(self.checkpoint, step)] * world, timeout=init_timeout_s,
                                   what="restore optimizer")
                self.optim_step, self.trained = step, step > 0
            self._report_placement()
            from dsray.runtime.recovery import Recovery

            self.recovery = Recovery(self)
            self._last_requests_check = 0.0
        except BaseException:
            self.shutdown(graceful=False)
            raise

    def _start_router(self, bias: list, step: int, history: dict | None, balance: dict | None) -> None:
        from dsray.runtime.router import Router

        self.router = self._ray.remote(Router).options(
            name=router_name(self.name), namespace=NAMESPACE, num_cpus=0, max_concurrency=4,
        ).remote(placement=self.placement.to_dict() if self.placement else {"version": 0}, bias=bias, step=step,
                 history=history, balance_state=balance, **self._router_args)

    # ---- construction helpers ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kw: Any) -> "Engine":
        """Load a HF deepseek_v3 folder: drivers read the dense weights, each shard only its experts."""
        return cls(ModelConfig.from_pretrained(path), checkpoint=path, **kw)

    @classmethod
    def from_config(cls, config: str | os.PathLike | ModelConfig, seed: int = 0, **kw: Any) -> "Engine":
        """A fresh model from a preset name, config.json path or ModelConfig; each rank initialises its
        own slice deterministically (same weights as `Transformer.from_config(cfg, seed)`)."""
        return cls(resolve_config(config), seed=seed, **kw)

    @property
    def num_drivers(self) -> int:
        return self.D

    @property
    def num_shards(self) -> int:
        return self.S

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """Per rank: node id, ip, pid, GPUs (what `RankGroup` learned when it started the rank)."""
        return self.group.nodes

    @property
    def drivers(self) -> list:
        return self.group.actors[:self.D]

    @property
    def shards(self) -> list:
        return self.group.actors[self.D:]

    def _load_json(self, name: str) -> dict[str, Any]:
        f = Path(self.checkpoint) / name if self.checkpoint else None
        return read_json_object(f, name) if f is not None and f.exists() else {}

    def _report_placement(self) -> None:
        mem = self.group.execute("memory", ranks=range(self.D, self.D + self.S), timeout=self.step_timeout_s)
        shards = {str(self.D + j): {"node": self.group.nodes[self.D + j]["ip"], **m} for j, m in enumerate(mem)}
        self.router_call("set_placement", self.placement.to_dict() if self.placement else {"version": 0}, shards)

    def record_change(self, kind: str, new: Placement, moved: int, seconds: float) -> None:
        self._report_placement()
        if getattr(self, "recovery", None) is not None:
            self.recovery.snapshot()  # a new layout: recovery restores from here
        self.last_change = {"kind": kind, "version": new.version, "bytes_moved": moved, "seconds": seconds}
        log.info("dsray: %s -> placement v%d, %d bytes moved rank to rank in %.2fs", kind, new.version, moved,
                 seconds)

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError(f"engine {self.name!r} is shut down")
        if self._broken:
            raise RuntimeError(f"engine {self.name!r} failed in an earlier step and could not recover; "
                               "shut it down and start again from the last checkpoint")

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

    def _split(self, t: torch.Tensor | None) -> list:
        return [None] * self.D if t is None else list(torch.tensor_split(t, self.D))

    # ---- one step: fan out, recover, report --------------------------------------------------------
    def _run(self, what: str, calls: Callable[[], dict[int, Any]]) -> list[Any]:
        """Issue one step's calls (one per rank) and wait; on a rank failure, recover and replay the
        step (recovery.py) — the caller gets the result as if nothing had happened."""
        self._check()
        self._apply_requests()
        try:
            return self.group.wait(calls(), self.step_timeout_s, what)
        except RankFailure as failure:
            if not self.recovery_enabled:
                self._broken = True
                raise
            return self.recovery.recover(failure, what, calls)

    def _report(self, mode: str, res: list[dict], tokens: int, seconds: float, wait: bool, **kw: Any):
        counts = np.sum([r["counts"] for r in res if r.get("counts") is not None], axis=0)
        L = len(self.moe_layers)
        counts = np.zeros((L, self.cfg.n_routed_experts), np.int64) if np.ndim(counts) != 2 else counts
        if counts.shape[0] < L:  # forward-only modes skip the MTP blocks (the last layers): zero counts
            counts = np.concatenate([counts, np.zeros((L - counts.shape[0], counts.shape[1]), counts.dtype)])
        self._drain_reports()  # in order: the Router serves calls on several threads
        rec = self.recovery if getattr(self, "recovery", None) is not None and self.recovery.replaying else None
        if rec is not None:  # a replayed step after recovery: the Router has counted it already
            return rec.recorded.pop(0) if wait else None
        args = (mode, counts)
        kw = dict(step_seconds=seconds, tokens=tokens, a2a=res[0]["a2a"], **kw)
        if not wait:  # forward-only modes change no routing state the next step needs: off the critical path
            self._reports.append(self.router_call("report", *args, wait=False, **kw))
            return None
        return self.router_call("report", *args, **kw)

    def _drain_reports(self) -> None:
        pending, self._reports = self._reports, []
        try:
            if pending:
                self._ray.get(pending, timeout=60)
        except self._ray.exceptions.RayActorError:
            self.router_call("get_bias")  # recovers the Router; the mirror replays the lost reports

    # Router calls that change its state; the Engine mirrors them (recovery.py) so a restarted Router
    # ends up exactly where the dead one was.
    _MIRRORED = ("report", "set_placement", "add_extra", "confirm")

    def router_call(self, method: str, *args: Any, wait: bool = True, **kw: Any) -> Any:
        entry = (method, args, kw)
        mirror = getattr(self, "recovery", None) if method in self._MIRRORED else None
        if mirror is not None:
            mirror.router_log.append(entry)
        ref = getattr(self.router, method).remote(*args, **kw)
        if not wait:
            return ref
        try:
            return self._ray.get(ref, timeout=60)
        except self._ray.exceptions.RayActorError as e:
            if not self.recovery_enabled or getattr(self, "recovery", None) is None:
                raise
            if mirror is not None and mirror.router_log and mirror.router_log[-1] is entry:
                mirror.router_log.pop()  # re-sent below, once, to the new Router
            self.recovery.recover_router(e)
            return self.router_call(method, *args, **kw)

    # ---- steps --------------------------------------------------------------------------------------
    def train_step(self, batch: torch.Tensor, lr: float | None = None) -> dict[str, Any]:
        """One optimizer step over `batch` [B, S] (B >= num_drivers): data-parallel over drivers, experts
        on shards. Returns loss, mtp_loss, per-layer counts, MaxVio, step time, tokens/s."""
        self._check()
        ids = self._ids(batch, 2)
        if ids.shape[0] < self.D:
            raise ValueError(f"batch of {ids.shape[0]} sequences for {self.D} driver ranks: need >= 1 each")
        t0 = time.perf_counter()
        n_tokens, step, lr = ids.shape[0] * (ids.shape[1] - 1), self._step, self.lr if lr is None else lr
        self.recovery.before_step(lambda: self.train_step(batch, lr))

        def calls():
            f = self.group.execute_async("train_step", [
                (step, part, self._bias, n_tokens, lr, self.mtp_weight, self.seq_aux_alpha, ids.shape[0])
                for part in self._split(ids)], ranks=range(self.D))
            f.update(self.group.execute_async("train_step", [(step, lr, "train")] * self.S,
                                              ranks=range(self.D, self.D + self.S)))
            return f

        res = self._run(f"train step {step}", calls)
        drv = res[:self.D]
        loss = float(sum(r["loss"] for r in drv))
        mtp = float(sum(r["mtp_loss"] for r in drv)) if drv[0]["mtp_loss"] is not None else None
        seconds = time.perf_counter() - t0
        rep = self._report("train", drv, int(ids.numel()), seconds, True, loss=loss, mtp_loss=mtp, lr=lr)
        self._after_step(rep)
        return {"step": self._step, "loss": loss, "mtp_loss": mtp, "counts": np.sum([r["counts"] for r in drv], 0),
                "grad_norm": drv[0]["grad_norm"] or None,
                "balance_loss": (float(sum(r["balance_loss"] for r in drv))
                                 if drv[0]["balance_loss"] is not None else None),
                "maxvio_batch": rep["maxvio_batch"], "maxvio_window": rep["maxvio_window"],
                "step_time_s": seconds, "tokens_per_s": ids.numel() / seconds,
                "shard_memory": list(res[self.D:])}

    def _after_step(self, rep: dict[str, Any]) -> None:
        self._bias, self._step = rep["bias"], rep["step"]
        self.optim_step, self.trained = self.optim_step + 1, True
        self.recovery.after_step(rep)

    def _forward_only(self, mode: str, what: str, per_driver: list[tuple], reference: bool = False) -> list[dict]:
        def calls():
            f = self.group.execute_async(mode, per_driver, ranks=range(self.D))
            f.update(self.group.execute_async("serve", [(mode, reference)] * self.S,
                                              ranks=range(self.D, self.D + self.S)))
            return f

        return self._run(what, calls)[:self.D]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V] (fp32 on CPU); last_only=True returns [B, 1, V] (B*S*V*4 bytes otherwise
        travel back through Ray: 256 MiB for 8x1024 tokens of an 8k vocab)."""
        ids = self._ids(input_ids)
        t0 = time.perf_counter()
        res = self._forward_only("forward", "forward", [(p, self._bias, last_only) for p in self._split(ids)])
        self._report("forward", res, ids.numel(), time.perf_counter() - t0, False)
        return torch.cat([r["logits"] for r in res if r["logits"] is not None])

    # ---- state --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        self._check()
        self._drain_reports()
        out = self.router_call("stats")
        out["recoveries"] = self.recovery.log
        return out

    def bias(self) -> np.ndarray:
        return np.asarray(self._bias)

    def grads(self) -> dict[str, torch.Tensor]:
        """Gradients of the last train step under checkpoint keys: dense from driver 0 (identical on every
        driver after the all-reduce), experts from the shards. For tests and debugging."""
        from dsray.model.hf import to_hf_name

        parts = self.group.execute("grads", ranks=[0, *range(self.D, self.D + self.S)], timeout=60)
        out = {to_hf_name(k, self.cfg): v for k, v in parts[0].items()}
        for part in parts[1:]:
            out.update(part)
        return out

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """A HF folder (official key layout, bias = the Router's, per-rank parts + one index), the AdamW
        moments (optimizer index), generation_config.json and the Router's statistics. Every rank writes
        its own tensors; the folder appears atomically and a crash leaves the previous one intact."""
        from dsray.checkpoint import staged_folder
        from dsray.config import DSRAY_SAMPLING
        from dsray.runtime.persist import write_indexes, write_metadata

        self._check()
        stats = self.stats()
        writers = [0, *range(self.D, self.D + self.S)]
        conf = self.cfg.to_dict()
        conf["num_nextn_predict_layers"] = self.cfg.num_nextn_predict_layers if self.has_mtp else 0
        conf["torch_dtype"] = self.dtype
        gen = self.generation.to_dict()
        if self.checkpoint is None or not (Path(self.checkpoint) / GenerationConfig.FILE).exists():
            gen.update(DSRAY_SAMPLING)
        with staged_folder(Path(path), overwrite) as tmp:
            futs = {0: self.group.actors[0].save_part.remote(str(tmp), 0, len(writers), self._bias)}
            futs.update(self.group.execute_async("save_part", [(str(tmp), i + 1, len(writers))
                                                               for i in range(self.S)],
                                                 ranks=range(self.D, self.D + self.S)))
            parts = self.group.wait(futs, self.step_timeout_s, "save")
            write_indexes(tmp, parts, params=self._n_params(parts))
            write_metadata(tmp, conf, gen, stats, {
                "step": self._step, "optim_step": max(p["optim_step"] for p in parts), "engine": self.name,
                "num_drivers": self.D, "num_shards": self.S})
        return Path(path)

    def _n_params(self, parts: list[dict]) -> int:
        return int(sum(n for p in parts for n in p["weights"].values()) // self.dtype_bytes)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def shutdown(self, graceful: bool = True) -> None:
        """Stop every actor and the placement groups; idempotent; safe after errors and Ctrl-C."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        ray = self._ray
        extra = []
        if self.router is not None and graceful and not self._broken:
            try:
                extra.append(self.router.flush_metrics.remote())
            except Exception:  # noqa: BLE001
                pass
        if self.group is not None:
            self.group.shutdown(graceful and not self._broken, extra)
        if self.router is not None:
            try:
                ray.kill(self.router, no_restart=True)
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
