"""Full-model forward tokens/s: one-process `Transformer` vs the Ray `Engine`, same model (same seed), same run.

CPU (default): the `debug` preset, fp32, 1 torch thread per process; the Engine as 1 driver + 2 expert shards
  (gloo all-to-all) and as 1 driver + 0 shards. Reports the EP overhead ratio (Engine time / one process).
GPU (--device cuda): a mid-size config (see MID) in bf16, batch 8 x 1024; the Engine with num_shards=0 on the
  one GPU vs the same model in this process on the same GPU. Then the logits check: the Engine's GPU bf16
  forward vs the same model (same seed) in fp32 on the CPU, on the `debug` preset, as the relative max-diff
  max|gpu - cpu| / max|cpu| against a stated bound.

The Engine returns fp32 logits on the CPU through Ray, so the one-process numbers are given both as
"logits stay on the device" and as "logits as the Engine returns them" (.float().cpu()).

    python benchmarks/bench_forward.py
    python benchmarks/bench_forward.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import _common as C  # noqa: F401  (puts the repo root on sys.path)
import torch

from dsray.config import ModelConfig, preset
from dsray.model import Transformer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Mid-size GPU config: Moonlight/V2-Lite-like widths and experts, 8 layers, small vocab so the fp32 logits that
# the Engine ships back through Ray (B x S x V x 4 bytes) stay at 256 MiB for 8 x 1024 tokens.
MID = ModelConfig(
    vocab_size=8192, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, num_hidden_layers=8,
    first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.446, q_lora_rank=None,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096,
    num_nextn_predict_layers=0)
# GPU-vs-CPU logits check, bf16 vs fp32, as max|gpu - cpu| / max|cpu|. Most tokens differ by ~0.4 % (bf16 has an
# 8-bit mantissa); a few near-tie tokens pick another expert in bf16 and differ by several % (on the CPU, an fp32
# model holding the bf16-rounded weights already differs from the fp32 one by 5.6e-2 at its worst token). Bounds:
# the worst token <= 1e-1, the median token (per-token max-diff over the vocab, same normalisation) <= 1e-2.
LOGITS_BOUND = 1e-1
LOGITS_MEDIAN_BOUND = 1e-2


def ids_for(cfg: ModelConfig, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


def wall_bench(fn, warmup: int, iters: int, sync=None) -> dict[str, float]:
    import statistics

    for _ in range(warmup):
        fn()
    if sync:
        sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(ts), "ms_min": min(ts), "ms_max": max(ts), "iters": iters, "warmup": warmup}


def row(label: str, r: dict[str, float], tokens: int, **kw: Any) -> dict[str, Any]:
    return {"impl": label, **r, "tokens": tokens, "tokens_per_s": tokens / (r["ms"] / 1e3), **kw}


def engine(cfg, seed, **kw):
    from dsray.runtime.engine import Engine

    return Engine.from_config(cfg, seed=seed, metrics=False, **kw)


# ---- CPU ----------------------------------------------------------------------------------------------
def run_cpu(args) -> dict[str, Any]:
    cfg = preset("debug")
    torch.set_num_threads(args.threads)
    model = Transformer.from_config(cfg, seed=args.seed).eval()
    out: dict[str, Any] = {"config": "debug", "dtype": "float32", "threads_per_process": args.threads, "runs": []}
    for batch, seq in args.cpu_shapes:
        ids = ids_for(cfg, batch, seq, args.seed)
        T = ids.numel()
        with torch.inference_mode():
            ref = model(ids)
            r = wall_bench(lambda: model(ids), args.warmup, args.iters)
        rows = [row("transformer_1proc", r, T, processes=1)]
        out["runs"].append({"batch": batch, "seq": seq, "tokens": T, "rows": rows, "ref": ref})
    for shards in (2, 0):
        label = f"engine_1d_{shards}s"
        t0 = time.perf_counter()
        with engine(cfg, args.seed, num_drivers=1, num_shards=shards, device="cpu", dtype="float32",
                    threads=args.threads, name=f"bench-cpu-{shards}") as eng:
            start_s = time.perf_counter() - t0
            for run in out["runs"]:
                ids = ids_for(cfg, run["batch"], run["seq"], args.seed)
                logits = eng.forward(ids)
                diff = C.rel_maxdiff(logits, run["ref"])
                r = wall_bench(lambda: eng.forward(ids), args.warmup, args.iters)
                base = run["rows"][0]["ms"]
                run["rows"].append(row(label, r, run["tokens"], overhead_ratio=r["ms"] / base,
                                       logits_rel_maxdiff_vs_1proc=diff, engine_start_s=start_s,
                                       processes=1 + shards))
    for run in out["runs"]:
        del run["ref"]
    return out


# ---- GPU ----------------------------------------------------------------------------------------------
def run_gpu(args) -> dict[str, Any]:
    dev = args.device  # "cpu" only with --gpu-suite-on-cpu (a dry run of this code path)
    cfg = MID if not args.gpu_suite_on_cpu else MID.replace(hidden_size=256, intermediate_size=512,
                                                            moe_intermediate_size=128, num_hidden_layers=2)
    B, S = (args.gpu_batch, args.gpu_seq) if not args.gpu_suite_on_cpu else (2, 64)
    ids = ids_for(cfg, B, S, args.seed)
    T = ids.numel()
    out: dict[str, Any] = {"config": {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "first_k_dense_replace", "num_attention_heads", "n_routed_experts", "n_shared_experts",
        "num_experts_per_tok", "n_group", "topk_group", "q_lora_rank", "kv_lora_rank")},
        "params": cfg.param_counts(), "dtype": "bfloat16", "batch": B, "seq": S, "tokens": T, "rows": []}
    # FLOPs of the MoE/MLP matmuls + lm head + attention projections are not counted: tokens/s only.

    t0 = time.perf_counter()
    model = Transformer.from_config(cfg, seed=args.seed, dtype=torch.bfloat16, device=dev, mtp=False).eval()
    build_s = time.perf_counter() - t0
    ids_dev = ids.to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else None
    with torch.inference_mode():
        ref = model(ids_dev).float().cpu()
        r_dev = C.bench(lambda: model(ids_dev), dev, args.warmup, args.iters)
        r_cpu = wall_bench(lambda: model(ids_dev).float().cpu(), args.warmup, args.iters, sync)
    out["rows"].append(row("transformer_1proc (logits on GPU)", r_dev, T, build_s=build_s))
    out["rows"].append(row("transformer_1proc (+ logits fp32 to CPU)", r_cpu, T))
    if dev == "cuda":
        out["peak_mem_gib_1proc"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    with engine(cfg, args.seed, num_drivers=1, num_shards=0, device=dev, dtype="bfloat16",
                name="bench-gpu-mid") as eng:
        start_s = time.perf_counter() - t0
        logits = eng.forward(ids)
        diff = C.rel_maxdiff(logits, ref)
        r = wall_bench(lambda: eng.forward(ids), args.warmup, args.iters)
        out["rows"].append(row("engine_1d_0s (cuda)", r, T, engine_start_s=start_s,
                               logits_rel_maxdiff_vs_1proc=diff, ratio_vs_1proc_gpu=r["ms"] / r_dev["ms"],
                               ratio_vs_1proc_cpu_logits=r["ms"] / r_cpu["ms"]))
        # Same forward, but only the last position's logits come back (what generation needs).
        r_last = wall_bench(lambda: eng.forward(ids, last_only=True), args.warmup, args.iters)
        out["rows"].append(row("engine_1d_0s (cuda, last_only)", r_last, T,
                               ratio_vs_1proc_gpu=r_last["ms"] / r_dev["ms"]))
    del ref, logits
    gc.collect()

    # ---- logits: Engine on GPU (bf16) vs the same model in fp32 on the CPU --------------------------------
    small = preset("debug")
    ids_s = ids_for(small, 4, 128, args.seed + 1)
    cpu_ref = Transformer.from_config(small, seed=args.seed).eval()
    with torch.inference_mode():
        want = cpu_ref(ids_s)
    with engine(small, args.seed, num_drivers=1, num_shards=0, device=dev, dtype="bfloat16",
                name="bench-gpu-check") as eng:
        got = eng.forward(ids_s)
    gpu_1proc = Transformer.from_config(small, seed=args.seed, dtype=torch.bfloat16, device=dev).eval()
    with torch.inference_mode():
        got_1proc = gpu_1proc(ids_s.to(dev)).float().cpu()
    cpu_bf16 = Transformer.from_config(small, seed=args.seed, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        got_cpu_bf16 = cpu_bf16(ids_s).float()
    d = C.rel_maxdiff(got, want)
    per_token = ((got - want).abs().amax(-1) / want.abs().max()).flatten()
    med = float(per_token.median())
    out["logits_check"] = {
        "config": "debug", "batch": 4, "seq": 128, "engine": "1 driver + 0 shards, cuda, bfloat16",
        "reference": "Transformer fp32 on CPU, same seed", "rel_maxdiff": d,
        "rel_meandiff": float((got - want).abs().mean() / want.abs().mean()),
        "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
        "median_token_rel_maxdiff": med, "p99_token_rel_maxdiff": float(torch.quantile(per_token, 0.99)),
        "bound": LOGITS_BOUND, "median_bound": LOGITS_MEDIAN_BOUND,
        "ok": d <= LOGITS_BOUND and med <= LOGITS_MEDIAN_BOUND,
        "calibration_cpu_bf16_rel_maxdiff": C.rel_maxdiff(got_cpu_bf16, want),
        "transformer_cuda_bf16_rel_maxdiff": C.rel_maxdiff(got_1proc, want),
        "engine_vs_transformer_cuda_bf16_rel_maxdiff": C.rel_maxdiff(got, got_1proc),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=None, help="timed runs, median reported (default 10 cpu, 10 cuda)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads per process (each Engine rank too)")
    ap.add_argument("--cpu-shapes", default="1x32,8x128", help="CPU: batch x seq list")
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--gpu-seq", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--gpu-suite-on-cpu", action="store_true", help=argparse.SUPPRESS)  # dry run of the GPU path
    args = ap.parse_args(argv)
    args.iters = args.iters or 10
    args.cpu_shapes = [tuple(int(v) for v in s.split("x")) for s in args.cpu_shapes.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")

    import ray

    payload: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}}
    try:
        if args.device == "cpu" and not args.gpu_suite_on_cpu:
            res = run_cpu(args)
            payload["cpu"] = res
            cols = [("impl", "impl", "s"), ("processes", "procs", "d"), ("ms", "ms", ".2f"),
                    ("tokens_per_s", "tokens/s", ",.0f"), ("overhead_ratio", "x 1proc time", ".2f"),
                    ("logits_rel_maxdiff_vs_1proc", "logits diff", ".1e")]
            for run in res["runs"]:
                print(f"\n== CPU, debug preset, fp32, {args.threads} thread(s)/process, batch {run['batch']} x "
                      f"{run['seq']} = {run['tokens']} tokens")
                print(C.table(run["rows"], cols))
            ok = all(r.get("logits_rel_maxdiff_vs_1proc", 0) <= 1e-4 for run in res["runs"] for r in run["rows"])
        else:
            res = run_gpu(args)
            payload["gpu"] = res
            cols = [("impl", "impl", "s"), ("ms", "ms", ".2f"), ("tokens_per_s", "tokens/s", ",.0f"),
                    ("ratio_vs_1proc_gpu", "x 1proc", ".2f"), ("ratio_vs_1proc_cpu_logits", "x 1proc+cpu", ".2f"),
                    ("logits_rel_maxdiff_vs_1proc", "logits diff", ".1e")]
            c = res["config"]
            print(f"\n== {args.device}, mid config (D={c['hidden_size']}, L={c['num_hidden_layers']}, "
                  f"E={c['n_routed_experts']}, top-{c['num_experts_per_tok']}, V={c['vocab_size']}), bf16, "
                  f"batch {res['batch']} x {res['seq']}")
            print(C.table(res["rows"], cols))
            lc = res["logits_check"]
            print(f"\nlogits check (debug preset, Engine {args.device} bf16 vs Transformer CPU fp32): rel max-diff "
                  f"{lc['rel_maxdiff']:.3e} (bound {lc['bound']:.0e}), "
                  f"median token {lc['median_token_rel_maxdiff']:.2e} "
                  f"(bound {lc['median_bound']:.0e}) -> {'OK' if lc['ok'] else 'FAIL'}; "
                  f"CPU bf16 for calibration {lc['calibration_cpu_bf16_rel_maxdiff']:.3e}; "
                  f"argmax agree {lc['argmax_agree']:.3f}; "
                  f"one-process {args.device} bf16 {lc['transformer_cuda_bf16_rel_maxdiff']:.3e}; "
                  f"Engine vs one-process {args.device} {lc['engine_vs_transformer_cuda_bf16_rel_maxdiff']:.1e}")
            ok = lc["ok"]
    finally:
        if ray.is_initialized():
            ray.shutdown()
    payload["ok"] = ok
    C.write_result("bench_forward", args.device, payload, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
