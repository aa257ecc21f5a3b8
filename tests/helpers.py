"""Shared test helpers: `assert_close` and tiny HF DeepSeek-V3 models made by transformers itself."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, first_k_dense_replace=1,
            max_position_embeddings=256, num_nextn_predict_layers=0, initializer_range=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Relative to the largest reference magnitude: max|a-e| <= rtol * max|e|. Prints the diffs on failure."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-30)
    rel = (diff.max() / scale).item() if diff.numel() else 0.0
    assert rel <= rtol, (f"{what}: max rel diff {rel:.3e} > {rtol:.1e} "
                         f"(max abs {diff.max().item():.3e}, mean abs {diff.mean().item():.3e}, scale {scale.item():.3e})")


def make_hf_model(seed: int = 0, bias_scale: float = 0.05, **overrides):
    """A tiny transformers DeepseekV3ForCausalLM with a non-zero e_score_correction_bias."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * bias_scale)
    return model




def quantize_checkpoint_fp8(path) -> None:
    """Rewrite a single-file HF folder the way official V3 checkpoints store weights: 2-D projection
    weights as float8_e4m3 with a `weight_scale_inv` per 128x128 block (norms, embeddings, gate, head stay)."""
    import json

    from safetensors.torch import load_file, save_file

    from dsray.fp8 import quantize_fp8_blockwise

    state = load_file(path / "model.safetensors")
    out = {}
    for k, v in state.items():
        if v.ndim == 2 and (k.endswith("proj.weight") or "proj_with_mqa" in k):
            out[k], out[k.removesuffix(".weight") + ".weight_scale_inv"] = quantize_fp8_blockwise(v)
        else:
            out[k] = v
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((path / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(conf))
