"""`dsray` command line: demo, train, generate, status, top, report.

Every command runs unchanged on a laptop (embedded local Ray, CPU) and as
`ray job submit --working-dir . -- dsray ...` on a cluster (RAY_ADDRESS set by the job).
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

EXIT_USAGE, EXIT_RUNTIME = 2, 1


def _sigterm(*_: Any) -> None:
    # `ray job stop` and schedulers send SIGTERM: unwind like Ctrl-C so the Engine cleans up.
    raise KeyboardInterrupt


def _engine_args(p: argparse.ArgumentParser, drivers: int = 1, shards: int = 2) -> None:
    p.add_argument("--drivers", type=int, default=drivers, help="driver ranks (data parallel)")
    p.add_argument("--shards", type=int, default=shards, help="expert shards (0: experts inside the driver)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--placement", default="linear", help="linear | round_robin | path to a JSON table")
    p.add_argument("--name", default="dsray", help="engine name (the Router is found by it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--cpus-per-rank", type=float, default=1.0,
                   help="logical CPUs each rank asks Ray for (fractions allowed: ranks mostly wait in collectives)")
    p.add_argument("--no-metrics", action="store_true", help="do not export Prometheus metrics")


def _engine_kw(a: argparse.Namespace) -> dict[str, Any]:
    placement: Any = a.placement
    if placement not in ("linear", "round_robin"):
        f = Path(placement)
        if not f.exists():
            raise FileNotFoundError(f"--placement {placement}: no such file (or use linear / round_robin)")
        placement = json.loads(f.read_text())
    return dict(num_drivers=a.drivers, num_shards=a.shards, device=a.device, dtype=a.dtype,
                placement=placement, name=a.name, threads=a.threads, metrics=not a.no_metrics,
                driver_resources={"num_cpus": a.cpus_per_rank}, shard_resources={"num_cpus": a.cpus_per_rank})


def _tokenizer(checkpoint: Path | None, vocab_size: int):
    if checkpoint is not None and (checkpoint / "tokenizer.json").exists():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
            return (lambda s: tok.encode(s).ids), tok.decode
        except ImportError:
            pass
    from dsray.data import ByteTokenizer

    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is too small for the byte tokenizer and the checkpoint has no "
                         "tokenizer.json; pass --prompt-ids")
    bt = ByteTokenizer()
    return bt.encode, bt.decode


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # A bar on a terminal; periodic log lines otherwise (job logs, CI), see _train_loop.
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                disable=not sys.stderr.isatty())


def _train_loop(eng, batches, steps: int, log_every: int, desc: str, rebalance_every: int = 0,
                replicas: int = 0) -> list[dict[str, Any]]:
    history = []
    bar = _progress(steps, desc)
    try:
        for i in range(steps):
            if rebalance_every and i and i % rebalance_every == 0 and eng.S > 1:
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


def _print_stats(stats: dict[str, Any]) -> None:
    from rich.console import Console

    from dsray.top import render

    Console().print(render(stats))


def cmd_train(a: argparse.Namespace, demo: bool = False) -> int:
    from dsray.config import resolve_config
    from dsray.data import TextBatches, default_corpus_path
    from dsray.runtime import Engine

    data = Path(a.data) if a.data else default_corpus_path()
    batches = TextBatches(data, seq_len=a.seq_len, batch_size=a.batch_size, seed=a.seed)
    kw = _engine_kw(a)
    kw.update(gamma=a.gamma, lr=a.lr, clip_grad_norm=a.clip_grad, seq_aux_alpha=a.seq_aux_alpha)
    if a.checkpoint:
        eng = Engine.from_pretrained(a.checkpoint, **kw)
    else:
        eng = Engine.from_config(resolve_config(a.config or a.preset), seed=a.seed, **kw)
    with eng:
        print(f"dsray: engine {a.name!r}: {eng.D} driver rank(s) + {eng.S} expert shard(s) on {a.device}, "
              f"{eng.cfg.n_routed_experts} experts x {len(eng.moe_layers)} MoE layers, gamma={a.gamma}", flush=True)
        hist = _train_loop(eng, batches, a.steps, a.log_every, "train", a.rebalance_every, a.replicas)
        if hist:
            k = max(1, len(hist) // 10)
            first = sum(h["loss"] for h in hist[:k]) / k
            last = sum(h["loss"] for h in hist[-k:]) / k
            mv0 = max(hist[0]["maxvio_batch"])
            mv1 = sum(max(h["maxvio_batch"]) for h in hist[-k:]) / k
            print(f"loss {first:.3f} -> {last:.3f} (mean of first/last {k} steps); "
                  f"max-layer MaxVio {mv0:.2f} -> {mv1:.2f}", flush=True)
        stats = eng.stats()
        _print_stats(stats)
        if a.save:
            path = eng.save(a.save, overwrite=True)
            print(f"saved checkpoint to {path}", flush=True)
            if a.report:
                from dsray.report import render_report

                print(f"wrote {render_report(stats, Path(a.report))}", flush=True)
        if demo:
            tok_enc, tok_dec = _tokenizer(None, eng.cfg.vocab_size)
            prompt = a.prompt
    if demo and a.save:
        print(f"\nreloading {a.save} with 1 driver + 2 shards and generating:", flush=True)
        with Engine.from_pretrained(a.save, num_drivers=1, num_shards=2, name=a.name + "-gen",
                                    metrics=False) as gen:
            import torch

            ids = torch.tensor([tok_enc(prompt)])
            out = gen.generate(ids, a.max_new_tokens, temperature=0.8, top_k=40, seed=a.seed)
            print("-" * 60 + "\n" + prompt + tok_dec(out[0, ids.shape[1]:].tolist()) + "\n" + "-" * 60)
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from dsray.runtime import Engine

    ckpt = Path(a.checkpoint)
    eng_kw = _engine_kw(a)
    with Engine.from_pretrained(ckpt, **eng_kw) as eng:
        texts = a.prompt or ["ROMEO:\n"]
        if a.prompt_ids:
            prompts = [torch.tensor([int(x) for x in a.prompt_ids.split(",")])]
            decode = None
        else:
            enc, decode = _tokenizer(ckpt, eng.cfg.vocab_size)
            prompts = [torch.tensor(enc(t)) for t in texts]
        t0 = time.perf_counter()
        outs = eng.generate(prompts, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            eos_token_id=eng.cfg.eos_token_id if a.stop_at_eos else None, seed=a.seed)
        dt = time.perf_counter() - t0
        n_new = 0
        for text, p, o in zip(texts, prompts, outs):
            new = o[p.shape[0]:].tolist()
            n_new += len(new)
            print(text + decode(new) if decode else ",".join(map(str, o.tolist())))
        print(f"[{n_new} tokens for {len(prompts)} prompt(s) in {dt:.2f}s, {n_new / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    import ray

    from dsray.runtime.engine import attach_router

    ray.init(address=a.address or "auto", log_to_driver=False)
    try:
        stats = ray.get(attach_router(a.name).stats.remote(), timeout=30)
        if a.json:
            stats.pop("history", None)
            print(json.dumps(stats))
        else:
            _print_stats(stats)
    finally:
        ray.shutdown()
    return 0


def cmd_top(a: argparse.Namespace) -> int:
    import ray

    from dsray.runtime.engine import attach_router
    from dsray.top import run_top

    ray.init(address=a.address or "auto", log_to_driver=False)
    try:
        router = attach_router(a.name)
        run_top(lambda: ray.get(router.stats.remote(), timeout=30), interval=a.interval, iterations=a.iterations)
    finally:
        ray.shutdown()
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from dsray.report import load_stats, render_report

    print(f"wrote {render_report(load_stats(Path(a.run)), Path(a.out))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsray", description="Expert-parallel DeepSeek-V3 MoE on Ray")
    sub = p.add_subparsers(dest="cmd", required=True)

    def train_args(t: argparse.ArgumentParser, steps: int, drivers: int, shards: int) -> None:
        src = t.add_mutually_exclusive_group()
        src.add_argument("--preset", default="debug", help="model preset (debug, v3-671b, moonlight-16b-a3b, kimi-k2)")
        src.add_argument("--config", help="a config.json (or checkpoint folder) to train from scratch")
        src.add_argument("--checkpoint", help="HF deepseek_v3 folder to continue from")
        t.add_argument("--data", help="UTF-8 text file (default: the bundled Shakespeare corpus)")
        t.add_argument("--steps", type=int, default=steps)
        t.add_argument("--batch-size", type=int, default=8)
        t.add_argument("--seq-len", type=int, default=64)
        t.add_argument("--lr", type=float, default=3e-3)
        t.add_argument("--gamma", type=float, default=1e-3, help="bias update speed (0 disables balancing)")
        t.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip over all ranks (0: off)")
        t.add_argument("--seq-aux-alpha", type=float, default=0.0,
                       help="sequence-wise balance loss weight (DeepSeek-V3: 1e-4; 0: off)")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--save", help="checkpoint folder to write at the end")
        t.add_argument("--report", help="PNG with the load heatmap and MaxVio curves (needs --save)")
        t.add_argument("--log-every", type=int, default=20, help="log line interval when not on a terminal")
        t.add_argument("--rebalance-every", type=int, default=0,
                       help="every N steps, re-place experts by load (EPLB-style replicas of hot experts)")
        t.add_argument("--replicas", type=int, default=2, help="extra expert slots for --rebalance-every")
        _engine_args(t, drivers, shards)

    t = sub.add_parser("train", help="train with expert parallelism")
    train_args(t, 100, 1, 2)
    d = sub.add_parser("demo", help="the README's main job: debug model, 2 drivers + 3 shards, train, save, generate")
    train_args(d, 300, 2, 3)
    d.set_defaults(save="runs/demo/checkpoint", report="runs/demo/report.png", name="demo", gamma=1e-2)
    d.add_argument("--prompt", default="ROMEO:\n")
    d.add_argument("--max-new-tokens", type=int, default=200)

    g = sub.add_parser("generate", help="generate from a checkpoint")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", action="append", help="text prompt; repeat for several (any lengths)")
    g.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop-at-eos", action="store_true")
    _engine_args(g, 1, 2)

    for name, helptext in (("status", "print a running engine's router statistics"),
                           ("top", "live view of expert load and MaxVio")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--name", default="dsray")
        s.add_argument("--address", help="Ray address (default: RAY_ADDRESS or auto)")
        if name == "status":
            s.add_argument("--json", action="store_true")
        else:
            s.add_argument("--interval", type=float, default=1.0)
            s.add_argument("--iterations", type=int, help="stop after N refreshes")

    r = sub.add_parser("report", help="PNG of a finished run's expert load and MaxVio")
    r.add_argument("run", help="run folder, checkpoint folder or dsray_router.json")
    r.add_argument("--out", default="report.png")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    handlers = {"train": cmd_train, "demo": lambda a: cmd_train(a, demo=True), "generate": cmd_generate,
                "status": cmd_status, "top": cmd_top, "report": cmd_report}
    try:
        return handlers[a.cmd](a)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"dsray {a.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"dsray {a.cmd}: failed: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print(f"dsray {a.cmd}: interrupted; engine stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
