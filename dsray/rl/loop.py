"""The GRPO loop, for any policy with the Engine's RL contract (`Engine` or `LocalPolicy`).

One step: sample `group_size` answers to each of `prompts_per_step` prompts (routing and log-probs
recorded), reward them, group-normalise the rewards into advantages, pack the ragged rows into one
right-padded batch, then `updates_per_rollout` full-batch `grpo_step`s on it. The first update is on
the rollout's own weights; later ones are off-policy, which is where the clip (and, for an MoE,
routing replay) matters: without replay the routing of the updated model drifts from the rollout's,
and `mismatch_tokens` says by how much.

A task is anything with `prompt_batch(n, seed, group_size) -> (texts, ids)`, `batch_rewards(texts,
rows) -> [B]`, `MAX_NEW_TOKENS`, `EOS_ID`, `PAD_ID` (dsray.rl.task, the module, is one).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dsray.rl.grpo import group_advantages, pack_completions


@dataclass
class History:
    """What `run_grpo` measured: one dict per step, (step, mean reward) per evaluation, wall seconds."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "evals": [list(e) for e in self.evals], "seconds": self.seconds}


def pack_rollout(prompts: list[torch.Tensor], rows: list[torch.Tensor], routing: list[torch.Tensor] | None,
                 logprobs: list[torch.Tensor] | None, pad_id: int, top_k: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """What `generate(..., return_routing=True, return_logprobs=True)` returned -> batch tensors:
    ids [B, S] right-padded with `pad_id`, completion_mask [B, S-1], logprobs [B, S-1] (the sampled
    tokens' at the masked positions, 0 elsewhere), routing [B, S, L, K] (padding positions get
    experts 0..K-1: right padding influences no earlier position, so any valid ids do)."""
    ids, mask = pack_completions(prompts, rows, pad_id)
    B, S = ids.shape
    out = {"ids": ids, "completion_mask": mask}
    if logprobs is not None:
        lp = torch.zeros(B, S - 1, dtype=torch.float32)
        for b, (p, row, x) in enumerate(zip(prompts, rows, logprobs)):
            n_new = len(row) - len(p)
            if x.shape != (n_new,):
                raise ValueError(f"logprobs[{b}]: shape {tuple(x.shape)}, expected ({n_new},) (one per new token)")
            lp[b, len(p) - 1:len(row) - 1] = x.float()
        out["logprobs"] = lp
    if routing is not None:
        L, K = routing[0].shape[1:]
        r = torch.arange(K, dtype=routing[0].dtype).expand(B, S, L, K).clone()
        for b, (row, x) in enumerate(zip(rows, routing)):
            if tuple(x.shape) != (len(row), L, K):
                raise ValueError(f"routing[{b}]: shape {tuple(x.shape)}, expected {(len(row), L, K)}")
            r[b, :len(row)] = x
        out["routing"] = r
    return out


def evaluate(policy, task, n: int = 256, seed: int = 123, temperature: float = 1.0, sample_seed: int = 1) -> float:
    """Mean reward on `n` held-out prompts (one batch of mixed lengths, one answer each)."""
    texts, prompts = task.prompt_batch(n, seed, 1)
    rows = policy.generate(prompts, task.MAX_NEW_TOKENS, temperature=temperature, eos_token_id=task.EOS_ID,
                           seed=sample_seed)
    return float(task.batch_rewards(texts, rows).mean())


def _check(**kw: Any) -> None:
    for name in ("steps", "group_size", "prompts_per_step", "max_new_tokens", "updates_per_rollout",
                 "eval_every", "eval_n"):
        v = kw[name]
        low = {"steps": 0, "eval_every": 0, "group_size": 2}.get(name, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            why = " (group-normalised advantages need >= 2 answers per prompt)" if name == "group_size" else ""
            raise ValueError(f"{name}={v!r}: expected an int >= {low}{why}")
    if not (kw["temperature"] > 0 and math.isfinite(kw["temperature"])):
        raise ValueError(f"temperature={kw['temperature']!r}: expected > 0 (GRPO samples its answers)")
    if not (kw["kl_coef"] >= 0 and math.isfinite(kw["kl_coef"])):
        raise ValueError(f"kl_coef={kw['kl_coef']!r}: expected a finite value >= 0")


class _Progress:
    """A tqdm bar on a terminal (when tqdm is installed), else a line every `every` steps."""

    def __init__(self, total: int, enabled: bool, every: int = 10) -> None:
        self.bar, self.every, self.enabled, self.n = None, every, enabled, 0
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="grpo", unit="step", dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                pass

    def update(self, h: dict[str, Any]) -> None:
        self.n += 1
        mm = h["mismatch_tokens"]
        post = dict(reward=f"{h['reward_mean']:.3f}", mismatch="-" if mm is None else f"{mm:.3f}")
        if self.bar is not None:
            self.bar.set_postfix(post)
            self.bar.update(1)
        elif self.enabled and self.every and self.n % self.every == 0:
            print(f"grpo step {h['step']:4d}  reward {post['reward']}  mismatch {post['mismatch']}  "
                  f"loss {h['loss']:+.4f}  {h['seconds']:.1f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_grpo(policy, task, steps: int, group_size: int = 8, prompts_per_step: int = 16,
             max_new_tokens: int | None = None, temperature: float = 1.0, replay: bool = True,
             kl_coef: float = 0.0, *, updates_per_rollout: int = 2, clip_eps: float = 0.2,
             clip_eps_high: float | None = None, norm: str = "token", lr: float | None = None, seed: int = 0,
             eval_every: int = 0, eval_n: int = 256, save_rollouts: str | Path | None = None,
             progress: bool = True, on_step: Callable[[dict[str, Any]], None] | None = None) -> History:
    """`steps` GRPO steps of `policy` on `task` (module docstring). kl_coef > 0 needs a reference:
    call `policy.set_reference()` first. eval_every > 0: `evaluate` before the first step, every
    `eval_every` steps and after the last. save_rollouts: a folder receiving each step's batch (ids,
    completion_mask, rewards, advantages, logprobs, routing, ref_logprobs) via `records.RolloutWriter`.

    History.steps[i]: step, reward_mean, the last update's grpo stats (loss, clip_frac, ratio_mean,
    kl_mean, n_tokens), mismatch_tokens / mismatch_pairs (mean over this step's updates, and of the
    last update as *_last), rollout_s, seconds."""
    max_new_tokens = task.MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    _check(steps=steps, group_size=group_size, prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens,
           updates_per_rollout=updates_per_rollout, eval_every=eval_every, eval_n=eval_n, temperature=temperature,
           kl_coef=kl_coef)
    writer = None
    if save_rollouts is not None:
        from dsray.rl.records import RolloutWriter

        writer = RolloutWriter(save_rollouts)
    hist = History()
    t_start = time.perf_counter()
    if eval_every:
        hist.evals.append((0, evaluate(policy, task, eval_n, temperature=temperature)))
    bar = _Progress(steps, progress)
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            texts, prompts = task.prompt_batch(prompts_per_step, seed * 1_000_003 + step, group_size)
            rows, routing, logprobs = policy.generate(
                prompts, max_new_tokens, temperature=temperature, eos_token_id=task.EOS_ID,
                seed=seed * 1_000_003 + step, return_routing=True, return_logprobs=True)
            t_roll = time.perf_counter() - t0
            rewards = task.batch_rewards(texts, rows)
            batch: dict[str, Any] = pack_rollout(prompts, rows, routing, logprobs, task.PAD_ID)
            batch["rewards"] = rewards
            batch["advantages"] = group_advantages(rewards, group_size)
            if kl_coef > 0:
                batch["ref_logprobs"] = policy.logprobs(batch["ids"], batch["routing"] if replay else None,
                                                        temperature=temperature, reference=True)
            if writer is not None:
                writer.write({**batch, "group_size": group_size, "step": step, "temperature": temperature},
                             meta={"task": getattr(task, "__name__", type(task).__name__), "replay": replay})
            outs = [policy.grpo_step(batch, replay=replay, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                     kl_coef=kl_coef, norm=norm, temperature=temperature, lr=lr)
                    for _ in range(updates_per_rollout)]
            last = outs[-1]
            h: dict[str, Any] = {"step": step, "reward_mean": float(rewards.mean())}
            h.update({k: last.get(k) for k in ("loss", "clip_frac", "ratio_mean", "kl_mean", "n_tokens")})
            for k in ("mismatch_tokens", "mismatch_pairs"):
                vals = [o[k] for o in outs if o.get(k) is not None]
                h[k] = sum(vals) / len(vals) if vals else None
                h[k + "_last"] = last.get(k)
            h["rollout_s"], h["seconds"] = t_roll, time.perf_counter() - t0
            hist.steps.append(h)
            bar.update(h)
            if on_step is not None:
                on_step(h)
            if eval_every and (step % eval_every == 0 or step == steps):
                hist.evals.append((step, evaluate(policy, task, eval_n, temperature=temperature)))
    finally:
        bar.close()
    hist.seconds = time.perf_counter() - t_start
    return hist
