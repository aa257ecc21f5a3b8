"""The Engine's generation and policy steps (mixed into `Engine`): `generate` with routing and
log-probs, `logprobs`, `grpo_step`, `set_reference`. They use the Engine's fan-out (`_run`,
`_forward_only`) and report to the Router like every other step; the math is dsray.rl.policy's, on
the driver ranks.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch


class PolicySteps:
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | list, max_new_tokens: int, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | tuple | None = None,
                 seed: int | None = None, pad_token_id: int | None = None, return_routing: bool = False,
                 return_logprobs: bool = False):
        """Prompt + new ids; defaults follow the checkpoint (generation_config.json, else config.json) as
        HF's `generate` does. A [B, S] tensor gives [B, S + n] (rows that stopped padded with the pad id,
        default the eos id); a list of prompts of any lengths (one left-padded batch per driver) gives a
        list of rows cut after their first eos. `eos_token_id=()` never stops early.

        return_routing / return_logprobs add, in that order, per row (list input) or stacked (tensor
        input): the logical expert ids of every position [len, L, K] (uint8 for <= 256 experts, else
        int16) and the sampled tokens' log-probs [n_new] under softmax(logits / temperature)."""
        from dsray.model.decode import Sampling

        self._check()
        temperature, top_k, top_p = self.generation.sampling(temperature, top_k, top_p)
        eos = self.generation.eos_token_id if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (
            self.generation.pad_token_id if self.generation.pad_token_id is not None else (eos[0] if eos else 0))
        s = Sampling(temperature, top_k, top_p, eos, int(pad))  # ValueError here, before any actor runs
        as_list = isinstance(input_ids, (list, tuple))
        prompts = [self._ids(p)[0] for p in input_ids] if as_list else list(self._ids(input_ids))
        if not prompts:
            raise ValueError("input_ids: no prompts")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 0")
        longest = max(p.shape[0] for p in prompts)
        if longest + max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt + max_new_tokens = {longest + max_new_tokens} exceeds "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        t0 = time.perf_counter()
        parts = [[int(i) for i in c] for c in torch.tensor_split(torch.arange(len(prompts)), self.D)]
        sampling = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_token_id=s.eos_token_id,
                        pad_token_id=s.pad_token_id)
        res = self._forward_only("generate", "generate", [
            ([prompts[i] for i in part], self._bias, max_new_tokens, sampling, None if seed is None else seed + k,
             return_routing, return_logprobs) for k, part in enumerate(parts)])
        rows: list[Any] = [None] * len(prompts)
        routing: list[Any] = [None] * len(prompts)
        logp: list[Any] = [None] * len(prompts)
        for part, r in zip(parts, res):
            for j, i in enumerate(part):
                rows[i] = r["rows"][j]
                routing[i] = r["routing"][j] if r["routing"] is not None else None
                logp[i] = r["logprobs"][j] if r["logprobs"] is not None else None
        new = sum(o.shape[0] - p.shape[0] for o, p in zip(rows, prompts))
        self._report("generate", [r for r in res if r["counts"] is not None] or res, int(new),
                     time.perf_counter() - t0, False)
        if not as_list:
            rows, routing, logp = _stack_rows(rows, routing, logp, prompts, max_new_tokens, s.pad_token_id)
        extras = [x for x, want in ((routing, return_routing), (logp, return_logprobs)) if want]
        return (rows, *extras) if extras else rows

    def logprobs(self, ids: torch.Tensor, routing: torch.Tensor | None = None, temperature: float = 1.0,
                 reference: bool = False) -> torch.Tensor:
        """[B, S-1] fp32: log-prob of each next token (only this small tensor comes back through Ray).
        `routing` [B, S, L, K] replays recorded experts; `reference` uses the set_reference() weights."""
        ids = self._ids(ids, 2)
        if not temperature > 0:
            raise ValueError(f"temperature={temperature}: expected > 0")
        if routing is not None and tuple(routing.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"routing: shape {tuple(routing.shape)}, expected [{ids.shape[0]}, {ids.shape[1]}, L, K]")
        t0 = time.perf_counter()
        res = self._forward_only("logprobs", "logprobs", [(p, self._bias, r, temperature, reference)
                                                          for p, r in zip(self._split(ids), self._split(routing))],
                                 reference)
        self._report("logprobs", res, ids.numel(), time.perf_counter() - t0, False)
        return torch.cat([r["logprobs"] for r in res if r["logprobs"] is not None])

    def grpo_step(self, batch: dict[str, torch.Tensor], *, replay: bool = True, clip_eps: float = 0.2,
                  clip_eps_high: float | None = None, kl_coef: float = 0.0, norm: str = "token",
                  temperature: float = 1.0, lr: float | None = None) -> dict[str, Any]:
        """One GRPO policy step (dsray.rl.policy.policy_loss on the drivers, experts on the shards).

        `batch`: ids [B, S], completion_mask [B, S-1] bool, advantages [B], logprobs [B, S-1] (the
        rollout's), optional ref_logprobs [B, S-1] and routing [B, S, L, K]. With `replay` and routing
        given, every token uses the rollout's experts (gate weights from the live scores); without
        replay the result reports how many tokens' experts differ from the rollout's."""
        from dsray.rl.policy import check_batch

        self._check()
        check_batch(batch, self.cfg)
        ids = batch["ids"]
        if ids.shape[0] < self.D:
            raise ValueError(f"batch of {ids.shape[0]} rows for {self.D} driver ranks: need >= 1 each")
        kw = dict(replay=replay, clip_eps=clip_eps, clip_eps_high=clip_eps_high, kl_coef=kl_coef, norm=norm,
                  temperature=temperature)
        n_norm = float(batch["completion_mask"].sum()) if norm == "token" else float(ids.shape[0])
        n_norm = max(n_norm, 1.0)
        t0, step, lr = time.perf_counter(), self._step, self.lr if lr is None else lr
        parts = [{k: (list(torch.tensor_split(v, self.D))[i] if torch.is_tensor(v) and v.dim() else v)
                  for k, v in batch.items()} for i in range(self.D)]
        self.recovery.before_step(lambda: self.grpo_step(batch, lr=lr, **kw))

        def calls():
            f = self.group.execute_async("grpo_step", [(step, p, self._bias, lr, kw, n_norm) for p in parts],
                                         ranks=range(self.D))
            f.update(self.group.execute_async("train_step", [(step, lr, "grpo")] * self.S,
                                              ranks=range(self.D, self.D + self.S)))
            return f

        drv = self._run(f"grpo step {step}", calls)[:self.D]
        out = _merge_grpo_stats([r["stats"] for r in drv])
        out["loss"] = float(sum(r["loss"] for r in drv))
        seconds = time.perf_counter() - t0
        extra = {k: out[k] for k in ("mismatch_tokens", "mismatch_pairs") if out.get(k) is not None}
        rep = self._report("grpo", drv, int(ids.numel()), seconds, True, loss=out["loss"], lr=lr, extra=extra)
        self._after_step(rep)
        return {**out, "step": self._step, "seconds": seconds, "maxvio_batch": rep["maxvio_batch"]}

    def set_reference(self) -> int:
        """Freeze the current weights as the reference policy of the KL term, on the ranks that hold them
        (+1x the weights in memory, no optimizer state, no second engine). Returns its bytes."""
        self._check()
        return int(sum(self.group.execute("set_reference", timeout=self.step_timeout_s)))


def _stack_rows(rows, routing, logp, prompts, n, pad):
    """Rows of a [B, S] prompt batch -> HF's [B, S + n] layout (finished rows padded)."""
    width = max(r.shape[0] for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0]), value=pad) for r in rows])
    if routing[0] is not None:
        routing = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, 0, 0, width - r.shape[0])) for r in routing])
    if logp[0] is not None:
        logp = torch.stack([torch.nn.functional.pad(x, (0, width - prompts[0].shape[0] - x.shape[0])) for x in logp])
    return ids, routing, logp


def _merge_grpo_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted means of the drivers' statistics (each driver saw its share of the rows)."""
    n = [s.get("n_tokens", 0.0) for s in stats]
    total = sum(n)
    out: dict[str, Any] = {"n_tokens": total}
    for k in stats[0]:
        if k == "n_tokens":
            continue
        vals = [s.get(k) for s in stats]
        if any(v is None for v in vals):
            out[k] = None
        elif isinstance(vals[0], (int, float)):
            out[k] = float(sum(v * w for v, w in zip(vals, n)) / total) if total else float(np.mean(vals))
    return out
