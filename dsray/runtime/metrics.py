"""Prometheus metrics for dsray, exported through `ray.util.metrics` from inside the Router actor.

Every metric below is named `dsray_*`; Ray exports it as `ray_dsray_*` (counters get `_total`,
histograms `_bucket`/`_sum`/`_count`) and adds the labels `Component, NodeAddress, SessionName,
Version, WorkerId`. `WorkerId` changes when the Router restarts, so dashboards aggregate with
`sum by (...)` for counters/histograms. docs/metrics.md lists every series and its cardinality.

Two Ray behaviours shape this file:
- A gauge that is not set again disappears after ~2 export intervals (`RAY_metrics_report_interval_ms`,
  default 10 s). We keep the latest value of every gauge and `refresh()` re-sets them; the Router
  calls it while idle (or runs `start_auto_refresh()`), and `flush()` before it exits.
- `Counter.inc` rejects values <= 0, and tag values must be `str`.

Shape suffixes: L = MoE layers (rows follow `moe_layers`), E = routed experts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ray.util.metrics import Counter, Gauge, Histogram

MODES = ("train", "grpo", "forward", "generate", "logprobs")
A2A_PHASES = ("dispatch", "combine")
EXPERT_DETAILS = ("full", "top", "none")
MEMORY_KINDS = ("weights", "optimizer")
# Above this many (layer, expert) pairs the default detail drops from "full" to "top".
FULL_DETAIL_MAX_SERIES = 4096

# 1-2-5 steps from 10 us to 10 s: 19 boundaries, 22 series per (layer, phase) with +Inf/sum/count.
A2A_BOUNDARIES_S = [m * 10.0**e for e in range(-5, 1) for m in (1, 2, 5)] + [10.0]
# 1-2-5 steps from 1 ms to 10 min: a debug CPU step is ~10 ms, a V3 training step tens of seconds.
STEP_BOUNDARIES_S = [m * 10.0**e for e in range(-3, 3) for m in (1, 2, 5)] + [1000.0]

_GaugeValue = tuple[Gauge, float, dict[str, str]]


def report_interval_s() -> float:
    """Ray's metrics export interval in this process (`RAY_metrics_report_interval_ms`, floor 1 s)."""
    ms = float(os.environ.get("RAY_metrics_report_interval_ms", "10000"))
    return max(ms, 1000.0) / 1000.0


