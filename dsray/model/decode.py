"""One decode loop: a decode state over the latent cache and the step that advances it.

`Transformer.generate`, the driver ranks of expert parallelism and MTP speculative decoding all use
`Decoding` (batching, positions, the eos rule) and `next_tokens` (sampling); the driver ranks add only
their lockstep vote around `Decoding.step`.

Prompts of different lengths decode together: they are left-padded to one length, every row keeps its
own positions (column - pad) and padding keys are masked out, so row b decodes exactly as it would
alone. The eos rule, HF's: a row that emitted an eos id emits `pad_id` from then on; decoding stops
when every row has finished or `max_new_tokens` were generated.

Shape legend: B rows, S prompt columns (longest prompt), V vocab, L MoE layers, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dsray.model.mla import LatentCache
from dsray.model.moe import RouteLog


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy; else softmax(logits / T) over top-k / top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: expected in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: expected >= 1")


def next_tokens(logits_BV: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    if s.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def apply_eos(tok_B: torch.Tensor, done_B: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The eos rule, written once: finished rows emit the pad id; `done_B` is updated in place."""
    if not s.eos_token_id:
        return tok_B
    tok_B = torch.where(done_B, torch.full_like(tok_B, s.pad_token_id), tok_B)
    done_B |= torch.isin(tok_B, torch.tensor(s.eos_token_id, device=tok_B.device)) & ~done_B
    return tok_B


class Decoding:
    """State of one batched decode: cache, per-row padding, finished rows, output columns.

        d = Decoding(prompts, max_new_tokens, sampling, new_cache)
        while not d.finished:
            d.step(lambda feed, pos, pad, log: model(feed, d.cache, pos, log=log, pad_B=pad)[:, -1])
        rows = d.rows()              # prompt + new tokens per row (cut after eos)
    """

    def __init__(self, prompts: Sequence[torch.Tensor], max_new_tokens: int, sampling: Sampling,
                 new_cache: Callable[[int, int], LatentCache], *, seed: int | None = None,
                 record_routing: bool = False, logprobs: bool = False) -> None:
        if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
            raise ValueError("prompts: expected a non-empty list of non-empty 1-D id tensors")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 0")
        device = prompts[0].device
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.lengths = [int(p.numel()) for p in prompts]
        S = max(self.lengths)
        self.pad_B = torch.tensor([S - n for n in self.lengths], device=device)
        self.ids_BS = torch.stack([F.pad(p, (S - p.numel(), 0), value=sampling.pad_token_id) for p in prompts])
        self.padded = bool(self.pad_B.any())
        self.cache = new_cache(len(prompts), S + max_new_tokens)
        self.done_B = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.new: list[torch.Tensor] = []  # one [B] column per generated token
        self.logp: list[torch.Tensor] = []  # log-prob of each sampled token (under softmax(logits / T))
        self.routes: list[torch.Tensor] = []  # per pass [B, S_fed, L, K] when recording
        self.record, self.want_logprobs = record_routing, logprobs
        self.pos = 0
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self._stop = max_new_tokens == 0

    @property
    def finished(self) -> bool:
        return self._stop

    def step(self, run: Callable[[torch.Tensor, int, torch.Tensor | None, RouteLog | None], torch.Tensor]) -> None:
        """One model pass (`run(feed_BS, start_pos, pad_B, log) -> last logits [B, V]`), then one token."""
        feed = self.ids_BS if self.pos == 0 else self.new[-1][:, None]
        log = RouteLog(record=True) if self.record else None
        logits_BV = run(feed, self.pos, self.pad_B if self.padded else None, log)
        self.pos += feed.shape[1]
        if log is not None:
            self.routes.append(log.routing(feed.shape[0]))
        tok = apply_eos(next_tokens(logits_BV, self.sampling, self.generator), self.done_B, self.sampling)
        if self.want_logprobs:
            t = max(self.sampling.temperature, 0.0) or 1.0
            self.logp.append(torch.log_softmax(logits_BV.float() / t, -1).gather(1, tok[:, None])[:, 0])
        self.new.append(tok)
        if len(self.new) >= self.max_new_tokens or (self.sampling.eos_token_id and bool(self.done_B.all())):  # host sync
            self._stop = True

    # ---- results --------------------------------------------------------------------------------
    def tokens(self) -> torch.Tensor:
        """[B, S + n] (prompts left-padded), rows that stopped early padded with pad_id, HF's layout."""
        return torch.cat([self.ids_BS, *[t[:, None] for t in self.new]], dim=1)

    def rows(self, cut_at_eos: bool = True) -> list[torch.Tensor]:
        """Per row: its prompt and its new tokens, up to and including its first eos."""
        out, full = [], self.tokens()
        for b, n in enumerate(self.lengths):
            row = full[b, full.shape[1] - len(self.new) - n:]
            if cut_at_eos and self.sampling.eos_token_id and len(self.new):
                hit = torch.isin(row[n:], torch.tensor(self.sampling.eos_token_id, device=row.device)).nonzero()
                if len(hit):
                    row = row[:n + int(hit[0]) + 1]
            out.append(row)
        return out

    def routing(self) -> torch.Tensor | None:
        """[B, S + n, L, K] logical expert ids of every fed column; the last token is never fed, so its
        column repeats the one before (it influences no log-prob of the sequence)."""
        if not self.routes:
            return None
        r = torch.cat(self.routes, dim=1)
        return torch.cat([r, r[:, -1:]], dim=1) if self.new else r

    def logprobs(self) -> torch.Tensor | None:
        return torch.stack(self.logp, dim=1) if self.logp else None
