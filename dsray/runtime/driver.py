"""DriverRank: token ids, embedding, MLA attention (latent KV cache), the gate with the Router's bias,
shared experts, dense layers, norm, lm head, MTP. With no shards (S == 0) it also runs the experts.

Under expert parallelism (`apply_ep`) every MoE layer of the driver's `Transformer` dispatches over the
world group to the shards; a driver with nothing to do in a pass walks the same layers with an empty
batch (`expert_pass`) so that collectives line up. Forward-only modes are bracketed by votes
(`vote`): drivers say whether another pass follows, shards serve until all say no.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from dsray.model.moe import RouteLog
from dsray.parallel.ep import apply_ep, expert_pass, vote
from dsray.runtime.rank import MOMENTS, Rank, RankSpec


class DriverRank(Rank):
    def __init__(self, spec: RankSpec) -> None:
        super().__init__(spec)
        from dsray.model import Transformer
        from dsray.model.hf import load_pretrained

        local_experts = spec.n_shards == 0
        if spec.checkpoint:
            self.model = load_pretrained(Transformer, spec.checkpoint, dtype=self.dtype, device=self.device,
                                         expert_impl=spec.expert_impl, experts=local_experts)
        else:
            self.model = Transformer.from_config(self.cfg, spec.seed, self.dtype, spec.expert_impl,
                                                 device=self.device, experts=local_experts, mtp=spec.has_mtp)
        assert len(self.model.mtp) == (self.cfg.num_nextn_predict_layers if spec.has_mtp else 0)
        self._counts: list[torch.Tensor] = []

    def _on_placement(self) -> None:
        apply_ep(self.model, self.ep)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _set_bias(self, bias_LE: np.ndarray | None) -> None:
        if bias_LE is None:
            return
        with torch.no_grad():
            for moe, b in zip(self.model.moe_modules(), bias_LE):
                moe.gate.e_score_correction_bias.copy_(torch.tensor(np.array(b, dtype=np.float32)))

    def state_bias(self) -> np.ndarray:
        return np.stack([m.gate.e_score_correction_bias.cpu().numpy() for m in self.model.moe_modules()])

    def _result(self, t0: float, **out: Any) -> dict[str, Any]:
        counts = (torch.stack(self._counts).sum(0) if self._counts else None)
        self._counts = []
        return {**out, "counts": None if counts is None else counts.cpu().numpy(), "a2a": self.timer.pop(),
                "seconds": time.perf_counter() - t0}

    def _log(self, log: RouteLog | None = None) -> RouteLog:
        return log if log is not None else RouteLog()

    def _keep(self, log: RouteLog) -> None:
        if log.counts:
            self._counts.append(log.counts_LE())

    # ---- training --------------------------------------------------------------------------------------
    def _optimizer_step(self, step: int, lr: float | None, loss_fn: Callable[[], tuple[torch.Tensor, dict]]
                        ) -> dict[str, Any]:
        """The part every training mode shares: backward, dense all-reduce, clip, AdamW. Idempotent by step."""
        if step == self.step_done and self.last_result is not None:
            return self.last_result
        t0 = time.perf_counter()
        self.model.train()
        if self.optimizer is None:
            self.optimizer = self._optim(self._trainable())
        self._set_lr(lr)
        self.optimizer.zero_grad(set_to_none=True)
        total, stats = loss_fn()
        total.backward()
        if self.world is not None and self.spec.n_drivers > 1:
            self._allreduce_dense_grads()
        params = self._trainable()
        # Dense grads are identical on every driver after the all-reduce: count them on driver 0 only.
        grad_norm = self._clip_grads(params, [1.0 if self.spec.rank == 0 else 0.0] * len(params))
        self.optimizer.step()
        self.step_done = step
        self.last_result = self._result(t0, grad_norm=grad_norm, **stats)
        return self.last_result

    def train_step(self, step: int, ids: torch.Tensor, bias_LE: np.ndarray | None, n_tokens: int,
                   lr: float | None, mtp_weight: float, seq_aux_alpha: float = 0.0,
                   n_sequences: int | None = None) -> dict[str, Any]:
        self._set_bias(bias_LE)

        def loss():
            log = RouteLog()
            out = self.model.loss(ids.to(self.device), mtp_weight=mtp_weight, n_tokens=n_tokens,
                                  seq_aux_alpha=seq_aux_alpha, n_sequences=n_sequences, log=log)
            self._keep(log)
            return out["total"], {"loss": out["loss"].item(),
                                  "mtp_loss": out["mtp_loss"].item() if "mtp_loss" in out else None,
                                  "balance_loss": out["balance_loss"].item() if "balance_loss" in out else None}

        return self._optimizer_step(step, lr, loss)

    def grpo_step(self, step: int, batch: dict[str, torch.Tensor], bias_LE: np.ndarray | None, lr: float | None,
                  kw: dict[str, Any], n_norm: float) -> dict[str, Any]:
        """One GRPO policy step on this driver's rows (dsray.rl.policy.policy_loss); `n_norm` is the whole
        batch's denominator, so the drivers' gradients add up to the whole batch's."""
        from dsray.rl.policy import policy_loss

        self._set_bias(bias_LE)
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

        def loss():
            loss_t, stats = policy_loss(self.model, batch, n_norm=n_norm, **kw)
            counts = stats.pop("counts", None)
            if counts is not None:
                self._counts.append(torch.as_tensor(counts))
            return loss_t, {"loss": float(loss_t.detach()), "stats": stats}

        return self._optimizer_step(step, lr, loss)

    def _allreduce_dense_grads(self) -> None:
        # Each driver's loss is already divided by the global count, so a SUM gives the full grad.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.drivers_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def grads(self) -> dict[str, torch.Tensor]:
        """Dense gradients of the last step (kept until the next step, for tests and debugging)."""
        return {n: p.grad.detach().cpu().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    # ---- forward-only modes ------------------------------------------------------------------------------
    def _idle_pass(self, mode: str) -> None:
        expert_pass(self.ep, {}, mode, self.device, self.dtype)

    def _one_pass(self, mode: str, has_work: bool, fn: Callable[[], Any], reference: bool = False) -> Any:
        """One lockstep pass of a forward-only mode, bracketed by the drivers' votes."""
        if reference:
            self._swap_reference()
        try:
            with torch.inference_mode():
                self.model.eval()
                if self.world is None:
                    return fn()
                vote(True, self.world, self._vote_device())
                out = fn() if has_work else self._idle_pass(mode)
                vote(False, self.world, self._vote_device())
                return out
        finally:
            if reference:
                self._swap_reference()

    def forward(self, ids: torch.Tensor, bias_LE: np.ndarray | None, last_only: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._set_bias(bias_LE)

        def run():
            log = RouteLog()
            logits = self.model(ids.to(self.device), log=log)
            self._keep(log)
            return logits[:, -1:] if last_only else logits

        logits = self._one_pass("forward", ids.shape[0] > 0, run)
        return self._result(t0, logits=None if logits is None else logits.float().cpu())

    def logprobs(self, ids: torch.Tensor, bias_LE: np.ndarray | None, routing: torch.Tensor | None,
                 temperature: float, reference: bool) -> dict[str, Any]:
        from dsray.rl.policy import sequence_logprobs

        t0 = time.perf_counter()
        self._set_bias(bias_LE)
        run = lambda: sequence_logprobs(self.model, ids.to(self.device), routing, temperature)  # noqa: E731
        lp = self._one_pass("logprobs", ids.shape[0] > 0, run, reference)
        return self._result(t0, logprobs=None if lp is None else lp.float().cpu())

    def generate(self, prompts: list[torch.Tensor], bias_LE: np.ndarray | None, max_new_tokens: int,
                 sampling: dict[str, Any], seed: int | None = None, record_routing: bool = False,
                 logprobs: bool = False) -> dict[str, Any]:
        """Latent-cache decoding of `prompts` (any lengths: one left-padded batch) with the one decode
        loop (dsray.model.decode); drivers vote before every pass so that all ranks run the same passes."""
        from dsray.model.decode import Decoding, Sampling

        t0 = time.perf_counter()
        self._set_bias(bias_LE)
        model = self.model.eval()
        s = Sampling(**sampling)
        d = None
        if prompts:
            d = Decoding([p.to(self.device) for p in prompts], max_new_tokens, s, model.new_cache, seed=seed,
                         record_routing=record_routing, logprobs=logprobs)

        def run(feed, pos, pad_B, log):
            log = self._log(log)
            out = model(feed, d.cache, pos, log=log, pad_B=pad_B)[:, -1]
            self._keep(log)
            return out

        with torch.inference_mode():
            while True:
                want = d is not None and not d.finished
                if self.world is not None:
                    if not vote(want, self.world, self._vote_device()):
                        break
                    if not want:
                        self._idle_pass("generate")
                        continue
                elif not want:
                    break
                d.step(run)
        if d is None:
            return self._result(t0, rows=[], routing=None, logprobs=None)
        rows = d.rows()
        routing = lp = None
        if record_routing:
            r = d.routing()
            S = d.ids_BS.shape[1]
            routing = [r[b, S - n:S - n + len(row)].to(torch.uint8 if self.cfg.n_routed_experts <= 256
                                                         else torch.int16).cpu()
                       for b, (n, row) in enumerate(zip(d.lengths, rows))]
        if logprobs:
            all_lp = d.logprobs()
            lp = [all_lp[b, :len(row) - n].float().cpu() if all_lp is not None else torch.zeros(0)
                  for b, (n, row) in enumerate(zip(d.lengths, rows))]
        return self._result(t0, rows=[row.cpu() for row in rows], routing=routing, logprobs=lp)

    # ---- state ---------------------------------------------------------------------------------------------
    def export_state(self, bias_LE: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Dense weights under checkpoint keys, and their AdamW moments under `<key>.exp_avg[_sq]`."""
        from dsray.model.hf import hf_state_dict, to_hf_name

        self._set_bias(bias_LE)
        out = {k: v.detach().cpu().contiguous() for k, v in hf_state_dict(self.model).items()}
        if self.optimizer is not None:
            names = {id(p): n for n, p in self.model.named_parameters()}
            for p, st in self.optimizer.state.items():
                for m in MOMENTS:
                    out[f"{to_hf_name(names[id(p)], self.cfg)}.{m}"] = st[m].detach().cpu().contiguous()
        return out

    def save_part(self, folder: str, index: int, total: int, bias_LE: np.ndarray) -> dict[str, Any]:
        from dsray.runtime.persist import write_rank_part

        return write_rank_part(Path(folder), index, total, self.export_state(bias_LE), self._optim_step())

    def import_optimizer(self, folder: str, step: int) -> bool:
        from dsray.model.hf import to_hf_name
        from dsray.runtime.persist import read_optimizer

        named = [(to_hf_name(n, self.cfg), p) for n, p in self.model.named_parameters() if p.requires_grad]
        moments = read_optimizer(folder, [f"{k}.{m}" for k, _ in named for m in MOMENTS])
        self.optimizer = self._optim(self._trainable())
        self._load_moments(named, moments, step)
        return True

    def _load_moments(self, named, moments: dict[str, torch.Tensor], step: int) -> None:
        for k, p in named:
            if f"{k}.exp_avg" in moments:
                self.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                           **{m: moments[f"{k}.{m}"].to(p) for m in MOMENTS}}

    def snapshot(self) -> dict[str, Any]:
        return {"tensors": self.export_state(), "optim_step": self._optim_step(), "step_done": self.step_done}

    def restore(self, snap: dict[str, Any]) -> bool:
        from dsray.model.hf import to_hf_name

        t = snap["tensors"]
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(t[to_hf_name(n, self.cfg)])
        named = [(to_hf_name(n, self.cfg), p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = self._optim(self._trainable()) if any(k.endswith(".exp_avg") for k in t) else None
        if self.optimizer is not None:
            self._load_moments(named, t, snap["optim_step"])
        self.step_done, self.last_result = snap["step_done"], None
        return True

    def memory(self) -> dict[str, int]:
        return self._memory(self.model.parameters())
