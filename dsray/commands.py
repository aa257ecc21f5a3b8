"""What each `dsray` command does, once `dsray.cli` has parsed and validated its arguments."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def engine_kw(a: argparse.Namespace) -> dict[str, Any]:
    return dict(num_drivers=a.drivers, num_shards=a.shards, device=a.device, dtype=a.dtype,
                placement=a.placement, name=a.name, threads=a.threads, metrics=not a.no_metrics,
                driver_resources={"num_cpus": a.cpus_per_rank}, shard_resources={"num_cpus": a.cpus_per_rank},
                address=a.address, wait_for_nodes_s=a.wait_for_nodes)


def tokenizer(checkpoint: Path | None, vocab_size: int):
    """(encode, decode) of the checkpoint's tokenizer.json, else the byte tokenizer (dsray's own models)."""
    if checkpoint is not None and (checkpoint / "tokenizer.json").exists():
        from tokenizers import Tokenizer  # a dependency: a real checkpoint must not fall back to bytes

        tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        return (lambda s: tok.encode(s).ids), tok.decode
    from dsray.data import ByteTokenizer

    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is too small for the byte tokenizer and the checkpoint has no "
                         "tokenizer.json; pass --prompt-ids")
    bt = ByteTokenizer()
    return bt.encode, bt.decode


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # A bar on a terminal; periodic log lines otherwise (job logs, CI), see train_loop.
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                disable=not sys.stderr.isatty())


def train_loop(eng, batches, steps: int, log_every: int, desc: str, rebalance_every: int = 0,
               replicas: int = 0) -> list[dict[str, Any]]:
    history = []
    bar = _progress(steps, desc)
    try:
        for i in range(steps):
            if rebalance_every and i and i % rebalance_every == 0 and eng.num_shards > 1:
                p = eng.rebalance(replicas)
                hot = sorted(e for e in range(p.n_experts) if len(p.replicas(e)) > 1)
                print(f"step {i}: placement v{p.version}, replicated experts {hot}", flush=True)
            out = eng.train_step(batches.next_batch())
            history.append(out)
            mv = float(max(out["maxvio_batch"])) if len(out["maxvio_batch"]) else 0.0
            bar.set_postfix(loss=f"{out['loss']:.3f}", maxvio=f"{mv:.2f}", tok_s=f"{out['tokens_per_s']:.0f}")
            bar.update(1)
            if not sys.stderr.isatty() and log_every and (i + 1) % log_every == 0:
                print(f"step {out['step']:5d}  loss {out['loss']:.4f}  max MaxVio {mv:.3f}  "
                      f"{out['tokens_per_s']:.0f} tok/s", flush=True)
    finally:
        bar.close()
    return history


def print_stats(stats: dict[str, Any], title: str) -> None:
    from rich.console import Console

    from dsray.top import render

    Console().print(render(stats, title=title))
    req = stats.get("requests") or {}
    for r in req.get("pending", []):
        print(f"pending  #{r['id']} {r['kind']} {({k: v for k, v in r.items() if k in ('num_shards', 'replicas')})} "
              f"(queued at placement v{r['from_version']})")
    for r in req.get("applied", [])[-5:]:
        print(f"applied  #{r['id']} {r['kind']}: v{r['from_version']} -> v{r['to_version']}, "
              f"{r['bytes_moved']} bytes moved in {r['seconds']}s" + (f", error: {r['error']}" if r["error"] else ""))
    rec = (stats.get("extra") or {}).get("recoveries")
    if rec:
        print(f"recoveries: {rec}")


def cmd_train(a: argparse.Namespace, demo: bool = False) -> int:
    from dsray.config import resolve_config
    from dsray.data import TextBatches, default_corpus_path
    from dsray.runtime import Engine

    data = Path(a.data) if a.data else default_corpus_path()
    batches = TextBatches(data, seq_len=a.seq_len, batch_size=a.batch_size, seed=a.seed)
    kw = engine_kw(a)
    kw.update(gamma=a.gamma, lr=a.lr, clip_grad_norm=a.clip_grad, seq_aux_alpha=a.seq_aux_alpha)
    if a.checkpoint:
        eng = Engine.from_pretrained(a.checkpoint, **kw)
    else:
        eng = Engine.from_config(resolve_config(a.config or a.preset), seed=a.seed, **kw)
    with eng:
        print(f"dsray: {eng.ray_how}", flush=True)
        print(f"dsray: engine {a.name!r}: {eng.num_drivers} driver rank(s) + {eng.num_shards} expert shard(s) on "
              f"{a.device}, {eng.cfg.n_routed_experts} experts x {len(eng.moe_layers)} MoE layers, gamma={a.gamma}",
              flush=True)
        hist = train_loop(eng, batches, a.steps, a.log_every, "train", a.rebalance_every, a.replicas)
        if hist:
            k = max(1, len(hist) // 10)
            first = sum(h["loss"] for h in hist[:k]) / k
            last = sum(h["loss"] for h in hist[-k:]) / k
            mv0 = max(hist[0]["maxvio_batch"])
            mv1 = sum(max(h["maxvio_batch"]) for h in hist[-k:]) / k
            print(f"loss {first:.3f} -> {last:.3f} (mean of first/last {k} steps); "
                  f"max-layer MaxVio {mv0:.2f} -> {mv1:.2f}", flush=True)
        stats = eng.stats()
        print_stats(stats, "dsray train")
        if a.save:
            print(f"saved checkpoint to {eng.save(a.save, overwrite=a.overwrite)}", flush=True)
        if a.report:
            from dsray.report import render_report

            print(f"wrote {render_report(stats, Path(a.report))}", flush=True)
        enc, dec = tokenizer(None, eng.cfg.vocab_size) if demo else (None, None)
    if demo and a.save:
        print(f"\nreloading {a.save} with 1 driver + 2 shards and generating:", flush=True)
        with Engine.from_pretrained(a.save, num_drivers=1, num_shards=2, name=a.name + "-gen",
                                    metrics=False) as gen:
            import torch

            ids = torch.tensor([enc(a.prompt)])
            out = gen.generate(ids, a.max_new_tokens, temperature=0.8, top_k=40, seed=a.seed)
            print("-" * 60 + "\n" + a.prompt + dec(out[0, ids.shape[1]:].tolist()) + "\n" + "-" * 60)
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from dsray.runtime import Engine

    ckpt = Path(a.checkpoint)
    with Engine.from_pretrained(ckpt, **engine_kw(a)) as eng:
        texts = a.prompt or ["ROMEO:\n"]
        if a.prompt_ids:
            prompts, decode = [torch.tensor(a.prompt_ids_list)], None
        else:
            enc, decode = tokenizer(ckpt, eng.cfg.vocab_size)
            prompts = [torch.tensor(enc(t)) for t in texts]
        eos = () if a.no_eos else a.eos_token_id
        t0 = time.perf_counter()
        outs = eng.generate(prompts, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            eos_token_id=eos, seed=a.seed)
        dt = time.perf_counter() - t0
        n_new = 0
        for text, p, o in zip(texts, prompts, outs):
            new = o[p.shape[0]:].tolist()
            n_new += len(new)
            print(text + decode(new) if decode else ",".join(map(str, o.tolist())))
        print(f"[{n_new} tokens for {len(prompts)} prompt(s) in {dt:.2f}s, {n_new / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def _router_stats(a: argparse.Namespace):
    """(fetch function, shutdown) for a running engine's Router, found by name on the cluster."""
    import ray

    from dsray.runtime.cluster import connect
    from dsray.runtime.engine import attach_router

    connect(a.address)
    try:
        router = attach_router(a.name)
    except BaseException:
        ray.shutdown()
        raise
    return (lambda: ray.get(router.stats.remote(), timeout=30)), ray.shutdown


