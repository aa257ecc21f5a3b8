"""Offline checks of dashboards/: the committed JSON is what generate.py makes, every query parses as
PromQL and reads only metrics that dsray/runtime/metrics.py defines, and promtool accepts
dashboards/prometheus.yml. (tests/ops/test_metrics_live.py runs the same queries against real data.)"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import promql_parser
import pytest
import yaml

try:
    from . import prom_utils
except ImportError:  # tests/ops is not a package: pytest put this folder on sys.path
    import prom_utils

from dsray.runtime.metrics import DsrayMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
# Grafana's values for an "All" selection and its interval macros.
GRAFANA_VALUES = {"datasource": "", "SessionName": ".+", "engine": ".+", "layer": ".+",
                  "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
# The schema's data source reference (what grafana-foundation-sdk writes) to the `datasource` variable.
TEMPLATE_DS = {"type": "prometheus", "uid": "${datasource}"}


def _dashboard() -> dict:
    return json.loads((DASHBOARDS / "dsray.json").read_text())


def _exported_names() -> set[str]:
    """Every series name Ray exports for DsrayMetrics: ray_ prefix, _total on counters,
    _bucket/_sum/_count on histograms, bare gauges."""
    from ray.util.metrics import Counter, Gauge, Histogram

    m = DsrayMetrics("names", [0], 2)
    names = set()
    for metric in vars(m).values():
        name = f"ray_{getattr(metric, '_name', '')}"
        if isinstance(metric, Counter):
            names.add(f"{name}_total")
        elif isinstance(metric, Histogram):
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif isinstance(metric, Gauge):
            names.add(name)
    return names


def _selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_generated_json_is_committed() -> None:
    out = subprocess.run([sys.executable, str(DASHBOARDS / "generate.py"), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_metric_names_cover_the_api() -> None:
    names = _exported_names()
    assert {"ray_dsray_expert_tokens_total", "ray_dsray_expert_load_share", "ray_dsray_maxvio_batch",
            "ray_dsray_maxvio_window", "ray_dsray_router_bias", "ray_dsray_placement_version",
            "ray_dsray_shard_experts", "ray_dsray_shard_memory_bytes", "ray_dsray_a2a_seconds_bucket",
            "ray_dsray_step_seconds_bucket", "ray_dsray_tokens_total", "ray_dsray_tokens_per_second",
            "ray_dsray_loss", "ray_dsray_steps_total"} <= names


def test_every_panel_query_parses_and_reads_dsray_metrics() -> None:
    dashboard = _dashboard()
    names = _exported_names()
    targets = prom_utils.dashboard_targets(dashboard)
    assert len(targets) >= 20
    used = set()
    for title, t in targets:
        expr = prom_utils.substitute_vars(t["expr"], GRAFANA_VALUES)
        try:
            selectors = _selectors(expr)
        except Exception as e:  # noqa: BLE001 - re-raised with the panel named
            pytest.fail(f"panel {title!r} [{t['refId']}]: {expr!r} does not parse: {e}")
        assert selectors, f"panel {title!r}: no metric in {expr!r}"
        for s in selectors:
            assert s.name in names, f"panel {title!r}: {s.name!r} is not a metric that metrics.py exports"
            matchers = {m.name: m.value for m in s.matchers.matchers}
            # Scoped to the selected Ray session and engine (WorkerId is aggregated away).
            assert matchers.get("SessionName") == ".+" and matchers.get("engine") == ".+", (title, expr)
            used.add(s.name)
        assert t["datasource"] == TEMPLATE_DS, title
        assert "WorkerId" not in t["expr"], f"panel {title!r} must aggregate WorkerId away"
        # Raw series carry Ray's per-process labels: every query aggregates (sum/max/avg/count by, topk...).
        assert re.match(r"^\s*(sum|max|avg|count|topk|bottomk|histogram_quantile)\b", t["expr"]), (title, t["expr"])
    # Every family is on the dashboard (histograms through _bucket).
    assert {n for n in names if not n.endswith(("_sum", "_count"))} <= used, sorted(names - used)


def test_panels_and_variables() -> None:
    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"] == TEMPLATE_DS for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "SessionName", "engine", "layer"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["SessionName"]["query"]["query"] == "label_values(ray_dsray_steps_total, SessionName)"
    names = _exported_names()
    for name in ("SessionName", "engine", "layer"):
        assert variables[name]["datasource"] == TEMPLATE_DS, name
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["query"]["query"])
        assert m and m.group(2) == name, variables[name]["query"]
        for s in _selectors(prom_utils.substitute_vars(m.group(1), GRAFANA_VALUES)):
            assert s.name in names


def test_rows_are_expanded_and_panels_follow_them() -> None:
    """Grafana drops the panels nested inside an expanded row: every row is expanded and empty, and its
    panels follow it on the top level, below it on the grid."""
    dashboard = _dashboard()
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Throughput", "Expert load", "All-to-all", "Placement", "Recovery and RL"]
    assert all(r["collapsed"] is False and r["panels"] == [] and r["gridPos"]["w"] == 24 for r in rows)
    assert dashboard["panels"][0]["type"] == "row"
    row_y = 0
    for p in dashboard["panels"]:
        if p["type"] == "row":
            row_y = p["gridPos"]["y"]
        else:
            assert p["gridPos"]["y"] > row_y, p["title"]


def _generator():
    spec = importlib.util.spec_from_file_location("dsray_dashboard_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_rejects_a_line_wider_than_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK starts a new grid line only when one is exactly full; a panel that sticks out is an error."""
    gen = _generator()
    q = [gen.query(gen.sel("ray_dsray_loss"))]
    monkeypatch.setattr(gen, "ROWS", [("Row", lambda: [gen.timeseries_panel(t, q, w=w)
                                                       for t, w in (("a", 12), ("b", 8), ("c", 8))])])
    with pytest.raises(ValueError, match=r"panel 'c' spans columns 20\.\.28"):
        gen.dashboard()


def test_provisioning_files() -> None:
    ds = yaml.safe_load((DASHBOARDS / "provisioning/datasources/dsray.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://127.0.0.1:9090"
    prov = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/dsray.yaml").read_text())
    provider = prov["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_prometheus_config_passes_promtool() -> None:
    if not os.path.exists(prom_utils.PROMTOOL):
        pytest.fail(f"{prom_utils.PROMTOOL} not found: {prom_utils.INSTALL_HINT}")
    out = subprocess.run([prom_utils.PROMTOOL, "check", "config", str(DASHBOARDS / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    assert cfg["global"]["scrape_interval"] == "5s"
    sd = cfg["scrape_configs"][0]["file_sd_configs"][0]
    assert sd["files"] == [prom_utils.RAY_SD_FILE] and sd["refresh_interval"] == "5s"
    # The live tests' generated config has the same shape.
    assert prom_utils.prometheus_config()["scrape_configs"][0]["file_sd_configs"][0]["files"] == sd["files"]
