"""Model configuration: the fields of HF `deepseek_v3` config.json, frozen, validated.

Field names are HF's so a checkpoint's config.json maps onto this class without a translation table.
Unknown keys are ignored (config.json carries many we do not need); bad values raise `ValueError`
naming the field and the value. Sizes that follow from the fields are properties, never stored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsray.files import read_json_object

_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
_SCORING = ("sigmoid", "softmax")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # one routed (or shared) expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    # HF's `rope_scaling` / v5 `rope_parameters`, normalised to a dict with "rope_type" (None: plain RoPE).
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # Extra keys that are kept verbatim so save_pretrained writes back what it read.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings", "moe_layer_freq"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "expected a positive integer")
        for name in ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                     "first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "expected a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise bad("q_lora_rank", "expected a positive integer or null")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "RoPE rotates pairs, so it must be even")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"more dense layers than num_hidden_layers={self.num_hidden_layers}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU experts) is supported")
        if self.topk_method not in _TOPK_METHODS:
            raise bad("topk_method", f"expected one of {_TOPK_METHODS}")
        if self.scoring_func not in _SCORING:
            raise bad("scoring_func", f"expected one of {_SCORING}")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "expected > 0")
        if self.rope_theta <= 0:
            raise bad("rope_theta", "expected > 0")
        if self.has_moe:
            e, g = self.n_routed_experts, self.n_group
            if not isinstance(g, int) or g <= 0:
                raise bad("n_group", "expected a positive integer")
            if e % g:
                raise bad("n_routed_experts", f"not divisible by n_group={g}")
            if not 0 < self.topk_group <= g:
                raise bad("topk_group", f"expected 1..n_group={g}")
            if not 0 < self.num_experts_per_tok <= e:
                raise bad("num_experts_per_tok", f"expected 1..n_routed_experts={e}")
            limited = self.topk_method in ("noaux_tc", "group_limited_greedy")
            if limited and self.num_experts_per_tok > self.topk_group * (e // g):
                raise bad("num_experts_per_tok",
                          f"more than the {self.topk_group} kept groups of {e // g} experts hold")
            if self.topk_method == "noaux_tc" and g > 1 and e // g < 2:
                raise bad("n_group", "noaux_tc scores a group by its top-2 experts; groups need >= 2 experts")
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "expected a positive integer for an MoE model")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise bad("intermediate_size", "dense layers need a positive intermediate_size")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("yarn", "default", None):
                raise bad("rope_scaling", "only YaRN scaling (rope_type 'yarn') is supported")
            if kind == "yarn":
                if not rs.get("factor") or rs["factor"] <= 0:
                    raise bad("rope_scaling", "YaRN needs a positive 'factor'")
                if not rs.get("original_max_position_embeddings"):
                    raise bad("rope_scaling", "YaRN needs 'original_max_position_embeddings'")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts > 0 and any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's rule; MTP blocks (index >= num_hidden_layers) follow it too."""
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    @property
    def moe_layers(self) -> list[int]:
        """Indices of MoE layers in forward order: main layers, then MTP blocks (num_hidden_layers + k)."""
        n = self.num_hidden_layers + self.num_nextn_predict_layers
        return [i for i in range(n) if self.is_moe_layer(i)]

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")) or "default"

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """MLA caches only c_kv and k_pe: layers x (kv_lora_rank + qk_rope_head_dim) x bytes."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes

    def param_counts(self) -> dict[str, int]:
        """Total and per-token-activated parameters (embeddings and head included), for planning."""
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            attn = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            attn = d * h * self.qk_head_dim
        attn += (d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                 + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim) + h * self.v_head_dim * d)
        expert = 3 * d * self.moe_intermediate_size
        dense = 3 * d * self.intermediate_size
        total = active = 0
        for i in range(self.num_hidden_layers):
            total += attn + 2 * d
            active += attn + 2 * d
            if self.is_moe_layer(i):
                shared = expert * self.n_shared_experts + d * self.n_routed_experts
                total += shared + expert * self.n_routed_experts
                active += shared + expert * self.num_experts_per_tok
            else:
                total += dense
                active += dense
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return {"total": total + emb + d, "activated": active + emb + d}

    # ---- I/O --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type")
        if mt is not None and mt not in ("deepseek_v3", "kimi_k2", "deepseek_v2"):
            raise ValueError(f"model_type={mt!r}: dsray runs deepseek_v3-family models")
        # HF v5 writes `rope_parameters` (rope_theta inside); older configs `rope_theta` + `rope_scaling`.
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
                d["rope_scaling"] = rp
        rs = d.get("rope_scaling")
        if rs:
            rs = dict(rs)
            rs.setdefault("rope_type", rs.pop("type", "default"))
            d["rope_scaling"] = None if rs["rope_type"] == "default" else rs
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k in ("quantization_config", "torch_dtype", "dtype")}
        for k in ("n_group", "topk_group"):
            if known.get(k, 1) is None:
                known[k] = 1
        if known.get("num_experts_per_tok") is None and "num_experts_per_tok" in known:
            known.pop("num_experts_per_tok")
        if known.get("n_routed_experts") is None and "n_routed_experts" in known:
            known["n_routed_experts"] = 0
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a checkpoint folder's config.json, or a config.json path."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"{f}: no config.json (expected a HF deepseek_v3 checkpoint folder)")
        d = read_json_object(f, "model config")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise ValueError(f"{f}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """HF-style config.json content (both rope spellings, so old and new readers agree)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        rp = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rp.update(self.rope_scaling)
        d.update(self.extra)
        d.pop("torch_dtype", None)
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], rope_parameters=rp,
                 num_key_value_heads=self.num_attention_heads, head_dim=self.qk_rope_head_dim,
                 rope_interleave=True)
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _yarn(factor: float, original: int, beta_fast: float = 32, beta_slow: float = 1) -> dict[str, Any]:
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": 1.0, "mscale_all_dim": 1.0}


