"""`dsray top`: a live terminal view of routing balance, one row per MoE layer.

`render(stats)` takes the Router statistics (the `dsray_router.json` structure, see `dsray.report`)
plus the live fields `last_counts` [L][E], `maxvio_batch` [L], `maxvio_window` [L], `tokens_per_s`,
`placement_version`. Missing live fields fall back to the last history entry, so a saved stats file
renders too. MaxVio = max_e(load_e) / mean_e(load_e) - 1.

Without a Ray connection to the Router, `stats_from_metrics(text, engine)` builds the same dict from
the Prometheus exposition text of the metrics that the Router exports (dsray/runtime/metrics.py).
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"


def load_bar(counts: Sequence[float], width: int = 32) -> str:
    """One block character per expert, height = load / max load; lines of `width` experts. Loads are
    token counts (Router stats) or shares (`stats_from_metrics`)."""
    if not counts:
        return ""
    top = max(counts)
    n = len(BLOCKS)
    chars = [BLOCKS[min(n - 1, int(c * n / top)) if top > 0 else 0] for c in counts]
    return "\n".join("".join(chars[i:i + width]) for i in range(0, len(chars), width))


def _maxvio(counts: list[int]) -> float | None:
    if not counts or sum(counts) == 0:
        return None
    return max(counts) * len(counts) / sum(counts) - 1.0


def _last(hist: dict[str, Any], key: str) -> Any:
    seq = hist.get(key) or []
    return seq[-1] if seq else None


def _vio_style(v: float | None) -> str:
    if v is None:
        return "dim"
    return "green" if v < 0.2 else "yellow" if v < 1.0 else "bold red"


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def render(stats: dict[str, Any], bar_width: int = 32, title: str = "dsray top") -> RenderableType:
    """Header (engine, step, placement version, tokens/s) and a table with one row per MoE layer."""
    hist = stats.get("history") or {}
    layers = list(stats.get("moe_layers") or [])
    counts = stats.get("last_counts") or _last(hist, "counts") or [[] for _ in layers]
    vio_b = stats.get("maxvio_batch") or _last(hist, "maxvio_batch") or [_maxvio(c) for c in counts]
    vio_w = stats.get("maxvio_window") or _last(hist, "maxvio_window") or [None] * len(layers)
    bias = stats.get("bias") or [[] for _ in layers]
    tps = stats["tokens_per_s"] if "tokens_per_s" in stats else _last(hist, "tokens_per_s")
    version = stats.get("placement_version", (stats.get("placement") or {}).get("version"))

    header = Text.assemble(
        (f"{title}  ", "bold"),
        ("engine ", "dim"), (str(stats.get("engine", "?")), "bold cyan"),
        ("   step ", "dim"), (str(stats.get("step", "?")), "bold"),
        ("   placement v", "dim"), (str(version if version is not None else "?"), "bold"),
        ("   tokens/s ", "dim"), (_fmt(tps, ",.0f"), "bold"),
        ("   experts ", "dim"), (str(stats.get("n_experts", "?")), "bold"),
    )

    table = Table(expand=False, header_style="bold")
    table.add_column("layer", justify="right")
    table.add_column("MaxVio\nbatch", justify="right")
    table.add_column("MaxVio\nwindow", justify="right")
    table.add_column("hottest\n(id share)", justify="right")
    table.add_column("coldest\n(id share)", justify="right")
    table.add_column("load per expert", no_wrap=True)
    table.add_column("bias range", justify="right")
    for i, layer in enumerate(layers):
        c = list(counts[i]) if i < len(counts) else []
        total = sum(c)
        if total > 0:
            hot = max(range(len(c)), key=c.__getitem__)
            cold = min(range(len(c)), key=c.__getitem__)
            hot_s, cold_s = f"{hot} {c[hot] / total:.1%}", f"{cold} {c[cold] / total:.1%}"
        else:
            hot_s = cold_s = "–"
        vb = vio_b[i] if i < len(vio_b) else None
        vw = vio_w[i] if i < len(vio_w) else None
        b = bias[i] if i < len(bias) else []
        bias_s = f"[{min(b):+.3f}, {max(b):+.3f}]" if b else "–"
        table.add_row(str(layer), Text(_fmt(vb), _vio_style(vb)), Text(_fmt(vw), _vio_style(vw)),
                      Text(hot_s, "red"), Text(cold_s, "blue"), load_bar(c, bar_width), bias_s)
    if not layers:
        return Group(header, Text("no MoE layers reported yet", style="dim"))
    return Group(header, table)


def run_top(
    fetch: Callable[[], dict[str, Any]],
    interval: float = 1.0,
    iterations: int | None = None,
    console: Console | None = None,
) -> None:
    """Refresh `render(fetch())` every `interval` s until Ctrl-C (or `iterations` refreshes).

    An exception from `fetch` ends the view and propagates: a dead engine should not look frozen.
    """
    if iterations is not None and iterations < 1:
        raise ValueError(f"run_top: iterations must be >= 1 or None, got {iterations}")
    try:
        with Live(render(fetch()), console=console, auto_refresh=False, transient=False) as live:
            live.refresh()
            done = 1
            while iterations is None or done < iterations:
                time.sleep(interval)
                live.update(render(fetch()), refresh=True)
                done += 1
    except KeyboardInterrupt:
        pass  # Ctrl-C is the normal way out of a live view


# ---- the same view from Prometheus metrics ---------------------------------------------------------

MODES = ("train", "grpo", "forward", "generate", "logprobs")  # dsray.runtime.metrics.MODES (not imported: it pulls in Ray)


def fetch_metrics(url: str, timeout: float = 10.0) -> str:
    """The exposition text at `url`: a Ray node's metrics port (`http://<node>:8080/metrics`, the node
    of the engine's Router), or a Prometheus server's `/federate?match[]=...` selecting `ray_dsray_.*`
    (URL-encoded), which serves the same format from all nodes. RuntimeError naming `url` if it
    cannot be read (the CLI reports it as a failure instead of a traceback)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors; ValueError: bad URL
        raise RuntimeError(f"cannot read metrics at {url}: {e}") from e


