"""dsray metrics end to end, no mocks: a loopback Ray head exports them, a loopback Prometheus scrapes
Ray's service-discovery targets, and the tests read them back through Prometheus's HTTP API.

Test A records known numbers with DsrayMetrics inside a Ray actor and checks every family, its labels
and values; `dsray top`'s metrics-text source is checked on the same numbers, read from Ray's metrics
endpoint directly. Test B runs `dsray train` as a Ray job and checks that every panel target of
dashboards/dsray.json returns data for it. The first tests check DsrayMetrics' input validation
without Ray.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray

try:
    from . import prom_utils
except ImportError:  # tests/ops is not a package: pytest put this folder on sys.path
    import prom_utils

from dsray import top
from dsray.runtime.metrics import A2A_BOUNDARIES_S, STEP_BOUNDARIES_S, DsrayMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "dsray.json"
EXPORT_WAIT_S = 30.0  # Ray exports every 1 s and Prometheus scrapes every 1 s here
# Logical CPUs of the test head (scheduling tokens, not cores). Test B's job runs 1 driver rank and
# 2 expert shards that ask Ray for 1 CPU each (dsray.runtime.engine.Resources): with --num-cpus=2
# their placement group never schedules and the job hangs. 4 tokens oversubscribe this 2-core box,
# as the Engine's embedded Ray does too.
HEAD_CPUS = 4


# ---- input validation (no Ray needed) --------------------------------------------------------------


def _step_kwargs(L: int, E: int) -> dict:
    return dict(mode="train", counts_LE=np.ones((L, E)), bias_LE=np.zeros((L, E)),
                maxvio_batch_L=np.zeros(L), maxvio_window_L=np.zeros(L), step_seconds=0.1, tokens=16)


def test_default_expert_detail_bounds_cardinality() -> None:
    assert DsrayMetrics("v", range(16), 64).expert_detail == "full"       # 1,024 pairs
    assert DsrayMetrics("v", range(64), 64).expert_detail == "full"       # 4,096 pairs
    assert DsrayMetrics("v", range(3, 61), 256).expert_detail == "top"    # V3: 14,848 pairs
    with pytest.raises(ValueError, match="expert_detail"):
        DsrayMetrics("v", range(2), 4, expert_detail="some")


@pytest.mark.parametrize("name, value, shape", [
    ("counts_LE", np.ones((3, 4)), "(2, 4)"),
    ("bias_LE", np.ones((2, 5)), "(2, 4)"),
    ("maxvio_batch_L", np.ones(3), "(2,)"),
    ("maxvio_window_L", np.ones((2, 1)), "(2,)"),
])
def test_record_step_rejects_bad_shapes(name: str, value: np.ndarray, shape: str) -> None:
    m = DsrayMetrics("v", [1, 2], 4)
    with pytest.raises(ValueError, match=re.escape(f"{name} must have shape {shape}, got {value.shape}")):
        m.record_step(**{**_step_kwargs(2, 4), name: value})


def test_record_step_rejects_bad_values() -> None:
    m = DsrayMetrics("v", [1, 2], 4)
    for bad, match in [({"mode": "eval"}, "mode"), ({"counts_LE": -np.ones((2, 4))}, "counts_LE"),
                       ({"step_seconds": -1.0}, "step_seconds"), ({"tokens": -1}, "tokens"),
                       ({"a2a_seconds": {(7, "dispatch"): [0.1]}}, "layer 7"),
                       ({"a2a_seconds": {(1, "shuffle"): [0.1]}}, "phase")]:
        with pytest.raises(ValueError, match=match):
            m.record_step(**{**_step_kwargs(2, 4), **bad})
    with pytest.raises(ValueError, match="shard_experts"):
        m.record_placement(version=1, shard_experts={"s0": ("n",)}, shard_memory={})
    with pytest.raises(ValueError, match="shard_memory"):
        m.record_placement(version=1, shard_experts={}, shard_memory={"s0": (1, -1)})


# ---- live cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack():
    """A loopback Ray head (dashboard on, metrics every 1 s) and a Prometheus scraping it."""
    with pytest.MonkeyPatch.context() as mp:
        # Not RAY_AUTH_MODE: Ray reads it once at import, and with it unset ray.init() turns token
        # auth on by itself when ~/.ray/auth_token exists (which `ray start` below makes sure of).
        for k, v in prom_utils.LOOPBACK_ENV.items():
            mp.setenv(k, v)
        # Actors import dsray from this checkout (the job test ships it with --working-dir instead).
        head = prom_utils.RayHead(num_cpus=HEAD_CPUS, extra_env={"PYTHONPATH": str(REPO)})
        with head, prom_utils.Prometheus(sd_file=head.sd_file, scrape_interval="1s") as prom:
            prom_utils.wait_for(lambda: f"127.0.0.1:{head.metrics_port}" in " ".join(prom.targets_up()),
                                30, "Prometheus to scrape Ray's metrics port")
            yield head, prom


def _eventually(prom: prom_utils.Prometheus, promql: str, labels: tuple[str, ...],
                expected: dict[tuple[str, ...], float], timeout: float = EXPORT_WAIT_S) -> None:
    """Wait until `promql` returns exactly the series `expected` ({label values: value}, rel 1e-9)."""
    last: dict = {}

    def ok() -> bool:
        nonlocal last
        last = prom_utils.instant_values(prom.query(promql), *labels)
        return last.keys() == expected.keys() and all(
            math.isclose(last[k], v, rel_tol=1e-9, abs_tol=1e-12) for k, v in expected.items())

    try:
        prom_utils.wait_for(ok, timeout, promql)
    except TimeoutError:
        pytest.fail(f"{promql}\n expected {sorted(expected.items())}\n      got {sorted(last.items())}")


def _within_buckets(prom: prom_utils.Prometheus, promql: str, labels: tuple[str, ...],
                    observed: dict[tuple[str, ...], list[float]], boundaries: list[float]) -> None:
    """Check a histogram's `_sum`. Ray 2.60 does not export the exact sum: it adds each observation's
    bucket midpoint (0.5 observed in (0.1, 1] adds 0.55). So check that the sum lies between the
    sums of the observations' bucket bounds, instead of equality."""
    edges = [0.0, *boundaries, math.inf]

    def bounds(values: list[float]) -> tuple[float, float]:
        lo_hi = [next((edges[i - 1], edges[i]) for i in range(1, len(edges)) if v <= edges[i]) for v in values]
        return sum(lo for lo, _ in lo_hi), sum(hi for _, hi in lo_hi)

    got = prom_utils.instant_values(prom.query(promql), *labels)
    assert got.keys() == observed.keys(), (promql, got)
    for key, values in observed.items():
        lo, hi = bounds(values)
        assert lo <= got[key] <= hi, f"{promql} {key}: {got[key]} outside [{lo}, {hi}] for {values}"


