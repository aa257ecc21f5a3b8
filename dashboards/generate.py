"""Generate the dsray Grafana dashboard (dashboards/dsray.json) as plain Python data.

    python dashboards/generate.py          # write dashboards/dsray.json
    python dashboards/generate.py --check  # exit 1 if the committed JSON is not what this generates

Queries read the metrics of dsray/runtime/metrics.py as Ray exports them (`ray_` prefix, `_total` on
counters, `_bucket` on histograms). Every query filters on the `SessionName` and `engine` template
variables and aggregates away Ray's per-process labels (WorkerId changes when the Router restarts):
counters and histograms with `sum by (...)`, gauges with `max`/`avg by (...)` so that the old and new
Router's series, which overlap for up to two export intervals after a restart, are not added up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dsray.json"
DS = "${datasource}"
SCOPE = 'SessionName=~"$SessionName", engine=~"$engine"'
LAYER = 'layer=~"$layer"'
QUANTILES = (0.5, 0.9, 0.99)


def sel(metric: str, *extra: str) -> str:
    """`metric{...}` filtered on the dashboard's session and engine (plus `extra` matchers)."""
    return f"{metric}{{{', '.join((SCOPE, *extra))}}}"


def target(expr: str, legend: str = "", *, fmt: str = "time_series", instant: bool = False) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "format": fmt, "instant": instant,
            "range": not instant}


def panel(kind: str, title: str, targets: list[dict[str, Any]], *, w: int, h: int = 8,
          unit: str = "short", description: str = "", options: dict[str, Any] | None = None,
          **extra: Any) -> dict[str, Any]:
    for ref, t in zip("ABCDEFGHIJ", targets):
        t["refId"] = ref
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"w": w, "h": h}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": options or {}, **extra,
    }


def quantiles(metric: str, by: str, legend: str, *extra: str) -> list[dict[str, Any]]:
    return [
        target(f"histogram_quantile({q}, sum by (le, {by}) (rate({sel(metric, *extra)}[$__rate_interval])))",
               f"{legend} p{round(q * 100)}")
        for q in QUANTILES
    ]


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def throughput_panels() -> list[dict[str, Any]]:
    return [
        row("Throughput"),
        panel("timeseries", "Tokens / s", [
            target(f"sum by (mode) (rate({sel('ray_dsray_tokens_total')}[$__rate_interval]))", "{{mode}} (rate)"),
            target(f"max by (mode) ({sel('ray_dsray_tokens_per_second')})", "{{mode}} (last step)"),
        ], w=6, description="Rate of the token counter, and tokens / step time of the latest step."),
        panel("timeseries", "Step time", quantiles("ray_dsray_step_seconds_bucket", "mode", "{{mode}}"),
              w=6, unit="s", description="Quantiles from the dsray_step_seconds histogram."),
        panel("timeseries", "Steps / s", [
            target(f"sum by (mode) (rate({sel('ray_dsray_steps_total')}[$__rate_interval]))", "{{mode}}"),
        ], w=6),
        panel("timeseries", "Loss", [target(f"max by (engine) ({sel('ray_dsray_loss')})", "{{engine}}")], w=6),
    ]


def load_panels() -> list[dict[str, Any]]:
    share = f"avg by (layer, expert) ({sel('ray_dsray_expert_load_share', LAYER)})"
    return [
        row("Expert load"),
        panel("timeseries", "MaxVio per layer", [
            target(f"max by (layer) ({sel('ray_dsray_maxvio_batch', LAYER)})", "L{{layer}} batch"),
            target(f"max by (layer) ({sel('ray_dsray_maxvio_window', LAYER)})", "L{{layer}} window"),
        ], w=12, description="(max(c) - mean(c)) / mean(c) of the step (batch) and of the Router's window."),
        panel("table", "Expert load share (layer x expert, latest)", [
            target(share, fmt="table", instant=True),
        ], w=12, unit="percentunit",
            description="Rows: layers, columns: experts. With expert_detail=top only the hottest and "
                        "coldest experts of each layer are exported; the other cells stay empty.",
            transformations=[{"id": "groupingToMatrix", "options": {
                "columnField": "expert", "rowField": "layer", "valueField": "Value"}}],
            options={"cellHeight": "sm", "showHeader": True}),
        panel("heatmap", "Expert load heatmap, layer $layer", [
            target(f"avg by (expert) ({sel('ray_dsray_expert_load_share', LAYER)})", "{{expert}}", fmt="heatmap"),
        ], w=12, unit="percentunit", repeat="layer", repeatDirection="h", maxPerRow=2,
            description="Expert (y) by time (x), one panel per selected layer.",
            options={"calculate": False, "yAxis": {"axisLabel": "expert"},
                     "color": {"mode": "scheme", "scheme": "Oranges"}}),
        panel("timeseries", "Routed tokens / s per expert", [
            target(f"sum by (layer, expert) (rate({sel('ray_dsray_expert_tokens_total', LAYER)}[$__rate_interval]))",
                   "L{{layer}} E{{expert}}"),
        ], w=12, description="expert='all' is the layer total (expert_detail top/none)."),
        panel("bargauge", "Hottest experts (latest step)", [
            target(f"topk(10, {share})", "L{{layer}} E{{expert}}", instant=True),
        ], w=8, unit="percentunit"),
        panel("bargauge", "Coldest experts (latest step)", [
            target(f"bottomk(10, {share})", "L{{layer}} E{{expert}}", instant=True),
        ], w=8, unit="percentunit"),
        panel("bargauge", "Hottest experts over the range", [
            target(f"topk(10, sum by (layer, expert) "
                   f"(increase({sel('ray_dsray_expert_tokens_total', LAYER)}[$__range])))",
                   "L{{layer}} E{{expert}}", instant=True),
        ], w=8, description="Tokens routed in the dashboard's time range."),
        panel("timeseries", "Router bias per expert", [
            target(f"avg by (layer, expert) ({sel('ray_dsray_router_bias', LAYER)})", "L{{layer}} E{{expert}}"),
        ], w=24, description="Aux-loss-free bias: it only changes which experts are selected."),
    ]


