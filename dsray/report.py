"""`dsray report --out report.png <run_dir>`: one PNG of a run's routing statistics.

Reads the Router's `dsray_router.json` (in a run dir, in a checkpoint dir, or given directly):

    {"engine", "step", "moe_layers": [L], "n_experts": E, "gamma", "placement", "bias": [L][E],
     "history": {"step": [N], "maxvio_batch": [N][L], "maxvio_window": [N][L], "loss": [N],
                 "tokens_per_s": [N], "counts": [N][L][E]}}

MaxVio = max_e(load_e) / mean_e(load_e) - 1 (DeepSeek-V3): 0 is perfect balance, E - 1 is collapse.
matplotlib is an optional dependency (`pip install dsray[plot]`); it is imported only when rendering.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dsray.files import read_json_object, write_file_atomic

STATS_FILE = "dsray_router.json"
_REQUIRED = ("engine", "step", "moe_layers", "n_experts", "bias", "history")
_REQUIRED_HISTORY = ("step", "maxvio_batch", "counts")
_PER_STEP = ("maxvio_batch", "maxvio_window", "loss", "tokens_per_s", "counts")


def _resolve(path: Path) -> Path:
    """Run dir or checkpoint dir -> its stats file; a dir without one at the top uses the newest
    `*/dsray_router.json` below it (e.g. the latest checkpoint of a run dir)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"no such run dir, checkpoint dir or stats file: {str(path)!r}")
    direct = path / STATS_FILE
    if direct.is_file():
        return direct
    nested = [p for p in path.glob(f"*/{STATS_FILE}") if p.is_file()]
    if not nested:
        raise FileNotFoundError(f"{str(direct)!r} does not exist (nor */{STATS_FILE} under {str(path)!r})")
    return max(nested, key=lambda p: p.stat().st_mtime)


def load_stats(path: Path | str) -> dict[str, Any]:
    """Load and check a Router statistics file; errors name the file and the missing/bad key."""
    file = _resolve(Path(path))
    stats = read_json_object(file, "router statistics")
    for key in _REQUIRED:
        if key not in stats:
            raise ValueError(f"{str(file)!r}: missing key {key!r}")
    hist = stats["history"]
    if not isinstance(hist, dict):
        raise ValueError(f"{str(file)!r}: key 'history' must be an object, got {type(hist).__name__}")
    for key in _REQUIRED_HISTORY:
        if key not in hist:
            raise ValueError(f"{str(file)!r}: missing key 'history.{key}'")
    n_steps, n_layers, n_experts = len(hist["step"]), len(stats["moe_layers"]), stats["n_experts"]
    for key in _PER_STEP:
        if key in hist and len(hist[key]) != n_steps:
            raise ValueError(f"{str(file)!r}: 'history.{key}' has {len(hist[key])} entries, "
                             f"'history.step' has {n_steps}")
    if len(stats["bias"]) != n_layers or any(len(b) != n_experts for b in stats["bias"]):
        raise ValueError(f"{str(file)!r}: key 'bias' must be [{n_layers} moe layers][{n_experts} experts]")
    for i, c in enumerate(hist["counts"]):
        if len(c) != n_layers or any(len(row) != n_experts for row in c):
            raise ValueError(f"{str(file)!r}: 'history.counts[{i}]' must be "
                             f"[{n_layers} moe layers][{n_experts} experts]")
    return stats


def _per_layer_series(rows: list[list[float] | None], n_layers: int) -> list[list[float]]:
    """[N][L] (None rows allowed) -> [L][N] with NaN for missing values."""
    return [[(r[l] if r is not None and r[l] is not None else math.nan) for r in rows] for l in range(n_layers)]


