"""Generate the dsray Grafana dashboard (dashboards/dsray.json) with grafana-foundation-sdk's typed builders.

    python dashboards/generate.py          # write dashboards/dsray.json
    python dashboards/generate.py --check  # exit 1 if the committed JSON is not what this generates

Queries read the metrics of dsray/runtime/metrics.py as Ray exports them (`ray_` prefix, `_total` on
counters, `_bucket` on histograms). Every query filters on the `SessionName` and `engine` template
variables and aggregates away Ray's per-process labels (WorkerId changes when the Router restarts):
counters and histograms with `sum by (...)`, gauges with `max`/`avg by (...)` so that the old and new
Router's series, which overlap for up to two export intervals after a restart, are not added up.

Adding a panel is one call in the function of its row, for example

    timeseries_panel("Routing mismatch", [query(f"max by (kind) ({sel('ray_dsray_routing_mismatch')})", "{{kind}}")],
               w=12, description="..."),

and a new row is one more entry in ROWS. The SDK flows panels left to right on Grafana's 24-column grid
and starts a new line when a line is exactly full, so the widths of each line must add up to 24
(`dashboard()` raises if a panel would stick out).

The JSON depends on the SDK build (the defaults it writes), so `--check` is only meaningful with the
version pinned in pyproject.toml's `test` extra.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import bargauge, heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import TableCellHeight
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync, DataSourceRef, DataTransformerConfig, VariableOption, VariableRefresh, VariableSort,
)
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "dsray.json"
# Every panel and query reads the data source picked in the `datasource` variable.
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SCOPE = 'SessionName=~"$SessionName", engine=~"$engine"'
LAYER = 'layer=~"$layer"'
QUANTILES = (0.5, 0.9, 0.99)
GRID_COLUMNS = 24

# The SDK's panel builders used here: they share the generic panel options that panel() sets.
P = TypeVar("P", timeseries.Panel, table.Panel, heatmap.Panel, bargauge.Panel, stat.Panel)
PanelBuilder = timeseries.Panel | table.Panel | heatmap.Panel | bargauge.Panel | stat.Panel


def sel(metric: str, *extra: str) -> str:
    """`metric{...}` filtered on the dashboard's session and engine (plus `extra` matchers)."""
    return f"{metric}{{{', '.join((SCOPE, *extra))}}}"


def query(expr: str, legend: str = "", *, fmt: PromQueryFormat = PromQueryFormat.TIME_SERIES,
          instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).format(fmt).datasource(DS)
    return q.instant() if instant else q.range()


def quantiles(metric: str, by: str, legend: str, *extra: str) -> list[prometheus.Dataquery]:
    return [
        query(f"histogram_quantile({q}, sum by (le, {by}) (rate({sel(metric, *extra)}[$__rate_interval])))",
              f"{legend} p{round(q * 100)}")
        for q in QUANTILES
    ]


def panel(p: P, title: str, queries: list[prometheus.Dataquery], *, w: int, h: int = 8, unit: str = "short",
          description: str = "") -> P:
    """What every dsray panel sets: title, size, unit, the template data source, queries A, B, C..."""
    for ref, q in zip(string.ascii_uppercase, queries):
        q.ref_id(ref)
    return p.title(title).description(description).datasource(DS).span(w).height(h).unit(unit).targets(queries)


def timeseries_panel(title: str, queries: list[prometheus.Dataquery], **kw: Any) -> timeseries.Panel:
    return panel(timeseries.Panel(), title, queries, **kw)


def bargauge_panel(title: str, queries: list[prometheus.Dataquery], **kw: Any) -> bargauge.Panel:
    return panel(bargauge.Panel(), title, queries, **kw)


def throughput_panels() -> list[PanelBuilder]:
    return [
        timeseries_panel("Tokens / s", [
            query(f"sum by (mode) (rate({sel('ray_dsray_tokens_total')}[$__rate_interval]))", "{{mode}} (rate)"),
            query(f"max by (mode) ({sel('ray_dsray_tokens_per_second')})", "{{mode}} (last step)"),
        ], w=6, description="Rate of the token counter, and tokens / step time of the latest step."),
        timeseries_panel("Step time", quantiles("ray_dsray_step_seconds_bucket", "mode", "{{mode}}"),
                         w=6, unit="s", description="Quantiles from the dsray_step_seconds histogram."),
        timeseries_panel("Steps / s", [
            query(f"sum by (mode) (rate({sel('ray_dsray_steps_total')}[$__rate_interval]))", "{{mode}}"),
        ], w=6),
        timeseries_panel("Loss", [query(f"max by (engine) ({sel('ray_dsray_loss')})", "{{engine}}")], w=6),
    ]


