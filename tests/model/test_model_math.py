"""Model math on hand-computed cases and internal consistency (decode vs naive, grouped vs loop, FP8)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from dsray.config import PRESETS, ModelConfig, preset
from dsray.model import Gate, LatentCache, RouteLog, RoutedExperts, Transformer


def test_gate_hand_computed():
    # 8 experts in 4 groups of 2, keep 2 groups, top-2; identity-like gate so scores = sigmoid(x).
    cfg = ModelConfig(hidden_size=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
                      routed_scaling_factor=2.0, norm_topk_prob=True, num_hidden_layers=2,
                      first_k_dense_replace=1)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(8))
        # Bias lifts expert 0 (group 0) into the selection although its raw score is lowest.
        gate.e_score_correction_bias.copy_(torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0]))
    logits = torch.tensor([[-2.0, -1.0, 0.5, 0.4, 1.0, 0.9, 0.1, 0.0]])
    s = torch.sigmoid(logits)[0]
    # biased group scores (top-2 sums): g0 = s0+3+s1, g1 = s2+s3, g2 = s4+s5, g3 = s6+s7 -> keep g0, g2
    # top-2 over kept biased scores: expert 0 (biased), expert 4
    weights, ids, scores = gate(logits)
    assert sorted(ids[0].tolist()) == [0, 4]
    assert_close(scores[0], s, 1e-6, "scores are the unbiased sigmoid")
    expected = {0: s[0] / (s[0] + s[4]) * 2.0, 4: s[4] / (s[0] + s[4]) * 2.0}  # unbiased weights
    for k in range(2):
        assert abs(weights[0, k].item() - expected[ids[0, k].item()].item()) < 1e-6


def test_gate_softmax_greedy():
    cfg = ModelConfig(hidden_size=4, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
                      topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                      routed_scaling_factor=1.0, num_hidden_layers=2, first_k_dense_replace=1)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(4))
        gate.e_score_correction_bias.fill_(100.0)  # ignored outside noaux_tc
    x = torch.tensor([[0.1, 2.0, 1.0, -1.0]])
    w, ids, scores = gate(x)
    p = x.softmax(-1)[0]
    assert sorted(ids[0].tolist()) == [1, 2]
    assert_close(w[0].sort().values, p[[2, 1]].sort().values, 1e-6)
    assert_close(scores[0], p, 1e-6, "scores")
    # replay: the given experts are used, weights recomputed from the live scores
    w2, ids2, _ = gate(x, replay_TK=torch.tensor([[0, 3]]))
    assert ids2[0].tolist() == [0, 3]
    assert_close(w2[0], p[[0, 3]], 1e-6, "replayed weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_loop(dtype):
    torch.manual_seed(0)
    loop, grouped = RoutedExperts(6, 16, 8, "loop"), RoutedExperts(6, 16, 8, "grouped")
    with torch.no_grad():
        for p in loop.parameters():
            p.normal_()
    grouped.load_state_dict(loop.state_dict())
    loop, grouped = loop.to(dtype), grouped.to(dtype)
    counts = [3, 0, 7, 1, 0, 5]  # empty experts included
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    y1 = loop(x, counts)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    gx1, gw1 = x.grad.clone(), [p.grad.clone() for p in loop.parameters()]
    x.grad = None
    y2 = grouped(x, counts)
    (y2 * g).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(y2.float(), y1.float(), tol, "y")
    assert_close(x.grad.float(), gx1.float(), tol, "dx")
    for a, b in zip(grouped.parameters(), gw1):
        assert_close(a.grad.float(), b.float(), tol, "dw")
    with torch.inference_mode():  # forward-only path (torch._grouped_mm on CPU when it applies)
        assert_close(grouped(x.detach(), counts).float(), y1.float(), tol, "y (inference)")


def test_absorbed_decode_equals_naive_token_by_token():
    cfg = preset("debug")
    model = Transformer.from_config(cfg, seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)  # naive path, no cache
        cache = model.new_cache(2, 12)
        # Prefill 5 tokens through the absorbed path, then one token at a time.
        steps = [model(ids[:, :5], cache, 0)]
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], cache, t))
    assert_close(torch.cat(steps, dim=1), full, 1e-5, "absorbed vs naive")


def test_cache_holds_only_latents():
    cfg = preset("debug")
    cache = LatentCache.allocate(cfg, cfg.num_hidden_layers, batch=3, max_len=10, dtype=torch.bfloat16)
    assert cache.values_per_token_per_layer() == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.nbytes() == 3 * 10 * cfg.kv_cache_bytes_per_token(2)
    assert PRESETS["v3-671b"].kv_cache_bytes_per_token(2) == 61 * 576 * 2 == 70272


def test_sampling_is_seeded_and_respects_top_k():
    cfg = preset("debug")
    model = Transformer.from_config(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 4))
    a = model.generate(ids, 8, temperature=1.0, top_k=5, seed=7)
    b = model.generate(ids, 8, temperature=1.0, top_k=5, seed=7)
    assert torch.equal(a, b) and a.shape == (2, 12)
    with torch.no_grad():
        logits = model(ids)[:, -1]
    top1 = model.generate(ids, 1, temperature=1.0, top_k=1, seed=3)[:, -1]
    assert torch.equal(top1, logits.argmax(-1))


def test_training_step_lowers_loss_and_counts_experts():
    cfg = preset("debug")
    model = Transformer.from_config(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    first, total = None, 0
    for _ in range(15):
        out = model.loss(ids)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
        total = total + out["counts"]
    assert out["loss"].item() < first * 0.8 and "mtp_loss" in out and "balance_loss" not in out
    # 2 MoE layers + 1 MTP MoE; each main layer routes 4*32 tokens x K, MTP routes 4*31 x K per step
    K = cfg.num_experts_per_tok
    assert out["counts"].shape == (3, cfg.n_routed_experts) and not out["counts"].requires_grad
    assert out["counts"][0].sum().item() == 4 * 32 * K and out["counts"][2].sum().item() == 4 * 31 * K
    assert total[0].sum().item() == 15 * 4 * 32 * K and total[2].sum().item() == 15 * 4 * 31 * K
    # the caller's log gets the same facts; nothing carries over between calls
    log = RouteLog()
    again = model.loss(ids, log=log)
    assert torch.equal(log.counts_LE(), again["counts"]) and len(log.counts) == 3
    assert again["counts"].sum().item() == out["counts"].sum().item()
    with pytest.raises(ValueError, match="fresh RouteLog"):  # a used log would stack two calls' counts
        model.loss(ids, log=log)
    with pytest.raises(ValueError, match="seq_aux_alpha"):  # the argument would silently replace it
        model.loss(ids, log=RouteLog(seq_aux_alpha=0.1))


def test_forward_route_log_counts_only_real_tokens():
    """Forward-only passes report counts through the log; left padding is routed to no expert."""
    cfg = preset("debug")
    model = Transformer.from_config(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    K, L = cfg.num_experts_per_tok, len(model.moe_modules())
    with torch.no_grad():
        log = RouteLog(record=True)
        model(ids, log=log)
        # forward() runs no MTP block: only the main MoE layers report
        n_main = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        assert log.counts_LE().shape == (n_main, cfg.n_routed_experts) and n_main < L
        assert (log.counts_LE().sum(dim=1) == 2 * 9 * K).all()
        assert log.routing(2).shape == (2, 9, n_main, K)
        padded = RouteLog()
        model(ids, log=padded, pad_B=torch.tensor([0, 4]))
        assert (padded.counts_LE().sum(dim=1) == (9 + 5) * K).all()
        # replaying the recorded ids reproduces the logits exactly
        replayed = RouteLog(replay=log.ids)
        assert torch.equal(model(ids, log=replayed), model(ids))
        assert torch.equal(replayed.counts_LE(), log.counts_LE())


@pytest.mark.parametrize("field,value,words", [
    ("n_routed_experts", 10, "not divisible by n_group"),
    ("topk_group", 5, "topk_group"),
    ("num_experts_per_tok", 9, "kept groups"),
    ("q_lora_rank", 0, "q_lora_rank"),
    ("qk_rope_head_dim", 7, "even"),
    ("topk_method", "magic", "topk_method"),
    ("first_k_dense_replace", 99, "first_k_dense_replace"),
])
def test_config_rejects_impossible(field, value, words):
    base = dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, num_hidden_layers=4)
    with pytest.raises(ValueError) as e:
        ModelConfig(**{**base, field: value})
    assert field in str(e.value) and words in str(e.value)


def test_presets_and_param_counts():
    assert list(PRESETS)[0] == "debug"
    v3 = PRESETS["v3-671b"].param_counts()
    # DeepSeek-V3: 671B total, 37B activated (main model, without the 14B MTP module)
    assert 660e9 < v3["total"] < 690e9 and 35e9 < v3["activated"] < 40e9
    k2 = PRESETS["kimi-k2"].param_counts()
    assert 1.0e12 < k2["total"] < 1.06e12
    ml = PRESETS["moonlight-16b-a3b"].param_counts()
    assert 15e9 < ml["total"] < 17e9
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


def test_config_from_official_style_json(tmp_path):
    import json

    official = {"model_type": "deepseek_v3", "hidden_size": 7168, "rope_theta": 10000,
                "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                 "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
                "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
                "unknown_key": 1}
    (tmp_path / "config.json").write_text(json.dumps(official))
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 40
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_sequence_balance_loss_by_hand():
    cfg = preset("debug")
    model = Transformer.from_config(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    # recompute layer 1's term with explicit loops from its gate on the same hidden states
    moe = model.moe_modules()[0]
    captured = {}

    def keep_input(m, args) -> None:  # returns None: a returned value would replace the arguments (and the log)
        captured["x"] = args[0].detach()

    hook = moe.register_forward_pre_hook(keep_input)
    log = RouteLog()
    out = model.loss(ids, seq_aux_alpha=0.1, log=log)
    hook.remove()
    x = captured["x"]  # [B, S, D]
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    _, idx, scores = moe.gate(x.reshape(-1, x.shape[-1]))
    per_seq = []
    for b in range(2):
        s = scores.view(2, 6, E)[b]
        chosen = idx.view(2, 6, K)[b]
        total = 0.0
        for i in range(E):
            f = E / (K * 6) * sum(int(i in chosen[t].tolist()) for t in range(6))
            p = sum((s[t, i] / s[t].sum()).item() for t in range(6)) / 6
            total += 0.1 * f * p
        per_seq.append(total)
    assert len(log.balance) == len(model.moe_modules()) and log.balance[0].shape == (2,)
    assert_close(log.balance[0], torch.tensor(per_seq), 1e-6, "layer 1 balance terms")
    # balance_loss: sum over layers (MTP's included) and sequences, divided by the batch's sequences
    assert_close(out["balance_loss"], torch.stack([b.sum() for b in log.balance]).sum() / 2, 1e-6)
    assert out["balance_loss"].item() > sum(per_seq) / 2
    assert_close(out["total"], out["loss"] + 0.3 * out["mtp_loss"] + out["balance_loss"], 1e-6, "total")
    # it is a loss: gradients reach the gate through the scores
    out["balance_loss"].backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    # alpha 0, or no grad: no terms, no balance_loss
    plain = RouteLog()
    assert "balance_loss" not in model.loss(ids, log=plain) and plain.balance == []
    with torch.no_grad():
        nograd = RouteLog()
        assert "balance_loss" not in model.loss(ids, seq_aux_alpha=0.1, log=nograd) and nograd.balance == []
