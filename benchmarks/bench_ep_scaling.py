"""Expert-parallel MoE layer scaling: D driver ranks + S expert shards, one GPU per rank (NCCL).

The data plane of dsray's runtime (dsray.parallel: count exchange + all_to_all_single dispatch, grouped
experts on shards, combine) is measured without Ray in the loop: Ray only starts the ranks, and
per-step actor overhead is one call per rank (benchmarks/bench_forward.py measures that part).
In the same run, raw NCCL `all_to_all_single` with the same split sizes and bytes is timed as the ceiling.

    # V3 shape on 4 or 8 GPUs (issue: 1+3 and 2+2 on 4; 2+6 and 4+4 on 8), 8192 tokens per driver
    python benchmarks/bench_ep_scaling.py --layouts 1+1,1+3,2+2,2+6,4+4 --device cuda
    # correctness-sized run on CPU (gloo): an 8-shard layout checked against the single-process MoE
    python benchmarks/bench_ep_scaling.py --device cpu --layouts 1+8,2+6 --check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsray.config import ModelConfig  # noqa: E402
from dsray.model.moe import MoE, combine_weighted  # noqa: E402
from dsray.parallel.dispatch import AllToAllDispatcher  # noqa: E402
from dsray.parallel.placement import Placement  # noqa: E402
from dsray.runtime.router import maxvio  # noqa: E402

V3 = dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
          num_experts_per_tok=8, n_group=8, topk_group=4)
SMALL = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=32, n_shared_experts=1,
             num_experts_per_tok=4, n_group=4, topk_group=2)


def moe_config(shape: dict) -> ModelConfig:
    return ModelConfig(num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=1, q_lora_rank=None,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, vocab_size=16, **shape)


def _timeit(fn, iters: int, cuda: bool) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank(rank: int, world: int, D: int, args, port: int, out_q) -> None:
    cuda = args.device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    cfg = moe_config(V3 if args.shape == "v3" else SMALL)
    dtype = torch.bfloat16 if cuda else torch.float32
    # Same weights everywhere (seeded), experts sliced per shard: rank-local copies of the full MoE.
    torch.manual_seed(0)
    full = MoE(cfg, "grouped").to(dev)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.02)
    full = full.to(dtype)
    full.gate.float()
    placement = Placement.linear(cfg.n_routed_experts, list(range(D, world)), world)
    local = list(placement.local_experts(rank))
    experts = None
    if local:
        from dsray.model.moe import RoutedExperts

        experts = RoutedExperts(len(local), cfg.hidden_size, cfg.moe_intermediate_size, "grouped").to(dev, dtype)
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(experts, name).copy_(getattr(full.experts, name)[local])
    disp = AllToAllDispatcher(placement)
    T = args.tokens if rank < D else 0
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(T, cfg.hidden_size, device=dev, dtype=dtype, generator=g)
    with torch.no_grad():
        w, ids = full.gate(x) if T else (torch.zeros(0, cfg.num_experts_per_tok, device=dev),
                                         torch.zeros(0, cfg.num_experts_per_tok, dtype=torch.long, device=dev))
    phases: dict[str, float] = {}

    @torch.inference_mode()
    def layer():
        t0 = time.perf_counter()
        x_RD, counts, meta = disp.dispatch(x, ids)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        y_RD = experts(x_RD, counts) if experts is not None else x_RD[:0] * 0
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        y = combine_weighted(disp.combine(y_RD, meta), w)
        if full.shared_experts is not None and T:
            y = y + full.shared_experts(x)
        if cuda:
            torch.cuda.synchronize()
        phases.setdefault("dispatch", []).append(t1 - t0)
        phases.setdefault("experts", []).append(t2 - t1)
        phases.setdefault("combine", []).append(time.perf_counter() - t2)
        return y, counts

    t_layer = _timeit(layer, args.iters, cuda)
    y, counts = layer()
    # Raw NCCL/gloo all_to_all_single with the same split sizes (the dispatch direction) as the ceiling.
    _, _, meta = disp.dispatch(x, ids)
    send, recv = list(meta.send_splits), list(meta.recv_splits)
    buf_in = torch.empty(sum(send), cfg.hidden_size, device=dev, dtype=dtype)
    buf_out = torch.empty(sum(recv), cfg.hidden_size, device=dev, dtype=dtype)
    t_raw = _timeit(lambda: dist.all_to_all_single(buf_out, buf_in, recv, send), args.iters, cuda)
    # Global counts for MaxVio; bytes each rank sends in one dispatch.
    all_counts = torch.zeros(cfg.n_routed_experts, dtype=torch.long, device=dev)
    if T:
        all_counts += torch.bincount(ids.flatten(), minlength=cfg.n_routed_experts)
    dist.all_reduce(all_counts)
    ok = None
    if args.check and T:
        with torch.no_grad():
            ref = full(x[None])[0]
        ok = float((y - ref).abs().max() / ref.abs().max())
    med = {k: statistics.median(v[-args.iters:]) for k, v in phases.items()}
    out_q.put({"rank": rank, "tokens": T, "t_layer": t_layer, "t_raw_a2a": t_raw, "phases": med,
               "bytes_sent": sum(send) * cfg.hidden_size * x.element_size(), "rows_in": sum(recv),
               "counts_global": all_counts.cpu().tolist(), "check_rel_err": ok})
    dist.destroy_process_group()


def run_layout(D: int, S: int, args) -> dict:
    world = D + S
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, D, args, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = sorted((q.get(timeout=900) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
    cfg = moe_config(V3 if args.shape == "v3" else SMALL)
    t = max(r["t_layer"] for r in res)
    tokens = sum(r["tokens"] for r in res)
    K, Dh, I = cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    flops = 2 * 3 * tokens * Dh * I * (K + cfg.n_shared_experts)
    drv = res[:D]
    a2a_s = statistics.mean(r["phases"]["dispatch"] for r in drv)
    comb_s = statistics.mean(r["phases"]["combine"] for r in drv)
    raw_s = max(r["t_raw_a2a"] for r in res)
    bytes_ = max(r["bytes_sent"] for r in drv)
    return {"layout": f"{D}+{S}", "gpus": world, "tokens": tokens, "layer_s": t,
            "tokens_per_s_per_gpu": tokens / t / world, "tflops": flops / t / 1e12,
            "dispatch_GBps": bytes_ / a2a_s / 1e9, "combine_GBps": bytes_ / comb_s / 1e9,
            "raw_a2a_GBps": bytes_ / raw_s / 1e9, "dispatch_vs_raw": raw_s / a2a_s,
            "maxvio": float(maxvio(torch.tensor([res[0]["counts_global"]]).numpy())[0]),
            "check_rel_err": max((r["check_rel_err"] or 0.0) for r in drv) if args.check else None,
            "per_rank": res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="1+1,1+3,2+2")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--shape", choices=["v3", "small"])
    ap.add_argument("--tokens", type=int, help="tokens per driver rank (default: 8192 on cuda, 256 on cpu)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--check", action="store_true", help="compare with the single-process MoE")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    args.shape = args.shape or ("v3" if args.device == "cuda" else "small")
    args.tokens = args.tokens or (8192 if args.device == "cuda" else 256)
    rows = []
    for lay in args.layouts.split(","):
        D, S = map(int, lay.split("+"))
        if args.device == "cuda" and D + S > torch.cuda.device_count():
            print(f"skip {lay}: needs {D + S} GPUs, have {torch.cuda.device_count()}")
            continue
        r = run_layout(D, S, args)
        rows.append(r)
        print(f"{r['layout']:>5} {r['gpus']} ranks {r['tokens_per_s_per_gpu']:>10.0f} tok/s/GPU  "
              f"{r['tflops']:7.1f} TFLOP/s  dispatch {r['dispatch_GBps']:6.1f} GB/s  combine {r['combine_GBps']:6.1f}"
              f"  raw a2a {r['raw_a2a_GBps']:6.1f}  MaxVio {r['maxvio']:.2f}"
              + (f"  check {r['check_rel_err']:.1e}" if args.check else ""), flush=True)
    base = {r["gpus"]: r["tokens_per_s_per_gpu"] for r in rows}
    for r in rows:
        r["scaling_eff_vs_2gpu"] = r["tokens_per_s_per_gpu"] / base[2] if 2 in base else None
    commit = os.environ.get("DSRAY_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                               text=True).stdout.strip()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    out = Path(args.out) / f"ep-scaling-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine, "commit": commit,
                               "args": vars(args), "results": rows}, indent=1))
    print("wrote", out)
    if rows:
        png = out.with_suffix(".png")
        plot(rows, png, f"{args.device}, {args.shape} shape, {args.tokens} tokens/driver")
        print("wrote", png)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Per layout: tokens/s per GPU, and dispatch/combine GB/s against the raw all-to-all ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['layout']}\n({r['gpus']} ranks)" for r in rows]
    x = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(x, [r["tokens_per_s_per_gpu"] for r in rows], color="tab:blue")
    a.set_xticks(list(x), names)
    a.set_ylabel("tokens/s per rank")
    a.set_title("MoE layer throughput")
    w = 0.27
    for k, (key, label) in enumerate([("dispatch_GBps", "dispatch"), ("combine_GBps", "combine"),
                                      ("raw_a2a_GBps", "raw all_to_all (ceiling)")]):
        b.bar([i + (k - 1) * w for i in x], [r[key] for r in rows], w, label=label)
    b.set_xticks(list(x), names)
    b.set_ylabel("GB/s per driver rank")
    b.set_title("all-to-all bandwidth")
    b.legend(fontsize=8)
    fig.suptitle(f"dsray EP scaling: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
