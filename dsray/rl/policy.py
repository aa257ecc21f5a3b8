"""The GRPO policy step on one model, with rollout routing replay. Pure torch, no ray.

`policy_loss` is what the Engine's driver ranks call on their share of a batch; `LocalPolicy` is the
Engine's RL contract (generate with routing and log-probs, logprobs, set_reference, grpo_step,
train_step, stats, save) in one process: a Python API for single-process RL and the reference the
Engine is tested against.

Shape legend: B sequences, S tokens, T = S - 1 next-token positions (position t scores token t + 1),
L main MoE layers (forward order, no MTP), K experts per token, E routed experts.

Which positions count (written once, here):
- trained position (b, t): `completion_mask[b, t]`; the loss reads the log-prob of token t + 1 there.
- mismatch: compared at the trained positions, on the experts of the token *at* position t (the pass
  that produced the logits scoring token t + 1), layer by layer, as sets (order within top-k is
  free). `mismatch_tokens` = trained positions with >= 1 differing layer / trained positions;
  `mismatch_pairs` = differing (position, layer) pairs / (trained positions x L). "Live" routing is
  the gate's own choice on this pass: without replay, the experts used; with replay, the experts the
  gate would have chosen (the ones used are the rollout's by construction).
- counts [L, E] (load actually served, for the Router's bias): expert assignments of every real
  token, i.e. positions 0 .. last trained position + 1 of each row (prompt and completion); right
  padding after it is not counted, nor is any position of a row without trained positions.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dsray.model.decode import Decoding, Sampling
from dsray.model.moe import RouteLog
from dsray.rl.grpo import grpo_loss, token_logprobs

Batch = dict[str, Any]


def routing_dtype(n_experts: int) -> torch.dtype:
    """How rollout routing is stored: uint8 for <= 256 experts, int16 otherwise."""
    return torch.uint8 if n_experts <= 256 else torch.int16


def check_routing(routing_BSLK: torch.Tensor, B: int, S: int, L: int, K: int, E: int,
                  name: str = "routing") -> None:
    """ValueError naming `name` unless routing is an integer [B, S, L, K] tensor of ids in [0, E)."""
    if not isinstance(routing_BSLK, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor [B, S, L, K], got {type(routing_BSLK).__name__}")
    if tuple(routing_BSLK.shape) != (B, S, L, K):
        raise ValueError(f"{name}: shape {tuple(routing_BSLK.shape)}, expected [B, S, L, K] = {(B, S, L, K)} "
                         f"(L = {L} main MoE layers, K = {K} experts per token)")
    if routing_BSLK.is_floating_point() or routing_BSLK.dtype == torch.bool or routing_BSLK.is_complex():
        raise ValueError(f"{name}: expected integer expert ids, got {routing_BSLK.dtype}")
    # host sync: an id >= E would index out of the gate's scores (a device-side assert on GPU)
    if routing_BSLK.numel() and (int(routing_BSLK.min()) < 0 or int(routing_BSLK.max()) >= E):
        raise ValueError(f"{name}: expert ids must be in [0, {E}) (n_routed_experts), got "
                         f"[{int(routing_BSLK.min())}, {int(routing_BSLK.max())}]")


def _moe_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.cfg
    L = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return L, cfg.num_experts_per_tok, cfg.n_routed_experts


def _replay_log(model: nn.Module, ids_BS: torch.Tensor, routing_BSLK: torch.Tensor | None,
                record: bool = False) -> RouteLog:
    B, S = ids_BS.shape
    L, K, E = _moe_shape(model)
    if routing_BSLK is None:
        return RouteLog(record=record)
    check_routing(routing_BSLK, B, S, L, K, E)
    r = routing_BSLK.to(ids_BS.device, torch.int64)
    return RouteLog(record=record, replay=[r[:, :, layer].reshape(B * S, K) for layer in range(L)])


def sequence_logprobs(model: nn.Module, ids_BS: torch.Tensor, routing_BSLK: torch.Tensor | None = None,
                      temperature: float = 1.0, pad_B: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S-1] fp32 log-probs of every next token under softmax(logits / temperature), main model only
    (no MTP). With `routing_BSLK`, every MoE layer uses the recorded experts (rollout routing replay)
    while the gate weights come from the live scores. Carries the gradient when grad is enabled."""
    log = _replay_log(model, ids_BS, routing_BSLK)
    logits = model(ids_BS, log=log, pad_B=pad_B)
    return token_logprobs(logits, ids_BS, temperature)