def load_panels() -> list[PanelBuilder]:
    share = f"avg by (layer, expert) ({sel('ray_dsray_expert_load_share', LAYER)})"
    return [
        timeseries_panel("MaxVio per layer", [
            query(f"max by (layer) ({sel('ray_dsray_maxvio_batch', LAYER)})", "L{{layer}} batch"),
            query(f"max by (layer) ({sel('ray_dsray_maxvio_window', LAYER)})", "L{{layer}} window"),
        ], w=12, description="(max(c) - mean(c)) / mean(c) of the step (batch) and of the Router's window."),
        panel(table.Panel(), "Expert load share (layer x expert, latest)", [
            query(share, fmt=PromQueryFormat.TABLE, instant=True),
        ], w=12, unit="percentunit",
            description="Rows: layers, columns: experts. With expert_detail=top only the hottest and "
                        "coldest experts of each layer are exported; the other cells stay empty.")
        .with_transformation(DataTransformerConfig(id_val="groupingToMatrix", options={
            "columnField": "expert", "rowField": "layer", "valueField": "Value"}))
        .cell_height(TableCellHeight.SM).show_header(True),
        panel(heatmap.Panel(), "Expert load heatmap, layer $layer", [
            query(f"avg by (expert) ({sel('ray_dsray_expert_load_share', LAYER)})", "{{expert}}",
                  fmt=PromQueryFormat.HEATMAP),
        ], w=12, unit="percentunit", description="Expert (y) by time (x), one panel per selected layer.")
        .repeat("layer").repeat_direction("h").max_per_row(2)
        .calculate(False).y_axis(heatmap.YAxisConfig().axis_label("expert"))
        .color(heatmap.HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("Oranges")),
        timeseries_panel("Routed tokens / s per expert", [
            query(f"sum by (layer, expert) (rate({sel('ray_dsray_expert_tokens_total', LAYER)}[$__rate_interval]))",
                  "L{{layer}} E{{expert}}"),
        ], w=12, description="expert='all' is the layer total (expert_detail top/none)."),
        bargauge_panel("Hottest experts (latest step)", [
            query(f"topk(10, {share})", "L{{layer}} E{{expert}}", instant=True),
        ], w=8, unit="percentunit"),
        bargauge_panel("Coldest experts (latest step)", [
            query(f"bottomk(10, {share})", "L{{layer}} E{{expert}}", instant=True),
        ], w=8, unit="percentunit"),
        bargauge_panel("Hottest experts over the range", [
            query(f"topk(10, sum by (layer, expert) "
                  f"(increase({sel('ray_dsray_expert_tokens_total', LAYER)}[$__range])))",
                  "L{{layer}} E{{expert}}", instant=True),
        ], w=8, description="Tokens routed in the dashboard's time range."),
        timeseries_panel("Router bias per expert", [
            query(f"avg by (layer, expert) ({sel('ray_dsray_router_bias', LAYER)})", "L{{layer}} E{{expert}}"),
        ], w=24, description="Aux-loss-free bias: it only changes which experts are selected."),
    ]


def a2a_panels() -> list[PanelBuilder]:
    bucket = "ray_dsray_a2a_seconds_bucket"
    return [
        timeseries_panel("Dispatch / combine latency", quantiles(bucket, "phase", "{{phase}}", LAYER),
                         w=12, unit="s", description="p50/p90/p99 over the selected layers, per phase."),
        timeseries_panel("p99 latency per layer", [
            query(f"histogram_quantile(0.99, sum by (le, layer, phase) "
                  f"(rate({sel(bucket, LAYER)}[$__rate_interval])))", "L{{layer}} {{phase}}"),
        ], w=12, unit="s"),
    ]