# Test A's numbers: deterministic, so the recording driver (a subprocess) and the checks agree.
LAYERS, E = [1, 3, 5], 8                  # expert_detail="full"
LAYERS_TOP, E_TOP, TOP_N = [0, 2], 32, 3  # expert_detail="top" and "none"
PLACEMENTS = [
    dict(version=1, shard_experts={"s0": ("10.0.0.1", 8), "s1": ("10.0.0.1", 8), "s2": ("10.0.0.2", 9)},
         shard_memory={"s0": (100, 200), "s1": (100, 200), "s2": (120, 240)}),
    dict(version=2, shard_experts={"s0": ("10.0.0.1", 12), "s1": ("10.0.0.2", 13)},
         shard_memory={"s0": (150, 300), "s1": (160, 320)}),
]


def scenario() -> tuple[list[dict], list[dict]]:
    """record_step kwargs for the "full" engine and for the "top"/"none" engines."""
    rng = np.random.default_rng(0)
    steps = []
    for i, mode in enumerate(["train", "train", "generate", "train"]):
        counts = rng.integers(0, 50, size=(len(LAYERS), E)).astype(float)
        counts[0, 2] = 0.0  # an expert that never gets a token: no counter series for it
        steps.append(dict(
            mode=mode, counts_LE=counts, bias_LE=rng.normal(0, 1e-3, size=(len(LAYERS), E)),
            maxvio_batch_L=rng.uniform(0, 1, len(LAYERS)), maxvio_window_L=rng.uniform(0, 1, len(LAYERS)),
            step_seconds=0.05 + 0.01 * i, tokens=256 + i, loss=(3.0 - 0.1 * i) if mode == "train" else None,
            a2a_seconds={(layer, phase): rng.uniform(1e-5, 2e-3, size=2).tolist()
                         for layer in LAYERS for phase in ("dispatch", "combine")}))
    top_steps = []
    for _ in range(3):  # distinct counts per layer so the hottest/coldest sets are unambiguous
        counts = np.stack([rng.permutation(E_TOP) + 1.0 for _ in LAYERS_TOP])
        top_steps.append(dict(mode="train", counts_LE=counts, bias_LE=rng.normal(0, 1e-3, size=counts.shape),
                              maxvio_batch_L=np.zeros(2), maxvio_window_L=np.zeros(2), step_seconds=0.1, tokens=64))
    return steps, top_steps


