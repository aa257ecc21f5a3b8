"""Logits, generation and checkpoints against HF transformers' DeepseekV3ForCausalLM (the oracle)."""

from __future__ import annotations

import pytest
import torch

from helpers import YARN, assert_close
from dsray.model import Transformer

CASES = {
    "base": {},
    "no_q_lora": {"q_lora_rank": None},
    "groups_4_keep_2": {"n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4},
    "dense_2_shared_2": {"first_k_dense_replace": 2, "n_shared_experts": 2},
    "no_shared": {"n_shared_experts": 0},
    "yarn": {"rope_parameters": YARN},
    "yarn_mscale": {"rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}},
    "no_norm_topk": {"norm_topk_prob": False, "routed_scaling_factor": 1.5},
    "one_group": {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 3},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(hf_checkpoint, case):
    path, hf = hf_checkpoint(seed=hash(case) % 1000, **CASES[case])
    model = Transformer.from_pretrained(path).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert_close(out, ref, 1e-5, what=f"logits[{case}]")


def test_bias_is_loaded_and_changes_routing(hf_checkpoint):
    path, hf = hf_checkpoint(bias_scale=0.5)
    model = Transformer.from_pretrained(path).eval()
    for hf_layer, moe in zip(hf.model.layers[1:], model.moe_modules()):
        assert torch.equal(moe.gate.e_score_correction_bias, hf_layer.mlp.gate.e_score_correction_bias)
        assert moe.gate.e_score_correction_bias.abs().max() > 0
    x = torch.randn(64, hf.config.hidden_size)
    ids_biased = model.moe_modules()[0].gate(x)[1]
    model.moe_modules()[0].gate.e_score_correction_bias.zero_()
    ids_plain = model.moe_modules()[0].gate(x)[1]
    assert not torch.equal(ids_biased.sort(-1).values, ids_plain.sort(-1).values)


def test_greedy_generate_matches_hf(hf_checkpoint):
    path, hf = hf_checkpoint(seed=3, rope_parameters=YARN)
    model = Transformer.from_pretrained(path).eval()
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones_like(ids))
    out = model.generate(ids, max_new_tokens=12)
    assert torch.equal(out, ref), f"\nours {out.tolist()}\nhf   {ref.tolist()}"


def test_bf16_logits_close_to_fp32(hf_checkpoint):
    path, _ = hf_checkpoint()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        ref = Transformer.from_pretrained(path)(ids)
        out = Transformer.from_pretrained(path, dtype=torch.bfloat16)(ids)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, 5e-2, what="bf16 vs fp32")


def test_save_load_round_trip_bit_exact(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint()
    model = Transformer.from_pretrained(path)
    model.save_pretrained(tmp_path / "again", max_shard_bytes=20_000)  # forces several shards
    assert (tmp_path / "again" / "model.safetensors.index.json").exists()
    again = Transformer.from_pretrained(tmp_path / "again")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and HF itself reads what we wrote
    from transformers import DeepseekV3ForCausalLM

    hf2 = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "again").eval()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert_close(model(ids), hf2(ids).logits, 1e-5, what="HF reloads our save")


def test_mtp_checkpoint_layout_round_trip(tmp_path):
    from dsray.checkpoint import CheckpointReader
    from dsray.config import preset

    cfg = preset("debug")
    model = Transformer.from_config(cfg, seed=0)
    model.save_pretrained(tmp_path / "m")
    keys = set(CheckpointReader(tmp_path / "m").keys())
    L = cfg.num_hidden_layers
    for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.3.gate_proj.weight",
              "mlp.gate.e_score_correction_bias", "self_attn.kv_a_proj_with_mqa.weight"):
        assert f"model.layers.{L}.{k}" in keys, k
    again = Transformer.from_pretrained(tmp_path / "m")
    assert len(again.mtp) == 1
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        a, b = model.loss(ids), again.loss(ids)
    assert torch.equal(a["mtp_loss"], b["mtp_loss"]) and torch.equal(a["loss"], b["loss"])
