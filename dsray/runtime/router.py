"""The Router actor: owns routing state for one engine.

- per-layer expert bias (fp32), DeepSeek-V3 auxiliary-loss-free balancing (arXiv 2408.15664): after
  each training step the global per-expert counts go through a `BiasUpdater` (dsray/runtime/balance.py;
  default rule `prop`, bias += gamma * (mean(c) - c) / mean(c), gamma 3e-2; gamma = 0 disables)
- the placement table and its version: it proposes rebalances from its load window (`propose_rebalance`)
  and queues placement / scale requests from outside (`request`, e.g. `dsray scale`), which the Engine
  applies at its next step boundary and confirms with `set_placement`
- load statistics: per-layer counts per step, moving average, MaxVio = (max c - mean c) / mean c per
  batch and over a window of steps
- their Prometheus metrics (dsray/runtime/metrics.py)

It never sees tokens: the Engine reports counts after a step and hands the new bias to the ranks
with the next step's call.
"""

from __future__ import annotations

import collections
import functools
import json
import threading
from typing import Any

import numpy as np


def maxvio(counts_LE: np.ndarray) -> np.ndarray:
    """(max - mean) / mean per layer; 0 for a layer that routed nothing."""
    c = np.asarray(counts_LE, dtype=np.float64)
    mean = c.mean(axis=-1)
    return np.where(mean > 0, (c.max(axis=-1) - mean) / np.where(mean > 0, mean, 1), 0.0)


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        with self._lock:
            return fn(self, *a, **kw)

    return wrapper


