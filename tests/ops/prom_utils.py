"""Helpers for the ops tests: a loopback Ray head and a loopback Prometheus that scrapes it.

Everything binds 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, see shared/RAY-NOTES.md) and is
stopped by process id: `RayHead` runs `ray start --head --block` in its own session and stops that
session's processes, never `ray stop` (which would kill every Ray on the machine, other people's
test clusters included). The head gets its own `--temp-dir`, so its service-discovery file
(`<temp_dir>/prom_metrics_service_discovery.json`, the `/tmp/ray/...` file of a default install)
is not shared with another Ray running on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

T = TypeVar("T")
PROMETHEUS = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")
PROMTOOL = os.environ.get("PROMTOOL_BIN", "/usr/bin/promtool")
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
INSTALL_HINT = "run `bash .ci/install-prometheus.sh` (installs Debian's prometheus and promtool)"

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP 127.0.0.1, every Ray listener on loopback
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_metrics_report_interval_ms": "1000",  # export every second (floor) instead of every 10 s
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Call `fn` until it returns something truthy; raise TimeoutError naming `what` (and the last
    exception `fn` raised, if any) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline, reported below
            last_exc = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def http_get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _descendants(root: int) -> list[psutil.Process]:
    """Every live descendant of `root` (Ray's workers call setsid, so killing the process group alone
    would miss them)."""
    try:
        return psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running: not exited, pid not reused (psutil compares start times), not a
    zombie (a zombie has exited and only waits for a parent, perhaps a non-reaping init, to reap it)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _stop_session(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the leader of a session we started, then SIGKILL what is left of its process group
    and of its descendants (psutil.Process remembers each one's start time and refuses to signal
    a pid that was reused since, so another user's process is left alone)."""
    started = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid: started with start_new_session=True
    except ProcessLookupError:
        pass
    for p in started:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # exited (or its pid now belongs to another process)
            pass
    deadline = time.monotonic() + 5
    while running(started) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# ---- Ray -------------------------------------------------------------------------------------


class _Service:
    """A server process of our own in its own session, with a scratch folder; stop() is idempotent."""

    proc: subprocess.Popen | None
    grace_s: float = 10.0

    def scratch(self) -> str | Path:
        raise AssertionError("subclasses name their scratch folder")

    def start(self):
        raise AssertionError("subclasses start their process")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_session(self.proc, grace_s=self.grace_s)
            self.proc = None
        shutil.rmtree(self.scratch(), ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RayHead(_Service):
    """`ray start --head --block` on loopback with free ports, its own temp dir and the dashboard
    (needed by `ray job submit`). Use as a context manager or call start()/stop()."""

    def __init__(self, num_cpus: int = 2, extra_env: dict[str, str] | None = None) -> None:
        # self.env is also the environment for `ray job ...` clients: RAY_AUTH_MODE=token is what
        # `ray job submit` needs with token auth on (Ray 2.60's default for a new local cluster).
        self.num_cpus = num_cpus
        # Short path: Ray's unix sockets live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="dsr", dir="/tmp")
        (self.gcs_port, self.metrics_port, self.dashboard_port, self.agent_http_port, self.agent_grpc_port,
         self.runtime_env_port, self.node_manager_port, self.object_manager_port,
         self.client_port) = free_ports(9)
        self.env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", **(extra_env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(self.temp_dir) / "ray-start.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def sd_file(self) -> str:
        return os.path.join(self.temp_dir, "prom_metrics_service_discovery.json")

    def start(self, timeout: float = 60.0) -> RayHead:
        cmd = [
            "ray", "start", "--head", "--block", f"--temp-dir={self.temp_dir}",
            f"--port={self.gcs_port}", f"--metrics-export-port={self.metrics_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_http_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}", f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}", f"--ray-client-server-port={self.client_port}",
            "--min-worker-port=0", "--max-worker-port=0",  # random worker ports: no clash with another Ray
            f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
        ]
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:  # any HTTP answer means the dashboard is up (401 without the auth token)
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2).close()
            except urllib.error.HTTPError:
                pass
            with open(self.sd_file) as f:
                targets = json.load(f)[0]["targets"]
            return f"127.0.0.1:{self.metrics_port}" in targets

        try:
            wait_for(ready, timeout, "the Ray head (dashboard and service-discovery file)")
        except BaseException:
            self.stop()
            raise
        return self

    grace_s = 20.0

    def scratch(self) -> str:
        return self.temp_dir


