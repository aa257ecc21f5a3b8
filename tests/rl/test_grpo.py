"""GRPO math against a loop-per-token reference written here, hand-picked clipping cases, n_norm additivity."""

from __future__ import annotations

import math

import pytest
import torch

from dsray.rl.grpo import group_advantages, grpo_loss, pack_completions, token_logprobs
from helpers import assert_close


def ref_loss(logp, old, adv, mask, ref=None, eps=0.2, eps_high=None, kl_coef=0.0, norm="token", n_norm=None):
    """Straightforward python loops over rows and tokens, the formulas written out one scalar at a time."""
    eps_high = eps if eps_high is None else eps_high
    B, T = logp.shape
    row_sums, row_counts = [], []
    for b in range(B):
        s, n = torch.zeros((), dtype=torch.float64), 0
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logp[b, t].double() - float(old[b, t]))
            a = float(adv[b])
            clipped = min(max(ratio, torch.tensor(1 - eps, dtype=torch.float64)), torch.tensor(1 + eps_high))
            term = -torch.minimum(ratio * a, clipped * a)
            if ref is not None and kl_coef:
                d = float(ref[b, t]) - logp[b, t].double()
                term = term + kl_coef * (torch.exp(d) - d - 1)
            s, n = s + term, n + 1
        row_sums.append(s)
        row_counts.append(n)
    if norm == "token":
        return sum(row_sums) / (n_norm if n_norm is not None else max(sum(row_counts), 1))
    per_row = [s / max(n, 1) for s, n in zip(row_sums, row_counts)]
    return sum(per_row) / (n_norm if n_norm is not None else B)


def make_batch(B=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(B, T, generator=g) * 0.3  # ratios spread across both clip edges
    ref = logp.detach() + torch.randn(B, T, generator=g) * 0.5
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0] = False  # a row with nothing to train on
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("norm", ["token", "sequence"])
@pytest.mark.parametrize("kl_coef,eps_high", [(0.0, None), (0.1, None), (0.05, 0.28)])
def test_loss_and_grad_match_loop_reference(norm, kl_coef, eps_high):
    logp, old, ref, adv, mask = make_batch()
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp_BT=ref, clip_eps=0.2, clip_eps_high=eps_high,
                            kl_coef=kl_coef, norm=norm)
    (g,) = torch.autograd.grad(loss, logp)
    lp = logp.detach().clone().requires_grad_()
    expect = ref_loss(lp, old, adv, mask, ref, 0.2, eps_high, kl_coef, norm)
    (g_ref,) = torch.autograd.grad(expect, lp)
    assert abs(loss.item() - expect.item()) <= 1e-6
    assert (g - g_ref).abs().max().item() <= 1e-6
    assert g[~mask].abs().max().item() == 0.0  # unmasked tokens get no gradient
    assert stats["n_tokens"] == mask.sum().item()


def test_clipping_at_hand_picked_ratios():
    # ratios 0.5, 0.9, 1.0, 1.1, 1.5 with eps 0.2: clip range [0.8, 1.2]
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5])
    old = torch.zeros(2, 5)
    logp = ratios.log().repeat(2, 1).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, stats = grpo_loss(logp, old, adv, mask, norm="token")
    # A=+1: min(r, clip(r)) = 0.5, 0.9, 1.0, 1.1, 1.2; A=-1: min(-r, -clip(r)) = -0.8, -0.9, -1, -1.1, -1.5
    expect = -(0.5 + 0.9 + 1.0 + 1.1 + 1.2 - 0.8 - 0.9 - 1.0 - 1.1 - 1.5) / 10
    assert abs(loss.item() - expect) < 1e-6
    (g,) = torch.autograd.grad(loss, logp)
    # d(-r*A)/dlogp = -r*A / n where not clipped; 0 where the clip is active (A>0, r=1.5; A<0, r=0.5)
    expect_g = torch.stack([-ratios, ratios]) / 10
    expect_g[0, 4] = 0.0
    expect_g[1, 0] = 0.0
    assert_close(g, expect_g, 1e-6, "grad")
    assert abs(stats["clip_frac"] - 2 / 10) < 1e-9
    assert abs(stats["ratio_mean"] - 2 * ratios.sum().item() / 10) < 1e-6
    # clip-higher: with eps_high 0.6 the A>0, r=1.5 token is no longer clipped
    loss_h, stats_h = grpo_loss(logp, old, adv, mask, clip_eps_high=0.6)
    assert abs(loss_h.item() - (expect - 0.3 / 10)) < 1e-6
    assert abs(stats_h["clip_frac"] - 1 / 10) < 1e-9


