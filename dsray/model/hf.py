"""Map our module tree onto the official DeepSeek-V3 checkpoint layout (what HF `save_pretrained` writes).

Ours                                   Checkpoint
model.layers.N.mlp.experts.gate_proj   model.layers.N.mlp.experts.E.gate_proj.weight  (for each E; stacked here)
mtp.K.<anything>                       model.layers.{num_hidden_layers+K}.<anything>
(shared with the main model)           model.layers.{L+K}.embed_tokens.weight, ...shared_head.head.weight (copies)
everything else                        the same name
"""

from __future__ import annotations

import logging
import os
import re

import torch

from dsray.checkpoint import CheckpointError, CheckpointReader, save_checkpoint
from dsray.config import ModelConfig

log = logging.getLogger(__name__)

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAM = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


def expert_key(layer: int, expert: int, proj: str) -> str:
    """Checkpoint key of one routed expert's projection; `layer` is the checkpoint layer index."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def to_hf_name(name: str, cfg: ModelConfig) -> str:
    m = _MTP.match(name)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    return name


def _mtp_copies(cfg: ModelConfig, k: int) -> tuple[str, str]:
    base = f"model.layers.{cfg.num_hidden_layers + k}"
    return f"{base}.embed_tokens.weight", f"{base}.shared_head.head.weight"


def _hf_layer_of(hf_prefix: str) -> int:
    return int(hf_prefix.split(".")[2])


def load_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", expert_impl: str = "grouped",
                    experts: bool = True):
    """Build `cls` (Transformer) on the meta device, then assign tensors read from the checkpoint.

    experts=False leaves the routed experts out entirely (driver ranks: experts live on shards), and
    never reads their tensors."""
    from dsray.model.rope import rope_frequencies

    reader = CheckpointReader(path)
    if reader.config_dict is None:
        raise FileNotFoundError(f"{path}: no config.json beside the weights")
    try:
        cfg = ModelConfig.from_dict(reader.config_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{reader.path / 'config.json'}: {e}") from None
    L = cfg.num_hidden_layers
    has_mtp = cfg.num_nextn_predict_layers > 0 and f"model.layers.{L}.eh_proj.weight" in reader
    if cfg.num_nextn_predict_layers and not has_mtp:
        log.warning("%s: config asks for %d MTP module(s) but the checkpoint has none; loading without MTP",
                    path, cfg.num_nextn_predict_layers)
    with torch.device("meta"):
        model = cls(cfg, expert_impl, mtp=has_mtp)
    if not experts:
        for m in model.moe_modules():
            m.experts = None

    wanted: dict[str, tuple[str, ...]] = {}  # our name -> checkpoint keys it is made of
    shapes: dict[str, torch.Size] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "rotary.inv_freq":
            continue
        shapes[name] = t.shape
        m = EXPERT_PARAM.match(name)
        if m:
            hf_prefix = to_hf_name(m.group(1), cfg)
            layer = _hf_layer_of(hf_prefix)
            wanted[name] = tuple(expert_key(layer, e, m.group(2)) for e in range(t.shape[0]))
        else:
            wanted[name] = (to_hf_name(name, cfg),)

    missing = [k for keys in wanted.values() for k in keys if k not in reader]
    if missing:
        raise CheckpointError(f"{reader.path}: {len(missing)} tensor(s) the config needs are missing, "
                              f"e.g. {missing[:3]} (config.json and weights disagree?)")
    used = {k for keys in wanted.values() for k in keys}
    allowed = set()
    for k in range(len(model.mtp)):
        allowed.update(_mtp_copies(cfg, k))
    if not experts:
        allowed.update(k for k in reader.keys() if ".mlp.experts." in k)
    if not has_mtp:
        mtp_layers = {str(L + k) for k in range(cfg.num_nextn_predict_layers)}
        allowed.update(k for k in reader.keys() if k.startswith("model.layers.") and k.split(".")[2] in mtp_layers)
    # HF writes zero-size shared experts when n_shared_experts == 0.
    allowed.update(k for k in reader.keys() if ".shared_experts." in k and 0 in reader.shape(k))
    unexpected = sorted(set(reader.keys()) - used - allowed)
    if unexpected:
        raise CheckpointError(f"{reader.path}: {len(unexpected)} tensor(s) the config does not use, e.g. "
                              f"{unexpected[:3]} (config.json and weights disagree?)")

    tensors = reader.get_many(sorted(used), device=device)
    state = {}
    for name, keys in wanted.items():
        keep_fp32 = ".mlp.gate." in name  # router weight and bias stay fp32
        parts = [tensors.pop(k) for k in keys]
        t = torch.stack(parts) if EXPERT_PARAM.match(name) else parts[0]
        if t.shape != shapes[name]:
            raise CheckpointError(f"{reader.path}: tensor {keys[0]!r} has shape {tuple(parts[0].shape)}, "
                                  f"the config expects {tuple(shapes[name][1:] if len(keys) > 1 else shapes[name])}")
        state[name] = t.to(torch.float32 if keep_fp32 else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    with torch.no_grad():
        model.rotary.inv_freq = rope_frequencies(cfg)[0].to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint keys (experts unstacked, MTP renamed, copies added)."""
    cfg: ModelConfig = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = EXPERT_PARAM.match(name)
        if m:
            layer = _hf_layer_of(to_hf_name(m.group(1), cfg))
            for e in range(t.shape[0]):
                out[expert_key(layer, e, m.group(2))] = t[e]
        else:
            out[to_hf_name(name, cfg)] = t
    for k in range(len(model.mtp)):
        emb, head = _mtp_copies(cfg, k)
        out[emb] = model.model.embed_tokens.weight.detach()
        out[head] = model.lm_head.weight.detach()
    return out


def save_pretrained(model, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
                    extra_json: dict | None = None, overwrite: bool = False) -> None:
    cfg: ModelConfig = model.cfg
    conf = cfg.to_dict()
    conf["num_nextn_predict_layers"] = len(model.mtp)
    dtype = model.lm_head.weight.dtype
    conf["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_checkpoint(hf_state_dict(model), path, conf, max_shard_bytes=max_shard_bytes,
                    extra_json=extra_json, overwrite=overwrite)