_JOB_INFO = """
import json, sys
from ray.job_submission import JobSubmissionClient
info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
print(json.dumps({"status": str(info.status.value), "message": info.message,
                  "start_time": info.start_time, "end_time": info.end_time}))
"""


def job_info(head: RayHead, submission_id: str) -> dict[str, Any]:
    """Status, message and start/end times (ms) of a job. Runs in a subprocess with head.env:
    Ray reads RAY_AUTH_MODE once per process, and this process may have imported Ray without it."""
    out = subprocess.run([sys.executable, "-c", _JOB_INFO, head.dashboard_url, submission_id], env=head.env,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"reading job {submission_id} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- Prometheus --------------------------------------------------------------------------------


def prometheus_config(sd_file: str = RAY_SD_FILE, scrape_interval: str = "1s",
                      refresh_interval: str = "5s") -> dict[str, Any]:
    """Same shape as dashboards/prometheus.yml, with the test's service-discovery file and interval."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [{
            "job_name": "ray",
            "file_sd_configs": [{"files": [sd_file], "refresh_interval": refresh_interval}],
        }],
    }


class Prometheus(_Service):
    """A Prometheus server on 127.0.0.1:<free port> with its TSDB in a temp dir."""

    def __init__(self, sd_file: str = RAY_SD_FILE, scrape_interval: str = "1s") -> None:
        if not os.path.exists(PROMETHEUS):
            raise FileNotFoundError(f"{PROMETHEUS} not found: {INSTALL_HINT}")
        self.dir = Path(tempfile.mkdtemp(prefix="dsray-prom-"))
        self.port = free_port()
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(prometheus_config(sd_file, scrape_interval)))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Prometheus:
        cmd = [PROMETHEUS, f"--config.file={self.config_path}", f"--web.listen-address=127.0.0.1:{self.port}",
               f"--storage.tsdb.path={self.dir / 'data'}", "--storage.tsdb.retention.time=1h",
               "--web.enable-lifecycle"]
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200

        try:
            wait_for(ready, timeout, f"Prometheus at {self.url}")
        except BaseException:
            self.stop()
            raise
        return self

    def scratch(self) -> Path:
        return self.dir

    # -- HTTP API --

    def _api(self, path: str, params: dict[str, Any]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = http_get_json(url)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"Prometheus {path} failed ({e.code}) for {params}: {e.read().decode()}") from e
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} failed for {params}: {body}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: [{'metric': {...}, 'value': [ts, 'str']}, ...]."""
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = at
        return self._api("query", params)["result"]

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """Range query: [{'metric': {...}, 'values': [[ts, 'str'], ...]}, ...]."""
        return self._api("query_range", {"query": promql, "start": start, "end": end, "step": step})["result"]

    def targets_up(self) -> list[str]:
        data = self._api("targets", {"state": "active"})
        return [t["scrapeUrl"] for t in data["activeTargets"] if t["health"] == "up"]

    def wait_for_query(self, promql: str, timeout: float = 30.0,
                       check: Callable[[list[dict[str, Any]]], bool] = bool) -> list[dict[str, Any]]:
        """Poll an instant query until `check(result)` holds."""
        last: list[dict[str, Any]] = []

        def attempt() -> list[dict[str, Any]] | None:
            nonlocal last
            last = self.query(promql)
            return last if check(last) else None

        try:
            return wait_for(attempt, timeout, f"Prometheus query {promql!r}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last result: {last}") from None


def instant_values(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    """{(label values...): value} of an instant-query result."""
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in result}


def has_finite_sample(result: list[dict[str, Any]]) -> bool:
    """True if an instant or range result holds at least one finite (non-NaN, non-Inf) value."""
    for r in result:
        values = r.get("values") or ([r["value"]] if "value" in r else [])
        if any(math.isfinite(float(v)) for _, v in values):
            return True
    return False


# ---- dashboard queries -------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute_vars(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}) in `expr`; an unknown variable raises KeyError."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VAR_RE.sub(repl, expr)


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every target of every panel, rows' nested panels included."""
    out = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t))
            visit(p.get("panels", []))

    visit(dashboard["panels"])
    return out