def a2a_panels() -> list[dict[str, Any]]:
    bucket = "ray_dsray_a2a_seconds_bucket"
    return [
        row("All-to-all"),
        panel("timeseries", "Dispatch / combine latency", quantiles(bucket, "phase", "{{phase}}", LAYER),
              w=12, unit="s", description="p50/p90/p99 over the selected layers, per phase."),
        panel("timeseries", "p99 latency per layer", [
            target(f"histogram_quantile(0.99, sum by (le, layer, phase) "
                   f"(rate({sel(bucket, LAYER)}[$__rate_interval])))", "L{{layer}} {{phase}}"),
        ], w=12, unit="s"),
    ]


def placement_panels() -> list[dict[str, Any]]:
    slots = sel("ray_dsray_shard_experts")
    return [
        row("Placement"),
        panel("stat", "Placement version", [target(f"max by (engine) ({sel('ray_dsray_placement_version')})",
                                                   "{{engine}}")], w=4),
        panel("timeseries", "Shards per node", [target(f"count by (node) (max by (shard, node) ({slots}))",
                                                       "{{node}}")], w=5),
        panel("timeseries", "Expert slots per node", [target(f"sum by (node) (max by (shard, node) ({slots}))",
                                                             "{{node}}")], w=5),
        panel("bargauge", "Expert slots per shard", [target(f"max by (shard, node) ({slots})",
                                                            "{{shard}} @ {{node}}", instant=True)], w=5),
        panel("timeseries", "Shard memory", [
            target(f"max by (shard, kind) ({sel('ray_dsray_shard_memory_bytes')})", "{{shard}} {{kind}}"),
        ], w=5, unit="bytes"),
    ]


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assign ids and flow panels left to right, top to bottom on Grafana's 24-column grid."""
    x = y = row_h = 0
    for pid, p in enumerate(panels, start=1):
        p["id"] = pid
        g = p["gridPos"]
        if p["type"] == "row" or x + g["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        g["x"], g["y"] = x, y
        x, row_h = x + g["w"], max(row_h, g["h"])
        if p["type"] == "row":
            x, y, row_h = 0, y + g["h"], 0
    return panels


def variable(name: str, label: str, query: str, *, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2, "sort": 3 if name == "layer" else 1, "multi": multi, "includeAll": True,
        "allValue": ".+", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0, "options": [], "regex": "",
    }


def dashboard() -> dict[str, Any]:
    return {
        "title": "dsray: MoE expert parallelism",
        "uid": "dsray-moe",
        "description": "Expert load, routing bias, all-to-all latency, placement and throughput of dsray "
                       "engines (metrics from dsray/runtime/metrics.py via Ray's metrics agent).",
        "tags": ["dsray", "ray", "moe"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
            variable("SessionName", "Ray session", "label_values(ray_dsray_steps_total, SessionName)"),
            variable("engine", "Engine", 'label_values(ray_dsray_steps_total{SessionName=~"$SessionName"}, engine)'),
            variable("layer", "MoE layer", f"label_values({sel('ray_dsray_maxvio_batch')}, layer)"),
        ]},
        "panels": layout(throughput_panels() + load_panels() + a2a_panels() + placement_panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dsray.json differs from the generated one")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run `python dashboards/generate.py`", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