class DsrayMetrics:
    """All dsray metrics of one engine, as recorded by its Router.

    `expert_detail` bounds the per-expert series (the only ones that grow with model size):
    "full" exports every (layer, expert); "top" exports, per layer, only the `top_n` hottest and
    `top_n` coldest experts of the latest step for load share and bias, and the token counter per
    layer with expert="all"; "none" exports no per-expert series (token counter per layer only).
    Default: "full" when layers x experts <= 4096, else "top".
    """

    def __init__(
        self,
        engine: str,
        moe_layers: Sequence[int],
        n_experts: int,
        expert_detail: str | None = None,
        top_n: int = 8,
    ) -> None:
        if not isinstance(engine, str) or not engine:
            raise ValueError(f"engine must be a non-empty str, got {engine!r}")
        layers = [int(layer) for layer in moe_layers]
        if not layers:
            raise ValueError("moe_layers must not be empty")
        if len(set(layers)) != len(layers):
            raise ValueError(f"moe_layers has duplicates: {layers}")
        if int(n_experts) < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if expert_detail is None:
            expert_detail = "full" if len(layers) * int(n_experts) <= FULL_DETAIL_MAX_SERIES else "top"
        if expert_detail not in EXPERT_DETAILS:
            raise ValueError(f"expert_detail must be one of {EXPERT_DETAILS}, got {expert_detail!r}")
        if int(top_n) < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")

        self.engine = engine
        self.moe_layers = layers
        self.n_experts = int(n_experts)
        self.expert_detail = expert_detail
        self.top_n = int(top_n)
        self._layer_tags = [str(layer) for layer in layers]
        self._expert_tags = [str(e) for e in range(self.n_experts)]

        ex = ("engine", "layer", "expert")
        self.expert_tokens = Counter(
            "dsray_expert_tokens", "Tokens routed to each logical expert (expert='all': layer total).", ex)
        self.expert_load_share = Gauge(
            "dsray_expert_load_share", "This step's share of the layer's routed assignments.", ex)
        self.maxvio_batch = Gauge(
            "dsray_maxvio_batch", "MaxVio of this step: (max(c) - mean(c)) / mean(c).", ("engine", "layer"))
        self.maxvio_window = Gauge(
            "dsray_maxvio_window", "MaxVio of the counts summed over the Router's window.", ("engine", "layer"))
        self.router_bias = Gauge("dsray_router_bias", "Aux-loss-free routing bias (selection only).", ex)
        self.placement_version = Gauge("dsray_placement_version", "Placement table version.", ("engine",))
        self.shard_experts = Gauge(
            "dsray_shard_experts", "Expert slots hosted by each shard.", ("engine", "shard", "node"))
        self.shard_memory_bytes = Gauge(
            "dsray_shard_memory_bytes", "Bytes of expert weights / optimizer state per shard.",
            ("engine", "shard", "kind"))
        self.a2a_seconds = Histogram(
            "dsray_a2a_seconds", "All-to-all time per MoE layer and phase.", A2A_BOUNDARIES_S,
            ("engine", "layer", "phase"))
        self.step_seconds = Histogram(
            "dsray_step_seconds", "Wall time of one engine step.", STEP_BOUNDARIES_S, ("engine", "mode"))
        self.tokens = Counter("dsray_tokens", "Tokens processed.", ("engine", "mode"))
        self.tokens_per_second = Gauge("dsray_tokens_per_second", "Tokens / step time of the last step.",
                                       ("engine", "mode"))
        self.loss = Gauge("dsray_loss", "Training loss of the last step.", ("engine",))
        self.steps = Counter("dsray_steps", "Engine steps.", ("engine", "mode"))
        self.recoveries = Counter("dsray_recoveries", "Ranks replaced or shrunk away after a failure.",
                                  ("engine", "role"))
        self.recovery_seconds = Histogram("dsray_recovery_seconds", "Failure noticed -> step result returned.",
                                          STEP_BOUNDARIES_S, ("engine",))
        self.routing_mismatch = Gauge(
            "dsray_routing_mismatch", "RL: share of trained tokens / (token, layer) pairs whose experts differ "
            "from the rollout's (last GRPO step without replay).", ("engine", "kind"))

        # Latest value of every gauge, replayed by refresh(). Step gauges are replaced per mode
        # (a generate step must not expire the last train step's loss/throughput) and as a whole
        # for the load gauges; placement gauges are replaced by each record_placement.
        self._lock = threading.Lock()
        self._load_gauges: list[_GaugeValue] = []
        self._mode_gauges: dict[str, list[_GaugeValue]] = {}
        self._loss_gauge: list[_GaugeValue] = []
        self._placement_gauges: list[_GaugeValue] = []
        self._refresher: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- recording -------------------------------------------------------------------------

    def record_step(
        self,
        *,
        mode: str,
        counts_LE: np.ndarray,
        bias_LE: np.ndarray | None,
        maxvio_batch_L: np.ndarray,
        maxvio_window_L: np.ndarray,
        step_seconds: float,
        tokens: int,
        loss: float | None = None,
        a2a_seconds: Mapping[tuple[int, str], Sequence[float]] | None = None,
    ) -> None:
        """Record one engine step. Rows of `counts_LE`/`bias_LE` follow `moe_layers`;
        `a2a_seconds` maps (layer, phase) to the durations measured in this step."""
        L, E = len(self.moe_layers), self.n_experts
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        counts_LE = self._check_array("counts_LE", counts_LE, (L, E))
        if (counts_LE < 0).any():
            raise ValueError("counts_LE must be >= 0")
        if bias_LE is not None:
            bias_LE = self._check_array("bias_LE", bias_LE, (L, E))
        maxvio_batch_L = self._check_array("maxvio_batch_L", maxvio_batch_L, (L,))
        maxvio_window_L = self._check_array("maxvio_window_L", maxvio_window_L, (L,))
        step_seconds = float(step_seconds)
        if not step_seconds >= 0.0:
            raise ValueError(f"step_seconds must be >= 0, got {step_seconds}")
        if int(tokens) < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        a2a = self._check_a2a(a2a_seconds)

        eng = self.engine
        totals_L = counts_LE.sum(axis=1)
        share_LE = counts_LE / np.maximum(totals_L, 1.0)[:, None]  # 0 for a layer with no tokens

        load: list[_GaugeValue] = []
        for i, lt in enumerate(self._layer_tags):
            load.append((self.maxvio_batch, float(maxvio_batch_L[i]), {"engine": eng, "layer": lt}))
            load.append((self.maxvio_window, float(maxvio_window_L[i]), {"engine": eng, "layer": lt}))
            for e in self._detail_experts(share_LE[i]):
                tags = {"engine": eng, "layer": lt, "expert": self._expert_tags[e]}
                load.append((self.expert_load_share, float(share_LE[i, e]), tags))
                if bias_LE is not None:
                    load.append((self.router_bias, float(bias_LE[i, e]), tags))

        mode_tags = {"engine": eng, "mode": mode}
        per_mode: list[_GaugeValue] = []
        if step_seconds > 0.0:
            per_mode.append((self.tokens_per_second, int(tokens) / step_seconds, mode_tags))

        with self._lock:
            # Counters: inc() rejects 0, so an expert that got no tokens has no increment.
            for i, lt in enumerate(self._layer_tags):
                if self.expert_detail == "full":
                    for e in np.flatnonzero(counts_LE[i]):
                        self.expert_tokens.inc(float(counts_LE[i, e]),
                                               {"engine": eng, "layer": lt, "expert": self._expert_tags[e]})
                elif totals_L[i] > 0:
                    self.expert_tokens.inc(float(totals_L[i]), {"engine": eng, "layer": lt, "expert": "all"})
            self.steps.inc(1.0, mode_tags)
            if int(tokens) > 0:
                self.tokens.inc(float(int(tokens)), mode_tags)
            self.step_seconds.observe(step_seconds, mode_tags)
            for (layer, phase), durations in a2a.items():
                tags = {"engine": eng, "layer": str(layer), "phase": phase}
                for d in durations:
                    self.a2a_seconds.observe(d, tags)

            self._load_gauges = load
            self._mode_gauges[mode] = per_mode
            if loss is not None:
                self._loss_gauge = [(self.loss, float(loss), {"engine": eng})]
            self._set_all_locked()

    def record_extra(self, values: Mapping[str, Any]) -> None:
        """Recoveries ("recovery": {"role", "seconds"}) and RL routing mismatch ("mismatch_tokens",
        "mismatch_pairs")."""
        eng = self.engine
        rec = values.get("recovery")
        if isinstance(rec, dict):
            self.recoveries.inc(1.0, {"engine": eng, "role": str(rec.get("role", "rank"))})
            self.recovery_seconds.observe(float(rec.get("seconds", 0.0)), {"engine": eng})
        gauges = [(self.routing_mismatch, float(values[k]), {"engine": eng, "kind": k.removeprefix("mismatch_")})
                  for k in ("mismatch_tokens", "mismatch_pairs") if values.get(k) is not None]
        if gauges:
            with self._lock:
                self._mode_gauges["rl"] = gauges
                self._set_all_locked()

    def record_placement(
        self,
        *,
        version: int,
        shard_experts: Mapping[str, tuple[str, int]],
        shard_memory: Mapping[str, tuple[int, int]],
    ) -> None:
        """Record a placement: `shard_experts` maps shard -> (node, n_slots), `shard_memory` maps
        shard -> (weight_bytes, optimizer_bytes). Shards absent from a new placement expire."""
        if int(version) < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        eng = self.engine
        gauges: list[_GaugeValue] = [(self.placement_version, float(int(version)), {"engine": eng})]
        for shard, value in shard_experts.items():
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"shard_experts[{shard!r}] must be (node, n_slots), got {value!r}")
            node, n_slots = value
            if int(n_slots) < 0:
                raise ValueError(f"shard_experts[{shard!r}] n_slots must be >= 0, got {n_slots}")
            gauges.append((self.shard_experts, float(int(n_slots)),
                           {"engine": eng, "shard": str(shard), "node": str(node)}))
        for shard, value in shard_memory.items():
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(
                    f"shard_memory[{shard!r}] must be (weight_bytes, optimizer_bytes), got {value!r}")
            for kind, nbytes in zip(MEMORY_KINDS, value):
                if int(nbytes) < 0:
                    raise ValueError(f"shard_memory[{shard!r}] {kind} bytes must be >= 0, got {nbytes}")
                gauges.append((self.shard_memory_bytes, float(int(nbytes)),
                               {"engine": eng, "shard": str(shard), "kind": kind}))
        with self._lock:
            self._placement_gauges = gauges
            self._set_all_locked()

    # ---- keeping gauges alive ----------------------------------------------------------------

    def refresh(self) -> None:
        """Re-set the latest value of every gauge so Ray keeps exporting it. Call at least once per
        export interval while no steps arrive (Ray drops a gauge ~2 intervals after its last set)."""
        with self._lock:
            self._set_all_locked()

    def flush(self, wait_s: float | None = None) -> None:
        """Refresh, then wait long enough (default 1.5 export intervals) for Ray to export the final
        values: call it before the Router exits, or the last step may never reach Prometheus."""
        self.refresh()
        time.sleep(1.5 * report_interval_s() if wait_s is None else wait_s)

    def start_auto_refresh(self, period_s: float | None = None) -> None:
        """Refresh from a daemon thread every `period_s` (default half the export interval)."""
        if self._refresher is not None:
            return
        period = report_interval_s() / 2 if period_s is None else float(period_s)
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(period):
                self.refresh()

        self._refresher = threading.Thread(target=loop, name="dsray-metrics-refresh", daemon=True)
        self._refresher.start()

    def stop_auto_refresh(self) -> None:
        if self._refresher is None:
            return
        self._stop.set()
        self._refresher.join()
        self._refresher = None

    # ---- helpers -------------------------------------------------------------------------------

    def _set_all_locked(self) -> None:
        groups = [self._load_gauges, self._loss_gauge, self._placement_gauges, *self._mode_gauges.values()]
        for group in groups:
            for gauge, value, tags in group:
                gauge.set(value, tags)

    def _detail_experts(self, share_E: np.ndarray) -> Sequence[int]:
        """Experts of one layer that get per-expert gauges at the current detail level."""
        if self.expert_detail == "full":
            return range(self.n_experts)
        if self.expert_detail == "none":
            return ()
        if 2 * self.top_n >= self.n_experts:
            return range(self.n_experts)
        hottest = np.argsort(-share_E, kind="stable")[: self.top_n]  # ties broken by expert id
        coldest = np.argsort(share_E, kind="stable")[: self.top_n]
        return sorted(set(hottest.tolist()) | set(coldest.tolist()))

    @staticmethod
    def _check_array(name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite")
        return arr

    def _check_a2a(
        self, a2a_seconds: Mapping[tuple[int, str], Sequence[float]] | None
    ) -> dict[tuple[int, str], list[float]]:
        if a2a_seconds is None:
            return {}
        layers = set(self.moe_layers)
        out: dict[tuple[int, str], list[float]] = {}
        for key, durations in a2a_seconds.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"a2a_seconds keys must be (layer, phase), got {key!r}")
            layer, phase = int(key[0]), key[1]
            if layer not in layers:
                raise ValueError(f"a2a_seconds key {key!r}: layer {layer} is not in moe_layers")
            if phase not in A2A_PHASES:
                raise ValueError(f"a2a_seconds key {key!r}: phase must be one of {A2A_PHASES}")
            values = [float(d) for d in durations]
            if any(not d >= 0.0 for d in values):
                raise ValueError(f"a2a_seconds[{key!r}] must be >= 0 seconds, got {values}")
            out[(layer, phase)] = values
        return out