PRESETS: dict[str, ModelConfig] = {
    # Tiny: byte-level vocab (256 bytes + specials), trains on 2 CPU cores in seconds. Every feature on:
    # q_lora, grouped routing (4 groups, keep 2), a dense first layer, a shared expert, one MTP block.
    "debug": ModelConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=1024, num_nextn_predict_layers=1, bos_token_id=256, eos_token_id=257),
    "v3-671b": ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_theta=10000.0, rope_scaling=_yarn(40, 4096), max_position_embeddings=163840,
        num_nextn_predict_layers=1),
    "moonlight-16b-a3b": ModelConfig(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.446,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_theta=50000.0, max_position_embeddings=8192, num_nextn_predict_layers=0,
        bos_token_id=163584, eos_token_id=163585),
    "kimi-k2": ModelConfig(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=1, num_attention_heads=64, n_routed_experts=384,
        n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=2.827,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_theta=50000.0, rope_scaling=_yarn(32, 4096, 1, 1), max_position_embeddings=131072,
        num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163585),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def resolve_config(spec: "str | os.PathLike | ModelConfig") -> ModelConfig:
    """A preset name, a config.json / checkpoint folder path, or a ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    p = Path(spec)
    if p.exists():
        return ModelConfig.from_pretrained(p)
    raise ValueError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing config path")



@dataclass(frozen=True)
class GenerationConfig:
    """Generation defaults of a checkpoint, read the way HF reads them: `generation_config.json` when the
    folder has one, else the token ids of `config.json`. Explicit arguments to `generate` override.

    HF's defaults apply to what the file leaves out: greedy unless `do_sample`; when sampling,
    temperature 1.0, top_k 50, top_p 1.0. Rows that stop at an eos id are padded with `pad_token_id`,
    or with the (first) eos id when the checkpoint names no pad token, as HF's `generate` does."""

    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0

    FILE = "generation_config.json"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "generation config") -> "GenerationConfig":
        eos = d.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
        top_k = d.get("top_k", 50)
        out = cls(eos_token_id=eos_ids, pad_token_id=d.get("pad_token_id"), do_sample=bool(d.get("do_sample", False)),
                  temperature=float(d.get("temperature", 1.0) if d.get("temperature") is not None else 1.0),
                  top_k=None if not top_k else int(top_k), top_p=d.get("top_p", 1.0))
        if out.temperature < 0 or (out.top_p is not None and not 0 < out.top_p <= 1):
            raise ValueError(f"{where}: temperature={out.temperature}, top_p={out.top_p}: expected "
                             "temperature >= 0 and top_p in (0, 1]")
        return out

    @classmethod
    def for_model(cls, cfg: ModelConfig, folder: str | os.PathLike | None = None) -> "GenerationConfig":
        """The checkpoint's generation_config.json if `folder` has one, else `cfg`'s eos id."""
        f = Path(folder) / cls.FILE if folder is not None else None
        if f is not None and f.is_file():
            return cls.from_dict(read_json_object(f, "generation config"), str(f))
        return cls(eos_token_id=() if cfg.eos_token_id is None else (int(cfg.eos_token_id),))

    def sampling(self, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None) -> tuple[float, int | None, float | None]:
        """(temperature, top_k, top_p) for a call: explicit values win; 0 temperature means greedy."""
        if temperature is None:
            temperature = self.temperature if self.do_sample else 0.0
        if temperature == 0:
            return 0.0, None, None
        return float(temperature), top_k if top_k is not None else self.top_k, top_p if top_p is not None else self.top_p

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        return self.eos_token_id[0] if self.eos_token_id else 0

    def to_dict(self) -> dict[str, Any]:
        eos = list(self.eos_token_id)
        return {"eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": self.pad_token_id,
                "do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k or 0,
                "top_p": self.top_p}


# What dsray writes into checkpoints it saves when the source named no sampling defaults.
DSRAY_SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 0.95}
