"""`dsray top`: a live terminal view of routing balance, one row per MoE layer.

`render(stats)` takes the Router statistics (the `dsray_router.json` structure, see `dsray.report`)
plus the live fields `last_counts` [L][E], `maxvio_batch` [L], `maxvio_window` [L], `tokens_per_s`,
`placement_version`. Missing live fields fall back to the last history entry, so a saved stats file
renders too. MaxVio = max_e(load_e) / mean_e(load_e) - 1.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"


def load_bar(counts: list[int], width: int = 32) -> str:
    """One block character per expert, height = load / max load; lines of `width` experts."""
    if not counts:
        return ""
    top = max(counts)
    n = len(BLOCKS)
    chars = [BLOCKS[min(n - 1, c * n // top) if top > 0 else 0] for c in counts]
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


def render(stats: dict[str, Any], bar_width: int = 32) -> RenderableType:
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
        ("dsray top  ", "bold"),
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
