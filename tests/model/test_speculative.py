"""MTP self-speculative decoding: same ids as greedy generate, real acceptance on a learnable pattern."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from dsray.config import preset
from dsray.model import LatentCache, Transformer
import dsray.model.speculative as spec
from dsray.model.speculative import mtp_step, speculative_generate


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer.from_config(preset("debug"), seed=0).eval()


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """The debug model fitted to a period-7 pattern, so both the main head and the MTP head predict it."""
    torch.manual_seed(0)
    m = Transformer.from_config(preset("debug"), seed=0)
    pattern = torch.tensor([11, 42, 7, 99, 3, 250, 64])
    seq = pattern.repeat(10)  # 70 tokens
    ids = torch.stack([seq[o:o + 48] for o in range(4)])  # 4 phases of the pattern
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        m.loss(ids)["total"].backward()
        opt.step()
    return m.eval()


def _prompts(vocab: int, B: int, S: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("B,S,n", [(1, 1, 9), (1, 5, 12), (2, 3, 10), (2, 8, 7), (1, 6, 1), (2, 4, 2)])
def test_equals_greedy(model, B, S, n):
    ids = _prompts(model.cfg.vocab_size, B, S, seed=10 * B + S)
    out, stats = speculative_generate(model, ids, n)
    assert torch.equal(out, model.generate(ids, n))
    assert out.shape == (B, S + n)
    assert stats["main_passes"] <= n and stats["accepted"] <= stats["drafted"]
    assert stats["tokens_per_main_pass"] == pytest.approx(n / stats["main_passes"])


@pytest.mark.parametrize("B", [1, 2])
def test_equals_greedy_with_eos(model, B):
    # EOS = a token greedy decoding is known to emit, so stopping and EOS padding are both exercised.
    ids = _prompts(model.cfg.vocab_size, B, 4, seed=3)
    free = model.generate(ids, 12)
    for eos in {int(free[0, 4 + 3]), int(free[-1, 4 + 6])}:
        ref = model.generate(ids, 12, eos_token_id=eos)
        out, _ = speculative_generate(model, ids, 12, eos_token_id=eos)
        assert torch.equal(out, ref), (eos, out, ref)
        assert out.shape[1] <= 4 + 12


def test_zero_new_tokens(model):
    ids = _prompts(model.cfg.vocab_size, 1, 3, seed=0)
    out, stats = speculative_generate(model, ids, 0)
    assert torch.equal(out, ids) and stats["main_passes"] == 0


def test_trained_pattern_accepts(trained):
    prompt = torch.tensor([[11, 42, 7, 99, 3, 250, 64, 11, 42, 7],
                           [3, 250, 64, 11, 42, 7, 99, 3, 250, 64]])
    for ids in (prompt[:1], prompt):
        out, stats = speculative_generate(trained, ids, 24)
        assert torch.equal(out, trained.generate(ids, 24))
        assert stats["acceptance_rate"] > 0.8, stats
        assert stats["tokens_per_main_pass"] > 1.6, stats
        assert stats["main_passes"] < 24


def test_trained_pattern_eos_while_accepting(trained):
    # Row 0 hits EOS (64) after 4 tokens and is padded with EOS while row 1 keeps accepting drafts.
    ids = torch.tensor([[11, 42, 7, 99, 3, 250, 64, 11, 42, 7],
                        [3, 250, 64, 11, 42, 7, 99, 3, 250, 64]])
    out, stats = speculative_generate(trained, ids, 20, eos_token_id=64)
    assert torch.equal(out, trained.generate(ids, 20, eos_token_id=64))
    assert out[0, 10:].tolist() == [99, 3, 250, 64, 64, 64, 64], out
    assert stats["acceptance_rate"] == 1.0, stats  # the finished row drafts EOS, so it never blocks acceptance


def test_mixed_accept_reject_equals_greedy(trained, monkeypatch):
    # Every third draft is made wrong (argmax moved to another token; the MTP cache is still written), so
    # rejections and rollbacks interleave with accepted pairs at known steps.
    calls = []

    def sabotaged(*args, **kwargs):
        logits = mtp_step(*args, **kwargs)
        calls.append(1)
        return logits.roll(1, dims=-1) if len(calls) % 3 == 0 else logits

    monkeypatch.setattr(spec, "mtp_step", sabotaged)
    for ids in (torch.tensor([[42, 7, 99]]), torch.tensor([[42, 7, 99], [64, 11, 42]])):
        calls.clear()
        out, stats = speculative_generate(trained, ids, 25)
        assert torch.equal(out, trained.generate(ids, 25))
        assert 0 < stats["accepted"] < stats["drafted"] and stats["drafted"] - stats["accepted"] == len(calls) // 3


@pytest.mark.parametrize("which", ["model", "trained"])
def test_drafts_see_what_mtp_logits_sees(which, request, monkeypatch):
    # During generation the MTP chunks must tile positions 0, 1, 2, ... with no gap or overlap, and each
    # chunk's logits must equal mtp_logits over the final sequence (the cache holds the accepted prefix only).
    m = request.getfixturevalue(which)
    seen = []

    def recording(model, h, next_ids, cache, start_pos, depth=0):
        logits = mtp_step(model, h, next_ids, cache, start_pos, depth)
        seen.append((start_pos, logits.clone()))
        return logits

    monkeypatch.setattr(spec, "mtp_step", recording)
    ids = torch.tensor([[42, 7, 99, 3], [5, 6, 250, 64]])
    out, _ = speculative_generate(m, ids, 15)
    with torch.inference_mode():
        ref = m.mtp_logits(out, m.hidden(out)[1])[0]
    pos = 0
    for start, logits in seen:
        assert start == pos
        assert_close(logits, ref[:, start:start + logits.shape[1]], rtol=1e-4, what=f"MTP chunk at {start}")
        pos += logits.shape[1]


@torch.inference_mode()
def test_mtp_cache_matches_mtp_logits(model):
    ids = _prompts(model.cfg.vocab_size, 2, 12, seed=5)
    h = model.hidden(ids)[1]  # no cache: the naive attention path
    ref = model.mtp_logits(ids, h)[0]  # [B, 11, V]: position j predicts token j+2
    cache = LatentCache.allocate(model.cfg, 1, 2, 16, h.dtype)
    got, pos = [], 0
    for n in (5, 1, 2, 1, 2):  # a prefill chunk, then decode-sized chunks, as speculative_generate runs
        got.append(mtp_step(model, h[:, pos:pos + n], ids[:, pos + 1:pos + 1 + n], cache, pos))
        pos += n
    assert_close(torch.cat(got, dim=1), ref, rtol=1e-5, what="MTP with cache vs mtp_logits")


def test_no_mtp_raises():
    m = Transformer.from_config(preset("debug").replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        speculative_generate(m, torch.zeros(1, 3, dtype=torch.long), 4)
