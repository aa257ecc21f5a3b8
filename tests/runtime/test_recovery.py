"""Fault recovery on a real local Ray (CPU, gloo): a killed shard, driver or Router is replaced inside the
step that noticed it, and every later step's loss equals an undisturbed run's (fp32, deterministic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsray.runtime import Engine
from runtime_helpers import alive_dsray_actors

STEPS = 6


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (4, 20), generator=g) for _ in range(STEPS)]


def _run(name: str, kill: dict[int, str] | None = None, snapshot_every: int = 2):
    """Losses of STEPS train steps with a forward in the middle; `kill` maps step -> which actor dies
    just before that step ("shard", "driver", "router")."""
    import ray

    losses, kill = [], kill or {}
    with Engine.from_config("debug", seed=1, num_drivers=2, num_shards=2, metrics=False, name=name, lr=3e-3,
                            snapshot_every=snapshot_every, step_timeout_s=60) as eng:
        for i, b in enumerate(_batches()):
            who = kill.get(i)
            if who == "shard":
                ray.kill(eng.shards[1], no_restart=True)
            elif who == "driver":
                ray.kill(eng.drivers[1], no_restart=True)
            elif who == "router":
                ray.kill(eng.router, no_restart=True)
            losses.append(eng.train_step(b)["loss"])
            if i == 2:
                logits = eng.forward(b[:1], last_only=True)
        stats = eng.stats()
    return losses, logits, stats


def test_killed_ranks_and_router_recover_exactly(local_ray):
    want, want_logits, want_stats = _run("calm")
    # shard dies after a snapshot boundary, a driver mid-journal (one step to replay), the Router last
    got, got_logits, stats = _run("chaos", kill={1: "shard", 3: "driver", 5: "router"})
    assert got == want  # bit-identical losses on every step after each recovery
    assert torch.equal(got_logits, want_logits)
    rec = stats["recoveries"]
    assert [r["ranks"] for r in rec] == [[3], [1], []] and rec[2]["router"]
    assert all(r["seconds"] > 0 for r in rec) and rec[1]["replayed_steps"] == 1
    # the Router counted every token exactly once: same per-step counts and step count as the calm run
    assert stats["step"] == want_stats["step"] == STEPS
    assert stats["history"]["counts"] == want_stats["history"]["counts"]
    np.testing.assert_array_equal(np.asarray(stats["bias"]), np.asarray(want_stats["bias"]))
    assert stats["extra"]["recoveries"] >= 2  # the restarted Router's mirror carried the count across
    assert not alive_dsray_actors()


def test_recovery_during_generate_and_after_scale(local_ray):
    prompts = [torch.tensor([1, 5, 9]), torch.tensor([2, 4])]
    with Engine.from_config("debug", seed=2, num_drivers=1, num_shards=2, metrics=False, name="gen") as eng:
        want = eng.generate(prompts, 8, temperature=0.0, eos_token_id=())
        eng.scale(3)
        import ray

        ray.kill(eng.shards[2], no_restart=True)
        got = eng.generate(prompts, 8, temperature=0.0, eos_token_id=())
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert eng.stats()["recoveries"][0]["ranks"] == [3]
    assert not alive_dsray_actors()
