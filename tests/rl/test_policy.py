"""policy_loss / LocalPolicy against hand computations: loss and every gradient, routing replay (the
experts used are exactly the recorded ones, gradients still reach the gate), mismatch, bit-identical
replay of a saved rollout, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from dsray.config import preset
from dsray.model import RouteLog, Transformer
from dsray.rl import task
from dsray.rl.loop import pack_rollout
from dsray.rl.policy import LocalPolicy, policy_loss, real_tokens, sequence_logprobs
from dsray.rl.records import read_rollout, write_rollout
from helpers import assert_close

CFG = preset("debug")
L, K, E = 2, CFG.num_experts_per_tok, CFG.n_routed_experts  # debug: layers 1 and 2 are MoE


def model(seed: int = 0) -> Transformer:
    return Transformer.from_config(CFG, seed=seed)


def rollout_batch(policy: LocalPolicy, n_prompts: int = 3, group: int = 2, seed: int = 0) -> dict:
    texts, prompts = task.prompt_batch(n_prompts, seed, group)
    rows, routing, lps = policy.generate(prompts, task.MAX_NEW_TOKENS, temperature=1.0, eos_token_id=task.EOS_ID,
                                         seed=seed, return_routing=True, return_logprobs=True)
    b = pack_rollout(prompts, rows, routing, lps, task.PAD_ID)
    b["advantages"] = torch.randn(len(rows), generator=torch.Generator().manual_seed(seed))
    return b


def hand_loss(m, batch, replay, eps=0.2, kl_coef=0.0, temperature=1.0):
    """The token-normalised GRPO loss written out per token, on log_softmax of the model's logits."""
    ids, mask = batch["ids"], batch["completion_mask"]
    B, S = ids.shape
    log = None
    if replay:
        r = batch["routing"].long()
        log = RouteLog(replay=[r[:, :, i].reshape(B * S, K) for i in range(L)])
    logits = m(ids, log=log)
    lsm = torch.log_softmax(logits.float() / temperature, dim=-1)
    total, n = 0.0, 0
    for b in range(B):
        for t in range(S - 1):
            if not mask[b, t]:
                continue
            lp = lsm[b, t, ids[b, t + 1]]
            ratio = torch.exp(lp - batch["logprobs"][b, t])
            a = batch["advantages"][b]
            term = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
            if kl_coef:
                d = batch["ref_logprobs"][b, t] - lp
                term = term + kl_coef * (torch.exp(d) - d - 1)
            total, n = total + term, n + 1
    return total / n


@pytest.mark.parametrize("replay", [False, True])
def test_loss_and_every_gradient_match_hand_computation(replay):
    m = model()
    pol = LocalPolicy(m)
    batch = rollout_batch(pol)
    g = torch.Generator().manual_seed(1)
    # old log-probs away from the current ones, so the clip is active on some tokens
    batch["logprobs"] = batch["logprobs"] + torch.randn(batch["logprobs"].shape, generator=g) * 0.3
    batch["ref_logprobs"] = batch["logprobs"] + torch.randn(batch["logprobs"].shape, generator=g) * 0.2
    loss, stats = policy_loss(m, batch, replay=replay, kl_coef=0.1, temperature=0.9)
    grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    m2 = copy.deepcopy(m)
    expect = hand_loss(m2, batch, replay, kl_coef=0.1, temperature=0.9)
    grads2 = torch.autograd.grad(expect, list(m2.parameters()), allow_unused=True)
    assert_close(loss, expect, what="loss")
    assert 0 < stats["clip_frac"] < 1
    n_checked = 0
    for (name, _), a, e in zip(m.named_parameters(), grads, grads2):
        if e is None:
            assert a is None or not a.any(), name
            continue
        assert_close(a, e, what=name)
        n_checked += 1
    assert n_checked > 20


def test_replay_serves_exactly_the_recorded_experts_and_trains_the_gate():
    m = model()
    pol = LocalPolicy(m)
    batch = rollout_batch(pol)
    B, S = batch["ids"].shape
    # a routing that the gate would never choose: only experts 0..7 (two per group of 4)
    g = torch.Generator().manual_seed(2)
    r = torch.stack([torch.randperm(8, generator=g)[:K] for _ in range(B * S * L)]).view(B, S, L, K)
    batch["routing"] = r.to(torch.uint8)
    with torch.no_grad():  # experts 8..15 poisoned: any token sent there would turn the loss to nan
        for moe in m.moe_modules():
            for p in moe.experts.parameters():
                p[8:] = float("nan")
    loss, stats = policy_loss(m, batch, replay=True)
    assert torch.isfinite(loss)
    real = real_tokens(batch["completion_mask"])
    for layer in range(L):
        expect = torch.bincount(r[:, :, layer][real].flatten().long(), minlength=E)
        assert torch.equal(stats["counts"][layer], expect), layer
    assert stats["mismatch_tokens"] > 0.5  # the gate itself would have chosen other experts
    loss.backward()
    for moe in m.moe_modules()[:L]:
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    # without replay the poisoned experts are reached
    m.zero_grad()
    loss2, _ = policy_loss(m, batch, replay=False)
    assert not torch.isfinite(loss2)