class Router:
    def __init__(self, engine: str, moe_layers: list[int], n_experts: int, placement: dict[str, Any],
                 gamma: float | None = None, bias: list[list[float]] | None = None, window: int = 50,
                 ema: float = 0.9, history: dict[str, Any] | None = None, step: int = 0,
                 metrics: bool = True, expert_detail: str | None = None, bias_rule: str = "prop",
                 balance_state: dict[str, Any] | None = None, lr: float | None = None) -> None:
        from dsray.runtime.balance import BiasUpdater

        self.engine, self.moe_layers, self.n_experts = engine, list(moe_layers), n_experts
        L = len(self.moe_layers)
        self.balancer = BiasUpdater(L, n_experts, bias_rule, gamma)
        if balance_state is not None and balance_state.get("rule") == bias_rule and gamma is None:
            self.balancer.load_state_dict(balance_state)
        self.gamma, self.window_len, self.ema_decay = self.balancer.gamma, window, ema
        self.base_lr = lr
        self.requests: list[dict[str, Any]] = []  # queued placement / scale changes, applied by the Engine
        self.applied: list[dict[str, Any]] = []
        self.bias = (np.zeros((L, n_experts), np.float32) if bias is None
                     else np.asarray(bias, dtype=np.float32).reshape(L, n_experts))
        self.placement = placement
        self.step = step
        self.window: collections.deque[np.ndarray] = collections.deque(maxlen=window)
        self.ema = np.zeros((L, n_experts))
        self.last_counts = np.zeros((L, n_experts), np.int64)
        self.history = history or {k: [] for k in ("step", "mode", "maxvio_batch", "maxvio_window", "loss",
                                                   "mtp_loss", "tokens_per_s", "step_seconds", "counts")}
        self.shards: dict[str, Any] = {}
        self.extra: dict[str, float] = {}
        self.last_tokens_per_s: float | None = None
        self.metrics = None
        if metrics:
            from dsray.runtime.metrics import DsrayMetrics

            self.metrics = DsrayMetrics(engine, self.moe_layers, n_experts, expert_detail)
        # The actor serves calls on a few threads (stats() while a step reports): one lock guards state.
        self._lock = threading.RLock()
        if self.metrics is not None:
            # Gauges not set again expire after ~2 export intervals; keep them alive while idle.
            self.metrics.start_auto_refresh()

    @_locked
    def get_bias(self) -> np.ndarray:
        return self.bias.copy()

    @_locked
    def report(self, mode: str, counts_LE: np.ndarray, *, loss: float | None = None, mtp_loss: float | None = None,
               step_seconds: float = 0.0, tokens: int = 0, a2a: dict | None = None,
               update_bias: bool | None = None, lr: float | None = None,
               extra: dict[str, float] | None = None) -> dict[str, Any]:
        """Record one step's global counts; for training steps apply the bias rule. Returns the new bias
        and this step's balance numbers."""
        c = np.asarray(counts_LE, dtype=np.int64).reshape(len(self.moe_layers), self.n_experts)
        update = (mode in ("train", "grpo")) if update_bias is None else update_bias
        if update:
            # the gate drifts in proportion to the learning rate: scale the bias step with an lr schedule
            g = self.gamma * (lr / self.base_lr) if lr is not None and self.base_lr else self.gamma
            self.bias = self.balancer.update(self.bias, c, gamma=g)
        if mode in ("train", "grpo"):
            self.step += 1
        self.last_counts = c
        self.window.append(c)
        self.ema = self.ema_decay * self.ema + (1 - self.ema_decay) * c if self.ema.any() else c.astype(float)
        mv_batch = maxvio(c)
        mv_window = maxvio(np.sum(self.window, axis=0))
        tps = tokens / step_seconds if step_seconds > 0 else None
        self.last_tokens_per_s = tps
        h = self.history
        h["step"].append(self.step)
        h["mode"].append(mode)
        h["maxvio_batch"].append(mv_batch.round(6).tolist())
        h["maxvio_window"].append(mv_window.round(6).tolist())
        h["loss"].append(loss)
        h["mtp_loss"].append(mtp_loss)
        h["tokens_per_s"].append(tps)
        h["step_seconds"].append(step_seconds)
        h["counts"].append(c.tolist())
        if self.metrics is not None:
            self.metrics.record_step(mode=mode, counts_LE=c, bias_LE=self.bias, maxvio_batch_L=mv_batch,
                                     maxvio_window_L=mv_window, step_seconds=step_seconds, tokens=tokens,
                                     loss=loss, a2a_seconds=a2a)
        if extra:
            self.add_extra(extra)
        return {"bias": self.bias.copy(), "maxvio_batch": mv_batch, "maxvio_window": mv_window,
                "step": self.step}

    # ---- placement authority ---------------------------------------------------------------------------
    @_locked
    def propose_rebalance(self, n_extra_slots: int = 0, tolerance: float = 0.02) -> dict[str, Any] | None:
        """A new placement from the load window (sum over layers of the moving-average counts): replicas
        for the hottest experts on `n_extra_slots` extra slots, moving as little as possible among
        placements within `tolerance` of the best balance. None when it would not change anything."""
        from dsray.parallel.placement import Placement

        if not self.placement.get("slots") or not self.ema.any():
            return None
        cur = Placement.from_dict(self.placement)
        new = cur.rebalanced(self.ema.sum(axis=0).tolist(), n_extra_slots, tolerance=tolerance)
        return None if new.slots == cur.slots else new.to_dict()

    @_locked
    def request(self, kind: str, **args: Any) -> int:
        """Queue a change for the Engine's next step boundary: kind "scale" (num_shards=N) or
        "rebalance" (replicas=K). Returns its id; `dsray status` lists pending and applied ones."""
        if kind not in ("scale", "rebalance"):
            raise ValueError(f"request kind {kind!r}: expected 'scale' or 'rebalance'")
        if kind == "scale" and (not isinstance(args.get("num_shards"), int) or args["num_shards"] < 1):
            raise ValueError(f"scale: num_shards={args.get('num_shards')!r}: expected an int >= 1")
        if kind == "rebalance" and (not isinstance(args.get("replicas", 0), int) or args.get("replicas", 0) < 0):
            raise ValueError(f"rebalance: replicas={args.get('replicas')!r}: expected an int >= 0")
        rid = len(self.requests) + len(self.applied) + 1
        self.requests.append({"id": rid, "kind": kind, **args, "from_version": self.placement.get("version", 0)})
        return rid

    @_locked
    def take_requests(self) -> list[dict[str, Any]]:
        out, self.requests = self.requests, []
        return out

    @_locked
    def confirm(self, req: dict[str, Any], version: int, bytes_moved: int, seconds: float, error: str = "") -> None:
        self.applied.append({**req, "to_version": version, "bytes_moved": bytes_moved,
                             "seconds": round(seconds, 3), "error": error})

    @_locked
    def set_placement(self, placement: dict[str, Any], shards: dict[str, Any]) -> int:
        """Placement table (with its version) and per-shard facts: node, slots, memory bytes."""
        self.placement = placement
        self.shards = shards
        if self.metrics is not None:
            self.metrics.record_placement(
                version=int(placement.get("version", 0)),
                shard_experts={k: (v["node"], v["slots"]) for k, v in shards.items()},
                shard_memory={k: (v["weights"], v["optimizer"]) for k, v in shards.items()})
        return int(placement.get("version", 0))

    def flush_metrics(self, max_wait_s: float = 3.0) -> None:
        """Before the engine stops: set the gauges once more and give Ray's exporter time to ship them."""
        if self.metrics is not None:
            from dsray.runtime.metrics import report_interval_s

            self.metrics.flush(min(1.5 * report_interval_s(), max_wait_s))

    @_locked
    def stats(self) -> dict[str, Any]:
        bias = self.bias.tolist()
        return {
            "engine": self.engine, "step": self.step, "moe_layers": self.moe_layers, "n_experts": self.n_experts,
            "gamma": self.gamma, "placement": self.placement, "placement_version": self.placement.get("version", 0),
            "bias": bias, "last_counts": self.last_counts.tolist(), "ema_counts": self.ema.round(3).tolist(),
            "maxvio_batch": maxvio(self.last_counts).tolist(),
            "maxvio_window": maxvio(np.sum(self.window, axis=0)).tolist() if self.window else [0.0] * len(bias),
            "tokens_per_s": self.last_tokens_per_s, "shards": self.shards, "history": self.history,
            "balance": self.balancer.state_dict(), "requests": {"pending": list(self.requests),
                                                                "applied": list(self.applied)},
            "extra": dict(self.extra),
        }

    @_locked
    def state(self) -> dict[str, Any]:
        """Everything needed to restart this Router exactly where it is (recovery mirrors it)."""
        return {"bias": self.bias.tolist(), "step": self.step, "history": self.history,
                "window": [c.tolist() for c in self.window], "ema": self.ema.tolist(),
                "last_counts": self.last_counts.tolist(), "balance": self.balancer.state_dict(),
                "placement": self.placement, "shards": self.shards, "requests": list(self.requests),
                "applied": list(self.applied), "extra": dict(self.extra)}

    @_locked
    def load_state(self, st: dict[str, Any]) -> None:
        self.bias = np.asarray(st["bias"], dtype=np.float32)
        self.step, self.history = int(st["step"]), st["history"]
        self.window.clear()
        for c in st["window"]:
            self.window.append(np.asarray(c, dtype=np.int64))
        self.ema, self.last_counts = np.asarray(st["ema"]), np.asarray(st["last_counts"], dtype=np.int64)
        self.balancer.load_state_dict(st["balance"])
        self.placement, self.shards = st["placement"], st["shards"]
        self.requests, self.applied, self.extra = list(st["requests"]), list(st["applied"]), dict(st["extra"])

    @_locked
    def add_extra(self, values: dict[str, float]) -> None:
        """Counters kept beside the routing statistics (recoveries, routing mismatch of RL steps)."""
        for k, v in values.items():
            if k == "recovery":
                self.extra["recoveries"] = self.extra.get("recoveries", 0) + 1
                self.extra.setdefault("recovery_log", []).append(v)
            else:
                self.extra[k] = v
        if self.metrics is not None:
            self.metrics.record_extra(values)

    def stats_json(self) -> str:
        return json.dumps(self.stats())