def test_k3_kl_hand_computed():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.tensor([[True, True]])
    adv = torch.zeros(1)  # isolate the KL term
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, ref_logp_BT=ref, kl_coef=0.5)
    d = [-0.5, 1.0]
    kl = [math.exp(x) - x - 1 for x in d]  # 0.10653..., 0.71828...
    assert abs(stats["kl_mean"] - sum(kl) / 2) < 1e-6
    assert abs(loss.item() - 0.5 * sum(kl) / 2) < 1e-6
    (g,) = torch.autograd.grad(loss, logp)
    # d/dlogp [exp(ref-logp) - (ref-logp) - 1] = 1 - exp(ref-logp)
    assert_close(g, torch.tensor([[0.5 * (1 - math.exp(x)) / 2 for x in d]]), 1e-6, "kl grad")


def test_normalisations_differ_as_defined():
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    adv = torch.tensor([1.0, 2.0])
    tok, _ = grpo_loss(logp, logp.detach(), adv, mask, norm="token")  # ratio 1: objective = -A per token
    seq, _ = grpo_loss(logp, logp.detach(), adv, mask, norm="sequence")
    assert abs(tok.item() - -(1 + 4 * 2) / 5) < 1e-6
    assert abs(seq.item() - -(1 + 2) / 2) < 1e-6


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_n_norm_makes_shards_add_up(norm):
    logp, old, ref, adv, mask = make_batch(B=8, T=5, seed=3)
    kw = dict(ref_logp_BT=ref, kl_coef=0.1, norm=norm)
    whole, _ = grpo_loss(logp, old, adv, mask, **kw)
    (g_whole,) = torch.autograd.grad(whole, logp)
    n = float(mask.sum()) if norm == "token" else 8.0
    parts, grads = [], []
    for sl in (slice(0, 3), slice(3, 8)):  # uneven split, as data-parallel shards can be
        lp = logp.detach()[sl].clone().requires_grad_()
        part, _ = grpo_loss(lp, old[sl], adv[sl], mask[sl], n_norm=n, **{**kw, "ref_logp_BT": ref[sl]})
        parts.append(part)
        grads.append(torch.autograd.grad(part, lp)[0])
    assert abs((parts[0] + parts[1]).item() - whole.item()) <= 1e-6
    assert_close(torch.cat(grads), g_whole, 1e-6, "sharded grads")
    # and without the global count the halves do not add up: n_norm is what makes it work
    local = [grpo_loss(logp.detach()[sl], old[sl], adv[sl], mask[sl], **{**kw, "ref_logp_BT": ref[sl]})[0]
             for sl in (slice(0, 3), slice(3, 8))]
    assert abs((local[0] + local[1]).item() - whole.item()) > 1e-3


def test_unmasked_garbage_is_ignored():
    logp, old, ref, adv, mask = make_batch()
    loss, _ = grpo_loss(logp, old, adv, mask, ref_logp_BT=ref, kl_coef=0.1)
    old2, ref2 = old.clone(), ref.clone()
    old2[~mask], ref2[~mask] = float("-inf"), float("inf")
    loss2, stats = grpo_loss(logp, old2, adv, mask, ref_logp_BT=ref2, kl_coef=0.1)
    (g,) = torch.autograd.grad(loss2, logp)
    assert loss2.item() == loss.item() and torch.isfinite(g).all()
    assert all(math.isfinite(v) for v in stats.values())