def cmd_status(a: argparse.Namespace) -> int:
    fetch, close = _router_stats(a)
    try:
        stats = fetch()
        if a.json:
            stats.pop("history", None)
            print(json.dumps(stats))
        else:
            print_stats(stats, "dsray status")
    finally:
        close()
    return 0


def cmd_request(a: argparse.Namespace) -> int:
    """`dsray scale` / `dsray rebalance`: queue the change on the engine's Router; the engine applies it
    at its next step boundary (new shards land wherever the cluster has the resources)."""
    import ray

    from dsray.runtime.cluster import connect
    from dsray.runtime.engine import attach_router

    if a.cmd == "scale" and a.shards < 1:
        raise ValueError(f"--shards {a.shards}: expected >= 1")
    if a.cmd == "rebalance" and a.replicas < 0:
        raise ValueError(f"--replicas {a.replicas}: expected >= 0")
    connect(a.address)
    try:
        router = attach_router(a.name)
        args = {"num_shards": a.shards} if a.cmd == "scale" else {"replicas": a.replicas}
        rid = ray.get(router.request.remote(a.cmd, **args), timeout=30)
        print(f"queued {a.cmd} request {rid} {args} on engine {a.name!r}; applied at its next step", flush=True)
        deadline = time.monotonic() + a.wait
        while a.wait > 0:
            done = [r for r in ray.get(router.stats.remote(), timeout=30)["requests"]["applied"] if r["id"] == rid]
            if done:
                r = done[0]
                if r["error"]:
                    print(f"request {rid} failed: {r['error']}", file=sys.stderr)
                    return 1
                print(f"applied: placement v{r['from_version']} -> v{r['to_version']}, {r['bytes_moved']} bytes "
                      f"moved rank to rank in {r['seconds']}s")
                return 0
            if time.monotonic() > deadline:
                print(f"request {rid} not applied within {a.wait:.0f}s (the engine applies it at its next step)",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        ray.shutdown()
    return 0


def cmd_top(a: argparse.Namespace) -> int:
    from dsray.top import fetch_metrics, run_top, stats_from_metrics

    if a.metrics_url:  # no Ray client: the same view from the metrics the Router exports
        run_top(lambda: stats_from_metrics(fetch_metrics(a.metrics_url), a.name), interval=a.interval,
                iterations=a.iterations)
        return 0
    fetch, close = _router_stats(a)
    try:
        run_top(fetch, interval=a.interval, iterations=a.iterations)
    finally:
        close()
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from dsray.report import load_stats, render_report

    print(f"wrote {render_report(load_stats(Path(a.run)), Path(a.out))}")
    return 0


class _SortBatches:
    """`next_batch()` of solved sort-task rows for `train_loop` (the warm-up of `dsray rl`)."""

    def __init__(self, batch_size: int, seed: int) -> None:
        self.batch_size, self.seed, self.i = batch_size, seed, 0

    def next_batch(self):
        from dsray.rl.task import sft_batch

        self.i += 1
        return sft_batch(self.batch_size, self.seed * 1_000_003 + self.i)


def cmd_rl(a: argparse.Namespace) -> int:
    from dsray.config import resolve_config
    from dsray.rl import task
    from dsray.rl.loop import evaluate, run_grpo
    from dsray.runtime import Engine

    kw = engine_kw(a)
    kw.update(gamma=a.gamma, lr=a.warmup_lr)
    with Engine.from_config(resolve_config(a.preset), seed=a.seed, **kw) as eng:
        print(f"dsray: {getattr(eng, 'ray_how', 'ray')}", flush=True)
        print(f"dsray rl: {eng.num_drivers} driver rank(s) + {eng.num_shards} expert shard(s), preset {a.preset}, "
              f"replay {'on' if a.replay else 'off'}", flush=True)
        t0 = time.perf_counter()
        if a.warmup_steps:
            hist = train_loop(eng, _SortBatches(a.warmup_batch, a.seed), a.warmup_steps, 50, "warm-up")
            print(f"warm-up: {a.warmup_steps} SFT steps, loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}, "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        before = evaluate(eng, task, a.eval_prompts, temperature=a.temperature)
        print(f"reward before GRPO: {before:.3f} (mean of {a.eval_prompts} held-out prompts, T={a.temperature})",
              flush=True)
        if a.kl_coef > 0:
            eng.set_reference()  # the KL anchor: the warm-up policy, a frozen copy on the same ranks
        t1 = time.perf_counter()
        h = run_grpo(eng, task, a.steps, a.group_size, a.prompts, a.max_new_tokens, a.temperature, a.replay,
                     a.kl_coef, updates_per_rollout=a.updates_per_rollout, clip_eps=a.clip_eps,
                     clip_eps_high=a.clip_eps_high, norm=a.norm, lr=a.lr, seed=a.seed, eval_every=a.eval_every,
                     eval_n=a.eval_prompts, save_rollouts=a.save_rollouts)
        grpo_s = time.perf_counter() - t1
        after = evaluate(eng, task, a.eval_prompts, temperature=a.temperature)
        mm = [s["mismatch_tokens"] for s in h.steps if s["mismatch_tokens"] is not None]
        print(f"reward after {a.steps} GRPO steps: {after:.3f} (before {before:.3f}); GRPO {grpo_s:.1f} s; "
              f"routing mismatch (tokens, mean over steps) {sum(mm) / len(mm) if mm else 0.0:.3f}", flush=True)
        if a.history:
            from dsray.files import write_file_atomic

            doc = {"reward_before": before, "reward_after": after, "grpo_seconds": grpo_s, **h.to_dict()}
            write_file_atomic(a.history, lambda f: f.write(json.dumps(doc).encode()))
            print(f"wrote {a.history}", flush=True)
        if a.save_rollouts:
            print(f"rollouts in {a.save_rollouts}", flush=True)
        if a.save:
            print(f"saved checkpoint to {eng.save(a.save, overwrite=a.overwrite)}", flush=True)
    return 0