def placement_panels() -> list[PanelBuilder]:
    slots = sel("ray_dsray_shard_experts")
    return [
        panel(stat.Panel(), "Placement version", [
            query(f"max by (engine) ({sel('ray_dsray_placement_version')})", "{{engine}}"),
        ], w=4),
        timeseries_panel("Shards per node", [
            query(f"count by (node) (max by (shard, node) ({slots}))", "{{node}}"),
        ], w=5),
        timeseries_panel("Expert slots per node", [
            query(f"sum by (node) (max by (shard, node) ({slots}))", "{{node}}"),
        ], w=5),
        bargauge_panel("Expert slots per shard", [
            query(f"max by (shard, node) ({slots})", "{{shard}} @ {{node}}", instant=True),
        ], w=5),
        timeseries_panel("Shard memory", [
            query(f"max by (shard, kind) ({sel('ray_dsray_shard_memory_bytes')})", "{{shard}} {{kind}}"),
        ], w=5, unit="bytes"),
    ]


def resilience_panels() -> list[PanelBuilder]:
    return [
        timeseries_panel("Recoveries", [
            query(f"sum by (role) (increase({sel('ray_dsray_recoveries_total')}[$__rate_interval]))", "{{role}}"),
        ], w=8, description="Ranks (or the Router) replaced after a failure, by role."),
        timeseries_panel("Recovery time", quantiles("ray_dsray_recovery_seconds_bucket", "engine", "{{engine}}"),
                         w=8, unit="s", description="From the failed step noticed to its result returned."),
        timeseries_panel("RL routing mismatch", [
            query(f"max by (kind) ({sel('ray_dsray_routing_mismatch')})", "{{kind}}"),
        ], w=8, unit="percentunit", description="Share of trained tokens / (token, layer) pairs whose experts "
                                                "differ from the rollout's (last GRPO step)."),
    ]


# Dashboard rows, top to bottom. Rows stay expanded with their panels after them on the dashboard's
# top level: Grafana drops panels nested inside a row unless the row is collapsed.
ROWS: list[tuple[str, Callable[[], list[PanelBuilder]]]] = [
    ("Throughput", throughput_panels),
    ("Expert load", load_panels),
    ("All-to-all", a2a_panels),
    ("Placement", placement_panels),
    ("Recovery and RL", resilience_panels),
]


def query_variable(name: str, label: str, promql: str, sort: VariableSort) -> QueryVariable:
    """A multi-value variable with "All" (= regex .+) selected, refreshed when the time range changes."""
    return (QueryVariable(name).label(label).datasource(DS).query({"query": promql, "refId": f"{name}-var"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort).multi(True).include_all(True)
            .all_value(".+").current(VariableOption(selected=True, text=["All"], value=["$__all"])))


def dashboard() -> Dashboard:
    d = (Dashboard("dsray: MoE expert parallelism").uid("dsray-moe")
         .description("Expert load, routing bias, all-to-all latency, placement and throughput of dsray "
                      "engines (metrics from dsray/runtime/metrics.py via Ray's metrics agent).")
         .tags(["dsray", "ray", "moe"]).editable().tooltip(DashboardCursorSync.CROSSHAIR)
         .refresh("10s").time("now-30m", "now").timezone("").version(1).links([])
         .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
         .with_variable(query_variable("SessionName", "Ray session", "label_values(ray_dsray_steps_total, SessionName)",
                                       VariableSort.ALPHABETICAL_ASC))
         .with_variable(query_variable("engine", "Engine",
                                       'label_values(ray_dsray_steps_total{SessionName=~"$SessionName"}, engine)',
                                       VariableSort.ALPHABETICAL_ASC))
         .with_variable(query_variable("layer", "MoE layer", f"label_values({sel('ray_dsray_maxvio_batch')}, layer)",
                                       VariableSort.NUMERICAL_ASC)))
    ids = itertools.count(1)
    for title, panels in ROWS:
        d.with_row(Row(title).id(next(ids)))
        for p in panels():
            d.with_panel(p.id(next(ids)))
    for p in d.build().panels or []:
        if p.grid_pos.x + p.grid_pos.w > GRID_COLUMNS:
            raise ValueError(f"panel {p.title!r} spans columns {p.grid_pos.x}..{p.grid_pos.x + p.grid_pos.w} of "
                             f"{GRID_COLUMNS}: make the widths of its line add up to {GRID_COLUMNS}")
    return d


def render() -> str:
    return json.dumps(dashboard().build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dsray.json differs from the generated one")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            sdk = importlib.metadata.version("grafana-foundation-sdk")
            print(f"{OUT} is stale: run `python dashboards/generate.py` (generated with grafana-foundation-sdk "
                  f"{sdk}; pyproject.toml's test extra pins the version the committed JSON was made with)",
                  file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
