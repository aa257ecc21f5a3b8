"""Auxiliary-loss-free balancing, side by side: the same Engine run with the Router's bias rule on
(gamma > 0) and off (gamma = 0), MaxVio per batch and over the Router's window, per step.

    python benchmarks/bench_balance.py            # CPU, debug preset, 1 driver + 2 shards, ~2 min

Two data sets: a fixed Zipf-skewed batch with lr = 0 (routing only: the bias is the only thing that
changes), and the bundled corpus with real training (lr 3e-3: the router's inputs drift as it learns).
Writes results/bench_balance-<machine>-<date>.json and results/bench_balance.png.
"""

from __future__ import annotations

import argparse
import time

import _common as C  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch

from dsray.data import TextBatches, default_corpus_path
from dsray.runtime import Engine


def zipf_batch(B: int, S: int, seed: int = 0) -> torch.Tensor:
    p = 1.0 / torch.arange(1, 257).float() ** 1.2
    return torch.multinomial(p, B * S, replacement=True, generator=torch.Generator().manual_seed(seed)).view(B, S)


def run(gamma: float, data: str, steps: int) -> dict:
    fixed = zipf_batch(8, 64)
    corpus = TextBatches(default_corpus_path(), seq_len=64, batch_size=8, seed=0)
    lr = 0.0 if data == "zipf-fixed" else 3e-3
    mv_b, mv_w, loss = [], [], []
    with Engine.from_config("debug", num_drivers=1, num_shards=2, gamma=gamma, lr=lr, metrics=False,
                            name=f"bal-{data}-{gamma}") as eng:
        for _ in range(steps):
            out = eng.train_step(fixed if data == "zipf-fixed" else corpus.next_batch())
            mv_b.append(float(np.max(out["maxvio_batch"])))
            mv_w.append(float(np.max(out["maxvio_window"])))
            loss.append(out["loss"])
    tail = mv_b[-max(1, steps // 5):]
    return {"gamma": gamma, "data": data, "lr": lr, "maxvio_batch": mv_b, "maxvio_window": mv_w, "loss": loss,
            "maxvio_batch_last20pct_mean": float(np.mean(tail)), "maxvio_batch_last20pct_max": float(np.max(tail)),
            "first_step_below_0.1": next((i + 1 for i, v in enumerate(mv_b) if v < 0.1), None)}


def plot(runs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = sorted({r["data"] for r in runs})
    fig, axes = plt.subplots(1, len(datas), figsize=(6.5 * len(datas), 4.2), squeeze=False)
    for ax, data in zip(axes[0], datas):
        for r in (r for r in runs if r["data"] == data):
            x = np.arange(1, len(r["maxvio_batch"]) + 1)
            line, = ax.plot(x, r["maxvio_batch"], lw=1.2, label=f"gamma={r['gamma']:g} batch")
            ax.plot(x, r["maxvio_window"], lw=1.0, ls="--", color=line.get_color(), label=f"gamma={r['gamma']:g} window")
        ax.axhline(0.1, color="k", lw=0.8, ls=":", label="0.1 (DESIGN target)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio (max over MoE layers)")
        ax.set_title(f"{data} (lr={next(r['lr'] for r in runs if r['data'] == data):g})")
        ax.legend(fontsize=8)
    fig.suptitle("dsray: aux-loss-free balancing, debug preset, 1 driver + 2 shards")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--gammas", default="0,0.001,0.01")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = []
    for data in ("zipf-fixed", "corpus-train"):
        for g in (float(x) for x in args.gammas.split(",")):
            t0 = time.perf_counter()
            r = run(g, data, args.steps)
            runs.append(r)
            print(f"{data:13s} gamma={g:<6g} MaxVio_batch last 20%: mean {r['maxvio_batch_last20pct_mean']:.3f} "
                  f"max {r['maxvio_batch_last20pct_max']:.3f}; first < 0.1 at step {r['first_step_below_0.1']}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    path = C.write_result("bench_balance", "cpu", {"steps": args.steps, "runs": runs})
    png = path.parent / "bench_balance.png"
    plot(runs, png)
    print("wrote", path, "and", png)


if __name__ == "__main__":
    main()
