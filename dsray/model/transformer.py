"""The DeepSeek-V3 decoder: embed -> layers (MLA + dense MLP or MoE) -> norm -> lm head, plus MTP.

Module names follow HF's `DeepseekV3ForCausalLM` (model.layers.N.self_attn.kv_a_proj_with_mqa, ...), so
checkpoint keys map one-to-one except the routed experts, which we stack ([E, I, D]) and the checkpoint
keeps per expert, and MTP blocks, which live in `mtp.k` here and at `model.layers.{num_hidden_layers+k}`
in the checkpoint (see dsray/model/hf.py).

Shape legend: B batch, S sequence, D hidden, V vocab.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsray.config import ModelConfig
from dsray.model.decode import Decoding, Sampling
from dsray.model.mla import MLA, LatentCache
from dsray.model.moe import MLP, MoE, RouteLog
from dsray.model.rope import RMSNorm, Rotary


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, expert_impl: str = "grouped") -> None:
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (MoE(cfg, expert_impl) if cfg.is_moe_layer(index)
                               else MLP(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, cache_slot: int = 0, start_pos: int = 0,
                log: RouteLog | None = None, pad_B: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_slot, start_pos, pad_B)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, log, valid) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPBlock(DecoderLayer):
    """Multi-token prediction depth k: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i^{k-1})]) -> decoder layer.

    The embedding and output head are the main model's (the checkpoint stores copies of them)."""

    def __init__(self, cfg: ModelConfig, index: int, expert_impl: str = "grouped") -> None:
        super().__init__(cfg, index, expert_impl)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor,  # type: ignore[override]
                sin: torch.Tensor, cache: LatentCache | None = None, start_pos: int = 0,
                log: RouteLog | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, cos, sin, cache, 0, start_pos, log)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_impl: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, expert_impl) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_impl: str = "grouped", mtp: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, expert_impl)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n_mtp = cfg.num_nextn_predict_layers if mtp else 0
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_hidden_layers + k, expert_impl) for k in range(n_mtp))
        self.rotary = Rotary(cfg)

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    expert_impl: str = "grouped", device: str | torch.device = "cpu", experts: bool = True,
                    mtp: bool = True) -> "Transformer":
        """A freshly initialised model (normal(0, initializer_range) weights, ones for norms).

        Built on the meta device and materialised once; experts=False leaves the routed experts out
        (driver ranks of expert parallelism never allocate them)."""
        from dsray.model.rope import rope_frequencies

        with torch.device("meta"):
            model = cls(cfg, expert_impl, mtp=mtp)
        if not experts:
            for m in model.moe_modules():
                m.experts = None
        model = model.to_empty(device=device)
        model.init_weights(seed)
        for m in model.moe_modules():
            m.gate.e_score_correction_bias.zero_()
        model.rotary.inv_freq = rope_frequencies(cfg)[0].to(device)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(dtype).keep_fp32_router()

    def init_weights(self, seed: int = 0) -> None:
        """normal(0, initializer_range) weights, ones for norms, zero bias; keyed by checkpoint name."""
        from dsray.model.hf import EXPERT_PARAM, to_hf_name
        from dsray.model.init import init_expert, init_tensor

        std = self.cfg.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                m = EXPERT_PARAM.match(name)
                if m:
                    layer = int(to_hf_name(m.group(1), self.cfg).split(".")[2])
                    for e in range(p.shape[0]):
                        p[e].copy_(init_expert(self.cfg, layer, e, m.group(2), seed))
                else:
                    p.copy_(init_tensor(to_hf_name(name, self.cfg), tuple(p.shape), std, seed))

    def keep_fp32_router(self) -> "Transformer":
        """Router weights and bias stay fp32 in every model dtype (as in HF and the V3 reference)."""
        for m in self.moe_modules():
            m.gate.float()
        self.rotary.inv_freq.data = self.rotary.inv_freq.float()
        return self

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        expert_impl: str = "grouped") -> "Transformer":
        """Load a HF deepseek_v3 safetensors folder (bf16/fp32 or FP8 block-scaled) into one process."""
        from dsray.model.hf import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, expert_impl=expert_impl)

    def save_pretrained(self, path, *, max_shard_bytes: int = 5 * 2**30, extra_json: dict | None = None,
                        overwrite: bool = False) -> None:
        """Write a HF folder in the official DeepSeek-V3 key layout (per-expert keys, MTP at layer L+k)."""
        from dsray.model.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, extra_json=extra_json, overwrite=overwrite)

    # ---- forward -------------------------------------------------------------------------------------
    def moe_modules(self) -> list[MoE]:
        """MoE layers in forward order: main layers, then MTP blocks."""
        layers = list(self.model.layers) + list(self.mtp)
        return [layer.mlp for layer in layers if isinstance(layer.mlp, MoE)]

    def hidden(self, input_ids_BS: torch.Tensor, cache: LatentCache | None = None, start_pos: int = 0,
               log: RouteLog | None = None, pad_B: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-norm last hidden state, final-normed hidden state), both [B, S, D].

        `pad_B` (left padding per row of a batched prompt): row b's columns < pad_B[b] are padding; each
        row's positions start at its first real column, padding keys are masked and padding tokens are
        routed to no expert."""
        S = input_ids_BS.shape[1]
        x = self.model.embed_tokens(input_ids_BS)
        pos = torch.arange(start_pos, start_pos + S, device=input_ids_BS.device)
        valid = None
        if pad_B is not None:
            pos = pos[None] - pad_B[:, None]
            valid = pos >= 0
            pos = pos.clamp_min(0)
        cos, sin = self.rotary(pos, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, start_pos, log, pad_B, valid)
        return x, self.model.norm(x)

    def forward(self, input_ids_BS: torch.Tensor, cache: LatentCache | None = None, start_pos: int = 0,
                log: RouteLog | None = None, pad_B: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids_BS, cache, start_pos, log, pad_B)[1])

    def mtp_logits(self, input_ids_BS: torch.Tensor, h_BSD: torch.Tensor, log: RouteLog | None = None
                   ) -> list[torch.Tensor]:
        """Logits of each MTP depth k: position i predicts token i+k+1; depth k has S-k positions.

        h_BSD is the main model's final-normed hidden state (what the V3 MTP modules consume)."""
        out, h = [], h_BSD
        emb = self.model.embed_tokens(input_ids_BS)
        for k, block in enumerate(self.mtp, start=1):
            S = h.shape[1] - 1
            if S <= 0:
                break
            pos = torch.arange(S, device=h.device)
            cos, sin = self.rotary(pos, h.dtype)
            h = block(h[:, :S], emb[:, k:k + S], cos, sin, log=log)
            out.append(self.lm_head(block.shared_head.norm(h)))
        return out

    def loss(self, input_ids_BS: torch.Tensor, mtp_weight: float = 0.3, n_tokens: int | None = None,
             seq_aux_alpha: float = 0.0, n_sequences: int | None = None, log: RouteLog | None = None
             ) -> dict[str, torch.Tensor]:
        """Next-token cross entropy (+ MTP, + the sequence-wise balance loss when seq_aux_alpha > 0).
        Sums are divided by `n_tokens` / `n_sequences` (default: this batch's), so data-parallel ranks
        can pass the global counts and simply add gradients. `counts` [L, E]: tokens per expert."""
        log = log if log is not None else RouteLog()
        # A log is one call's: a used one would stack two calls' counts and shift replay by a call's layers;
        # an alpha set on the log would be silently replaced by the argument's.
        if log.counts or log.balance or log.ids:
            raise ValueError(f"log: holds {len(log.counts)} layer(s) of an earlier call; "
                             "pass a fresh RouteLog per call")
        if log.seq_aux_alpha not in (0.0, seq_aux_alpha):
            raise ValueError(f"seq_aux_alpha={seq_aux_alpha} but log.seq_aux_alpha={log.seq_aux_alpha}: pass the "
                             "alpha to loss(seq_aux_alpha=...)")
        log.seq_aux_alpha = seq_aux_alpha
        _, h = self.hidden(input_ids_BS, log=log)
        logits = self.lm_head(h)
        V = logits.shape[-1]
        tgt = input_ids_BS[:, 1:]
        n = n_tokens if n_tokens is not None else tgt.numel()
        main = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tgt.reshape(-1), reduction="sum") / n
        out = {"loss": main, "total": main}
        mtp = self.mtp_logits(input_ids_BS, h, log)
        if mtp:
            terms = []
            for k, lg in enumerate(mtp, start=1):
                t = input_ids_BS[:, k + 1:]
                lg = lg[:, :t.shape[1]]
                terms.append(F.cross_entropy(lg.reshape(-1, V).float(), t.reshape(-1), reduction="sum")
                             / max(n, 1))
            out["mtp_loss"] = torch.stack(terms).mean()
            out["total"] = main + mtp_weight * out["mtp_loss"]
        if log.balance:
            n_seq = n_sequences if n_sequences is not None else input_ids_BS.shape[0]
            out["balance_loss"] = torch.stack([b.sum() for b in log.balance]).sum() / n_seq
            out["total"] = out["total"] + out["balance_loss"]
        out["counts"] = log.counts_LE()
        return out

    # ---- generation ----------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> LatentCache:
        p = self.lm_head.weight
        return LatentCache.allocate(self.cfg, self.cfg.num_hidden_layers, batch, max_len, p.dtype, p.device)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | list[torch.Tensor], max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Greedy (temperature 0) or sampled decoding with the latent cache; prompt + new ids.

        A [B, S] tensor gives [B, S + n] (rows that finished early padded with `pad_token_id`, default the
        eos id, as HF pads); a list of 1-D prompts of any lengths decodes as one left-padded batch and
        gives a list (each row cut after its first eos). `eos_token_id` None: the config's eos id;
        () or []: never stop early."""
        if eos_token_id is None:
            eos_token_id = () if self.cfg.eos_token_id is None else (self.cfg.eos_token_id,)
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        s = Sampling(temperature, top_k, top_p, eos, pad)
        as_list = isinstance(input_ids, (list, tuple))
        d = Decoding(list(input_ids) if as_list else list(input_ids), max_new_tokens, s, self.new_cache, seed=seed)
        while not d.finished:
            d.step(lambda feed, pos, pad_B, log: self.forward(feed, d.cache, pos, log, pad_B)[:, -1])
        return d.rows() if as_list else d.tokens()