def test_empty_mask_gives_zero_loss():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = grpo_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and stats["n_tokens"] == 0.0 and stats["clip_frac"] == 0.0


def test_loss_argument_errors():
    logp, old, ref, adv, mask = make_batch(B=2, T=3)
    cases = [
        (dict(mask_BT=mask[:, :2]), "mask_BT"),
        (dict(mask_BT=mask.float()), "mask_BT"),
        (dict(old_logp_BT=old[:1]), "old_logp_BT"),
        (dict(advantages_B=adv[:1]), "advantages_B"),
        (dict(ref_logp_BT=ref[:, :1]), "ref_logp_BT"),
        (dict(norm="mean"), "norm"),
        (dict(clip_eps=0.0), "clip_eps="),
        (dict(clip_eps=1.0), "clip_eps="),
        (dict(clip_eps_high=-0.1), "clip_eps_high="),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(kl_coef=0.1), "ref_logp_BT"),  # a KL needs a reference
        (dict(n_norm=0), "n_norm"),
        (dict(logp_BT=logp[0]), "logp_BT"),
    ]
    for change, name in cases:
        kw = {**dict(logp_BT=logp, old_logp_BT=old, advantages_B=adv, mask_BT=mask), **change}
        with pytest.raises(ValueError, match=name):
            grpo_loss(**kw)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    adv = group_advantages(r, 4)
    g1 = torch.tensor([1.0, 0, 0, 0])
    expect1 = (g1 - 0.25) / (math.sqrt(((g1 - 0.25) ** 2).mean().item()) + 1e-6)  # population std
    assert_close(adv[:4], expect1, 1e-6, "group 1")
    g2 = torch.tensor([1.0, 1.0, 0.5, 0.5])
    assert_close(adv[4:], (g2 - 0.75) / (0.25 + 1e-6), 1e-6, "group 2")
    assert_close(group_advantages(r, 4, normalize_std=False), torch.cat([g1 - 0.25, g2 - 0.75]), 1e-7, "raw")
    assert torch.equal(group_advantages(torch.ones(6), 3), torch.zeros(6))  # all equal: no signal
    assert torch.equal(group_advantages(r, 1, normalize_std=False), torch.zeros(8))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 0)
    with pytest.raises(ValueError, match="rewards_B"):
        group_advantages(r[None], 4)


def test_token_logprobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    ids = torch.randint(0, 11, (3, 5), generator=g)
    lp = token_logprobs(logits, ids)
    assert lp.shape == (3, 4) and lp.dtype == torch.float32
    for b in range(3):
        for t in range(4):
            expect = torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]]
            assert abs(lp[b, t].item() - expect.item()) < 1e-5
    assert_close(token_logprobs(logits.bfloat16(), ids), token_logprobs(logits.bfloat16().float(), ids), 0)
    lp_t = token_logprobs(logits, ids, temperature=2.0)
    assert_close(lp_t, token_logprobs(logits / 2, ids), 1e-6, "temperature")
    with pytest.raises(ValueError, match="ids_BT"):
        token_logprobs(logits, ids[:, :4])
    with pytest.raises(ValueError, match="ids_BT"):
        token_logprobs(logits, ids + 11)
    with pytest.raises(ValueError, match="logits_BTV"):
        token_logprobs(logits[0], ids)


def test_pack_completions():
    prompts = [torch.tensor([256, 1, 2]), torch.tensor([256, 5])]
    outputs = [torch.tensor([256, 1, 2, 7, 257]), torch.tensor([256, 5, 9, 9, 9, 257])]
    ids, mask = pack_completions(prompts, outputs, pad_id=258)
    assert ids.tolist() == [[256, 1, 2, 7, 257, 258], [256, 5, 9, 9, 9, 257]]
    # position t predicts token t+1: row 0 generated tokens 3, 4 -> positions 2, 3
    assert mask.tolist() == [[False, False, True, True, False], [False, True, True, True, True]]
    with pytest.raises(ValueError, match="outputs"):
        pack_completions(prompts, [outputs[1], outputs[0]], 258)
