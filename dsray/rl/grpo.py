"""GRPO (group relative policy optimisation) in pure torch: advantages, the clipped loss, token log-probs.

No ray, no torch.distributed: the Engine calls these on driver ranks. Shape legend: B sequences (a
rollout batch: `B / group_size` prompts, `group_size` samples each, rows of one prompt consecutive),
T next-token positions (a sequence of S tokens has T = S - 1: position t scores token t + 1),
V vocab.

References: GRPO (DeepSeekMath, arXiv 2402.03300: group-normalised advantages, per-sequence mean,
k3 KL to a reference policy), DAPO (arXiv 2503.14476: token-level normalisation, decoupled upper
clip `clip_eps_high`), PPO (arXiv 1707.06347: the clipped surrogate).
"""

from __future__ import annotations

import math

import torch

_NORMS = ("token", "sequence")


def group_advantages(rewards_B: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages [B] (fp32): each reward minus its group's mean, divided by (group std + eps) when
    `normalize_std`. Row i belongs to group i // group_size. The std is the population one
    (unbiased=False), as in DeepSeekMath's formula; a group whose rewards are all equal gets
    advantage 0 everywhere (no signal, no gradient), not a division by zero."""
    if rewards_B.ndim != 1:
        raise ValueError(f"rewards_B: expected a 1-D tensor [B], got shape {tuple(rewards_B.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: expected an int >= 1")
    B = rewards_B.shape[0]
    if B % group_size:
        raise ValueError(f"group_size={group_size}: rewards_B has {B} rows, not a multiple of group_size")
    if normalize_std and group_size == 1:
        raise ValueError("group_size=1 with normalize_std=True: a group of one has no relative signal")
    if not eps >= 0:
        raise ValueError(f"eps={eps!r}: expected >= 0")
    r_GN = rewards_B.float().reshape(B // group_size, group_size)
    adv_GN = r_GN - r_GN.mean(dim=1, keepdim=True)
    if normalize_std:
        adv_GN = adv_GN / (r_GN.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv_GN.reshape(B)


def grpo_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor,
              mask_BT: torch.Tensor, *, ref_logp_BT: torch.Tensor | None = None, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, kl_coef: float = 0.0, norm: str = "token",
              n_norm: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective to minimise, and statistics of this batch.

    Per masked token: ratio = exp(logp - old_logp); surrogate = min(ratio * A, clip(ratio, 1 - clip_eps,
    1 + clip_eps_high) * A) with A the row's advantage; kl = exp(ref - logp) - (ref - logp) - 1 (the
    k3 estimator: unbiased for KL(policy || ref) under samples of the policy, and always >= 0);
    objective = -surrogate + kl_coef * kl. `clip_eps_high` defaults to `clip_eps` (symmetric PPO
    clip); DAPO's clip-higher sets it larger.

    norm="token": sum of all masked tokens' objectives / number of masked tokens (DAPO: long answers
    weigh as many tokens as they have). norm="sequence": mean over rows of each row's masked mean
    (the GRPO paper's 1/G sum_i 1/|o_i| sum_t); a row without masked tokens adds 0 but still counts.

    `n_norm` replaces the denominator: the global number of masked tokens (norm="token") or of rows
    (norm="sequence"). With it, data-parallel ranks that each pass their share of the batch get
    losses, and gradients, that add up to the loss of the whole batch, so summing (all-reduce) the
    gradients is the whole-batch gradient. Without it the denominator is this batch's own.

    `logp_BT` carries the gradient; `old_logp_BT` (the rollout policy) and `ref_logp_BT` are treated
    as constants. Values at unmasked positions are never read (they may be anything, even inf).

    Stats (floats, this batch only, means over masked tokens): `clip_frac` (tokens whose gradient the
    clip removes: A > 0 and ratio > 1 + clip_eps_high, or A < 0 and ratio < 1 - clip_eps),
    `ratio_mean`, `kl_mean` (0 without a reference), `adv_mean` (over rows), `n_tokens`.
    """
    if logp_BT.ndim != 2:
        raise ValueError(f"logp_BT: expected a 2-D tensor [B, T], got shape {tuple(logp_BT.shape)}")
    if not logp_BT.is_floating_point():
        raise ValueError(f"logp_BT: expected a floating-point tensor, got {logp_BT.dtype}")
    shape = tuple(logp_BT.shape)
    for name, t in (("old_logp_BT", old_logp_BT), ("mask_BT", mask_BT), ("ref_logp_BT", ref_logp_BT)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match logp_BT's {shape}")
    if mask_BT.dtype != torch.bool:
        raise ValueError(f"mask_BT: expected a bool tensor, got {mask_BT.dtype}")
    if tuple(advantages_B.shape) != (shape[0],):
        raise ValueError(f"advantages_B: shape {tuple(advantages_B.shape)}, expected ({shape[0]},) "
                         "(one advantage per row of logp_BT)")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps={clip_eps!r}: expected 0 < clip_eps < 1 (the ratio is clipped to "
                         "[1 - clip_eps, 1 + clip_eps_high])")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not eps_high > 0:
        raise ValueError(f"clip_eps_high={clip_eps_high!r}: expected > 0")
    if not (kl_coef >= 0 and math.isfinite(kl_coef)):
        raise ValueError(f"kl_coef={kl_coef!r}: expected a finite value >= 0")
    if kl_coef > 0 and ref_logp_BT is None:
        raise ValueError(f"kl_coef={kl_coef}: needs ref_logp_BT (the reference policy's log-probs)")
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r}: expected one of {_NORMS}")
    if n_norm is not None and not (n_norm > 0 and math.isfinite(n_norm)):
        raise ValueError(f"n_norm={n_norm!r}: expected a positive count (global tokens or rows) or None")

    mask = mask_BT
    logp = logp_BT.float()
    # Unmasked positions are zeroed *before* exp: exp of garbage could be inf, and 0 * inf is nan in
    # both the forward and the backward.
    log_ratio = torch.where(mask, logp - old_logp_BT.float().detach(), 0.0)
    ratio = torch.exp(log_ratio)
    adv = advantages_B.float().detach()[:, None]
    clipped = ratio.clamp(1 - clip_eps, 1 + eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    obj = -surrogate
    if ref_logp_BT is not None:
        d = torch.where(mask, ref_logp_BT.float().detach() - logp, 0.0)
        kl = torch.exp(d) - d - 1
        if kl_coef > 0:
            obj = obj + kl_coef * kl
    else:
        kl = torch.zeros_like(logp)
    obj = torch.where(mask, obj, 0.0)

    n_rows = shape[0]
    n_tok_B = mask.sum(dim=1)
    if norm == "token":
        loss = obj.sum() / (n_norm if n_norm is not None else n_tok_B.sum().clamp_min(1))
    else:
        per_row = obj.sum(dim=1) / n_tok_B.clamp_min(1)
        loss = per_row.sum() / (n_norm if n_norm is not None else max(n_rows, 1))

    with torch.no_grad():
        n_tok = int(n_tok_B.sum())  # host sync (stats are for logging; the loss does not wait on them)
        clip_on = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - clip_eps))

        def tok_mean(x: torch.Tensor) -> float:
            return float(torch.where(mask, x.float(), 0.0).sum()) / n_tok if n_tok else 0.0

        stats = {"clip_frac": tok_mean(clip_on), "ratio_mean": tok_mean(ratio), "kl_mean": tok_mean(kl),
                 "adv_mean": float(advantages_B.float().mean()) if n_rows else 0.0, "n_tokens": float(n_tok)}
    return loss, stats


