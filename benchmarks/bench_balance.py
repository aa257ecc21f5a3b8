"""Bias-update rules side by side in real training: MaxVio over the Router's window and on held-out text,
train and validation loss, for several batch sizes (dsray/runtime/balance.py, docs/balance.md).

    python benchmarks/bench_balance.py                  # CPU, debug preset, 400 steps, ~15 min on 2 cores
    python benchmarks/bench_balance.py --jobs 15        # the same on 16 cores, ~3 min
    python benchmarks/bench_balance.py --sweep --jobs 15  # plus the gamma / lr / alpha grid of docs/balance.md

Each run trains the debug preset in one process exactly as an Engine rank does (the runtime tests pin
the Engine to one process): AdamW (betas 0.9/0.95, wd 0.1), global grad-norm clip 1.0, MTP weight 0.3,
bundled corpus, seq 64; after every step the rule turns the step's counts into the next step's bias.
Measured, per run:
- window MaxVio: counts of the last 50 steps summed, as the Router reports it (max over MoE layers);
- held-out MaxVio: counts of one no-grad pass (main layers and MTP) over fixed windows of the val split
  with the current bias, 32x64 and 256x64 tokens (max over layers); val loss on the 256x64 windows.
Writes results/bench_balance-<machine>-<date>.json and results/bench_balance.png.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time
from typing import Any

import _common as C  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch

from dsray.config import preset
from dsray.data import TextBatches, default_corpus_path
from dsray.model import Transformer
from dsray.runtime.balance import DEFAULT_GAMMA, DEFAULT_RULE, BiasUpdater
from dsray.runtime.router import maxvio

WINDOW, EVAL_EVERY = 50, 25
OLD = {"label": "sign 1e-3 (old default)", "rule": "sign", "gamma": 1e-3}
NEW = {"label": f"{DEFAULT_RULE} {DEFAULT_GAMMA:g} (new default)", "rule": DEFAULT_RULE, "gamma": DEFAULT_GAMMA}
OFF = {"label": "off (gamma=0)", "rule": "sign", "gamma": 0.0}
# Alternatives shown in the default run; --sweep adds the grid that picked the default.
ALTERNATIVES = [
    {"label": "sign 1e-2", "rule": "sign", "gamma": 1e-2},
    {"label": "sign 1.5e-2", "rule": "sign", "gamma": 1.5e-2},
    {"label": "prop 1e-2", "rule": "prop", "gamma": 1e-2},
    {"label": "prop 1e-1", "rule": "prop", "gamma": 1e-1},
    {"label": "rprop 1e-3..3e-2", "rule": "rprop", "gamma": 1e-3},
    {**NEW, "label": NEW["label"].replace(" (new default)", " + alpha 1e-3"), "alpha": 1e-3},
]
# The grid (seed 0): batches 4 and 8 for the rules, the CLI's batch 8 for lr and lr schedules.
_SMALL, _CLI = {"batches": (4, 8)}, {"batches": (8,)}
SWEEP = ([{"label": f"sign {g:g}", "rule": "sign", "gamma": g, **_SMALL} for g in (3e-3, 5e-3, 2e-2, 3e-2)]
         + [{"label": "prop 5e-2", "rule": "prop", "gamma": 5e-2, **_SMALL},
            {"label": "rprop 1e-3..1e-2", "rule": "rprop", "gamma": 1e-3, "params": {"s_max": 1e-2}, **_SMALL}]
         + [{"label": f"off + alpha {a:g}", "rule": "sign", "gamma": 0.0, "alpha": a, **_SMALL} for a in (1e-2, 1e-1)]
         + [{**NEW, "label": NEW["label"].replace(" (new default)", " + alpha 1e-2"), "alpha": 1e-2, **_SMALL}]
         # lr 1e-3: does the best gamma scale with lr?
         + [{"label": f"lr 1e-3, {r} {g:g}", "rule": r, "gamma": g, "lr": 1e-3, **_CLI}
            for r, g in (("prop", 1e-2), ("prop", 3e-2), ("sign", 1e-3), ("sign", 1e-2))]
         + [{"label": "lr 1e-3, off", "rule": "sign", "gamma": 0.0, "lr": 1e-3, **_CLI}]
         # lr schedules (cosine 3e-3 -> 3e-4; wsd: constant, then linear to 0 over the last 20%): the gate
         # slows down at the end; gamma fixed or following lr
         + [{"label": f"{sc} lr, {NEW['rule']} {NEW['gamma']:g}" + (" x lr/lr0" if f else ""), "rule": NEW["rule"],
             "gamma": NEW["gamma"], "sched": sc, "gamma_follows_lr": f, **_CLI}
            for sc in ("cos", "wsd") for f in (0, 1)]
         + [{"label": f"{sc} lr, off", "rule": "sign", "gamma": 0.0, "sched": sc, **_CLI} for sc in ("cos", "wsd")])


def lr_at(spec: dict[str, Any], t: int) -> float:
    lr0, steps, sched = spec.get("lr", 3e-3), spec["steps"], spec.get("sched")
    if sched == "cos":
        return lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / steps)))
    if sched == "wsd":
        return lr0 * min(1.0, (steps - t) / (0.2 * steps))
    assert sched is None, sched
    return lr0


def _held_out(seq: int) -> dict[str, torch.Tensor]:
    path = default_corpus_path()
    return {n: TextBatches(path, seq, n, seed=0, split="val").val_batch() for n in (32, 256)}


def _set_bias(mods, bias_LE: np.ndarray) -> None:
    with torch.no_grad():
        for m, b in zip(mods, bias_LE):
            m.gate.e_score_correction_bias.copy_(torch.as_tensor(b, dtype=torch.float32))


def floors(model: Transformer, opt: torch.optim.Optimizer, data: TextBatches, bias: np.ndarray, set_bias_to,
           seq: int, alpha: float) -> dict[str, Any]:
    """How low held-out MaxVio can go at the end of a run, whatever the rule: fit the bias to the held-out
    text itself (frozen model, shrinking sign steps) on the even 64-token chunks of the val split, then
    measure on the odd chunks (disjoint text): `sampling_256` at 256x64 tokens, `sampling_32` on 32x64
    subsets, and `lag_1step` after one more optimizer step, i.e. the best any rule fed by the last
    step's counts could do. Leaves the model one step further on."""
    val = data.val_tokens[: len(data.val_tokens) // seq * seq].view(-1, seq)
    fit_ids, test_ids = val[0::2][:256], val[1::2][:256]

    def mv(ids: torch.Tensor, b: np.ndarray) -> np.ndarray:
        set_bias_to(b)
        with torch.no_grad():
            return maxvio(model.loss(ids, mtp_weight=0.3)["counts"].numpy())

    model.eval()
    b = bias.astype(np.float64)
    for eta in [1e-2] * 40 + [3e-3] * 40 + [1e-3] * 40 + [3e-4] * 40:
        set_bias_to(b)
        with torch.no_grad():
            c = model.loss(fit_ids, mtp_weight=0.3)["counts"].numpy()
        b = b + eta * np.sign(c.mean(axis=1, keepdims=True) - c)
    out = {"fit_256": float(mv(fit_ids, b).max()), "sampling_256": float(mv(test_ids, b).max()),
           "sampling_32": [float(mv(test_ids[i:i + 32], b).max()) for i in range(0, len(test_ids) - 31, 32)],
           "rule_bias_256": float(mv(test_ids, bias).max())}
    model.train()
    set_bias_to(bias)
    loss = model.loss(data.next_batch(), mtp_weight=0.3, seq_aux_alpha=alpha)["total"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.eval()
    out["lag_1step"] = float(mv(test_ids, b).max())
    model.train()
    return out


def train_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run of the debug preset under one rule; returns its curves and final numbers."""
    torch.set_num_threads(1)
    B, S, steps, seed = spec["batch"], spec["seq"], spec["steps"], spec["seed"]
    lr0, alpha = spec.get("lr", 3e-3), spec.get("alpha", 0.0)
    cfg = preset("debug")
    model = Transformer.from_config(cfg, seed)
    mods = model.moe_modules()
    opt = torch.optim.AdamW(model.parameters(), lr=lr0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    data = TextBatches(default_corpus_path(), seq_len=S, batch_size=B, seed=seed)
    held = _held_out(S)
    upd = BiasUpdater(len(mods), cfg.n_routed_experts, spec["rule"], spec["gamma"], **spec.get("params", {}))
    bias = np.zeros((len(mods), cfg.n_routed_experts), np.float32)

    def set_bias() -> None:
        _set_bias(mods, bias)

    def evaluate() -> dict[str, Any]:
        out: dict[str, Any] = {}
        model.eval()
        for n, ids in held.items():
            with torch.no_grad():
                res = model.loss(ids, mtp_weight=0.3)
            loss, mv = res["loss"].item(), maxvio(res["counts"].numpy())
            out[f"maxvio_{n}"], out[f"maxvio_{n}_per_layer"] = float(mv.max()), mv.round(4).tolist()
            if n == 256:
                out["val_loss"] = loss
        model.train()
        return out

    window: list[np.ndarray] = []
    curves: dict[str, list] = {"loss": [], "maxvio_window": [], "maxvio_batch": [], "eval_step": [], "val_loss": [],
                               "maxvio_32": [], "maxvio_256": []}
    t0 = time.perf_counter()
    for t in range(steps):
        lr = lr_at(spec, t)
        for g in opt.param_groups:
            g["lr"] = lr
        set_bias()
        out = model.loss(data.next_batch(), mtp_weight=0.3, seq_aux_alpha=alpha)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        counts = out["counts"].numpy().astype(np.int64)  # [L, E] of this step (main layers, then MTP); host sync
        bias = upd.update(bias, counts, spec["gamma"] * lr / lr0 if spec.get("gamma_follows_lr") else None)
        window = (window + [counts])[-WINDOW:]
        curves["loss"].append(round(out["loss"].item(), 5))
        curves["maxvio_batch"].append(round(float(maxvio(counts).max()), 4))
        curves["maxvio_window"].append(round(float(maxvio(np.sum(window, axis=0)).max()), 4))
        if (t + 1) % EVAL_EVERY == 0 or t + 1 == steps:
            set_bias()
            ev = evaluate()
            curves["eval_step"].append(t + 1)
            for k in ("val_loss", "maxvio_32", "maxvio_256"):
                curves[k].append(round(ev[k], 5))
        if (t + 1) % 100 == 0 and B >= 32:
            print(f"  .. {spec['label']} B={B} seed={seed}: step {t + 1}/{steps}", flush=True)
    if spec.get("floors"):
        ev["floors"] = floors(model, opt, data, bias, set_bias_to=lambda b: _set_bias(mods, b), seq=S, alpha=alpha)
    last = [i for i, s in enumerate(curves["eval_step"]) if s > steps - 100]
    final = {"maxvio_window": curves["maxvio_window"][-1], **ev,
             # the last 100 steps' held-out numbers, averaged: one final eval is a noisy statistic
             "maxvio_256_last100": float(np.mean([curves["maxvio_256"][i] for i in last])),
             "maxvio_32_last100": float(np.mean([curves["maxvio_32"][i] for i in last])),
             "maxvio_window_last100": float(np.mean(curves["maxvio_window"][-100:])),
             "val_loss_last100": float(np.mean([curves["val_loss"][i] for i in last])),
             "train_loss_last50": float(np.mean(curves["loss"][-50:])), "bias_absmax": float(np.abs(bias).max()),
             "seconds": time.perf_counter() - t0}
    return {**spec, "final": final, "curves": curves, "updater_state_updates": upd.updates}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rule, batch): finals averaged over seeds, val loss vs the gamma=0 run of the same seeds."""
    def key(r):
        return (r["label"], r["batch"])

    off = {(r["batch"], r["seed"], r.get("lr", 3e-3), r.get("sched")): r["final"]["val_loss"]
           for r in runs if r["gamma"] == 0 and not r.get("alpha")}
    rows = []
    for lab, B in dict.fromkeys(key(r) for r in runs):
        rs = [r for r in runs if key(r) == (lab, B)]
        f = {k: float(np.mean([r["final"][k] for r in rs])) for k in
             ("maxvio_window", "maxvio_32", "maxvio_256", "maxvio_256_last100", "val_loss", "train_loss_last50")}
        deltas = [r["final"]["val_loss"] - off[k] for r in rs
                  if (k := (r["batch"], r["seed"], r.get("lr", 3e-3), r.get("sched"))) in off]
        rows.append({"label": lab, "batch": B, "seeds": len(rs), **f,
                     "dval_vs_off": float(np.mean(deltas)) if deltas else None})
    return rows


def plot(runs: list[dict[str, Any]], labels: list[str], batches: list[int], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("maxvio_window", "window MaxVio (50 steps)", True), ("maxvio_256", "held-out MaxVio (256x64)", True),
              ("loss", "train loss (50-step mean)", False), ("val_loss", "val loss (256x64)", False)]
    fig, axes = plt.subplots(len(batches), len(panels), figsize=(20, 4.2 * len(batches)), squeeze=False)
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    for row, B in zip(axes, batches):
        for ax, (k, title, log) in zip(row, panels):
            for lab in labels:
                rs = [r for r in runs if r["label"] == lab and r["batch"] == B and r["seed"] == 0]
                if not rs:
                    continue
                c = rs[0]["curves"]
                y = np.asarray(c[k], float)
                x = np.asarray(c["eval_step"]) if k in ("maxvio_256", "val_loss") else np.arange(1, len(y) + 1)
                if k == "loss":
                    w = min(50, len(y))
                    y = np.convolve(y, np.ones(w) / w, mode="valid")
                    x = x[w - 1:]
                bold = "default" in lab or "gamma=0" in lab
                ax.plot(x, y, color=colors[lab], lw=2.0 if bold else 0.9, alpha=1.0 if bold else 0.75, label=lab)
            if log:
                ax.set_yscale("log")
                ax.axhline(0.1 if k == "maxvio_window" else 0.05, color="k", lw=0.8, ls=":")
            ax.set_title(f"batch {B}: {title}", fontsize=10)
            ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("dsray bias-update rules, debug preset, seq 64, lr 3e-3 (seed 0; dotted: targets 0.1 / 0.05)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batches", default="4,8,64")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the old/new default and gamma=0 runs")
    ap.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each)")
    ap.add_argument("--sweep", action="store_true", help="also the gamma / lr / alpha grid (seed 0)")
    ap.add_argument("--out", help="results JSON path (default: results/bench_balance-<machine>-<date>.json)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [OFF, OLD, NEW] + ALTERNATIVES + (SWEEP if args.sweep else [])
    specs = []
    for v in variants:
        for B in batches:
            if B not in v.get("batches", batches):
                continue
            many = v in (OFF, OLD, NEW) or v["label"].endswith(", off")  # the baselines of the comparisons
            for s in (seeds if many else seeds[:1]):
                specs.append({**{k: x for k, x in v.items() if k != "batches"}, "batch": B, "seq": args.seq,
                              "steps": args.steps, "seed": s, "floors": v is NEW and s == seeds[0]})
    # longest first, so the pool does not end on one big run
    specs.sort(key=lambda s: -s["batch"])
    print(f"{len(specs)} runs of {args.steps} steps on {args.jobs} process(es)", flush=True)
    runs, t0 = [], time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs) as pool:
        for r in pool.imap_unordered(train_run, specs):
            runs.append(r)
            f = r["final"]
            print(f"[{len(runs):3d}/{len(specs)} {time.perf_counter() - t0:5.0f}s] {r['label']:34s} B={r['batch']:<3d} "
                  f"seed={r['seed']} window {f['maxvio_window']:.3f} held-out 32x64 {f['maxvio_32']:.3f} "
                  f"256x64 {f['maxvio_256']:.3f} val {f['val_loss']:.4f}", flush=True)
    rows = summarise(runs)
    order = {v["label"]: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: (r["batch"], order[r["label"]]))
    print(C.table(rows, [("label", "rule", "s"), ("batch", "B", "d"), ("seeds", "n", "d"),
                         ("maxvio_window", "window", ".3f"), ("maxvio_32", "held 32x64", ".3f"),
                         ("maxvio_256", "held 256x64", ".3f"), ("maxvio_256_last100", "held 256 last100", ".3f"),
                         ("val_loss", "val loss", ".4f"), ("dval_vs_off", "val - off", "+.4f")]))
    path = C.write_result("bench_balance", "cpu", {"steps": args.steps, "seq": args.seq, "window": WINDOW,
                                                   "summary": rows, "runs": runs}, args.out)
    png = path.parent / "bench_balance.png"
    plot(runs, [v["label"] for v in [OFF, OLD, NEW] + ALTERNATIVES], batches, png)
    print("wrote", png)


if __name__ == "__main__":
    main()