def check_batch(batch: Batch, cfg) -> tuple[int, int]:
    """(B, S) of a GRPO batch for a model of `cfg`; ValueError naming the key that does not fit (what
    `policy_loss` checks, callable before any rank runs)."""
    L = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return _check_batch(batch, L, cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.vocab_size)


def _check_batch(batch: Batch, L: int, K: int, E: int, V: int) -> tuple[int, int]:
    if not isinstance(batch, dict):
        raise ValueError(f"batch: expected a dict, got {type(batch).__name__}")
    for key in ("ids", "completion_mask", "advantages", "logprobs"):
        if not isinstance(batch.get(key), torch.Tensor):
            raise ValueError(f"batch[{key!r}]: missing or not a tensor")
    ids = batch["ids"]
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch['ids']: expected int64 [B, S] with S >= 2, got {ids.dtype} {tuple(ids.shape)}")
    B, S = ids.shape
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):  # host sync
        raise ValueError(f"batch['ids']: token ids must be in [0, {V}), got [{int(ids.min())}, {int(ids.max())}]")
    for key in ("completion_mask", "logprobs", "ref_logprobs"):
        t = batch.get(key)
        if t is not None and tuple(t.shape) != (B, S - 1):
            raise ValueError(f"batch[{key!r}]: shape {tuple(t.shape)}, expected [B, S-1] = {(B, S - 1)} "
                             "(ids is [B, S])")
    if batch["completion_mask"].dtype != torch.bool:
        raise ValueError(f"batch['completion_mask']: expected bool, got {batch['completion_mask'].dtype}")
    if tuple(batch["advantages"].shape) != (B,):
        raise ValueError(f"batch['advantages']: shape {tuple(batch['advantages'].shape)}, expected ({B},)")
    if batch.get("routing") is not None:
        check_routing(batch["routing"], B, S, L, K, E, "batch['routing']")
    return B, S


