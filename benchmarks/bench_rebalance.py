"""Expert placement side by side: migration-aware rebalancing vs DeepSeek-style EPLB from scratch on a
skewed, drifting load trace, and the group-aligned placement's fan-out under V3's group-limited routing.

    python benchmarks/bench_rebalance.py           # CPU only, ~20 s

Part 1 (rebalance): per-expert loads per step are Zipf(s) over a popularity order that drifts (each
expert's latent score random-walks), with Poisson noise; every `--every` steps each policy rebalances
from its own current placement using the last window's summed load, with `--extra` replica slots.
Policies: `static` (the initial linear table, never changed), `homes-kept` (`rebalanced` default:
homes stay, replicas follow the hot experts), `eplb-scratch` (`Placement.eplb`, ignores where experts
are), `migration-aware tol=X` (`rebalanced(..., tolerance=X)`). Balance = max / mean rank load, on the
window it was computed from (in-sample) and per step over the next window (out-of-sample, what the
next steps see). Bytes moved: slots a rank gains x one V3 expert (3 x 7168 x 2048 bf16 = 84 MiB per
MoE layer), x3 when training (AdamW's two moments), x58 MoE layers when one table serves all layers
(as `Engine.rebalance` does).

Part 2 (fan-out): the real `Gate` (V3 shape: 256 experts, 8 groups keep 4, top-8; random weights,
bias and inputs; hidden 256, which does not change what can be routed) on T tokens; distinct
destination ranks and nodes per token (`Placement.destinations`, the dispatcher's replica rule) and
the worst case (`Placement.max_fanout`), for linear, round-robin and grouped tables on several
cluster shapes, nodes in blocks or interleaved (rank r on node r % N).

Writes results/bench_rebalance-<machine>-<date>.json and results/bench_rebalance.png.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import _common as C  # noqa: F401  (puts the repo root on sys.path)
import torch

from dsray.config import preset
from dsray.model.moe import Gate
from dsray.parallel.placement import Placement, moved_slots

V3_EXPERT_BYTES = 3 * 7168 * 2048 * 2  # gate/up/down, bf16
V3_MOE_LAYERS = 61 - 3


def load_trace(E: int, steps: int, tokens: int, top_k: int, zipf: float, sigma: float, seed: int) -> torch.Tensor:
    """float64 [steps, E]: assignments per expert per step (tokens x top_k in all)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(E, generator=g, dtype=torch.float64)
    zipf_p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** zipf
    zipf_p /= zipf_p.sum()
    out = torch.empty(steps, E, dtype=torch.float64)
    for t in range(steps):
        u += sigma * torch.randn(E, generator=g, dtype=torch.float64)
        popularity = torch.argsort(torch.argsort(-u))  # 0 = hottest
        out[t] = torch.poisson(zipf_p[popularity] * tokens * top_k, generator=g)
    return out


def share_matrix(p: Placement) -> torch.Tensor:
    """float64 [W, E]: rank r's share of expert e's load (1 / n_replicas where hosted), so that
    rank loads = share @ load."""
    A = torch.zeros(p.world_size, p.n_experts, dtype=torch.float64)
    n_rep = p.n_replicas.double()
    for r, experts in enumerate(p.slots):
        for e in experts:
            A[r, e] = 1.0 / n_rep[e]
    return A


