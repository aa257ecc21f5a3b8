"""Bar charts from benchmark result JSONs -> benchmarks/results/*.png.

    python benchmarks/plot.py                          # newest bench_moe / bench_forward result per machine
    python benchmarks/plot.py results/a.json b.json    # these files
    python benchmarks/plot.py --out benchmarks/results/moe.png

bench_moe: one panel per result file, TFLOP/s per implementation grouped by shape, the grouped-GEMM ceiling
drawn as a line. bench_forward: tokens/s per configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["hf_eager", "hf_grouped_mm", "dsray_loop", "dsray_grouped", "gmm_fused_gu", "gmm_ceiling", "gmm_only"]
COLORS = {"hf_eager": "#9e9e9e", "hf_grouped_mm": "#616161", "dsray_loop": "#90caf9", "dsray_grouped": "#1565c0",
          "gmm_ceiling": "#ef6c00", "gmm_only": "#ffb74d", "gmm_fused_gu": "#ffe0b2"}


def latest(kind: str) -> list[Path]:
    """Newest file of `kind` per machine tag (file names: <kind>-<machine>-<date>.json)."""
    best: dict[str, Path] = {}
    for p in sorted(RESULTS.glob(f"{kind}-*.json")):
        machine = p.stem[len(kind) + 1:].rsplit("-", 2)[0]
        best[machine] = p  # sorted by name: the date suffix sorts chronologically
    return list(best.values())


def _machine(doc: dict) -> str:
    m = doc.get("machine", {})
    dev = m.get("gpu") or f"{m.get('cpu', 'CPU')}, {m.get('cpu_cores')} cores"
    return f"{dev}, torch {m.get('torch')}, {doc.get('date', '')[:10]}"


def plot_moe(docs: list[tuple[Path, dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(docs), figsize=(6.5 * len(docs), 5.6), squeeze=False)
    for ax, (path, doc) in zip(axes[0], docs):
        shapes = doc["results"]
        impls = [i for i in ORDER if any(r["impl"] == i for s in shapes for r in s["rows"])]
        width = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for k, s in enumerate(shapes):
                r = next((r for r in s["rows"] if r["impl"] == impl), None)
                if r:
                    xs.append(k + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r["tflops"])
            bars = ax.bar(xs, ys, width, label=impl, color=COLORS.get(impl))
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.2f}", (b.get_x() + b.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2),
                            textcoords="offset points")
        for k, s in enumerate(shapes):
            c = next((r for r in s["rows"] if r["impl"] == "gmm_ceiling"), None)
            if c:
                ax.hlines(0.8 * c["tflops"], k - 0.45, k + 0.45, colors="#ef6c00", linestyles=":", linewidth=1)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{s['shape']}\nT={s['tokens']} D={s['hidden']} I={s['inter']}\nE={s['experts']} "
                            f"top-{s['topk']} {s['dtype']}" for s in shapes], fontsize=8)
        ax.set_ylabel("TFLOP/s (routed + shared; gmm_*: routed only)")
        ax.set_title(f"MoE layer forward\n{_machine(doc)}", fontsize=9)
        ax.margins(y=0.12)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
    fig.text(0.01, 0.01, "dotted: 0.8 x gmm_ceiling (DESIGN.md target)", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def plot_forward(docs: list[tuple[Path, dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for path, doc in docs:
        if "cpu" in doc:
            for run in doc["cpu"]["runs"]:
                panels.append((f"CPU debug preset fp32, {run['batch']}x{run['seq']}\n{_machine(doc)}", run["rows"]))
        if "gpu" in doc:
            g = doc["gpu"]
            panels.append((f"GPU mid config bf16, {g['batch']}x{g['seq']}\n{_machine(doc)}", g["rows"]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        labels = [r["impl"].replace(" (", "\n(") for r in rows]
        ys = [r["tokens_per_s"] for r in rows]
        colors = ["#1565c0" if r["impl"].startswith("engine") else "#616161" for r in rows]
        bars = ax.bar(range(len(rows)), ys, color=colors)
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:,.0f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("tokens/s")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG path (only with files of one benchmark kind)")
    args = ap.parse_args(argv)
    files = args.files or latest("bench_moe") + latest("bench_forward")
    groups: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for f in files:
        doc = json.loads(f.read_text())
        groups[doc["benchmark"]].append((f, doc))
    if not groups:
        print(f"no result files in {RESULTS}", file=sys.stderr)
        return 1
    for kind, docs in groups.items():
        docs.sort(key=lambda d: (d[1]["machine"].get("gpu") is not None, d[1].get("date", "")))
        out = args.out if args.out and len(groups) == 1 else RESULTS / f"{kind}.png"
        (plot_moe if kind == "bench_moe" else plot_forward)(docs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