def real_tokens(mask_BT: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: positions 0 .. last trained position + 1 of each row (see the module docstring)."""
    B, T = mask_BT.shape
    pos = torch.arange(T, device=mask_BT.device)
    last_B = torch.where(mask_BT, pos, -2).amax(dim=1) if T else torch.full((B,), -2, device=mask_BT.device)
    return torch.arange(T + 1, device=mask_BT.device)[None] <= last_B[:, None] + 1


def routing_mismatch(live_BSLK: torch.Tensor, rollout_BSLK: torch.Tensor, mask_BT: torch.Tensor
                     ) -> tuple[float, float]:
    """(mismatch_tokens, mismatch_pairs) at the trained positions, experts compared as sets."""
    T = mask_BT.shape[1]
    a = live_BSLK[:, :T].long().sort(dim=-1).values
    b = rollout_BSLK[:, :T].to(a.device).long().sort(dim=-1).values
    differ_BTL = (a != b).any(dim=-1)[mask_BT]  # [n_trained, L]
    n = differ_BTL.shape[0]
    if n == 0 or differ_BTL.shape[1] == 0:
        return 0.0, 0.0
    return float(differ_BTL.any(dim=1).sum()) / n, float(differ_BTL.sum()) / differ_BTL.numel()  # host sync


class _GateChoices:
    """Forward hooks on the main layers' gates that record what each gate would choose by itself.
    Under replay the gate returns the replayed ids; the hook reruns it on the same input without them."""

    def __init__(self, model: nn.Module) -> None:
        self.ids: list[torch.Tensor] = []
        gates = [m.gate for m in model.moe_modules()[:_moe_shape(model)[0]]]
        self.handles = [g.register_forward_hook(self._hook) for g in gates]

    def _hook(self, gate: nn.Module, args: tuple, out: tuple) -> None:
        if len(args) > 1 and args[1] is not None:
            with torch.no_grad():  # .forward, not __call__: no second trip through this hook
                self.ids.append(gate.forward(args[0].detach())[1])
        else:
            self.ids.append(out[1].detach())

    def routing(self, B: int) -> torch.Tensor:
        return torch.stack(self.ids, dim=1).view(B, -1, len(self.ids), self.ids[0].shape[-1])

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def policy_loss(model: nn.Module, batch: Batch, *, replay: bool = True, clip_eps: float = 0.2,
                clip_eps_high: float | None = None, kl_coef: float = 0.0, norm: str = "token",
                temperature: float = 1.0, n_norm: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The GRPO loss of `batch` on `model` (with grad) and its statistics.

    batch: "ids" [B, S] (right-padded), "completion_mask" [B, S-1] bool, "advantages" [B],
    "logprobs" [B, S-1] (the rollout's, the "old" policy), optional "ref_logprobs" [B, S-1] (needed
    when kl_coef > 0), optional "routing" [B, S, L, K] logical expert ids (needed when replay=True).
    The loss is `grpo.grpo_loss` on `sequence_logprobs` (`n_norm`: the global denominator when ranks
    each pass a share). Stats: grpo_loss's, plus `loss`, `mismatch_tokens` / `mismatch_pairs` (None
    without routing) and `counts` [L, E] int64, all as defined in the module docstring.
    """
    L, K, E = _moe_shape(model)
    B, S = _check_batch(batch, L, K, E, model.cfg.vocab_size)
    routing = batch.get("routing")
    if replay and routing is None:
        raise ValueError("replay=True: batch has no 'routing' (generate with return_routing=True), "
                         "or pass replay=False")
    ids = batch["ids"].long()
    mask = batch["completion_mask"].to(ids.device)
    log = _replay_log(model, ids, routing if replay else None, record=True)
    choices = _GateChoices(model) if routing is not None else None
    try:
        logits = model(ids, log=log)
    finally:
        if choices is not None:
            choices.close()
    logp = token_logprobs(logits, ids, temperature)
    ref = batch.get("ref_logprobs")
    loss, stats = grpo_loss(logp, batch["logprobs"].to(logp.device), batch["advantages"].to(logp.device), mask,
                            ref_logp_BT=None if ref is None else ref.to(logp.device), clip_eps=clip_eps,
                            clip_eps_high=clip_eps_high, kl_coef=kl_coef, norm=norm, n_norm=n_norm)
    with torch.no_grad():
        used_BSLK = log.routing(B)[:, :, :L]
        real = real_tokens(mask)
        counts = torch.stack([torch.bincount(used_BSLK[:, :, layer][real].flatten(), minlength=E)
                              for layer in range(L)])
        stats["loss"] = float(loss)  # host sync
        stats["counts"] = counts.cpu()
        stats["mismatch_tokens"] = stats["mismatch_pairs"] = None
        if choices is not None:
            stats["mismatch_tokens"], stats["mismatch_pairs"] = routing_mismatch(choices.routing(B), routing, mask)
    return loss, stats


class LocalPolicy:
    """The Engine's RL contract on one in-process `Transformer`: AdamW (the Engine's defaults), the
    reference policy a frozen deepcopy (`set_reference`), the expert bias moved after each step by
    `bias_updater.update(bias_LE, counts_LE)` when one is given (e.g. dsray.runtime.balance.BiasUpdater)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, clip_grad_norm: float = 0.0,
                 mtp_weight: float = 0.3, bias_updater: Any = None) -> None:
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr={lr!r}: expected a finite value >= 0")
        if not clip_grad_norm >= 0:
            raise ValueError(f"clip_grad_norm={clip_grad_norm!r}: expected >= 0 (0 disables)")
        self.model, self.cfg = model, model.cfg
        self.lr, self.clip_grad_norm, self.mtp_weight = lr, clip_grad_norm, mtp_weight
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                     weight_decay=weight_decay, betas=betas, eps=eps)
        self.bias_updater = bias_updater
        self.reference: nn.Module | None = None
        self.step = 0
        self.history: list[dict[str, Any]] = []

    @property
    def n_moe_layers(self) -> int:
        return _moe_shape(self.model)[0]

    # ---- rollouts ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[torch.Tensor], max_new_tokens: int, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 seed: int | None = None, return_routing: bool = False, return_logprobs: bool = False):
        """Rows (prompt + new tokens, cut after the first eos); with flags `(rows, routing, logprobs)`
        holding only the requested extras: routing per row [len(row), L, K] (`routing_dtype`),
        logprobs per row [n_new] fp32 under softmax(logits / temperature). temperature None: greedy;
        eos_token_id None: the config's."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts: expected a non-empty list of 1-D id tensors")
        if eos_token_id is None:
            eos_token_id = () if self.cfg.eos_token_id is None else (self.cfg.eos_token_id,)
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        s = Sampling(temperature or 0.0, top_k, top_p, eos, eos[0] if eos else 0)
        was = self.model.training
        self.model.eval()
        d = Decoding(list(prompts), max_new_tokens, s, self.model.new_cache, seed=seed,
                     record_routing=return_routing, logprobs=return_logprobs)
        while not d.finished:
            d.step(lambda feed, pos, pad_B, log: self.model(feed, d.cache, pos, log, pad_B)[:, -1])
        self.model.train(was)
        rows = d.rows()
        if not (return_routing or return_logprobs):
            return rows
        extras: list[Any] = [rows]
        if return_routing:
            r = d.routing()
            dt = routing_dtype(self.cfg.n_routed_experts)
            start = [int(p) for p in d.pad_B]
            extras.append([r[b, start[b]:start[b] + len(row), :self.n_moe_layers].to(dt).cpu()
                           for b, row in enumerate(rows)])
        if return_logprobs:
            lp = d.logprobs()
            extras.append([(lp[b, :len(row) - d.lengths[b]] if lp is not None else torch.zeros(0)).float().cpu()
                           for b, row in enumerate(rows)])
        return tuple(extras)

    @torch.inference_mode()
    def logprobs(self, ids_BS: torch.Tensor, routing: torch.Tensor | None = None, temperature: float = 1.0,
                 reference: bool = False) -> torch.Tensor:
        """[B, S-1] fp32 (see `sequence_logprobs`); reference=True: the frozen reference policy."""
        model = self.model
        if reference:
            if self.reference is None:
                raise ValueError("reference=True: no reference policy yet; call set_reference() first")
            model = self.reference
        was = model.training
        model.eval()
        try:
            return sequence_logprobs(model, ids_BS.long(), routing, temperature)
        finally:
            model.train(was)

    def set_reference(self) -> None:
        """Snapshot the current weights (and bias) as the reference policy: a frozen copy in memory."""
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    # ---- updates ----------------------------------------------------------------------------------
    def _optimizer_step(self, lr: float | None) -> float | None:
        if lr is not None:
            if not (lr >= 0 and math.isfinite(lr)):
                raise ValueError(f"lr={lr!r}: expected a finite value >= 0")
            for g in self.opt.param_groups:
                g["lr"] = lr
        norm = None
        if self.clip_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm))
        self.opt.step()
        if lr is not None:
            for g in self.opt.param_groups:
                g["lr"] = self.lr
        self.step += 1
        return norm

    def _move_bias(self, counts_LE: torch.Tensor) -> None:
        if self.bias_updater is None:
            return
        import numpy as np

        gates = [m.gate for m in self.model.moe_modules()[:counts_LE.shape[0]]]
        bias = np.stack([g.e_score_correction_bias.detach().cpu().numpy() for g in gates])
        new = self.bias_updater.update(bias, counts_LE.cpu().numpy())
        with torch.no_grad():
            for g, b in zip(gates, new):
                g.e_score_correction_bias.copy_(torch.as_tensor(b))

    def grpo_step(self, batch: Batch, *, replay: bool = True, clip_eps: float = 0.2,
                  clip_eps_high: float | None = None, kl_coef: float = 0.0, norm: str = "token",
                  temperature: float = 1.0, lr: float | None = None) -> dict[str, Any]:
        """One AdamW step on `policy_loss(batch)`; returns its stats plus `step`, `grad_norm`, `seconds`."""
        t0 = time.perf_counter()
        self.model.train()
        loss, stats = policy_loss(self.model, batch, replay=replay, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                  kl_coef=kl_coef, norm=norm, temperature=temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"] = self._optimizer_step(lr)
        self._move_bias(stats["counts"])
        stats["step"], stats["seconds"] = self.step, time.perf_counter() - t0
        self.history.append({k: v for k, v in stats.items() if k != "counts"})
        return stats

    def train_step(self, ids_BS: torch.Tensor, lr: float | None = None) -> dict[str, Any]:
        """One supervised AdamW step (next-token loss + MTP, as `Engine.train_step`)."""
        t0 = time.perf_counter()
        self.model.train()
        out = self.model.loss(ids_BS.long(), mtp_weight=self.mtp_weight)
        self.opt.zero_grad(set_to_none=True)
        out["total"].backward()
        grad_norm = self._optimizer_step(lr)
        counts = out["counts"][:self.n_moe_layers]
        self._move_bias(counts)
        return {"step": self.step, "loss": float(out["loss"].detach()), "counts": counts, "grad_norm": grad_norm,
                "seconds": time.perf_counter() - t0}

    # ---- state ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Step count and the GRPO history (mismatch per step included)."""
        last = self.history[-1] if self.history else {}
        return {"step": self.step, "mismatch_tokens": last.get("mismatch_tokens"),
                "mismatch_pairs": last.get("mismatch_pairs"), "grpo_history": list(self.history)}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """HF folder (official key layout, bias included), refusing what `dsray train --save` refuses."""
        from dsray.files import check_checkpoint_target

        path = Path(path)
        check_checkpoint_target(path, overwrite)
        self.model.save_pretrained(path, overwrite=overwrite)
        return path

    def shutdown(self) -> None:
        pass

    def __enter__(self) -> "LocalPolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