def record_scenario(address: str, run: str) -> None:
    """Driver side of Test A: record the scenario from Router-like actors, keep them alive (and
    their gauges refreshed) until stdin closes."""
    ray.init(address=address, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self, engine: str, layers: list[int], n_experts: int, detail: str, top_n: int) -> None:
            self.m = DsrayMetrics(engine, layers, n_experts, detail, top_n)
            self.m.start_auto_refresh()  # gauges expire ~2 export intervals after their last set

        def step(self, kw: dict) -> None:
            self.m.record_step(**kw)

        def placement(self, kw: dict) -> None:
            self.m.record_placement(**kw)

    steps, top_steps = scenario()
    full = Recorder.remote(f"ci-a-{run}", LAYERS, E, "full", 8)
    top = Recorder.remote(f"ci-top-{run}", LAYERS_TOP, E_TOP, "top", TOP_N)
    none = Recorder.remote(f"ci-none-{run}", LAYERS_TOP, E_TOP, "none", TOP_N)
    for kw in steps:
        ray.get(full.step.remote(kw))
    for kw in PLACEMENTS:
        ray.get(full.placement.remote(kw))
    for kw in top_steps:
        ray.get([top.step.remote(kw), none.step.remote(kw)])
    print("RECORDED", flush=True)
    sys.stdin.read()
    ray.shutdown()


