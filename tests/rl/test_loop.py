"""run_grpo on a LocalPolicy: it raises the mean reward, writes readable rollout files, rejects bad input."""

from __future__ import annotations

import pytest
import torch

from dsray.config import preset
from dsray.model import Transformer
from dsray.rl import task
from dsray.rl.loop import pack_rollout, run_grpo
from dsray.rl.policy import LocalPolicy
from dsray.rl.records import iter_rollouts, read_rollout


class Letters:
    """A task a fresh model can learn by RL alone (no warm-up): reward = fraction of the completion's
    tokens that are letters a..p. A random 320-token model scores ~0.03; measured with lr 1e-2 on the
    debug preset: 0.03 -> 0.92 in 12 steps (4 s on one idle core)."""

    MAX_NEW_TOKENS, EOS_ID, PAD_ID = 6, task.EOS_ID, task.PAD_ID
    prompt_batch = staticmethod(task.prompt_batch)

    @staticmethod
    def batch_rewards(texts, rows):
        out = []
        for t, r in zip(texts, rows):
            new = r[len(task.encode_prompt(t)):].tolist()
            out.append(sum(97 <= x < 113 for x in new) / Letters.MAX_NEW_TOKENS)
        return torch.tensor(out)


def fresh(seed=0, lr=1e-2) -> LocalPolicy:
    return LocalPolicy(Transformer.from_config(preset("debug"), seed=seed), lr=lr)


@pytest.mark.parametrize("replay", [True, False])
def test_run_grpo_raises_the_reward(tmp_path, replay):
    pol = fresh()
    h = run_grpo(pol, Letters, 8, group_size=8, prompts_per_step=6, replay=replay, progress=False,
                 save_rollouts=tmp_path / "r")
    r = [s["reward_mean"] for s in h.steps]
    assert sum(r[-2:]) / 2 > sum(r[:2]) / 2 + 0.2, r
    assert all(s["mismatch_tokens"] is not None for s in h.steps)
    files = list(iter_rollouts(tmp_path / "r"))
    assert len(files) == 8
    _, b, meta = files[0]
    assert meta["replay"] is replay and b["group_size"] == 8 and b["step"] == 1
    assert b["routing"].dtype == torch.uint8 and b["routing"].shape[:2] == b["ids"].shape
    assert torch.equal(b["advantages"], (b["rewards"].view(-1, 8) - b["rewards"].view(-1, 8).mean(1, keepdim=True))
                       .div(b["rewards"].view(-1, 8).std(1, unbiased=False, keepdim=True) + 1e-6).view(-1))


def test_kl_needs_and_uses_the_reference(tmp_path):
    pol = fresh()
    with pytest.raises(ValueError, match="set_reference"):
        run_grpo(pol, Letters, 1, group_size=2, prompts_per_step=2, kl_coef=0.1, progress=False)
    pol.set_reference()
    h = run_grpo(pol, Letters, 2, group_size=4, prompts_per_step=2, kl_coef=0.1, progress=False,
                 updates_per_rollout=2, save_rollouts=tmp_path)
    assert h.steps[-1]["kl_mean"] > 0
    b, _ = read_rollout(tmp_path / "rollout-000002.msgpack")
    assert b["ref_logprobs"].shape == b["logprobs"].shape


def test_bad_arguments_raise_before_any_rollout():
    pol = fresh()
    for kw, match in [(dict(group_size=1), "group_size=1"), (dict(temperature=0.0), "temperature"),
                      (dict(steps=-1), "steps"), (dict(kl_coef=-1.0), "kl_coef"),
                      (dict(updates_per_rollout=0), "updates_per_rollout"), (dict(prompts_per_step=0), "prompts")]:
        args = dict(steps=1, group_size=2, prompts_per_step=1) | kw
        with pytest.raises(ValueError, match=match):
            run_grpo(pol, Letters, progress=False, **args)
    assert pol.step == 0


def test_pack_rollout_pads_routing_and_logprobs():
    prompts = [torch.tensor([256, 97, 61]), torch.tensor([256, 61])]
    rows = [torch.tensor([256, 97, 61, 97, 257]), torch.tensor([256, 61, 257])]
    routing = [torch.full((5, 2, 4), 9, dtype=torch.uint8), torch.full((3, 2, 4), 7, dtype=torch.uint8)]
    lps = [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0])]
    b = pack_rollout(prompts, rows, routing, lps, pad_id=258)
    assert b["ids"].tolist() == [[256, 97, 61, 97, 257], [256, 61, 257, 258, 258]]
    assert b["logprobs"].tolist() == [[0, 0, -1, -2], [0, -3, 0, 0]]
    assert b["completion_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert (b["routing"][1, 3:] == torch.arange(4, dtype=torch.uint8)).all() and (b["routing"][1, :3] == 7).all()
    with pytest.raises(ValueError, match=r"routing\[1\]"):
        pack_rollout(prompts, rows, [routing[0], routing[0]], lps, 258)
    with pytest.raises(ValueError, match=r"logprobs\[0\]"):
        pack_rollout(prompts, rows, routing, [lps[1], lps[1]], 258)


def test_truncated_and_foreign_rollout_files_name_the_file(tmp_path):
    pol = fresh()
    run_grpo(pol, Letters, 1, group_size=2, prompts_per_step=2, progress=False, save_rollouts=tmp_path)
    p = tmp_path / "rollout-000001.msgpack"
    blob = p.read_bytes()
    p.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match="rollout-000001.msgpack"):
        read_rollout(p)
    q = tmp_path / "rollout-000002.msgpack"
    q.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError, match="rollout-000002.msgpack"):
        read_rollout(q)
    with pytest.raises(ValueError, match="rollout-00000"):
        list(iter_rollouts(tmp_path))
