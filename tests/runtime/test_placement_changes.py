"""Rebalancing (replicas of hot experts) and scaling shards while an engine trains: weights and
optimizer state move with the experts, and training continues exactly as the single-process run."""

from __future__ import annotations

import numpy as np
import torch

from dsray.config import preset
from dsray.model import Transformer
from dsray.runtime import Engine
from runtime_helpers import alive_dsray_actors

GAMMA, LR = 1e-3, 1e-3


def reference_losses(cfg, batches) -> list[float]:
    """One process: AdamW as the ranks configure it, plus the Router's bias rule between steps."""
    model = Transformer.from_config(cfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses = []
    for ids in batches:
        out = model.loss(ids)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        counts = out["counts"].numpy()  # [L, E], MTP's layer last, in moe_modules() order
        with torch.no_grad():
            for moe, c in zip(model.moe_modules(), counts):
                moe.gate.e_score_correction_bias += torch.tensor(GAMMA * np.sign(c.mean() - c), dtype=torch.float32)
        losses.append(out["loss"].item())
    return losses


def test_rebalance_and_scale_while_training(local_ray):
    cfg = preset("debug")
    batches = [torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(k)) for k in range(5)]
    want = reference_losses(cfg, batches)
    got = []
    with Engine.from_config(cfg, seed=3, num_drivers=2, num_shards=2, gamma=GAMMA, bias_rule="sign", lr=LR, metrics=False,
                            name="moves") as eng:
        got.append(eng.train_step(batches[0])["loss"])
        p1 = eng.rebalance(4)  # 4 hot experts get a replica on the other shard
        assert p1.version == 1 and sum(p1.experts_per_rank()) == 16 + 4
        assert sum(len(p1.replicas(e)) > 1 for e in range(16)) == 4
        got.append(eng.train_step(batches[1])["loss"])
        p2 = eng.scale(3)  # a third shard joins; experts (and moments) spread over 3 shards
        assert p2.version == 2 and p2.experts_per_rank()[2:] == [6, 5, 5] and len(eng.shards) == 3
        got.append(eng.train_step(batches[2])["loss"])
        p3 = eng.scale(1)  # shrink to one shard holding everything
        assert p3.version == 3 and p3.experts_per_rank()[2:] == [16] and len(eng.shards) == 1
        got.append(eng.train_step(batches[3])["loss"])
        eng.set_placement("round_robin")
        got.append(eng.train_step(batches[4])["loss"])
        stats = eng.stats()
        assert stats["placement_version"] == 4 and stats["step"] == 5
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not alive_dsray_actors()


def test_global_grad_norm_clipping_matches_single_process(local_ray):
    """Clipping by the global norm over drivers and shards, replicas counted once."""
    cfg = preset("debug")
    batches = [torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(10 + k)) for k in range(3)]
    model = Transformer.from_config(cfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    want_loss, want_norm = [], []
    for ids in batches:
        out = model.loss(ids)
        opt.zero_grad()
        out["total"].backward()
        want_norm.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        opt.step()
        want_loss.append(out["loss"].item())
    got_loss, got_norm = [], []
    with Engine.from_config(cfg, seed=3, num_drivers=2, num_shards=2, gamma=0.0, lr=LR, clip_grad_norm=0.05,
                            metrics=False, name="clip") as eng:
        for i, ids in enumerate(batches):
            if i == 1:
                eng.rebalance(3)  # replicas must not be counted twice in the norm
            out = eng.train_step(ids)
            got_loss.append(out["loss"])
            got_norm.append(out["grad_norm"])
    assert want_norm[0] > 0.05  # clipping really happened
    np.testing.assert_allclose(got_norm, want_norm, rtol=1e-5)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
