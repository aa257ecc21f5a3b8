"""The Ray Engine's RL contract against LocalPolicy (fp32 CPU, <= 1e-5), and `dsray rl` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dsray.config import preset
from dsray.model import Transformer
from dsray.rl import task
from dsray.rl.loop import pack_rollout
from dsray.rl.policy import LocalPolicy, policy_loss
from helpers import assert_close

ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONUNBUFFERED": "1"}
ENV.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def checkpoint_grads(model, cfg) -> dict[str, torch.Tensor]:
    from dsray.model.hf import EXPERT_PARAM, expert_key, to_hf_name

    out = {}
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        m = EXPERT_PARAM.match(n)
        if m:
            layer = int(to_hf_name(m.group(1), cfg).split(".")[2])
            for e in range(p.shape[0]):
                out[expert_key(layer, e, m.group(2))] = p.grad[e]
        else:
            out[to_hf_name(n, cfg)] = p.grad
    return out


def rollout(policy: LocalPolicy, seed: int = 0) -> dict:
    texts, prompts = task.prompt_batch(3, seed, 2)
    rows, routing, lps = policy.generate(prompts, task.MAX_NEW_TOKENS, temperature=1.0, eos_token_id=task.EOS_ID,
                                         seed=seed, return_routing=True, return_logprobs=True)
    b = pack_rollout(prompts, rows, routing, lps, task.PAD_ID)
    g = torch.Generator().manual_seed(seed)
    b["logprobs"] = b["logprobs"] + torch.randn(b["logprobs"].shape, generator=g) * 0.3  # clip active
    b["advantages"] = torch.randn(len(rows), generator=g)
    return b


def test_engine_grpo_step_and_logprobs_equal_local_policy(local_ray):
    cfg = preset("debug")
    local = LocalPolicy(Transformer.from_config(cfg, seed=3), lr=1e-3)
    batch = rollout(local)
    with Engine_(cfg) as eng:
        for replay in (False, True):
            r = batch["routing"] if replay else None
            assert_close(eng.logprobs(batch["ids"], r), local.logprobs(batch["ids"], r), what=f"logprobs {replay}")
        # the loss and every gradient of one step, with and without replay
        for replay in (True, False):
            m = local.model
            m.zero_grad(set_to_none=True)
            loss, stats = policy_loss(m, batch, replay=replay, kl_coef=0.0)
            loss.backward()
            want = checkpoint_grads(m, cfg)
            got_stats = eng.grpo_step(batch, replay=replay, lr=0.0)
            assert abs(got_stats["loss"] - stats["loss"]) <= 1e-5 * abs(stats["loss"]), (got_stats, stats)
            for k in ("clip_frac", "ratio_mean", "n_tokens", "mismatch_tokens", "mismatch_pairs"):
                assert got_stats[k] == pytest.approx(stats[k], abs=1e-6), k
            got = eng.grads()
            for k, v in want.items():
                assert k in got, k
                assert_close(got[k], v, 1e-5, k)
        eng.set_reference()
        assert_close(eng.logprobs(batch["ids"], reference=True), local.logprobs(batch["ids"]), what="reference")


def Engine_(cfg):
    from dsray.runtime import Engine

    return Engine.from_config(cfg, seed=3, num_drivers=2, num_shards=2, name="rltest", metrics=False, gamma=0.0)


def test_dsray_rl_cli(tmp_path):
    ck, ro, hist = tmp_path / "ck", tmp_path / "ro", tmp_path / "h.json"
    args = ["rl", "--warmup-steps", "3", "--warmup-batch", "8", "--steps", "2", "--group-size", "2", "--prompts", "2",
            "--eval-prompts", "8", "--drivers", "1", "--shards", "1", "--no-metrics", "--name", "clirl",
            "--save", str(ck), "--save-rollouts", str(ro), "--history", str(hist)]
    r = subprocess.run([sys.executable, "-m", "dsray.cli", *args], capture_output=True, text=True, timeout=400, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reward before GRPO" in r.stdout and "reward after 2 GRPO steps" in r.stdout
    assert (ck / "config.json").exists() and len(list(ro.glob("rollout-*.msgpack"))) == 2
    doc = json.loads(hist.read_text())
    assert len(doc["steps"]) == 2 and 0 <= doc["reward_after"] <= 1
    # the same --save again without --overwrite: refused before Ray starts, exit 2
    r2 = subprocess.run([sys.executable, "-m", "dsray.cli", *args], capture_output=True, text=True, timeout=60, env=ENV)
    assert r2.returncode == 2 and "exists" in r2.stderr