def run_rebalance(trace: torch.Tensor, S: int, extra: int, every: int, tolerances: list[float]) -> list[dict]:
    E, steps = trace.shape[1], trace.shape[0]
    ranks = list(range(S))
    start = Placement.linear(E, ranks, S)
    policies: dict[str, object] = {"static": None, "homes-kept": None, "eplb-scratch": None}
    for tol in tolerances:
        policies[f"migration-aware tol={tol:g}"] = tol
    runs = []
    for name, tol in policies.items():
        p, rows, t_alg = start, [], 0.0
        for t0 in range(every, steps - every + 1, every):
            window = trace[t0 - every:t0].sum(0).tolist()
            tic = time.perf_counter()
            if name == "static":
                new = p
            elif name == "homes-kept":
                new = p.rebalanced(window, extra)
            elif name == "eplb-scratch":
                new = Placement.eplb(window, E, ranks, S, extra)
            else:
                new = p.rebalanced(window, extra, tolerance=tol)
            t_alg += time.perf_counter() - tic
            rl = new.rank_loads(window)
            nxt = share_matrix(new) @ trace[t0:t0 + every].T  # [S, every]: rank loads per next step
            rows.append({
                "step": t0, "moved_slots": moved_slots(p, new),
                # any table with the new replica counts moves at least the replicas it adds
                "lower_bound_slots": int((new.n_replicas - p.n_replicas).clamp_min(0).sum()),
                "in_sample_max_over_mean": max(rl) / (sum(rl) / S),
                "next_window_max_over_mean": float((nxt.max(0).values / nxt.mean(0)).mean()),
                "experts_per_rank": new.experts_per_rank(),
            })
            p = new
        moved = [r["moved_slots"] for r in rows]
        runs.append({
            "policy": name, "tolerance": tol, "rebalances": rows,
            "mean_in_sample": sum(r["in_sample_max_over_mean"] for r in rows) / len(rows),
            "worst_in_sample": max(r["in_sample_max_over_mean"] for r in rows),
            "mean_next_window": sum(r["next_window_max_over_mean"] for r in rows) / len(rows),
            "moved_slots_total": sum(moved), "moved_slots_mean": sum(moved) / len(moved),
            "lower_bound_slots_mean": sum(r["lower_bound_slots"] for r in rows) / len(rows),
            "moved_slots_mean_after_first": sum(moved[1:]) / max(1, len(moved) - 1),
            "gib_per_rebalance_layer_weights": sum(moved) / len(moved) * V3_EXPERT_BYTES / 2**30,
            "gib_per_rebalance_model_training": sum(moved) / len(moved) * V3_EXPERT_BYTES * 3 * V3_MOE_LAYERS / 2**30,
            "algorithm_ms_per_rebalance": 1e3 * t_alg / len(rows),
        })
        r = runs[-1]
        print(f"  {name:28s} in-sample max/mean {r['mean_in_sample']:.3f} (worst {r['worst_in_sample']:.3f}), "
              f"next window {r['mean_next_window']:.3f}, moved {r['moved_slots_mean']:.1f} slots/rebalance "
              f"({r['algorithm_ms_per_rebalance']:.0f} ms each)", flush=True)
    return runs


def run_fanout(T: int, seed: int) -> list[dict]:
    cfg = replace(preset("v3-671b"), hidden_size=256)
    E, G, TG, K = cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
    torch.manual_seed(seed)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias.normal_(std=0.05)
    with torch.no_grad():
        _, ids_TK = gate(torch.randn(T, cfg.hidden_size))
    zipf_load = (1.0 / torch.arange(1, E + 1, dtype=torch.float64)[torch.randperm(E)] ** 1.1).tolist()
    rows = []
    for S, N, interleaved in [(8, 1, False), (12, 1, False), (16, 2, False), (32, 4, False), (24, 3, False),
                              (64, 8, False), (64, 8, True), (128, 16, False)]:
        nodes = [f"n{(r % N) if interleaved else r // (S // N)}" for r in range(S)]
        grouped = Placement.grouped(E, G, range(S), S, nodes)
        tables = {"linear": Placement.linear(E, range(S), S), "round_robin": Placement.round_robin(E, range(S), S),
                  "grouped": grouped,
                  "grouped + 32 replicas (tol 0.02)": grouped.rebalanced(zipf_load, 32, tolerance=0.02)}
        for name, p in tables.items():
            d_r = p.destinations(ids_TK, 0).double()
            d_n = p.destinations(ids_TK, 0, node_of_rank=nodes).double()
            rows.append({
                "shards": S, "nodes": N, "node_layout": "interleaved" if interleaved else "blocks", "placement": name,
                "experts_per_shard_min": min(p.experts_per_rank()), "experts_per_shard_max": max(p.experts_per_rank()),
                "max_fanout_ranks": p.max_fanout(G, TG, K), "max_fanout_nodes": p.max_fanout(G, TG, K, nodes),
                "mean_ranks": float(d_r.mean()), "max_ranks": int(d_r.max()),
                "mean_nodes": float(d_n.mean()), "max_nodes": int(d_n.max()),
            })
        print(f"  {S:3d} shards on {N:2d} nodes ({'interleaved' if interleaved else 'blocks'}): mean ranks / nodes per "
              f"token " + ", ".join(f"{r['placement'].split(' ')[0]} {r['mean_ranks']:.2f}/{r['mean_nodes']:.2f}"
                                    for r in rows[-len(tables):]), flush=True)
    return rows