def test_mismatch_zero_when_unchanged_positive_after_updates():
    torch.manual_seed(0)
    m = model(3)
    pol = LocalPolicy(m, lr=0.0)
    batch = rollout_batch(pol, 4, 2)
    out = pol.grpo_step(batch, replay=False)
    assert out["mismatch_tokens"] == 0 and out["mismatch_pairs"] == 0
    assert abs(out["ratio_mean"] - 1) < 1e-5  # decode with the cache == full forward
    for _ in range(5):
        pol.grpo_step(batch, replay=False, lr=3e-2)
    out = pol.grpo_step(batch, replay=False, lr=0.0)
    assert out["mismatch_tokens"] > 0 and 0 < out["mismatch_pairs"] <= out["mismatch_tokens"]
    rep = pol.grpo_step(batch, replay=True, lr=0.0)  # counterfactual: what the gate would choose
    assert rep["mismatch_tokens"] == out["mismatch_tokens"]


def test_frozen_weights_moved_bias_replay_reproduces_rollout_logprobs():
    m = model(4)
    pol = LocalPolicy(m, lr=0.0)
    batch = rollout_batch(pol, 4, 2)
    mask = batch["completion_mask"]
    with torch.no_grad():  # a bias skewed as after balancing on skewed data: selection changes
        for moe in m.moe_modules():
            moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, E))
    with_r = pol.logprobs(batch["ids"], batch["routing"], temperature=1.0)
    without = pol.logprobs(batch["ids"], None, temperature=1.0)
    assert_close(with_r[mask], batch["logprobs"][mask], rtol=1e-5, what="replayed vs rollout")
    assert (without[mask] - batch["logprobs"][mask]).abs().max() > 1e-3


def test_saved_rollout_replays_bit_identically(tmp_path):
    m = model(5)
    batch = rollout_batch(LocalPolicy(m), 3, 2)
    batch["rewards"] = torch.tensor([1.0, 0, 0, 1, 1, 0])
    p = write_rollout(tmp_path / "rollout-000001.msgpack", batch)
    back, _ = read_rollout(p)
    a, b = LocalPolicy(copy.deepcopy(m), lr=1e-3), LocalPolicy(copy.deepcopy(m), lr=1e-3)
    for replay in (True, False):
        oa, ob = a.grpo_step(batch, replay=replay), b.grpo_step(back, replay=replay)
        assert oa["loss"] == ob["loss"] and oa["mismatch_tokens"] == ob["mismatch_tokens"]
    for (name, x), y in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(x, y), name
    assert not torch.equal(next(a.model.parameters()), next(m.parameters()))  # the steps did move it


def test_generate_contract():
    pol = LocalPolicy(model())
    prompts = [torch.tensor([256, 97, 98, 61]), torch.tensor([256, 99, 61])]
    rows = pol.generate(prompts, 5, temperature=1.0, seed=0)
    assert isinstance(rows, list) and all(torch.equal(r[:len(p)], p) for r, p in zip(rows, prompts))
    rows2, lps = pol.generate(prompts, 5, temperature=1.0, seed=0, return_logprobs=True)
    assert all(torch.equal(x, y) for x, y in zip(rows, rows2))
    assert [lp.shape[0] for lp in lps] == [len(r) - len(p) for r, p in zip(rows2, prompts)]
    rows3, routing = pol.generate(prompts, 5, temperature=1.0, seed=0, return_routing=True)
    assert [tuple(r.shape) for r in routing] == [(len(r), L, K) for r in rows3]
    assert routing[0].dtype == torch.uint8 and int(max(r.max() for r in routing)) < E
    # the routing of a row decoded in a padded batch is the routing of that row alone
    _, alone = pol.generate(prompts[1:], 5, temperature=1.0, seed=0, return_routing=True)
    n = min(len(alone[0]), len(routing[1])) - 1
    assert torch.equal(alone[0][:len(prompts[1])], routing[1][:len(prompts[1])])
    assert n > 0


def test_reference_is_a_frozen_snapshot():
    m = model()
    pol = LocalPolicy(m, lr=1e-2)
    batch = rollout_batch(pol)
    with pytest.raises(ValueError, match="set_reference"):
        pol.logprobs(batch["ids"], reference=True)
    pol.set_reference()
    before = pol.logprobs(batch["ids"], reference=True)
    pol.grpo_step(batch, replay=True)
    assert torch.equal(pol.logprobs(batch["ids"], reference=True), before)
    assert not torch.equal(pol.logprobs(batch["ids"]), before)
    assert_close(sequence_logprobs(pol.reference, batch["ids"]), before, what="sequence_logprobs")


def test_bad_input_names_the_argument():
    m = model()
    pol = LocalPolicy(m)
    batch = rollout_batch(pol)
    B, S = batch["ids"].shape

    def bad(**changes):
        return {**batch, **changes}

    cases = [
        (bad(routing=batch["routing"][:, :-1]), "routing"),
        (bad(routing=batch["routing"][..., :2]), "routing"),
        (bad(routing=torch.full_like(batch["routing"], E)), r"\[0, 16\)"),
        (bad(routing=batch["routing"].float()), "integer"),
        (bad(advantages=torch.zeros(B + 1)), "advantages"),
        (bad(completion_mask=batch["completion_mask"][:, 1:]), "completion_mask"),
        (bad(completion_mask=batch["completion_mask"].int()), "completion_mask"),
        (bad(logprobs=batch["logprobs"][:1]), "logprobs"),
        (bad(ids=batch["ids"].float()), "ids"),
        ({k: v for k, v in batch.items() if k != "advantages"}, "advantages"),
        ({k: v for k, v in batch.items() if k != "routing"}, "replay=True"),
    ]
    for b, match in cases:
        with pytest.raises(ValueError, match=match):
            pol.grpo_step(b, replay=True)
    with pytest.raises(ValueError, match="routing"):
        pol.logprobs(batch["ids"], batch["routing"][:1])
    with pytest.raises(ValueError, match="kl_coef"):
        pol.grpo_step(batch, kl_coef=0.1)  # no ref_logprobs