def render_report(stats: dict[str, Any], out: Path | str, last_n: int | None = None) -> Path:
    """Write one PNG: (a) expert load heatmap, (b) MaxVio_batch per layer, (c) loss, (d) final bias.

    `last_n` limits the load heatmap to the last N recorded steps (default: the whole run).
    The file is written to a temp file next to `out` and renamed, so a watcher never sees half a PNG.
    """
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import FuncFormatter
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg via savefig

    out = Path(out)
    hist = stats["history"]
    layers: list[int] = list(stats["moe_layers"])
    L, E = len(layers), int(stats["n_experts"])
    steps = list(hist["step"])

    fig = Figure(figsize=(15, 10), dpi=100, layout="constrained")
    ax_load, ax_vio, ax_loss, ax_bias = fig.subplots(2, 2).flatten()
    fig.suptitle(f"dsray {stats['engine']}  ·  step {stats['step']}  ·  {L} MoE layers × {E} experts"
                 + (f"  ·  γ={stats['gamma']:g}" if stats.get("gamma") is not None else ""), fontsize=14)
    ylabels = [str(l) for l in layers]
    tick_every = max(1, math.ceil(L / 24))  # at most ~24 layer labels, however deep the model

    def layer_ticks(ax) -> None:
        ax.set_yticks(range(0, L, tick_every), ylabels[::tick_every])
        ax.set_ylabel("MoE layer")
        ax.set_xlabel("expert")

    # (a) load: tokens per expert summed over (the last N) steps, relative to the layer's mean
    counts = hist["counts"][-last_n:] if last_n else hist["counts"]
    if counts and L and E:
        total_LE = np.asarray(counts, dtype=np.float64).sum(axis=0)
        mean_L1 = np.maximum(total_LE.mean(axis=1, keepdims=True), 1e-12)
        rel_LE = total_LE / mean_L1
        vmax = max(2.0, float(rel_LE.max()))
        im = ax_load.imshow(rel_LE, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, vmax),
                            interpolation="nearest")
        fig.colorbar(im, ax=ax_load, label="tokens / layer mean  (1 = balanced)")
        if L * E <= 128:  # numbers only where they fit
            for l in range(L):
                for e in range(E):
                    dark = abs(rel_LE[l, e] - 1.0) > 0.6  # far from balanced = saturated colour
                    ax_load.text(e, l, f"{int(total_LE[l, e])}", ha="center", va="center", fontsize=7,
                                 color="white" if dark else "black")
        span = f"steps {steps[-len(counts)]}–{steps[-1]}" if steps else ""
        ax_load.set_title(f"(a) expert load, {int(total_LE.sum(axis=1).mean()):,} tokens/layer over {span}")
        layer_ticks(ax_load)
    else:
        _empty(ax_load, "(a) expert load", "no counts recorded")

    # (b) MaxVio_batch per layer over steps, log y (0 = perfect balance is clipped to the floor)
    vio = hist["maxvio_batch"]
    if steps and vio:
        floor = 1e-3
        series = _per_layer_series(vio, L)
        arr = np.clip(np.asarray(series, dtype=np.float64), floor, None)
        if L <= 8:
            for l in range(L):
                ax_vio.plot(steps, arr[l], lw=1.4, label=f"layer {layers[l]}")
        else:  # deep model: thin line per layer, bold summary lines
            for l in range(L):
                ax_vio.plot(steps, arr[l], lw=0.6, color="0.75")
            ax_vio.plot(steps, np.nanmax(arr, axis=0), lw=1.8, color="C3", label="max over layers")
            ax_vio.plot(steps, np.nanmean(arr, axis=0), lw=1.8, color="C0", label="mean over layers")
        if hist.get("maxvio_window"):
            win = np.clip(np.asarray(_per_layer_series(hist["maxvio_window"], L), dtype=np.float64), floor, None)
            if not np.all(np.isnan(win)):
                ax_vio.plot(steps, np.nanmean(win, axis=0), lw=1.8, ls="--", color="k", label="window, mean")
        ax_vio.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 2, 10 instead of 5×10⁻¹
        ax_vio.yaxis.set_major_formatter(plain)
        ax_vio.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax_vio.set_xlabel("step")
        ax_vio.set_ylabel("MaxVio (max/mean − 1)")
        ax_vio.set_title("(b) MaxVio per batch")
        ax_vio.grid(True, which="both", alpha=0.3)
        ax_vio.legend(fontsize=8, loc="upper right")
    else:
        _empty(ax_vio, "(b) MaxVio per batch", "no steps recorded")

    # (c) loss (and throughput on a twin axis) when the run recorded them
    loss = [math.nan if v is None else v for v in hist.get("loss") or []]
    tps = [math.nan if v is None else v for v in hist.get("tokens_per_s") or []]
    has_loss = any(not math.isnan(v) for v in loss)
    has_tps = any(not math.isnan(v) for v in tps)
    if has_loss or has_tps:
        ax_loss.set_title("(c) loss" + (" and throughput" if has_tps else ""))
        ax_loss.set_xlabel("step")
        if has_loss:
            ax_loss.plot(steps, loss, color="C0", lw=1.4, marker="." if len(steps) < 50 else None, label="loss")
            ax_loss.set_ylabel("loss", color="C0")
            ax_loss.grid(True, alpha=0.3)
        if has_tps:
            ax_t = ax_loss.twinx() if has_loss else ax_loss
            ax_t.plot(steps, tps, color="C2", lw=1.0, alpha=0.8, label="tokens/s")
            ax_t.set_ylabel("tokens/s", color="C2")
    else:
        _empty(ax_loss, "(c) loss", "no loss recorded (inference run)")

    # (d) final bias per expert: only selects experts; positive = pushed up because under-loaded
    bias = np.asarray(stats["bias"], dtype=np.float64).reshape(L, E)
    if bias.size:
        lim = max(float(np.abs(bias).max()), 1e-12)
        im = ax_bias.imshow(bias, aspect="auto", cmap="PuOr_r", vmin=-lim, vmax=lim, interpolation="nearest")
        fig.colorbar(im, ax=ax_bias, label="e_score_correction_bias")
        ax_bias.set_title(f"(d) final expert bias, range [{bias.min():+.3g}, {bias.max():+.3g}]")
        layer_ticks(ax_bias)
    else:
        _empty(ax_bias, "(d) final expert bias", "no MoE layers")

    return write_file_atomic(out, lambda f: fig.savefig(f, format="png"))


def _empty(ax, title: str, note: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
