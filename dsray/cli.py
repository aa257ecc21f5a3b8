"""`dsray` command line: demo, train, generate, status, top, report, rl.

Every command runs unchanged on a laptop (embedded local Ray, CPU) and as
`ray job submit --working-dir . -- dsray ...` on a cluster (RAY_ADDRESS set by the job).
Every argument is checked before Ray starts; every error is one line on stderr and a non-zero exit
(2: bad input, 1: the run failed, 130: interrupted). Nothing a user had on disk is ever replaced
without --overwrite, and never a folder that holds anything but a dsray checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dsray.commands import cmd_generate, cmd_report, cmd_request, cmd_rl, cmd_status, cmd_top, cmd_train

EXIT_USAGE, EXIT_RUNTIME = 2, 1


def _sigterm(*_: Any) -> None:
    # `ray job stop` and schedulers send SIGTERM: unwind like Ctrl-C so the Engine cleans up.
    raise KeyboardInterrupt


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    pass


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join ('auto': the one running on this host); default: "
                   "RAY_ADDRESS inside a Ray job, else an embedded local Ray of our own")


def _engine_args(p: argparse.ArgumentParser, drivers: int = 1, shards: int = 2) -> None:
    p.add_argument("--drivers", type=int, default=drivers, help="driver ranks (data parallel)")
    p.add_argument("--shards", type=int, default=shards, help="expert shards (0: experts inside the driver)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where ranks compute")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and activations")
    p.add_argument("--placement", default="linear", help="linear | round_robin | path to a JSON table")
    p.add_argument("--name", default="dsray", help="engine name (the Router is found by it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--cpus-per-rank", type=float, default=1.0,
                   help="logical CPUs each rank asks Ray for (fractions allowed: ranks mostly wait in collectives)")
    p.add_argument("--wait-for-nodes", type=float, default=0.0, metavar="SECONDS",
                   help="on an autoscaling cluster, wait this long for nodes that can hold the ranks")
    p.add_argument("--no-metrics", action="store_true", help="do not export Prometheus metrics")
    _ray_args(p)


def _train_args(t: argparse.ArgumentParser, steps: int, drivers: int, shards: int) -> None:
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", default="debug", help="model preset (debug, v3-671b, moonlight-16b-a3b, kimi-k2)")
    src.add_argument("--config", help="a config.json (or checkpoint folder) to train from scratch")
    src.add_argument("--checkpoint", help="HF deepseek_v3 folder to continue from")
    t.add_argument("--data", help="UTF-8 text file (default: the bundled Shakespeare corpus)")
    t.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (over all drivers)")
    t.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    t.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    t.add_argument("--gamma", type=float, default=1e-3, help="bias update speed (0 disables balancing)")
    t.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip over all ranks (0: off)")
    t.add_argument("--seq-aux-alpha", type=float, default=0.0,
                   help="sequence-wise balance loss weight (DeepSeek-V3: 1e-4; 0: off)")
    t.add_argument("--seed", type=int, default=0, help="weights and data order")
    t.add_argument("--save", help="checkpoint folder to write at the end")
    t.add_argument("--report", help="PNG with the load heatmap and MaxVio curves of the run")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint / report (never a folder holding other files)")
    t.add_argument("--log-every", type=int, default=20, help="log line interval when not on a terminal")
    t.add_argument("--rebalance-every", type=int, default=0,
                   help="every N steps, re-place experts by load (EPLB-style replicas of hot experts)")
    t.add_argument("--replicas", type=int, default=2, help="extra expert slots for --rebalance-every")
    _engine_args(t, drivers, shards)


def _rl_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--preset", default="debug", help="model preset (the task needs the byte tokenizer's vocab)")
    r.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling")
    r.add_argument("--warmup-steps", type=int, default=300, help="supervised steps on solved examples first")
    r.add_argument("--warmup-batch", type=int, default=128, help="sequences per warm-up step")
    r.add_argument("--warmup-lr", type=float, default=3e-3, help="AdamW learning rate of the warm-up")
    r.add_argument("--steps", type=int, default=60, help="GRPO steps (one rollout each)")
    r.add_argument("--group-size", type=int, default=8, help="answers sampled per prompt (>= 2)")
    r.add_argument("--prompts", type=int, default=16, help="prompts per GRPO step")
    r.add_argument("--updates-per-rollout", type=int, default=2, help="grpo_step calls on each rollout batch")
    r.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of GRPO")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts (> 0)")
    r.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the task's)")
    r.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                   help="train with the rollout's routing (rollout routing replay)")
    r.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL penalty to the post-warm-up policy (0: off)")
    r.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip: ratio kept in [1-eps, 1+eps-high]")
    r.add_argument("--clip-eps-high", type=float, help="upper clip (DAPO clip-higher; default: --clip-eps)")
    r.add_argument("--norm", choices=["token", "sequence"], default="token", help="loss normalisation")
    r.add_argument("--gamma", type=float, default=1e-3, help="bias update speed (0 disables balancing)")
    r.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts for the reward before/after")
    r.add_argument("--eval-every", type=int, default=0, help="also evaluate every N GRPO steps (0: only before/after)")
    r.add_argument("--save", help="checkpoint folder to write at the end")
    r.add_argument("--save-rollouts", help="folder receiving every rollout batch as msgpack")
    r.add_argument("--history", help="JSON file receiving the per-step history")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint / history (never a folder holding other files)")
    _engine_args(r, 1, 2)


def _validate_rl(a: argparse.Namespace) -> None:
    from dsray.config import resolve_config
    from dsray.data import ByteTokenizer
    from dsray.files import check_checkpoint_target, check_new_file

    _positive(a, warmup_steps=0, warmup_batch=1, warmup_lr=0, group_size=2, prompts=1, updates_per_rollout=1,
              kl_coef=0, eval_prompts=1, eval_every=0, max_new_tokens=1)
    if a.clip_eps_high is not None and not a.clip_eps_high > 0:
        raise ValueError(f"--clip-eps-high {a.clip_eps_high}: expected > 0")
    if not a.temperature > 0:
        raise ValueError(f"--temperature {a.temperature}: expected > 0 (GRPO samples its answers)")
    if not 0 < a.clip_eps < 1:
        raise ValueError(f"--clip-eps {a.clip_eps}: expected in (0, 1)")
    cfg = resolve_config(a.preset)
    if cfg.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"--preset {a.preset}: vocab_size {cfg.vocab_size} < {ByteTokenizer.vocab_size}, "
                         "the byte tokenizer of the sort task does not fit")
    if a.group_size * a.prompts < a.drivers:
        raise ValueError(f"--group-size {a.group_size} x --prompts {a.prompts} rows is fewer than --drivers "
                         f"{a.drivers}: each driver needs at least one row")
    if a.warmup_steps and a.warmup_batch < a.drivers:
        raise ValueError(f"--warmup-batch {a.warmup_batch} is smaller than --drivers {a.drivers}")
    if a.save:
        check_checkpoint_target(a.save, a.overwrite)
    if a.history:
        check_new_file(a.history, a.overwrite, "--history")
    if a.save_rollouts and Path(a.save_rollouts).exists() and not Path(a.save_rollouts).is_dir():
        raise FileExistsError(f"--save-rollouts {a.save_rollouts} exists and is not a folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsray", description="Expert-parallel DeepSeek-V3 MoE on Ray",
                                formatter_class=_Help)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = lambda name, helptext: sub.add_parser(name, help=helptext, formatter_class=_Help)  # noqa: E731

    _train_args(add("train", "train with expert parallelism"), 100, 1, 2)
    d = add("demo", "the README's main job: debug model, 2 drivers + 3 shards, train, save, generate")
    _train_args(d, 300, 2, 3)
    d.set_defaults(name="demo", gamma=1e-2)
    d.add_argument("--run-dir", help="where the demo writes (default: a new runs/demo-<time> folder)")
    d.add_argument("--prompt", default="ROMEO:\n", help="text to continue after training")
    d.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample after training")

    g = add("generate", "generate from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="HF deepseek_v3 folder (safetensors)")
    g.add_argument("--prompt", action="append", help="text prompt; repeat for several (any lengths)")
    g.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    g.add_argument("--max-new-tokens", type=int, default=100, help="new tokens per prompt")
    g.add_argument("--temperature", type=float,
                   help="0: greedy (default: the checkpoint's generation_config.json, else greedy)")
    g.add_argument("--top-k", type=int, help="sample from the k likeliest (default: the checkpoint's)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the checkpoint's)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--eos-token-id", type=int,
                   help="stop a row at this id (default: the checkpoint's generation_config.json / config.json)")
    g.add_argument("--no-eos", action="store_true", help="never stop early: always generate --max-new-tokens")
    _engine_args(g, 1, 2)

    for name, helptext in (("status", "print a running engine's router statistics"),
                           ("top", "live view of expert load and MaxVio")):
        s = add(name, helptext)
        s.add_argument("--name", default="dsray", help="engine name")
        s.add_argument("--address", default="auto", help="Ray cluster to look in")
        if name == "status":
            s.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            s.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
            s.add_argument("--iterations", type=int, help="stop after N refreshes (default: until Ctrl-C)")
            s.add_argument("--metrics-url", help="read the engine's metrics from a Ray metrics endpoint "
                           "(http://<Router's node>:8080/metrics) instead of connecting to Ray")

    for name, helptext in (("scale", "queue a change of a running engine's shard count (applied at its next step)"),
                           ("rebalance", "queue a load-based re-placement of a running engine's experts")):
        s = add(name, helptext)
        s.add_argument("--name", default="dsray", help="engine name")
        s.add_argument("--address", default="auto", help="Ray cluster to look in")
        if name == "scale":
            s.add_argument("--shards", type=int, required=True, help="number of expert shards after the change")
        else:
            s.add_argument("--replicas", type=int, default=0, help="extra slots for replicas of the hottest experts")
        s.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the engine to apply it (0: queue only)")

    _rl_args(add("rl", "GRPO with rollout routing replay on the toy sort task (SFT warm-up first)"))

    r = add("report", "PNG of a finished run's expert load and MaxVio")
    r.add_argument("run", help="run folder, checkpoint folder or dsray_router.json")
    r.add_argument("--out", default="report.png", help="PNG to write")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _positive(a: argparse.Namespace, **rules: int) -> None:
    for name, low in rules.items():
        v = getattr(a, name, None)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')} {v}: expected >= {low}")


def validate(a: argparse.Namespace) -> None:
    """Everything that can be checked before Ray starts (ValueError / FileExistsError: exit 2)."""
    from dsray.files import check_checkpoint_target, check_new_file

    _positive(a, drivers=1, shards=0, threads=1, steps=0, batch_size=1, seq_len=2, log_every=0,
              rebalance_every=0, replicas=0, max_new_tokens=0, top_k=1, iterations=1, gamma=0, lr=0,
              clip_grad=0, seq_aux_alpha=0, temperature=0, cpus_per_rank=0, wait_for_nodes=0)
    if getattr(a, "top_p", None) is not None and not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p {a.top_p}: expected in (0, 1]")
    if getattr(a, "interval", 1.0) <= 0:
        raise ValueError(f"--interval {a.interval}: expected > 0")
    if a.cmd in ("train", "demo"):
        if a.cmd == "demo":
            run = Path(a.run_dir) if a.run_dir else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
            a.save = a.save or str(run / "checkpoint")
            a.report = a.report or str(run / "report.png")
        if a.batch_size < a.drivers:
            raise ValueError(f"--batch-size {a.batch_size} is smaller than --drivers {a.drivers}: each driver "
                             "needs at least one sequence")
        if a.save:
            check_checkpoint_target(a.save, a.overwrite)
        if a.report:
            check_new_file(a.report, a.overwrite, "--report")
        for opt in ("checkpoint", "config", "data"):
            if getattr(a, opt, None) and not Path(getattr(a, opt)).exists():
                raise FileNotFoundError(f"--{opt} {getattr(a, opt)}: no such file or folder")
    if a.cmd == "generate":
        if not Path(a.checkpoint).exists():
            raise FileNotFoundError(f"--checkpoint {a.checkpoint}: no such folder")
        if a.prompt and a.prompt_ids:
            raise ValueError("give --prompt or --prompt-ids, not both")
        if a.prompt_ids:
            try:
                a.prompt_ids_list = [int(x) for x in a.prompt_ids.split(",")]
            except ValueError:
                raise ValueError(f"--prompt-ids {a.prompt_ids!r}: expected comma-separated integers") from None
    if a.cmd == "report":
        check_new_file(a.out, a.overwrite, "--out")
    if a.cmd == "rl":
        _validate_rl(a)
    if getattr(a, "placement", "linear") not in ("linear", "round_robin"):
        f = Path(a.placement)
        if not f.is_file():
            raise FileNotFoundError(f"--placement {a.placement}: no such file (or use linear / round_robin)")
        try:
            a.placement = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--placement {f}: not valid JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    handlers = {"train": cmd_train, "demo": lambda a: cmd_train(a, demo=True), "generate": cmd_generate,
                "status": cmd_status, "top": cmd_top, "report": cmd_report, "rl": cmd_rl,
                "scale": cmd_request, "rebalance": cmd_request}
    try:
        validate(a)
        return handlers[a.cmd](a)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"dsray {a.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, ConnectionError, TimeoutError) as e:
        print(f"dsray {a.cmd}: failed: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print(f"dsray {a.cmd}: interrupted; engine stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
