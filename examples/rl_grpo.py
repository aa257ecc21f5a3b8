"""GRPO with rollout routing replay on the toy sort task, in one process (LocalPolicy) or on the Ray Engine.

Run:  python examples/rl_grpo.py             # LocalPolicy, ~2 min on one CPU core
      python examples/rl_grpo.py --engine   # the same on Engine(1 driver + 2 expert shards)
      python examples/rl_grpo.py --no-replay  # train on the live routing instead of the rollout's

A debug-preset model is warmed up on solved examples (supervised), then GRPO samples 8 answers to each
of 16 prompts per step, rewards exact answers, and updates twice per rollout. Prints the held-out
reward before and after, and the routing mismatch the updates saw.
"""

import argparse
import time

import torch

from dsray.config import preset
from dsray.rl import task
from dsray.rl.loop import evaluate, run_grpo
from dsray.rl.policy import LocalPolicy

ap = argparse.ArgumentParser()
ap.add_argument("--engine", action="store_true", help="run on the Ray Engine instead of one process")
ap.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True)
ap.add_argument("--warmup-steps", type=int, default=300)
ap.add_argument("--steps", type=int, default=60)
a = ap.parse_args()
torch.set_num_threads(1)

if a.engine:
    from dsray.runtime import Engine

    policy = Engine.from_config(preset("debug"), seed=0, num_drivers=1, num_shards=2, lr=3e-3, metrics=False)
else:
    from dsray.model import Transformer

    policy = LocalPolicy(Transformer.from_config(preset("debug"), seed=0), lr=3e-3)

with policy:
    t0 = time.perf_counter()
    for i in range(a.warmup_steps):  # supervised warm-up: reward ~0.45 after 300 steps
        policy.train_step(task.sft_batch(128, i + 1))
    before = evaluate(policy, task)
    print(f"warm-up {a.warmup_steps} steps ({time.perf_counter() - t0:.0f} s): reward {before:.3f}")
    h = run_grpo(policy, task, a.steps, group_size=8, prompts_per_step=16, replay=a.replay, lr=1e-4)
    after = evaluate(policy, task)
    mm = [s["mismatch_tokens"] for s in h.steps]
    print(f"GRPO {a.steps} steps ({h.seconds:.0f} s, replay {a.replay}): reward {before:.3f} -> {after:.3f}, "
          f"tokens whose experts differ from the rollout's: {100 * sum(mm) / len(mm):.1f} %")
