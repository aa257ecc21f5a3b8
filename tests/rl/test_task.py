"""The sort task: deterministic generators, sequence layout, completion cutting, the reward rule."""

from __future__ import annotations

import pytest
import torch

from dsray.data import ByteTokenizer
from dsray.rl import task
from dsray.rl.task import (MAX_NEW_TOKENS, SEQ_LEN, answer, batch_rewards, completion_text, encode_prompt,
                           prompt_batch, prompt_texts, reward, sft_batch)

TOK = ByteTokenizer()


def test_reward_cases():
    assert answer("dcba=") == "abcd"
    assert reward("pdakp=", "adkpp") == 1.0
    assert reward("aa=", "aa") == 1.0
    for wrong in ("adkp", "adkppp", "adkpp\n", " adkpp", "ADKPP", "pdakp", "", "adkpp="):
        assert reward("pdakp=", wrong) == 0.0, wrong  # no partial credit, no stripping
    for bad in ("abc", "=", "a=b=", ""):
        with pytest.raises(ValueError, match="prompt_text"):
            reward(bad, "abc")


def test_completion_text_cuts_at_first_eos():
    ids = [*b"ab", TOK.eos_id, *b"zz", TOK.eos_id]
    assert completion_text(ids) == "ab"
    assert completion_text(torch.tensor(ids)) == "ab"
    assert completion_text(list(b"ab\ncd")) == "ab\ncd"  # a newline is just a byte
    assert completion_text([TOK.pad_id, *b"x"]) == "x"  # other specials are dropped
    assert completion_text([]) == ""


def test_prompts_are_deterministic_short_and_varied():
    a, b = prompt_texts(200, seed=5), prompt_texts(200, seed=5)
    assert a == b and a != prompt_texts(200, seed=6)
    lengths = {len(t) for t in a}
    assert min(lengths) >= task.MIN_LETTERS + 1 and max(lengths) <= task.MAX_LETTERS + 1 <= 16
    assert len(lengths) > 5  # prompts of different lengths in one batch
    assert all(t.endswith("=") and set(t[:-1]) <= set(task.ALPHABET) for t in a)
    assert prompt_texts(3, 0) == ["bnlimf=", "lbcdadecoc=", "khdmo="]  # pinned: same on every platform


def test_prompt_batch_groups_consecutive_rows():
    texts, ids = prompt_batch(3, seed=1, group_size=4)
    assert len(texts) == len(ids) == 12
    assert texts == [t for t in prompt_texts(3, 1) for _ in range(4)]
    for t, x in zip(texts, ids):
        assert x.dtype == torch.long and x.ndim == 1
        assert x[0].item() == TOK.bos_id and TOK.decode(x) == t
    with pytest.raises(ValueError, match="group_size"):
        prompt_batch(2, 0, group_size=0)


def test_sft_batch_layout():
    x = sft_batch(64, seed=3)
    assert x.shape == (64, SEQ_LEN) and x.dtype == torch.long
    assert torch.equal(x, sft_batch(64, seed=3)) and not torch.equal(x, sft_batch(64, seed=4))
    for row in x.tolist():
        assert row[0] == TOK.bos_id
        end = row.index(TOK.eos_id)
        assert all(i == TOK.pad_id for i in row[end + 1:])
        prompt, ans = TOK.decode(row[1:end]).split("=")
        assert reward(prompt + "=", ans) == 1.0
        assert len(ans) + 1 <= MAX_NEW_TOKENS
    assert (x == TOK.eos_id).sum(1).eq(1).all()
    assert (x[:, -1] == TOK.eos_id).any()  # the longest words fill the row exactly
    assert sft_batch(0, 0).shape == (0, SEQ_LEN)


def test_batch_rewards():
    texts = ["cba=", "cba=", "ba="]
    outs = [torch.cat([encode_prompt(t), torch.tensor(c)]) for t, c in
            zip(texts, [[*b"abc", TOK.eos_id], [*b"acb", TOK.eos_id], [*b"ab", TOK.eos_id, TOK.eos_id]])]
    assert batch_rewards(texts, outs).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="outputs"):
        batch_rewards(texts, outs[:2])
    with pytest.raises(ValueError, match="shorter than the prompt"):
        batch_rewards(["cba="], [torch.tensor([TOK.bos_id])])


def test_warm_up_and_evaluate_run():
    # a smoke run of the measurement path (the real numbers come from `python -m dsray.rl.task`)
    model, log = task.warm_up(steps=1, batch_size=4)
    r = task.evaluate(model, n=8, temperature=1.0)
    assert 0.0 <= r <= 1.0 and model.training
