"""GRPO on the sort task with and without rollout routing replay: reward curves and routing mismatch.

    python benchmarks/bench_rl.py                         # 2 seeds x (replay, no replay), ~4 min on 4 cores
    python benchmarks/bench_rl.py --seeds 0 1 2 --updates 2 4 --jobs 12

Every run: SFT warm-up of a fresh `debug` model (dsray.rl.task.warm_up, 300 steps), then `run_grpo` on
a `LocalPolicy` (one process, fp32 CPU, one torch thread), evaluated on 256 held-out prompts before,
every `--eval-every` steps and after. Runs of one seed start from identical weights (same warm-up
seed), so replay vs no replay differ only in the routing the updates use. `--updates` > 1 makes the
later updates of each rollout off-policy, where the routing has drifted. Writes
results/rl_grpo-<machine>-<date>.json and one PNG (results/rl_grpo_replay.png): reward per step
(held-out evaluations as markers), and the mismatch fraction the no-replay runs trained with.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import time

from _common import RESULTS, write_result

import torch


def one_run(args: tuple) -> dict:
    seed, replay, updates, a = args
    torch.set_num_threads(1)
    from dsray.rl import task
    from dsray.rl.loop import run_grpo
    from dsray.rl.policy import LocalPolicy

    t0 = time.perf_counter()
    model, _ = task.warm_up(a.warmup_steps, seed=seed)
    warm_s = time.perf_counter() - t0
    policy = LocalPolicy(model, lr=a.lr)
    h = run_grpo(policy, task, a.steps, a.group_size, a.prompts, temperature=1.0, replay=replay,
                 updates_per_rollout=updates, seed=seed, eval_every=a.eval_every, progress=False)
    return {"seed": seed, "replay": replay, "updates_per_rollout": updates, "warmup_s": warm_s,
            "grpo_s": h.seconds, **h.to_dict()}


def plot(runs: list[dict], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = sorted({r["updates_per_rollout"] for r in runs})
    fig, axes = plt.subplots(2, len(updates), figsize=(6 * len(updates), 7.5), squeeze=False, sharex=True)
    colors = {True: "#1565c0", False: "#ef6c00"}
    styles = dict(zip(sorted({r["seed"] for r in runs}), ["-", "--", ":", "-."] * 8))
    for j, u in enumerate(updates):
        ax, mx = axes[0][j], axes[1][j]
        for r in (r for r in runs if r["updates_per_rollout"] == u):
            label = f"{'replay' if r['replay'] else 'no replay'} seed {r['seed']}"
            steps = [s["step"] for s in r["steps"]]
            rew = torch.tensor([s["reward_mean"] for s in r["steps"]])
            k = 5  # running mean over 5 steps: each step's batch reward is noisy (16 prompts)
            smooth = [float(rew[max(0, i - k + 1):i + 1].mean()) for i in range(len(rew))]
            ax.plot(steps, smooth, color=colors[r["replay"]], alpha=0.8, label=label,
                    ls=styles[r["seed"]])
            ev = r["evals"]
            ax.plot([e[0] for e in ev], [e[1] for e in ev], "o", color=colors[r["replay"]], ms=4)
            mm = [100 * (s["mismatch_tokens_last"] or 0) for s in r["steps"]]
            mx.plot(steps, mm, color=colors[r["replay"]], alpha=0.8, label=label, ls=styles[r["seed"]])
        ax.set_title(f"{u} update(s) per rollout: batch reward (5-step mean),\nheld-out reward (dots)", fontsize=9)
        ax.set_ylabel("mean reward")
        ax.legend(fontsize=7)
        mx.set_title("routing mismatch vs the rollout, last update of each rollout\n(no replay: experts used; "
                     "replay: the gate's own choice)", fontsize=9)
        mx.set_ylabel("% trained tokens, >= 1 layer differs")
        mx.set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--updates", type=int, nargs="+", default=[2], help="updates per rollout (one panel each)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=4, help="runs in parallel (one torch thread each)")
    ap.add_argument("--png", default=str(RESULTS / "rl_grpo_replay.png"))
    a = ap.parse_args()
    jobs = [(s, r, u, a) for u, s, r in itertools.product(a.updates, a.seeds, (True, False))]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(min(a.jobs, len(jobs))) as pool:
        runs = pool.map(one_run, jobs)
    wall = time.perf_counter() - t0
    for r in runs:
        ev = r["evals"]
        mm = [s["mismatch_tokens_last"] for s in r["steps"] if s["mismatch_tokens_last"] is not None]
        print(f"updates {r['updates_per_rollout']}  seed {r['seed']}  replay {str(r['replay']):5s}  "
              f"reward {ev[0][1]:.3f} -> {ev[-1][1]:.3f}  GRPO {r['grpo_s']:.0f} s  warm-up {r['warmup_s']:.0f} s  "
              f"mismatch (last update) mean {100 * sum(mm) / max(len(mm), 1):.2f} %  max {100 * max(mm, default=0):.2f} %")
    plot(runs, a.png)
    print(f"wrote {a.png}")
    write_result("rl_grpo", "cpu", {"args": vars(a), "wall_s": wall, "runs": runs})


if __name__ == "__main__":
    main()
