"""MTP self-speculative decoding (greedy): the depth-1 MTP block drafts one token, the main model verifies.

Shape legend: B batch, S prompt length, P positions in one MTP chunk, K tokens fed to one main pass
(1 or 2), D hidden, V vocab.

Positions. Main position i holds token t_i and yields h_i (final-normed) and the prediction of t_{i+1}.
MTP position j takes (h_j, emb(t_{j+1})) and predicts t_{j+2}; its rope position is j, as in
`Transformer.mtp_logits`. Both caches are position-addressed, so a rejected draft needs no explicit
rollback: its cache entries lie past the accepted length and the next pass overwrites them.

One step, with t_m the newest token (not yet fed; main cache valid for 0..m-1, MTP cache for 0..m-2):
  1. MTP position m-1 on (h_{m-1}, emb(t_m)) drafts d = t_{m+1}.
  2. The main model runs [t_m, d] at positions m, m+1 -> predictions p_{m+1}, p_{m+2}.
  3. p_{m+1} == d: keep d and p_{m+2} (two tokens, one pass). Otherwise keep p_{m+1} only.
  4. The MTP block then catches up on the positions just accepted (m, or m and m+1).
Greedy decoding is causal, so p_{m+1} is exactly what plain decoding would produce, and p_{m+2} is valid
whenever d was right; hence the output equals `Transformer.generate(..., temperature=0)`.
"""

from __future__ import annotations

import torch

from dsray.model.decode import Sampling, apply_eos
from dsray.model.mla import LatentCache
from dsray.model.transformer import Transformer


def mtp_step(model: Transformer, h_BPD: torch.Tensor, next_ids_BP: torch.Tensor, cache: LatentCache,
             start_pos: int, depth: int = 0) -> torch.Tensor:
    """Logits [B, P, V] of MTP block `depth` at positions start_pos..start_pos+P-1, with its own cache.

    h_BPD are the main model's final-normed hidden states at those positions and next_ids_BP the tokens
    one position later."""
    block = model.mtp[depth]
    pos = torch.arange(start_pos, start_pos + h_BPD.shape[1], device=h_BPD.device)
    cos, sin = model.rotary(pos, h_BPD.dtype)
    x_BPD = block(h_BPD, model.model.embed_tokens(next_ids_BP), cos, sin, cache, start_pos)
    return model.lm_head(block.shared_head.norm(x_BPD))


@torch.inference_mode()
def speculative_generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_token_id: int | tuple[()] | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy decoding with one MTP draft per main pass; returns (prompt + new ids, stats).

    The ids equal `model.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id)` (None: the
    config's eos id, (): none), finished rows padded with the eos id. All rows share
    one cache position, so a draft is accepted only if every row accepts it (rows already at EOS always
    do). Stats: main_passes counts every main-model forward including the prefill (plain greedy needs
    one per new token); drafted/accepted count verified drafts (one per pass for the whole batch);
    tokens_per_main_pass = new tokens / main_passes. Only MTP depth 1 drafts, as in DeepSeek-V3."""
    if len(model.mtp) == 0:
        raise ValueError("speculative_generate needs an MTP block; model has num_nextn_predict_layers=0 "
                         "(or was built with mtp=False)")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [B, S] tensor, got shape {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    stats = {"main_passes": 0, "accepted": 0, "drafted": 0}
    if max_new_tokens <= 0:
        return input_ids.clone(), _finish(stats, 0)

    # A main pass writes positions m and m+1 with m+1 < S + max_new_tokens; one spare slot for clarity.
    max_len = S + max_new_tokens + 1
    p = model.lm_head.weight
    cache = model.new_cache(B, max_len)
    mtp_cache = LatentCache.allocate(model.cfg, 1, B, max_len, p.dtype, p.device)
    done_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = [input_ids]

    if eos_token_id is None:
        eos_token_id = model.cfg.eos_token_id
    eos_token_id = None if eos_token_id == () else eos_token_id
    rule = Sampling(eos_token_id=() if eos_token_id is None else (eos_token_id,),
                    pad_token_id=eos_token_id if eos_token_id is not None else 0)

    def commit(tok_B: torch.Tensor) -> tuple[torch.Tensor, bool]:
        # generate()'s eos rule (finished rows emit the pad id, here the eos id); stop once all have finished.
        tok_B = apply_eos(tok_B, done_B, rule)
        out.append(tok_B[:, None])
        n_new = len(out) - 1
        return tok_B, n_new == max_new_tokens or (eos_token_id is not None and bool(done_B.all()))  # host sync

    _, h_BSD = model.hidden(input_ids, cache, 0)
    stats["main_passes"] += 1
    tok_B, stop = commit(model.lm_head(h_BSD[:, -1]).argmax(dim=-1))
    m = S  # position of tok_B, the newest token, not yet fed to the main model
    # MTP inputs not yet in its cache: positions mtp_pos..m-1 need h_{j} and t_{j+1}.
    mtp_pos, h_pend_BPD, next_pend_BP = 0, h_BSD, torch.cat([input_ids[:, 1:], tok_B[:, None]], dim=1)

    while not stop:
        draft = max_new_tokens - (len(out) - 1) >= 2  # the last token needs no draft
        feed_BK = tok_B[:, None]
        if draft:
            d_B = mtp_step(model, h_pend_BPD, next_pend_BP, mtp_cache, mtp_pos)[:, -1].argmax(dim=-1)
            # finished rows feed the pad id, as in generate(); their draft is the pad id
            d_B = torch.where(done_B, torch.full_like(d_B, rule.pad_token_id), d_B)
            feed_BK = torch.stack([tok_B, d_B], dim=1)
        _, h_BKD = model.hidden(feed_BK, cache, m)
        stats["main_passes"] += 1
        pred_BK = model.lm_head(h_BKD).argmax(dim=-1)
        first_B, stop = commit(pred_BK[:, 0])
        if not draft:
            break
        stats["drafted"] += 1
        ok = bool((first_B == d_B).all())  # host sync
        if ok:
            # d was right, so the main pass at m+1 saw the true prefix: its prediction is the next token.
            stats["accepted"] += 1
            if not stop:
                tok_B, stop = commit(pred_BK[:, 1])
            mtp_pos, h_pend_BPD, next_pend_BP = m, h_BKD, torch.stack([first_B, tok_B], dim=1)
            m += 2
        else:
            # Rollback is implicit: position m+1 in the main cache is overwritten by the next pass.
            tok_B = first_B
            mtp_pos, h_pend_BPD, next_pend_BP = m, h_BKD[:, :1], first_B[:, None]
            m += 1

    return torch.cat(out, dim=1), _finish(stats, len(out) - 1)


def _finish(stats: dict, n_new: int) -> dict:
    passes, drafted = stats["main_passes"], stats["drafted"]
    return {**stats, "acceptance_rate": stats["accepted"] / drafted if drafted else 0.0,
            "tokens_per_main_pass": n_new / passes if passes else 0.0}