def _series(text: str, engine: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value)]} of `engine`'s dsray samples."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_dsray_") and sample.labels.get("engine") == engine:
                out[sample.name].append((sample.labels, sample.value))
    return out


def _by(samples: Iterable[tuple[dict[str, str], float]], keys: tuple[str, ...],
        agg: Callable[[list[float]], float]) -> dict[tuple[str, ...], float]:
    """Aggregate away every label but `keys` (Ray's WorkerId and friends), like `agg by (keys)`."""
    groups: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for labels, value in samples:
        groups[tuple(labels.get(k, "") for k in keys)].append(value)
    return {k: agg(v) for k, v in groups.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def stats_from_metrics(text: str, engine: str, n_experts: int | None = None) -> dict[str, Any]:
    """The stats dict that `render()` takes, built from the Prometheus exposition text of one Ray
    metrics endpoint (see `fetch_metrics`).

    Aggregation follows dashboards/dsray.json: after a Router restart the old and the new process's
    series coexist for up to two export intervals (different WorkerId), so gauges are combined with
    max (MaxVio, version, tokens/s) or avg (load share, bias) and counters summed.

    - `moe_layers`, `maxvio_batch`, `maxvio_window`: from the per-layer MaxVio gauges.
    - `last_counts`: the latest step's load shares (`render` only needs proportions). With
      expert_detail="top" only the hottest and coldest experts are exported: each missing expert gets
      an equal part of the remaining share (so the hottest and coldest stay the exported ones); with
      "none" there are no shares and the per-expert columns stay empty.
    - `n_experts`: given, else the largest expert id seen + 1 (exact at expert_detail="full").
    - `bias`: the exported experts' router bias, per layer.
    - `step`: train steps counted in this Ray session; `tokens_per_s`: the latest step's throughput of
      the mode with the most steps; `placement_version`.

    Raises ValueError naming the engine (and the engines present) if `text` has no MaxVio series for it.
    """
    series = _series(text, engine)
    maxvio_b = _by(series["ray_dsray_maxvio_batch"], ("layer",), max)
    if not maxvio_b:
        engines = sorted({s.labels["engine"] for f in text_string_to_metric_families(text) for s in f.samples
                          if s.name.startswith("ray_dsray_") and "engine" in s.labels})
        raise ValueError(f"no dsray metrics for engine {engine!r} in the metrics text "
                         f"(engines there: {', '.join(engines) or 'none'})")
    maxvio_w = _by(series["ray_dsray_maxvio_window"], ("layer",), max)
    layers = sorted(int(layer) for (layer,) in maxvio_b)
    share = _by(series["ray_dsray_expert_load_share"], ("layer", "expert"), _mean)
    bias = _by(series["ray_dsray_router_bias"], ("layer", "expert"), _mean)
    experts = [int(e) for _, e in share] + [int(e) for _, e in bias]
    E = n_experts if n_experts is not None else (max(experts) + 1 if experts else None)

    counts: list[list[float]] = []
    for layer in layers:
        have = {int(e): v for (lt, e), v in share.items() if lt == str(layer)}
        if not have or E is None:
            counts.append([])
            continue
        missing = E - len(have)
        rest = max(0.0, 1.0 - sum(have.values())) / missing if missing > 0 else 0.0
        counts.append([have.get(e, rest) for e in range(E)])

    steps = _by(series["ray_dsray_steps_total"], ("mode",), sum)
    tps = _by(series["ray_dsray_tokens_per_second"], ("mode",), max)
    # The mode the engine mostly runs; MODES order breaks ties (train first).
    main_mode = max(MODES, key=lambda m: (steps.get((m,), 0.0), -MODES.index(m)))
    version = _by(series["ray_dsray_placement_version"], (), max).get(())
    stats: dict[str, Any] = {
        "engine": engine,
        "step": int(steps.get(("train",), 0.0)),
        "moe_layers": layers,
        "last_counts": counts,
        "maxvio_batch": [maxvio_b[(str(layer),)] for layer in layers],
        "maxvio_window": [maxvio_w.get((str(layer),)) for layer in layers],
        "bias": [[v for (lt, e), v in sorted(bias.items(), key=lambda kv: int(kv[0][1])) if lt == str(layer)]
                 for layer in layers],
        "tokens_per_s": tps.get((main_mode,)),
        "placement_version": int(version) if version is not None else None,
    }
    if E is not None:  # unknown at expert_detail="none": render() shows "?"
        stats["n_experts"] = E
    return stats