def plot(reb: list[dict], fan: list[dict], cfg: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(24, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, r in enumerate(reb):
        steps = [x["step"] for x in r["rebalances"]]
        style = dict(marker=".", lw=1.2, color=colors[k % len(colors)], label=r["policy"],
                     ls="--" if r["policy"] == "static" else "-")
        axes[0].plot(steps, [x["next_window_max_over_mean"] for x in r["rebalances"]], **style)
        if r["policy"] != "static":
            axes[1].plot(steps, [max(x["moved_slots"], 0.5) * V3_EXPERT_BYTES / 2**30 for x in r["rebalances"]], **style)
    axes[0].set(xlabel="step", ylabel="max / mean rank load over the next window (per step)",
                title=f"balance: {cfg['experts']} experts, {cfg['shards']} shards, +{cfg['extra']} slots, "
                      f"every {cfg['every']} steps")
    axes[1].set(xlabel="step", ylabel="GiB moved per rebalance (one MoE layer, bf16 weights)", yscale="log",
                title="bytes moved (V3 expert 84 MiB; x3 training, x58 layers)")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    shapes = [(r["shards"], r["nodes"], r["node_layout"]) for r in fan if r["placement"] == "linear"]
    width = 0.27
    for ax, unit, bound in ((axes[2], "ranks", None), (axes[3], "nodes", 4)):
        for j, name in enumerate(["linear", "round_robin", "grouped"]):
            ys = [next(r for r in fan if (r["shards"], r["nodes"], r["node_layout"]) == sh and r["placement"] == name)
                  for sh in shapes]
            xs = [i + (j - 1) * width for i in range(len(shapes))]
            ax.bar(xs, [y[f"mean_{unit}"] for y in ys], width, color=colors[j], label=f"{name}: mean")
            ax.scatter(xs, [y[f"max_fanout_{unit}"] for y in ys], marker="_", s=120, color="k", zorder=3,
                       label="worst case (max_fanout)" if j == 0 else None)
        if bound:
            ax.axhline(bound, color="r", lw=0.8, ls=":", label="topk_group = 4")
        ax.set_xticks(range(len(shapes)), [f"{a}/{b}{'i' if c == 'interleaved' else ''}" for a, b, c in shapes],
                      fontsize=8)
        ax.set(xlabel="shards / nodes (i: ranks interleaved over nodes)", ylabel=f"distinct {unit} per token",
               title=f"V3 routing (8 groups keep 4, top-8): {unit} per token")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--extra", type=int, default=32, help="replica slots beyond one per expert")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="rebalance every N steps (window = N steps)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (x top-8 assignments)")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--sigma", type=float, default=0.05, help="per-step random-walk std of each expert's score")
    ap.add_argument("--tolerances", default="0,0.02,0.05,0.1")
    ap.add_argument("--fanout-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    tols = [float(x) for x in args.tolerances.split(",")]

    print(f"rebalance: {args.experts} experts, {args.shards} shards, +{args.extra} slots, every {args.every} of "
          f"{args.steps} steps, Zipf {args.zipf}, drift sigma {args.sigma}", flush=True)
    trace = load_trace(args.experts, args.steps, args.tokens, 8, args.zipf, args.sigma, args.seed)
    reb = run_rebalance(trace, args.shards, args.extra, args.every, tols)
    print("fan-out: V3 routing through the real Gate", flush=True)
    fan = run_fanout(args.fanout_tokens, args.seed)

    scratch = next(r for r in reb if r["policy"] == "eplb-scratch")
    for r in reb:
        r["balance_vs_eplb_in_sample"] = r["mean_in_sample"] / scratch["mean_in_sample"]
        r["moved_vs_eplb"] = r["moved_slots_total"] / max(1, scratch["moved_slots_total"])
    print()
    print(C.table(reb, [("policy", "policy", "s"), ("mean_in_sample", "max/mean in-sample", ".3f"),
                        ("worst_in_sample", "worst", ".3f"), ("mean_next_window", "max/mean next window", ".3f"),
                        ("moved_slots_mean", "slots moved / rebalance", ".1f"),
                        ("moved_slots_mean_after_first", "after the 1st", ".1f"),
                        ("lower_bound_slots_mean", "lower bound", ".1f"),
                        ("moved_vs_eplb", "x eplb bytes", ".3f"),
                        ("gib_per_rebalance_layer_weights", "GiB/layer (weights)", ".2f"),
                        ("gib_per_rebalance_model_training", "GiB model, training", ".0f"),
                        ("algorithm_ms_per_rebalance", "ms", ".0f")]))
    print()
    print(C.table(fan, [("shards", "shards", "d"), ("nodes", "nodes", "d"), ("node_layout", "ranks", "s"),
                        ("placement", "placement", "s"), ("experts_per_shard_min", "exp/shard min", "d"),
                        ("experts_per_shard_max", "max", "d"), ("mean_ranks", "ranks/token mean", ".2f"),
                        ("max_ranks", "max", "d"), ("max_fanout_ranks", "worst case", "d"),
                        ("mean_nodes", "nodes/token mean", ".2f"), ("max_nodes", "max", "d"),
                        ("max_fanout_nodes", "worst case", "d")]))
    config = {k: getattr(args, k) for k in ("experts", "shards", "extra", "steps", "every", "tokens", "zipf", "sigma",
                                             "fanout_tokens", "seed")}
    config.update(tolerances=tols, v3_expert_bytes=V3_EXPERT_BYTES, v3_moe_layers=V3_MOE_LAYERS)
    path = C.write_result("bench_rebalance", "cpu", {"config": config, "rebalance": reb, "fanout": fan,
                                                     "wall_s": time.perf_counter() - t_start})
    png = path.parent / "bench_rebalance.png"
    plot(reb, fan, config, png)
    print(f"wrote {png} ({time.perf_counter() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