@pytest.fixture(scope="module")
def recorded(stack):
    """Test A's scenario recorded from Ray actors that stay alive (gauges refreshed) until the module ends.

    The driver runs in a subprocess: Ray reads RAY_AUTH_MODE once per process (at import), and
    this pytest process may have imported Ray before the environment was set."""
    head, prom = stack
    run = uuid.uuid4().hex[:6]
    driver = subprocess.Popen([sys.executable, __file__, "--record", head.address, run], env=head.env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(90, driver.kill)  # a hung driver must not hang the tests
    watchdog.start()
    try:
        output = []
        for line in driver.stdout:  # Ray's log lines, then "RECORDED" (or EOF if the driver died)
            if line.strip() == "RECORDED":
                break
            output.append(line)
        else:
            pytest.fail(f"recording driver exited with {driver.wait()}:\n{''.join(output)[-5000:]}")
        watchdog.cancel()
        yield head, prom, run
    finally:
        watchdog.cancel()
        if driver.poll() is None:
            driver.stdin.close()
            try:
                driver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                driver.kill()


def test_metrics_reach_prometheus(recorded) -> None:
    """Test A: record known numbers from Ray actors; read every family back from Prometheus."""
    _, prom, run = recorded
    _check_recorded_metrics(prom, run)


def test_top_stats_from_the_metrics_endpoint(recorded) -> None:
    """`dsray top`'s fallback source: the Ray node's metrics endpoint itself (no Prometheus, no Ray
    client), parsed with prometheus_client, gives the scenario's latest step."""
    head, _, run = recorded
    url = f"http://127.0.0.1:{head.metrics_port}/metrics"
    steps, top_steps = scenario()
    last = steps[-1]
    share = last["counts_LE"] / last["counts_LE"].sum(axis=1, keepdims=True)
    expected_full = {
        "engine": f"ci-a-{run}", "step": 3, "moe_layers": LAYERS, "n_experts": E, "placement_version": 2,
        "tokens_per_s": 259 / 0.08,  # train has the most steps; its last step: 259 tokens in 0.08 s
        "last_counts": share.tolist(), "bias": last["bias_LE"].tolist(),
        "maxvio_batch": last["maxvio_batch_L"].tolist(), "maxvio_window": last["maxvio_window_L"].tolist(),
    }
    last_top = top_steps[-1]["counts_LE"]
    got: dict = {}

    def matches(engine: str, expected: dict) -> bool:
        got[engine] = stats = top.stats_from_metrics(top.fetch_metrics(url), engine)
        return stats.keys() == expected.keys() and all(_close(stats[k], v) for k, v in expected.items())

    def top_ok() -> bool:
        got["top"] = stats = top.stats_from_metrics(top.fetch_metrics(url), f"ci-top-{run}", E_TOP)
        for i, counts in enumerate(stats["last_counts"]):
            order = np.argsort(last_top[i])  # distinct counts: one hottest, one coldest
            hot, cold = int(order[-1]), int(order[0])
            if not (len(counts) == E_TOP and max(range(E_TOP), key=counts.__getitem__) == hot
                    and min(range(E_TOP), key=counts.__getitem__) == cold
                    and math.isclose(counts[hot], last_top[i, hot] / last_top[i].sum(), rel_tol=1e-9)):
                return False
        return stats["moe_layers"] == LAYERS_TOP and stats["step"] == 3

    try:
        prom_utils.wait_for(lambda: matches(f"ci-a-{run}", expected_full), EXPORT_WAIT_S, "full-detail stats")
        prom_utils.wait_for(top_ok, EXPORT_WAIT_S, "top-detail stats")
    except TimeoutError as e:
        pytest.fail(f"{e}\n got {got}\n expected (full) {expected_full}")


def _close(a: object, b: object) -> bool:
    """Equal, floats within rel 1e-6 (Ray exports doubles; the text format keeps them), lists elementwise."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6,
                                                                                           abs_tol=1e-12)
    return a == b


def _check_recorded_metrics(prom: prom_utils.Prometheus, run: str) -> None:
    eng, eng_top, eng_none = f"ci-a-{run}", f"ci-top-{run}", f"ci-none-{run}"
    layers, layers_top, top_n = LAYERS, LAYERS_TOP, TOP_N
    steps, top_steps = scenario()
    S = lambda e: f'engine="{e}"'  # noqa: E731
    last = steps[-1]
    counts_sum = sum(s["counts_LE"] for s in steps)

    # Counters: sum over Ray's per-process labels, as the dashboards do.
    _eventually(prom, f"sum by (layer, expert) (ray_dsray_expert_tokens_total{{{S(eng)}}})", ("layer", "expert"),
                {(str(layer), str(e)): counts_sum[i, e] for i, layer in enumerate(layers) for e in range(E)
                 if counts_sum[i, e] > 0})
    _eventually(prom, f"sum by (mode) (ray_dsray_steps_total{{{S(eng)}}})", ("mode",),
                {("train",): 3.0, ("generate",): 1.0})
    _eventually(prom, f"sum by (mode) (ray_dsray_tokens_total{{{S(eng)}}})", ("mode",),
                {("train",): 256 + 257 + 259, ("generate",): 258})

    # Gauges: the latest step, kept alive by refresh().
    share = last["counts_LE"] / last["counts_LE"].sum(axis=1, keepdims=True)
    _eventually(prom, f"ray_dsray_expert_load_share{{{S(eng)}}}", ("layer", "expert"),
                {(str(layer), str(e)): share[i, e] for i, layer in enumerate(layers) for e in range(E)})
    _eventually(prom, f"ray_dsray_router_bias{{{S(eng)}}}", ("layer", "expert"),
                {(str(layer), str(e)): last["bias_LE"][i, e] for i, layer in enumerate(layers) for e in range(E)})
    for name, key in [("maxvio_batch", "maxvio_batch_L"), ("maxvio_window", "maxvio_window_L")]:
        _eventually(prom, f"ray_dsray_{name}{{{S(eng)}}}", ("layer",),
                    {(str(layer),): last[key][i] for i, layer in enumerate(layers)})
    _eventually(prom, f"ray_dsray_tokens_per_second{{{S(eng)}}}", ("mode",),
                {("train",): 259 / 0.08, ("generate",): 258 / 0.07})
    _eventually(prom, f"ray_dsray_loss{{{S(eng)}}}", (), {(): 2.7})  # last train step's loss

    # Histograms: counts, sums and one bucket boundary.
    _eventually(prom, f"sum by (mode) (ray_dsray_step_seconds_count{{{S(eng)}}})", ("mode",),
                {("train",): 3.0, ("generate",): 1.0})
    _within_buckets(prom, f"sum by (mode) (ray_dsray_step_seconds_sum{{{S(eng)}}})", ("mode",),
                    {("train",): [0.05, 0.06, 0.08], ("generate",): [0.07]}, STEP_BOUNDARIES_S)
    a2a_all = {k: [d for s in steps for d in s["a2a_seconds"][k]] for k in steps[0]["a2a_seconds"]}
    _eventually(prom, f"sum by (layer, phase) (ray_dsray_a2a_seconds_count{{{S(eng)}}})", ("layer", "phase"),
                {(str(layer), phase): float(len(v)) for (layer, phase), v in a2a_all.items()})
    _within_buckets(prom, f"sum by (layer, phase) (ray_dsray_a2a_seconds_sum{{{S(eng)}}})", ("layer", "phase"),
                    {(str(layer), phase): v for (layer, phase), v in a2a_all.items()}, A2A_BOUNDARIES_S)
    buckets = prom_utils.instant_values(
        prom.query(f'sum by (le) (ray_dsray_a2a_seconds_bucket{{{S(eng)}, layer="1", phase="dispatch"}})'), "le")
    assert sorted(float(le) for (le,) in buckets) == sorted([*A2A_BOUNDARIES_S, math.inf])
    for (le,), n in buckets.items():
        assert n == sum(d <= float(le) for d in a2a_all[(1, "dispatch")]), (le, n)

    # Placement: version 2 replaced version 1, so shard s2 expired.
    _eventually(prom, f"ray_dsray_placement_version{{{S(eng)}}}", (), {(): 2.0})
    _eventually(prom, f"ray_dsray_shard_experts{{{S(eng)}}}", ("shard", "node"),
                {("s0", "10.0.0.1"): 12.0, ("s1", "10.0.0.2"): 13.0})
    _eventually(prom, f"ray_dsray_shard_memory_bytes{{{S(eng)}}}", ("shard", "kind"),
                {("s0", "weights"): 150.0, ("s0", "optimizer"): 300.0,
                 ("s1", "weights"): 160.0, ("s1", "optimizer"): 320.0})

    # Ray's own labels are on every series (dashboards filter on SessionName, aggregate WorkerId away).
    series = prom.query(f"ray_dsray_placement_version{{{S(eng)}}}")
    assert {"SessionName", "WorkerId", "NodeAddress", "Component", "Version"} <= series[0]["metric"].keys()
    assert series[0]["metric"]["NodeAddress"] == "127.0.0.1"
    assert series[0]["metric"]["SessionName"].startswith("session_")

    # expert_detail="top": only the latest step's top_n hottest + coldest per layer; others expired.
    last_top = top_steps[-1]["counts_LE"]
    expected_top = {}
    for i, layer in enumerate(layers_top):
        order = np.argsort(last_top[i])
        for e in [*order[:top_n], *order[-top_n:]]:
            expected_top[(str(layer), str(e))] = last_top[i, e] / last_top[i].sum()
    _eventually(prom, f"ray_dsray_expert_load_share{{{S(eng_top)}}}", ("layer", "expert"), expected_top)
    _eventually(prom, f"count(ray_dsray_router_bias{{{S(eng_top)}}})", (), {(): 2 * 2 * top_n})
    total_top = {(str(layer), "all"): sum(s["counts_LE"][i].sum() for s in top_steps)
                 for i, layer in enumerate(layers_top)}
    for e in (eng_top, eng_none):
        _eventually(prom, f"sum by (layer, expert) (ray_dsray_expert_tokens_total{{{S(e)}}})",
                    ("layer", "expert"), total_top)
    # expert_detail="none": no per-expert gauges at all, the per-layer gauges still there.
    assert prom.query(f'{{__name__=~"ray_dsray_(expert_load_share|router_bias)", {S(eng_none)}}}') == []
    _eventually(prom, f"ray_dsray_maxvio_batch{{{S(eng_none)}}}", ("layer",),
                {(str(layer),): 0.0 for layer in layers_top})


# ---- Test B: the dashboard against a real `dsray train` job ---------------------------------------

JOB_NAME = "ci-metrics"
JOB_TIMEOUT_S = 100
JOB_ARGS = ["dsray", "train", "--preset", "debug", "--steps", "30", "--drivers", "1", "--shards", "2",
            "--name", JOB_NAME]
GRAFANA_VALUES = {"datasource": "", "SessionName": ".+", "engine": JOB_NAME, "layer": ".+",
                  "__rate_interval": "1m", "__interval": "5s", "__range": "5m"}


def test_dashboard_panels_have_data_for_dsray_job(stack) -> None:
    """Test B: `dsray train` as a Ray job; every panel target of dashboards/dsray.json has data.

    The job's actors die when it ends and their gauges vanish ~2 export intervals later, so every
    query runs as a range query over the job's own lifetime (from the job's start/end times)."""
    head, prom = stack
    sid = f"ci-metrics-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": [".git", "/.whl", "/runs", "/checkpoints", "/benchmarks/results"],
                   "env_vars": {"RAY_metrics_report_interval_ms": "1000"}}
    cmd = ["ray", "job", "submit", "--address", head.dashboard_url, "--submission-id", sid,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", *JOB_ARGS]
    try:
        proc = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["ray", "job", "stop", "--address", head.dashboard_url, sid], env=head.env, timeout=30)
        out = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        pytest.fail(f"`{' '.join(cmd)}` did not finish in {JOB_TIMEOUT_S} s:\n{out[0][-6000:]}\n{out[1][-3000:]}")
    info = prom_utils.job_info(head, sid)
    if info["status"] != "SUCCEEDED":
        hint = "" if shutil.which("dsray") else " (no `dsray` on PATH: the CLI is not installed, pip install -e .)"
        pytest.fail(f"job {sid} ended {info['status']}{hint}: {info['message']}\n--- `ray job submit` (rc "
                    f"{proc.returncode}), last lines ---\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")

    start, end = info["start_time"] / 1000.0, info["end_time"] / 1000.0
    print(f"job {sid} ran {end - start:.1f} s")
    time.sleep(max(0.0, end + 3.0 - time.time()))  # let the last export and scrape land
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    targets = prom_utils.dashboard_targets(dashboard)
    # Event panels: their series exist only after a recovery or a GRPO step, which a plain train job has
    # none of (their queries still parse and name exported metrics: test_dashboards.py). Exempt exactly them.
    event = {"Recoveries", "Recovery time", "RL routing mismatch"}
    assert event <= {title for title, _ in targets}
    for title, t in targets:
        if title in event:
            continue
        expr = prom_utils.substitute_vars(t["expr"], GRAFANA_VALUES)
        result = prom.query_range(expr, start - 5.0, end + 3.0, step=1.0)
        if not prom_utils.has_finite_sample(result):
            empty.append(f"{title} [{t['refId']}]: {expr} -> {result[:2]}")
    assert not empty, (f"{len(empty)} dashboard targets had no finite data for engine={JOB_NAME} "
                       f"over the job's lifetime ({end - start:.1f} s):\n" + "\n".join(empty))


def test_status_and_top_reach_a_running_job_and_job_stop_cleans_up(stack) -> None:
    """`dsray status` / `dsray top` find the job's Router by name from outside the job; `ray job stop`
    (SIGTERM to the driver) ends it with every actor gone."""
    head, _ = stack
    sid = f"status-{uuid.uuid4().hex[:8]}"
    name = "status-check"
    runtime_env = {"excludes": [".git", "/.whl", "/runs", "/checkpoints", "/benchmarks/results"]}
    submit = ["ray", "job", "submit", "--no-wait", "--address", head.dashboard_url, "--submission-id", sid,
              "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", "dsray", "train",
              "--steps", "100000", "--shards", "2", "--name", name, "--cpus-per-rank", "0.5"]
    subprocess.run(submit, env=head.env, check=True, capture_output=True, timeout=60)
    try:
        status, deadline = None, time.monotonic() + 90
        while time.monotonic() < deadline:
            r = subprocess.run(["dsray", "status", "--name", name, "--json", "--address", head.address],
                               env=head.env, capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                status = json.loads(r.stdout.strip().splitlines()[-1])
                if status["step"] > 0:
                    break
            time.sleep(1.0)
        assert status and status["engine"] == name and status["step"] > 0, r.stderr[-2000:]
        assert len(status["bias"]) == 3 and len(status["shards"]) == 2
        top = subprocess.run(["dsray", "top", "--name", name, "--address", head.address, "--iterations", "2",
                              "--interval", "0.2"], env=head.env, capture_output=True, text=True, timeout=60)
        assert top.returncode == 0 and "MaxVio" in top.stdout, top.stderr[-2000:]
    finally:
        subprocess.run(["ray", "job", "stop", "--address", head.dashboard_url, sid], env=head.env,
                       capture_output=True, timeout=60)
    deadline = time.monotonic() + 60
    while prom_utils.job_info(head, sid)["status"] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, "job did not stop"
        time.sleep(1.0)
    probe = ("import ray, sys, time; ray.init(address=sys.argv[1], log_to_driver=False)\n"
             "for _ in range(40):\n"
             "    names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True) if a['name'].startswith('dsray-')]\n"
             "    if not names: break\n"
             "    time.sleep(0.5)\n"
             "print(names)")
    left = subprocess.run([sys.executable, "-c", probe, head.address], env=head.env, capture_output=True,
                          text=True, timeout=60)
    assert left.stdout.strip().splitlines()[-1] == "[]", left.stdout + left.stderr[-2000:]


if __name__ == "__main__":  # Test A's recording driver: python test_metrics_live.py --record ADDRESS RUN
    assert sys.argv[1] == "--record", sys.argv
    record_scenario(sys.argv[2], sys.argv[3])
