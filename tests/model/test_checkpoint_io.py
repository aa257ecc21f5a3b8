"""dsray.checkpoint: HF safetensors round trips, lazy reads, FP8 block dequant, bad inputs, atomic saves."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dsray.checkpoint as ckpt
from dsray.checkpoint import CheckpointError, CheckpointReader, save_checkpoint, save_tensors
from dsray.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g),
        "model.layers.0.self_attn.q_a_proj.weight": torch.randn(24, 32, generator=g).bfloat16(),
        "model.layers.1.mlp.experts.17.gate_proj.weight": torch.randn(16, 32, generator=g).bfloat16(),
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g),
        "model.layers.1.mlp.gate.weight": torch.randn(8, 32, generator=g).half(),
        "model.norm.weight": torch.randn(32, generator=g, dtype=torch.float64),
        "lm_head.weight": torch.randn(64, 32, generator=g),
        "step": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def _assert_same(reader: CheckpointReader, state: dict[str, torch.Tensor]) -> None:
    assert reader.keys() == sorted(state)
    for k, t in state.items():
        got = reader.get(k)
        assert got.dtype == t.dtype and torch.equal(got, t), k  # bit-exact, dtype kept
        assert reader.shape(k) == tuple(t.shape)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """Record every safe_open and every header read by file name."""
    opened, headers = [], []
    real_open, real_header = ckpt.safe_open, ckpt._read_header
    monkeypatch.setattr(ckpt, "safe_open",
                        lambda f, *a, **kw: opened.append(Path(f).name) or real_open(f, *a, **kw))
    monkeypatch.setattr(ckpt, "_read_header", lambda f: headers.append(Path(f).name) or real_header(f))
    return opened, headers


# ---------------------------------------------------------------- round trips

def test_round_trip_single_file(tmp_path: Path) -> None:
    state = _state()
    cfg = {"model_type": "deepseek_v3", "hidden_size": 32}
    out = save_checkpoint(state, tmp_path / "ck", cfg, extra_json={"dsray_router.json": {"bias": [0.5, -1.0]}})
    assert out == tmp_path / "ck"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dsray_router.json", "model.safetensors"]
    assert json.loads((out / "dsray_router.json").read_text()) == {"bias": [0.5, -1.0]}
    r = CheckpointReader(out)
    assert r.config_dict == cfg
    _assert_same(r, state)
    assert r.dtype_name("model.layers.0.self_attn.q_a_proj.weight") == "BF16"
    assert r.dtype_name("model.embed_tokens.weight") == "F32"
    assert r.file_of("lm_head.weight") == out / "model.safetensors"
    assert "lm_head.weight" in r and "nope" not in r
    # a single file path works too, without a config
    r2 = CheckpointReader(out / "model.safetensors")
    assert r2.config_dict == cfg  # config.json beside the file
    _assert_same(r2, state)
    assert _leftovers(tmp_path) == []


def test_round_trip_sharded_and_index_format(tmp_path: Path) -> None:
    state = _state()
    limit = 3000
    out = save_checkpoint(state, tmp_path / "ck", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in state.values())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    text = (out / "model.safetensors.index.json").read_text()
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"  # HF's exact layout
    for shard in shards:  # greedy, in state order; a shard only exceeds the limit when it holds one tensor
        keys = [k for k, f in index["weight_map"].items() if f == shard]
        nbytes = sum(state[k].numel() * state[k].element_size() for k in keys)
        assert nbytes <= limit or len(keys) == 1
    r = CheckpointReader(out)
    _assert_same(r, state)
    got = r.get_many(reversed(list(state)))
    assert list(got) == list(reversed(list(state)))  # order as asked
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_dtype_and_device_arguments(tmp_path: Path) -> None:
    state = _state()
    r = CheckpointReader(save_checkpoint(state, tmp_path / "ck"))
    got = r.get_many(state, dtype=torch.bfloat16, device="cpu")
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(got["model.embed_tokens.weight"], state["model.embed_tokens.weight"].bfloat16())
    assert got["step"].dtype == torch.int64 and got["mask"].dtype == torch.bool  # non-float kept as stored


def test_save_handles_shared_views_noncontiguous_and_grad(tmp_path: Path) -> None:
    base = torch.randn(8, 6)
    p = torch.nn.Parameter(torch.randn(4, 5))
    state = {"tied.a": base, "tied.b": base, "view.top": base[:6], "view.t": base.t(), "param": p}
    r = CheckpointReader(save_checkpoint(state, tmp_path / "ck"))
    for k, t in state.items():
        assert torch.equal(r.get(k), t.detach()), k
    save_tensors(state, tmp_path / "opt" / "state.safetensors")
    r2 = CheckpointReader(tmp_path / "opt" / "state.safetensors")
    assert all(torch.equal(r2.get(k), t.detach()) for k, t in state.items())


def test_reads_checkpoint_written_by_transformers(tmp_path: Path) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
        first_k_dense_replace=1,
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    r = CheckpointReader(tmp_path / "hf")
    assert len(set(r.file_of(k) for k in r.keys())) > 1  # really sharded
    assert r.config_dict["model_type"] == "deepseek_v3" and r.config_dict["n_routed_experts"] == 8

    # transformers 5 keeps routed experts fused in memory ([E, 2*F, D] gate|up, [E, D, F] down) and
    # writes them back per expert in the official layout; unfuse to compare.
    expected: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        prefix, _, name = k.rpartition(".experts.")
        if name == "gate_up_proj":
            for e in range(cfg.n_routed_experts):
                expected[f"{prefix}.experts.{e}.gate_proj.weight"] = v[e, : cfg.moe_intermediate_size]
                expected[f"{prefix}.experts.{e}.up_proj.weight"] = v[e, cfg.moe_intermediate_size:]
        elif name == "down_proj":
            for e in range(cfg.n_routed_experts):
                expected[f"{prefix}.experts.{e}.down_proj.weight"] = v[e]
        else:
            expected[k] = v
    assert r.keys() == sorted(expected)
    for e in range(8):
        assert f"model.layers.1.mlp.experts.{e}.gate_proj.weight" in r
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in r
    got = r.get_many(r.keys())
    for k, v in expected.items():
        assert torch.equal(got[k], v), k

    # and our sharded index reads the same as HF's
    ours = save_checkpoint(got, tmp_path / "ours", r.config_dict, max_shard_bytes=20_000)
    r2 = CheckpointReader(ours)
    assert r2.keys() == r.keys() and all(torch.equal(r2.get(k), got[k]) for k in r.keys())


# ---------------------------------------------------------------- laziness

def test_get_opens_only_the_shard_holding_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state()
    out = save_checkpoint(state, tmp_path / "ck", max_shard_bytes=3000)
    opened, headers = _spy(monkeypatch)
    r = CheckpointReader(out)
    assert r.keys() == sorted(state)
    assert opened == [] and headers == []  # the index alone names the keys
    key = "model.layers.1.mlp.gate.weight"
    shard = r.file_of(key).name
    assert torch.equal(r.get(key), state[key])
    assert opened == [shard] and set(headers) == {shard}
    assert r.shape(key) == (8, 32) and headers == [shard]  # headers are cached


def test_get_many_opens_each_shard_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state()
    out = save_checkpoint(state, tmp_path / "ck", max_shard_bytes=3000)
    opened, _ = _spy(monkeypatch)
    r = CheckpointReader(out)
    got = r.get_many(state)
    assert sorted(opened) == sorted({r.file_of(k).name for k in state})  # each once
    assert all(torch.equal(got[k], state[k]) for k in state)


# ---------------------------------------------------------------- FP8

def _fp8_state(block: tuple[int, int] = (128, 128)) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    weights = {
        "model.layers.0.self_attn.q_a_proj.weight": torch.randn(200, 300, generator=g),  # ragged both ways
        "model.layers.1.mlp.experts.3.down_proj.weight": torch.randn(256, 128, generator=g) * 1e-3,
        "model.layers.1.mlp.experts.3.up_proj.weight": torch.randn(64, 32, generator=g) * 50,
    }
    weights["model.layers.1.mlp.experts.3.down_proj.weight"][:128, :128] = 0  # an all-zero block
    state: dict[str, torch.Tensor] = {"model.norm.weight": torch.ones(32)}
    for k, w in weights.items():
        q, s = quantize_fp8_blockwise(w, block)
        state[k], state[k.removesuffix(".weight") + ".weight_scale_inv"] = q, s
    return weights, state


def test_quantize_fp8_blockwise_shapes_and_zero_blocks() -> None:
    w = torch.randn(200, 300)
    w[:128, 128:256] = 0
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (2, 3)
    assert s[0, 1] == 1.0
    assert torch.allclose(s[1, 2], w[128:, 256:].abs().max() / 448)
    assert q.float().abs().amax() <= 448
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        dequantize_fp8_blockwise(q, s[:1])


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 20_000])
def test_fp8_checkpoint_is_dequantized_on_load(tmp_path: Path, max_shard_bytes: int) -> None:
    weights, state = _fp8_state()
    out = save_checkpoint(state, tmp_path / "ck", {"quantization_config": {"quant_method": "fp8"}},
                          max_shard_bytes=max_shard_bytes)
    r = CheckpointReader(out)
    assert r.keys() == sorted([*weights, "model.norm.weight"])  # scale companions hidden
    assert not any(k.endswith("weight_scale_inv") for k in r.keys())
    got = r.get_many(r.keys())
    for k, w in weights.items():
        scale_key = k.removesuffix(".weight") + ".weight_scale_inv"
        assert r.dtype_name(k) == "F8_E4M3" and r.shape(k) == tuple(w.shape)
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], dequantize_fp8_blockwise(state[k], state[scale_key]))
        # e4m3 has 3 mantissa bits: relative error <= 2^-4, plus half the smallest subnormal (2^-10) x scale
        scale = state[scale_key].repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        assert ((got[k] - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all(), k
        assert torch.equal(r.get(k, dtype=torch.bfloat16), got[k].bfloat16())
    if max_shard_bytes == 20_000:  # some weight's scale lives in another shard than the weight
        assert any(r.file_of(k) != r._key_file[k.removesuffix(".weight") + ".weight_scale_inv"] for k in weights)


def test_fp8_block_size_comes_from_config(tmp_path: Path) -> None:
    w = torch.randn(100, 70)
    q, s = quantize_fp8_blockwise(w, (64, 32))
    assert s.shape == (2, 3)
    state = {"x.weight": q, "x.weight_scale_inv": s}
    out = save_checkpoint(state, tmp_path / "ck", {"quantization_config": {"weight_block_size": [64, 32]}})
    assert torch.equal(CheckpointReader(out).get("x.weight"), dequantize_fp8_blockwise(q, s, (64, 32)))
    # with the default 128x128 blocks that scale has the wrong shape
    bad = save_checkpoint(state, tmp_path / "bad")
    with pytest.raises(CheckpointError, match=r"'x\.weight_scale_inv' has shape \(2, 3\), expected \(1, 1\)"):
        CheckpointReader(bad).get("x.weight")
    cfg_bad = save_checkpoint(state, tmp_path / "cfgbad", {"quantization_config": {"weight_block_size": [0, 1]}})
    with pytest.raises(ValueError, match="config.json: quantization_config.weight_block_size"):
        CheckpointReader(cfg_bad)


# ---------------------------------------------------------------- bad inputs

def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no .safetensors"):
        CheckpointReader(tmp_path / "empty")


def test_pickle_checkpoints_are_refused_unopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **kw):
        raise AssertionError("unpickled!")
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04garbage that is not a pickle at all")
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="pytorch_model.bin.*never unpickles.*safetensors"):
        CheckpointReader(folder)
    with pytest.raises(ValueError, match="never unpickles"):
        CheckpointReader(folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").rename(folder / "weights.pt")
    with pytest.raises(ValueError, match="weights.pt.*never unpickles"):
        CheckpointReader(folder)


def test_index_problems(tmp_path: Path) -> None:
    out = save_checkpoint(_state(), tmp_path / "ck", max_shard_bytes=3000)
    index = out / "model.safetensors.index.json"
    (out / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.index.json names shard 'model-00002-of-00005"):
        CheckpointReader(out)
    index.write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match="model.safetensors.index.json: malformed index JSON"):
        CheckpointReader(out)
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json: malformed index"):
        CheckpointReader(out)
    # the index names a key its shard does not hold
    index.write_text(json.dumps({"weight_map": {"ghost.weight": "model-00001-of-00005.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00005.safetensors: tensor 'ghost.weight' is listed"):
        CheckpointReader(out).get("ghost.weight")


def test_missing_key_names_it_and_suggests(tmp_path: Path) -> None:
    r = CheckpointReader(save_checkpoint(_state(), tmp_path / "ck"))
    with pytest.raises(CheckpointError,
                       match=r"ck: tensor 'model\.norm\.weigth' not found.*did you mean 'model\.norm\.weight'"):
        r.get("model.norm.weigth")
    with pytest.raises(CheckpointError, match="'nothing.like.it' not found"):
        r.get_many(["model.norm.weight", "nothing.like.it"])
    with pytest.raises(CheckpointError):
        r.shape("nope")


def test_unsupported_dtype(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.float8_e5m2), "b": torch.zeros(2)}, f)
    r = CheckpointReader(f)
    assert r.dtype_name("a.weight") == "F8_E5M2"
    with pytest.raises(CheckpointError, match=r"w\.safetensors: tensor 'a\.weight' has dtype F8_E5M2"):
        r.get("a.weight")
    assert torch.equal(r.get("b"), torch.zeros(2))


def test_non_finite_values(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    q, s = quantize_fp8_blockwise(torch.randn(4, 4))
    s[0, 0] = float("inf")
    save_file({"nan": torch.tensor([1.0, float("nan")]).bfloat16(), "inf": torch.tensor([float("inf")]),
               "ok": torch.ones(2), "q.weight": q, "q.weight_scale_inv": s}, f)
    r = CheckpointReader(f)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: tensor 'nan' has 1 NaN/Inf"):
        r.get("nan")
    with pytest.raises(CheckpointError, match="tensor 'inf' has 1 NaN/Inf"):
        r.get_many(["ok", "inf"])
    with pytest.raises(CheckpointError, match="tensor 'q.weight' has 16 NaN/Inf"):  # checked after dequant
        r.get("q.weight")
    assert r.get("nan", check_finite=False).isnan().any()
    with pytest.raises(CheckpointError, match="'big' has 1 NaN/Inf values of 1 \\(as torch.float16\\)"):
        save_file({"big": torch.tensor([1e6])}, tmp_path / "big.safetensors")
        CheckpointReader(tmp_path / "big.safetensors").get("big", dtype=torch.float16)


def test_fp8_scale_problems(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    q, s = quantize_fp8_blockwise(torch.randn(200, 300))
    save_file({"a.weight": q, "b.weight": q.clone(), "b.weight_scale_inv": s[:, :2].contiguous(),
               "c.weight": torch.ones(3, 3), "c.weight_scale_inv": torch.ones(1, 1)}, f)
    r = CheckpointReader(f)
    with pytest.raises(ValueError, match=r"'a\.weight' is stored as F8_E4M3 but has no 'a\.weight_scale_inv'"):
        r.get("a.weight")
    with pytest.raises(CheckpointError,
                       match=r"'b\.weight_scale_inv' has shape \(2, 2\), expected \(2, 3\) for 'b\.weight'"):
        r.get("b.weight")
    with pytest.raises(CheckpointError, match=r"'c\.weight' is stored as F32 but has a 'c\.weight_scale_inv'"):
        r.get("c.weight")
    with pytest.raises(CheckpointError, match="scale companion"):
        r.get("b.weight_scale_inv")


@pytest.mark.parametrize("content", [
    b"",                                                    # empty
    b"\xff" * 16,                                           # absurd length prefix
    (12).to_bytes(8, "little") + b"{not json!}!",           # bad JSON
    (2).to_bytes(8, "little") + b"[]",                      # not an object
    (60).to_bytes(8, "little") + b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}    ',  # truncated data
])
def test_corrupt_header(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        CheckpointReader(tmp_path)


# ---------------------------------------------------------------- atomic writes

def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    out = save_checkpoint(_state(0), tmp_path / "ck")
    with pytest.raises(FileExistsError, match="ck exists and is not empty"):
        save_checkpoint(_state(1), out)
    _assert_same(CheckpointReader(out), _state(0))
    save_checkpoint(_state(1), out, overwrite=True, max_shard_bytes=3000)
    assert not (out / "model.safetensors").exists()  # the old folder is replaced, not merged
    _assert_same(CheckpointReader(out), _state(1))
    assert _leftovers(tmp_path) == []
    (tmp_path / "emptydir").mkdir()
    save_checkpoint(_state(0), tmp_path / "emptydir")  # an empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file exists and is not a folder"):
        save_checkpoint(_state(0), tmp_path / "file")


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           overwrite: bool) -> None:
    target = tmp_path / "ck"
    if overwrite:
        save_checkpoint(_state(0), target)
    real, calls = ckpt.save_file, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **kw)
    monkeypatch.setattr(ckpt, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(1), target, max_shard_bytes=3000, overwrite=overwrite)
    assert len(calls) == 2
    monkeypatch.setattr(ckpt, "save_file", real)
    # a failure after the shards are written (NaN is not JSON) is just as clean
    with pytest.raises(ValueError):
        save_checkpoint(_state(1), target, extra_json={"x.json": {"v": float("nan")}}, overwrite=overwrite)
    if overwrite:
        _assert_same(CheckpointReader(target), _state(0))
    else:
        assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a': expected a torch.Tensor, got list"):
        save_checkpoint({"a": [1, 2]}, tmp_path / "ck")
    with pytest.raises(ValueError, match="'m': is on the meta device"):
        save_checkpoint({"m": torch.empty(2, device="meta")}, tmp_path / "ck")
    with pytest.raises(ValueError, match="extra_json name '../evil.json'"):
        save_checkpoint({"a": torch.ones(1)}, tmp_path / "ck", extra_json={"../evil.json": {}})
    assert list(tmp_path.iterdir()) == []


def test_save_tensors_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "opt" / "rank0.safetensors"
    state = {"exp_avg": torch.randn(3, 4), "step": torch.tensor(5)}
    assert save_tensors(state, f) == f
    r = CheckpointReader(f)
    assert all(torch.equal(r.get(k), v) for k, v in state.items())

    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_tensors({"exp_avg": torch.zeros(3, 4)}, f)
    assert sorted(p.name for p in f.parent.iterdir()) == ["rank0.safetensors"]
    assert torch.equal(CheckpointReader(f).get("exp_avg"), state["exp_avg"])
