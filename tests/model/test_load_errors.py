"""Bad checkpoints fail with clear errors naming the tensor or file; FP8 checkpoints load dequantized."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_close, quantize_checkpoint_fp8
from dsray.checkpoint import CheckpointError
from dsray.model import Transformer


def _rewrite(path, fn):
    f = path / "model.safetensors"
    state = load_file(f)
    fn(state)
    save_file(state, f, metadata={"format": "pt"})


def test_missing_tensor(hf_checkpoint):
    path, _ = hf_checkpoint()
    _rewrite(path, lambda s: s.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        Transformer.from_pretrained(path)


def test_wrong_shape(hf_checkpoint):
    path, _ = hf_checkpoint()
    _rewrite(path, lambda s: s.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(32, 3)))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*shape"):
        Transformer.from_pretrained(path)


def test_nan(hf_checkpoint):
    path, _ = hf_checkpoint()

    def poison(s):
        s["model.layers.2.mlp.shared_experts.down_proj.weight"][0, 0] = float("nan")

    _rewrite(path, poison)
    with pytest.raises(CheckpointError, match=r"shared_experts\.down_proj\.weight"):
        Transformer.from_pretrained(path)


def test_config_mismatch(hf_checkpoint):
    path, _ = hf_checkpoint()
    conf = json.loads((path / "config.json").read_text())
    conf["num_hidden_layers"] = 2
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"does not use.*model\.layers\.2"):
        Transformer.from_pretrained(path)
    conf["num_hidden_layers"], conf["n_routed_experts"] = 3, 16
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"missing.*experts\.(8|9|1[0-5])"):
        Transformer.from_pretrained(path)


def test_pickle_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="unpickle"):
        Transformer.from_pretrained(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Transformer.from_pretrained(tmp_path / "nowhere")


def test_fp8_checkpoint_dequantized(hf_checkpoint):
    path, hf = hf_checkpoint(seed=5)
    ref_model = Transformer.from_pretrained(path)
    quantize_checkpoint_fp8(path)
    fp8 = Transformer.from_pretrained(path)
    w_ref = ref_model.model.layers[1].mlp.experts.gate_proj
    w_fp8 = fp8.model.layers[1].mlp.experts.gate_proj
    assert not torch.equal(w_ref, w_fp8)  # really went through fp8
    assert_close(w_fp8, w_ref, 0.07, "fp8 dequantized weight")  # e4m3 keeps 3 mantissa bits
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert_close(fp8(ids), ref_model(ids), 0.1, "fp8 logits")