def token_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T-1] fp32: log-softmax of logits[:, :-1] (divided by `temperature`) at ids[:, 1:], i.e. the
    log-probability of every next token given its prefix. Use the temperature the rollout sampled at
    when the log-probs must be those of the sampling distribution."""
    if logits_BTV.ndim != 3:
        raise ValueError(f"logits_BTV: expected a 3-D tensor [B, T, V], got shape {tuple(logits_BTV.shape)}")
    if tuple(ids_BT.shape) != tuple(logits_BTV.shape[:2]):
        raise ValueError(f"ids_BT: shape {tuple(ids_BT.shape)} does not match logits_BTV's "
                         f"[B, T] = {tuple(logits_BTV.shape[:2])}")
    if ids_BT.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids_BT: expected int64 token ids, got {ids_BT.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected > 0")
    V = logits_BTV.shape[-1]
    tgt_BT1 = ids_BT[:, 1:].long()
    # host sync: an out-of-range id would be a device-side assert on GPU, which kills the CUDA context
    if tgt_BT1.numel() and (int(tgt_BT1.min()) < 0 or int(tgt_BT1.max()) >= V):
        raise ValueError(f"ids_BT: token ids must be in [0, {V}) (the logits' vocab), got "
                         f"[{int(tgt_BT1.min())}, {int(tgt_BT1.max())}]")
    logits = logits_BTV[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    # gather - logsumexp instead of log_softmax().gather(): no second [B, T, V] fp32 tensor
    picked = logits.gather(-1, tgt_BT1[..., None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def pack_completions(prompts: list[torch.Tensor], outputs: list[torch.Tensor],
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rollouts -> (ids [B, S] right-padded with `pad_id`, completion_mask [B, S-1] bool).

    `outputs[i]` is prompt i followed by what was generated (what `Engine.generate` returns for a list
    of prompts). The mask is True at next-token positions t whose target token t + 1 was generated:
    t in [len(prompt) - 1, len(output) - 1). Those are the positions GRPO trains on."""
    if len(prompts) != len(outputs):
        raise ValueError(f"outputs: {len(outputs)} rows for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("prompts: empty")
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        if p.ndim != 1 or o.ndim != 1:
            raise ValueError(f"prompts[{i}] / outputs[{i}]: expected 1-D id tensors")
        if p.shape[0] < 1 or o.shape[0] < p.shape[0] or not torch.equal(o[:p.shape[0]], p):
            raise ValueError(f"outputs[{i}] does not start with prompts[{i}] (a non-empty prompt)")
    S = max(o.shape[0] for o in outputs)
    ids_BS = torch.full((len(outputs), S), pad_id, dtype=torch.long)
    mask_BT = torch.zeros(len(outputs), max(S - 1, 0), dtype=torch.bool)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        ids_BS[i, :o.shape[0]] = o
        mask_BT[i, p.shape[0] - 1:o.shape[0] - 1] = True
    return ids_BS, mask_BT
