"""Expert-parallel MoE layer: D driver ranks + S expert shards, one GPU per rank (NCCL) or gloo on CPU.

Per layout, side by side in one run (one process group, same tokens, same weights), every combination of
  placement  `linear` (contiguous expert blocks) | `grouped` (`Placement.grouped`: whole gate groups on
             as few shards as possible, so that `topk_group` bounds the shards a token reaches)
  dispatch   the model dtype | `float8_e4m3fn` (e4m3 rows + 1x128 fp32 scales, combine in the model dtype)
and for each: layer time and its phases (dispatch / experts / combine on the drivers), dispatch payload
bytes per token (`DispatchMeta.bytes_sent`, exact) next to what sending a row per assignment would cost
(K x D x element size), destinations per token (mean, and the placement's worst case `max_fanout`), the
raw `all_to_all_single` of the same payload bytes with the same splits as a ceiling, and the routed output
against the single-process MoE (LocalDispatcher, all experts) on the same tokens.
Ray is not in the loop: the data plane (dsray.parallel) is measured alone.

    # CPU (gloo), small shape: 1 driver + 1..3 shards and 2 drivers + 2 shards
    python benchmarks/bench_ep_scaling.py --device cpu --layouts 1+1,1+2,1+3,2+2
    # GPUs (one per rank), V3 shape, 8192 tokens per driver
    python benchmarks/bench_ep_scaling.py --device cuda --layouts 1+1,1+3,2+2
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import table, write_result
from dsray.config import ModelConfig
from dsray.model.dispatch import LocalDispatcher
from dsray.model.experts import RoutedExperts
from dsray.model.moe import MoE
from dsray.parallel.dispatch import AllToAllDispatcher
from dsray.parallel.placement import Placement

V3 = dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
          num_experts_per_tok=8, n_group=8, topk_group=4)
# Small enough for 2 CPU cores, with 8 groups so that 3 shards cut groups under `linear`.
SMALL = dict(hidden_size=256, moe_intermediate_size=128, n_routed_experts=64, n_shared_experts=1,
             num_experts_per_tok=6, n_group=8, topk_group=2)
WIRE = {"model": None, "fp8": "float8_e4m3fn"}


def moe_config(shape: dict) -> ModelConfig:
    return ModelConfig(num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=1, q_lora_rank=None,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, vocab_size=16, **shape)


def make_placement(kind: str, cfg: ModelConfig, n_drivers: int, world: int) -> Placement:
    shards = list(range(n_drivers, world))
    if kind == "linear":
        return Placement.linear(cfg.n_routed_experts, shards, world)
    return Placement.grouped(cfg.n_routed_experts, cfg.n_group, shards, world)


def _timeit(fn, iters: int, cuda: bool, group) -> list[float]:
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier(group)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _rank(rank: int, world: int, n_drivers: int, args, port: int, out_q) -> None:
    cuda = args.device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        out_q.put(_measure(rank, world, n_drivers, args, dev))
    finally:
        dist.destroy_process_group()


def _measure(rank: int, world: int, n_drivers: int, args, dev: torch.device) -> dict:
    cuda = dev.type == "cuda"
    cfg = moe_config(V3 if args.shape == "v3" else SMALL)
    dtype = getattr(torch, args.dtype)
    K, D = cfg.num_experts_per_tok, cfg.hidden_size
    # Same weights on every rank (seeded); shards copy their experts' slices out of the full MoE.
    torch.manual_seed(0)
    full = MoE(cfg, "grouped").to(dev)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.02)
    full = full.to(dtype)
    full.gate.float()
    T = args.tokens if rank < n_drivers else 0
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(T, D, device=dev, dtype=dtype, generator=g)
    with torch.no_grad():
        w, ids, _ = full.gate(x)
        ref = (full.routed(x, w, ids) if T else None)  # LocalDispatcher: every expert in this process
    rows = []
    for pname in args.placements.split(","):
        placement = make_placement(pname, cfg, n_drivers, world)
        local = list(placement.local_experts(rank))
        experts = None
        if local:
            experts = RoutedExperts(len(local), D, cfg.moe_intermediate_size, "grouped").to(dev, dtype)
            with torch.no_grad():
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(experts, name).copy_(getattr(full.experts, name)[local])
        for wire in args.dispatch.split(","):
            disp = AllToAllDispatcher(placement, dispatch_dtype=WIRE[wire])
            phases: dict[str, list[float]] = {}

            @torch.inference_mode()
            def layer():
                t0 = time.perf_counter()
                x_RD, counts, meta = disp.dispatch(x, w, ids)
                if cuda:
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                y_RD = experts(x_RD, counts) if experts is not None else x_RD[:0] * 0
                if cuda:
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                y = disp.combine(y_RD, meta)
                if cuda:
                    torch.cuda.synchronize()
                for k, v in (("dispatch", t1 - t0), ("experts", t2 - t1), ("combine", time.perf_counter() - t2)):
                    phases.setdefault(k, []).append(v)
                return y, meta

            t_layer = _timeit(layer, args.iters, cuda, None)
            y, meta = layer()
            # Raw all_to_all_single of the same payload bytes with the same splits (the ceiling).
            per_row = meta.bytes_sent // max(meta.rows_sent, 1)
            send = [s * per_row for s in meta.send_splits]
            recv_row = disp.row_bytes(D, K, dtype)
            recv = [s * recv_row for s in meta.recv_splits]
            buf_in = torch.empty(sum(send), dtype=torch.uint8, device=dev)
            buf_out = torch.empty(sum(recv), dtype=torch.uint8, device=dev)
            t_raw = _timeit(lambda: dist.all_to_all_single(buf_out, buf_in, recv, send), args.iters, cuda, None)
            err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) if T else None
            rows.append({"placement": pname, "dispatch": wire, "rank": rank, "tokens": T,
                         "layer_s": statistics.median(t_layer), "raw_a2a_s": statistics.median(t_raw),
                         "phases_s": {k: statistics.median(v[-args.iters:]) for k, v in phases.items()},
                         "rows_sent": meta.rows_sent, "bytes_sent": meta.bytes_sent,
                         "rows_in": sum(meta.recv_splits), "rel_err_vs_local": err,
                         "max_fanout": placement.max_fanout(cfg.n_group, cfg.topk_group, K),
                         "local_experts": len(local)})
    counts = torch.bincount(ids.flatten(), minlength=cfg.n_routed_experts) if T else \
        torch.zeros(cfg.n_routed_experts, dtype=torch.long, device=dev)
    dist.all_reduce(counts)
    return {"rank": rank, "rows": rows, "counts_global": counts.cpu().tolist()}


def run_layout(n_drivers: int, n_shards: int, args) -> list[dict]:
    world = n_drivers + n_shards
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, n_drivers, args, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        res = sorted((q.get(timeout=900) for _ in procs), key=lambda r: r["rank"])
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    cfg = moe_config(V3 if args.shape == "v3" else SMALL)
    K, D = cfg.num_experts_per_tok, cfg.hidden_size
    el = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    c = torch.tensor(res[0]["counts_global"], dtype=torch.float64)
    out = []
    for i, r0 in enumerate(res[0]["rows"]):
        per_rank = [r["rows"][i] for r in res]
        drv = per_rank[:n_drivers]
        tokens = sum(r["tokens"] for r in drv)
        payload = sum(r["bytes_sent"] for r in drv)
        t = max(r["layer_s"] for r in per_rank)
        disp_s = statistics.mean(r["phases_s"]["dispatch"] for r in drv)
        raw_s = max(r["raw_a2a_s"] for r in per_rank)
        top = max(r["bytes_sent"] for r in drv)  # the busiest driver sets the pace
        out.append({
            "layout": f"{n_drivers}+{n_shards}", "ranks": n_drivers + n_shards, "placement": r0["placement"],
            "dispatch": r0["dispatch"], "tokens": tokens, "layer_ms": t * 1e3,
            "dispatch_ms": disp_s * 1e3,
            "experts_ms": max(r["phases_s"]["experts"] for r in per_rank) * 1e3,
            "combine_ms": statistics.mean(r["phases_s"]["combine"] for r in drv) * 1e3,
            "raw_a2a_ms": raw_s * 1e3, "tokens_per_s": tokens / t,
            "dispatch_bytes_per_token": payload / tokens,
            "per_assignment_bytes_per_token": K * D * el,  # a row per (token, expert), no side rows
            "destinations_per_token": sum(r["rows_sent"] for r in drv) / tokens,
            "max_fanout": r0["max_fanout"],
            "dispatch_GBps": top / disp_s / 1e9, "raw_a2a_GBps": top / raw_s / 1e9,
            "rel_err_vs_local": max(r["rel_err_vs_local"] for r in drv),
            "experts_per_shard": [r["local_experts"] for r in per_rank[n_drivers:]],
            "maxvio": float((c.max() - c.mean()) / c.mean()),
            "per_rank": per_rank})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="1+1,1+2,1+3,2+2", help="driver+shard ranks, comma-separated")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", choices=["v3", "small"], help="default: v3 on cuda, small on cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model dtype")
    ap.add_argument("--tokens", type=int, help="tokens per driver rank (default: 8192 on cuda, 512 on cpu)")
    ap.add_argument("--placements", default="linear,grouped")
    ap.add_argument("--dispatch", default="model,fp8", help="row dtypes on the wire: model, fp8")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", help="result JSON path (default: benchmarks/results/ep_scaling-<machine>-<date>.json)")
    args = ap.parse_args()
    args.shape = args.shape or ("v3" if args.device == "cuda" else "small")
    args.tokens = args.tokens or (8192 if args.device == "cuda" else 512)
    for wire in args.dispatch.split(","):
        if wire not in WIRE:
            ap.error(f"--dispatch: unknown {wire!r}, expected some of {sorted(WIRE)}")
    rows = []
    for lay in args.layouts.split(","):
        n_drivers, n_shards = map(int, lay.split("+"))
        if args.device == "cuda" and n_drivers + n_shards > torch.cuda.device_count():
            print(f"skip {lay}: needs {n_drivers + n_shards} GPUs, have {torch.cuda.device_count()}")
            continue
        rows += run_layout(n_drivers, n_shards, args)
    print(table(rows, [("layout", "layout", ""), ("placement", "placement", ""), ("dispatch", "wire", ""),
                       ("layer_ms", "layer ms", ".2f"), ("dispatch_ms", "dispatch ms", ".2f"),
                       ("combine_ms", "combine ms", ".2f"), ("raw_a2a_ms", "raw a2a ms", ".2f"),
                       ("dispatch_bytes_per_token", "B/token", ".0f"),
                       ("per_assignment_bytes_per_token", "B/token per-assign.", ".0f"),
                       ("destinations_per_token", "dest/token", ".2f"), ("max_fanout", "max fanout", "d"),
                       ("rel_err_vs_local", "rel err", ".1e")]))
    cfg = moe_config(V3 if args.shape == "v3" else SMALL)
    path = write_result("ep_scaling", args.device, {"args": vars(args), "shape": V3 if args.shape == "v3" else SMALL,
                                                    "results": rows}, args.out)
    if rows:
        png = path.with_suffix(".png")
        plot(rows, png, f"{args.device}, {args.shape} shape (D {cfg.hidden_size}, {cfg.n_routed_experts} experts, "
                        f"top-{cfg.num_experts_per_tok}, {cfg.n_group} groups keep {cfg.topk_group}), "
                        f"{args.tokens} tokens/driver, {args.dtype}")
        print("wrote", png)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Per layout and variant: dispatch bytes per token (with the per-assignment cost), destinations per
    token (with the placement's worst case), layer time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    variants = list(dict.fromkeys((r["placement"], r["dispatch"]) for r in rows))
    by = {(r["layout"], r["placement"], r["dispatch"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    w = 0.8 / len(variants)
    for ax, key, label in zip(axes, ("dispatch_bytes_per_token", "destinations_per_token", "layer_ms"),
                              ("dispatch bytes per token", "destination ranks per token (mean)", "MoE layer ms")):
        for j, (pl, wire) in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * w for i in range(len(layouts))]
            ax.bar(xs, [by[(lay, pl, wire)][key] if (lay, pl, wire) in by else 0 for lay in layouts], w,
                   label=f"{pl}, {wire}")
        ax.set_xticks(range(len(layouts)), layouts)
        ax.set_xlabel("drivers + shards")
        ax.set_title(label)
    per_assign = rows[0]["per_assignment_bytes_per_token"]
    axes[0].axhline(per_assign, color="k", ls="--", lw=1, label="a row per assignment (K x D)")
    for i, lay in enumerate(layouts):
        fan = max(r["max_fanout"] for r in rows if r["layout"] == lay and r["placement"] == "linear")
        fan_g = [r["max_fanout"] for r in rows if r["layout"] == lay and r["placement"] == "grouped"]
        axes[1].plot([i - 0.4, i + 0.4], [fan, fan], "k:", lw=1)
        if fan_g:
            axes[1].plot([i - 0.4, i + 0.4], [fan_g[0], fan_g[0]], "r:", lw=1)
    axes[1].plot([], [], "k:", label="worst case, linear")
    axes[1].plot([], [], "r:", label="worst case, grouped")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"dsray EP dispatch: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
