"""Logits, generation and checkpoints against HF transformers' DeepseekV3ForCausalLM (the oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

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


N_NEW = 12


def hf_greedy(hf, ids: torch.Tensor, **kw) -> torch.Tensor:
    """HF's greedy generate with its defaults (eos and padding from the checkpoint) unless overridden."""
    return hf.generate(ids, max_new_tokens=N_NEW, do_sample=False, attention_mask=torch.ones_like(ids), **kw)


def pick_eos(new_BN: torch.Tensor, avoid: int) -> tuple[int, dict[int, int], int]:
    """(eos, {row: column of its first eos}, a row that never emits it): an id that some rows emit first
    strictly inside the new tokens while another row never does (so rows finish and another goes on).
    Preferred: more rows stopping, then first stops near the middle."""
    B, N = new_BN.shape
    best = None
    for t in set(new_BN.flatten().tolist()) - {avoid}:
        first = {b: new_BN[b].tolist().index(t) for b in range(B) if t in new_BN[b].tolist()}
        stops = {b: c for b, c in first.items() if 0 < c < N - 1}
        going = [b for b in range(B) if b not in first]
        if stops and going and len(stops) == len(first):
            key = (len(stops), -min(abs(c - N // 2) for c in stops.values()), -t)
            if best is None or key > best[0]:
                best = (key, (t, stops, going[0]))
    assert best is not None, f"no id stops a row mid-way while another goes on: {new_BN.tolist()}"
    return best[1]


@pytest.fixture
def eos_checkpoint(hf_checkpoint):
    """(path, hf, ids, free, (eos, {row that stops: its column}, a row that goes on)) for a checkpoint whose eos
    id (config.json and generation_config.json) is one that greedy decoding of `ids` really emits mid-way."""
    path, hf = hf_checkpoint(seed=3, rope_parameters=YARN)
    ids = torch.randint(2, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    free = hf_greedy(hf, ids, eos_token_id=None)  # eos disabled: what every row says in N_NEW tokens
    assert free.shape == (3, 7 + N_NEW)
    eos, stops, go_on = pick_eos(free[:, 7:], avoid=hf.config.eos_token_id)
    for name in ("config.json", "generation_config.json"):
        conf = json.loads((path / name).read_text())
        conf["eos_token_id"] = eos
        (path / name).write_text(json.dumps(conf))
    hf = DeepseekV3ForCausalLM.from_pretrained(path).eval()
    assert hf.generation_config.eos_token_id == eos and hf.generation_config.pad_token_id is None
    return path, hf, ids, free, (eos, stops, go_on)


def test_greedy_generate_matches_hf_with_eos_and_padding(eos_checkpoint):
    path, hf, ids, free, (eos, stops, go_on) = eos_checkpoint
    model = Transformer.from_pretrained(path).eval()
    ref = hf_greedy(hf, ids)
    out = model.generate(ids, N_NEW)  # no eos argument: the checkpoint's, as HF
    assert torch.equal(out, ref), f"\nours {out.tolist()}\nhf   {ref.tolist()}"
    # the comparison covers HF's padding: a stopping row says eos at its column c, then eos (there is no
    # pad token) to the end, while another row goes on to N_NEW tokens
    assert out.shape == free.shape and torch.equal(out[go_on], free[go_on])
    for r, c in stops.items():
        assert torch.equal(out[r, :7 + c + 1], free[r, :7 + c + 1]) and (out[r, 7 + c:] == eos).all()
        assert not torch.equal(out[r], free[r])
    # an explicit pad id, both sides
    ref0 = hf_greedy(hf, ids, pad_token_id=0)
    out0 = model.generate(ids, N_NEW, pad_token_id=0)
    assert torch.equal(out0, ref0), f"\nours {out0.tolist()}\nhf   {ref0.tolist()}"
    assert all((out0[r, 7 + c + 1:] == 0).all() for r, c in stops.items())


def test_generate_without_eos_matches_hf_without_eos(eos_checkpoint):
    path, hf, ids, free, (eos, stops, _) = eos_checkpoint
    model = Transformer.from_pretrained(path).eval()
    ref = hf_greedy(hf, ids, eos_token_id=None)
    assert torch.equal(ref, free)
    assert all(ref[r, 7 + c] == eos and (ref[r, 7 + c + 1:] != eos).any() for r, c in stops.items())  # HF went on
    for never in ((), []):
        out = model.generate(ids, N_NEW, eos_token_id=never)
        assert torch.equal(out, ref), f"eos_token_id={never!r}\nours {out.tolist()}\nhf   {ref.tolist()}"


def test_ragged_prompts_decode_as_each_alone(eos_checkpoint):
    path, hf, ids, free, (eos, stops, _) = eos_checkpoint
    model = Transformer.from_pretrained(path).eval()
    # a stopping row keeps its full prompt, so it stops at eos mid-way inside the ragged batch too
    r, c = next(iter(stops.items()))
    prompts = [ids[b, (0 if b == r else 1 + 2 * b) % 7:] for b in range(3)]
    assert len({p.numel() for p in prompts}) == 3
    rows = model.generate(prompts, N_NEW)
    assert isinstance(rows, list) and len(rows) == 3
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], N_NEW)[0]  # a single row stops at its eos: nothing to cut
        assert torch.equal(rows[b], alone), f"row {b}\nbatched {rows[b].tolist()}\nalone   {alone.tolist()}"
        assert torch.equal(rows[b][:p.numel()], p)
    assert rows[r][-1] == eos and rows[r].numel() == 7 + c + 1
    # and one row against HF alone: the shortest prompt, the most left padding in the batch
    short = min(range(3), key=lambda b: prompts[b].numel())
    ref = hf_greedy(hf, prompts[short][None])[0]
    assert torch.equal(rows[short], ref), f"\nours {rows[short].tolist()}\nhf   {ref.tolist()}"
    # without eos every row has exactly N_NEW new tokens
    never = model.generate(prompts, N_NEW, eos_token_id=())
    assert [x.numel() - p.numel() for x, p in zip(never, prompts)] == [N_NEW] * 3


@pytest.mark.parametrize("kw,name", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1.0, "top_k": 0}, "top_k"), ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_generate_rejects_bad_sampling_args(kw, name):
    from dsray.config import preset

    model = Transformer.from_config(preset("debug"), seed=0).eval()
    ids = torch.randint(0, 64, (1, 4))
    kw = {"max_new_tokens": 3, **kw}
    with pytest.raises(ValueError, match=name):
        model.generate(ids, **kw)


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
