"""MoE layer forward, side by side in one run on one machine:

  hf_eager         HF transformers `DeepseekV3MoE`, experts_implementation="eager" (per-expert loop)
  hf_grouped_mm    the same HF module with experts_implementation="grouped_mm" (extra reference, if present)
  dsray_grouped    dsray MoE, impl="grouped" (torch._grouped_mm on CUDA bf16, padded bmm elsewhere)
  dsray_loop       dsray MoE, impl="loop" (per-expert reference)
  gmm_ceiling      the routed part alone: 3 raw torch._grouped_mm calls + SwiGLU on pre-sorted rows,
                   the same routing as the layer (the ceiling the targets are measured against)
  gmm_only         the 3 raw torch._grouped_mm calls alone (SwiGLU input precomputed)
  gmm_fused_gu     2 calls: gate and up fused into one [E, D, 2I] grouped GEMM (headroom, not a target)

All modules hold the same weights (HF's fused `experts.gate_up_proj` [E, 2I, D] = cat(gate, up); the
`down_proj` [E, D, I] tensor is shared). Outputs are compared before anything is timed.
FLOPs: routed 3 x 2 x T x K x D x I, shared 3 x 2 x T x D x (I x n_shared); the gate (2 x T x D x E)
is not counted. The ceiling rows count the routed FLOPs only.

    python benchmarks/bench_moe.py                      # CPU: small shapes (see SHAPES)
    python benchmarks/bench_moe.py --device cuda        # GPU: V3 and V2-Lite shapes, 8192 tokens
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

import _common as C  # noqa: F401  (puts the repo root on sys.path)
import torch
import torch.nn.functional as F
from torch import nn

from dsray.config import ModelConfig
from dsray.model.moe import MoE

SHAPES: dict[str, dict[str, Any]] = {
    # full size (GPU)
    "v3": dict(hidden=7168, inter=2048, experts=256, topk=8, n_group=8, topk_group=4, shared=1, tokens=8192,
               scale=2.5),
    "v2lite": dict(hidden=2048, inter=1408, experts=64, topk=6, n_group=1, topk_group=1, shared=2, tokens=8192,
                   scale=2.446),
    # scaled down for a CPU (same expert counts / top-k / grouping, smaller widths and token count)
    "v3-cpu": dict(hidden=512, inter=256, experts=64, topk=8, n_group=8, topk_group=4, shared=1, tokens=512,
                   scale=2.5),
    "v2lite-cpu": dict(hidden=512, inter=352, experts=64, topk=6, n_group=1, topk_group=1, shared=2, tokens=512,
                       scale=2.446),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def flops(s: dict[str, Any], T: int) -> tuple[float, float]:
    routed = 3 * 2 * T * s["topk"] * s["hidden"] * s["inter"]
    shared = 3 * 2 * T * s["hidden"] * s["inter"] * s["shared"]
    return routed, shared


def _replace_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point every parameter/buffer of a meta-built module at the given tensors (no copies)."""
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    missing, extra = names - tensors.keys(), tensors.keys() - names
    assert not missing and not extra, f"{type(module).__name__}: missing {missing}, unexpected {extra}"
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        m = module
        for p in path:
            m = getattr(m, p)
        if leaf in m._parameters:
            m._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            m._buffers[leaf] = t


def build(s: dict[str, Any], device: str, dtype: torch.dtype, seed: int, bias_std: float = 0.0):
    E, D, I, S = s["experts"], s["hidden"], s["inter"], s["shared"]
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dt=dtype, std=0.02):
        return (torch.randn(*shape, generator=g, device=device, dtype=dt) * std)

    w = {
        "gate.weight": randn(E, D, dt=torch.float32),
        # bias selects, never weighs. Default 0: near-balanced routing as after aux-loss-free balancing
        # (V3 shape: max/mean tokens per expert ~1.2). A random bias of std 0.01 already skews it to ~2x.
        "gate.e_score_correction_bias": randn(E, dt=torch.float32, std=bias_std),
        "experts.gate_proj": randn(E, I, D), "experts.up_proj": randn(E, I, D), "experts.down_proj": randn(E, D, I),
        "shared_experts.gate_proj.weight": randn(I * S, D), "shared_experts.up_proj.weight": randn(I * S, D),
        "shared_experts.down_proj.weight": randn(D, I * S),
    }
    cfg = ModelConfig(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=s["topk"],
                      n_group=s["n_group"], topk_group=s["topk_group"], n_shared_experts=S,
                      routed_scaling_factor=s["scale"], norm_topk_prob=True, topk_method="noaux_tc",
                      scoring_func="sigmoid")
    with torch.device("meta"):
        ours = MoE(cfg, impl="grouped")
    _replace_tensors(ours, {**w, "tokens_per_expert": torch.zeros(E, device=device)})

    hf = None
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except Exception as e:  # noqa: BLE001
        print(f"transformers DeepseekV3MoE unavailable: {e}", file=sys.stderr)
    else:
        hcfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E,
                                num_experts_per_tok=s["topk"], n_group=s["n_group"], topk_group=s["topk_group"],
                                n_shared_experts=S, routed_scaling_factor=s["scale"], norm_topk_prob=True,
                                hidden_act="silu", experts_implementation="eager")
        with torch.device("meta"):
            hf = DeepseekV3MoE(hcfg)
        keys = {n for n, _ in hf.named_parameters()}
        hw = {k: v for k, v in w.items() if not k.startswith("experts.")}
        if "experts.gate_up_proj" in keys:  # transformers v5: fused [E, 2I, D], gate first
            hw["experts.gate_up_proj"] = torch.cat([w["experts.gate_proj"], w["experts.up_proj"]], dim=1)
            hw["experts.down_proj"] = w["experts.down_proj"]  # same layout [E, D, I]: share the storage
        else:  # older layout: one MLP per expert
            for e in range(E):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    hw[f"experts.{e}.{p}.weight"] = w[f"experts.{p}"][e]
        _replace_tensors(hf, hw)
        hf.eval()
    return ours.eval(), hf, w


def run_shape(name: str, s: dict[str, Any], args, device: str, dtype: torch.dtype) -> dict[str, Any]:
    T = args.tokens or s["tokens"]
    ours, hf, w = build(s, device, dtype, args.seed, args.bias_std)
    E, K, D = s["experts"], s["topk"], s["hidden"]
    gx = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(T, D, generator=gx, device=device, dtype=dtype)
    routed_f, shared_f = flops(s, T)

    # ---- same routing, pre-sorted rows for the ceiling ------------------------------------------------
    with torch.inference_mode():
        weights_TK, ids_TK = ours.gate(x)
        counts_t = torch.bincount(ids_TK.flatten(), minlength=E)
        order = ids_TK.flatten().argsort(stable=True)
        xs = x[order // K].contiguous()
        counts = counts_t.tolist()
        offs = counts_t.cumsum(0).to(torch.int32)
    wg_t = w["experts.gate_proj"].transpose(-2, -1)
    wu_t = w["experts.up_proj"].transpose(-2, -1)
    wd_t = w["experts.down_proj"].transpose(-2, -1)
    gmm = getattr(torch, "_grouped_mm", None)
    wgu_t = None
    if hf is not None and hasattr(hf.experts, "gate_up_proj"):
        wgu_t = hf.experts.gate_up_proj.transpose(-2, -1)  # [E, D, 2I]
    else:
        wgu_t = torch.cat([w["experts.gate_proj"], w["experts.up_proj"]], dim=1).transpose(-2, -1)

    def ceiling():
        return gmm(F.silu(gmm(xs, wg_t, offs=offs)) * gmm(xs, wu_t, offs=offs), wd_t, offs=offs)

    h_fixed = torch.randn(xs.shape[0], s["inter"], generator=gx, device=device, dtype=dtype)

    def gmm_only():
        gmm(xs, wg_t, offs=offs)
        gmm(xs, wu_t, offs=offs)
        return gmm(h_fixed, wd_t, offs=offs)

    def fused_gu():
        gu = gmm(xs, wgu_t, offs=offs)
        g_, u_ = gu.chunk(2, dim=-1)
        return gmm(F.silu(g_) * u_, wd_t, offs=offs)

    # ---- correctness first --------------------------------------------------------------------------
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    check: dict[str, Any] = {"tolerance_rel_maxdiff": tol, "reference": "hf_eager" if hf is not None else "dsray_loop"}
    impls: dict[str, Any] = {}
    with torch.inference_mode():
        def ours_with(impl):
            def f():
                ours.experts.impl = impl
                return ours(x)
            return f

        def hf_with(impl):
            def f():
                hf.config._experts_implementation = impl
                return hf(x)
            return f

        if hf is not None:
            impls["hf_eager"] = hf_with("eager")
            try:
                from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
                if "grouped_mm" in ALL_EXPERTS_FUNCTIONS:
                    impls["hf_grouped_mm"] = hf_with("grouped_mm")
            except Exception:  # noqa: BLE001
                pass
        impls["dsray_grouped"] = ours_with("grouped")
        impls["dsray_loop"] = ours_with("loop")
        outs = {}
        for k, f in list(impls.items()):
            try:
                outs[k] = f()
            except Exception as e:  # noqa: BLE001
                print(f"[{name}] {k} failed: {type(e).__name__}: {e}", file=sys.stderr)
                check[f"{k}_error"] = f"{type(e).__name__}: {e}"
                impls.pop(k)
        ref = outs[check["reference"]]
        for k, o in outs.items():
            if k != check["reference"]:
                check[f"{k}_vs_ref"] = C.rel_maxdiff(o, ref)
        # the ceiling computes what dsray's routed experts compute on the same sorted rows
        if gmm is not None:
            try:
                yc = ceiling()
                ours.experts.impl = "grouped"
                check["gmm_ceiling_vs_dsray_experts"] = C.rel_maxdiff(yc, ours.experts(xs, counts))
                check["gmm_fused_gu_vs_gmm_ceiling"] = C.rel_maxdiff(fused_gu(), yc)
                impls["gmm_ceiling"], impls["gmm_only"], impls["gmm_fused_gu"] = ceiling, gmm_only, fused_gu
            except Exception as e:  # noqa: BLE001
                print(f"[{name}] torch._grouped_mm unavailable here: {type(e).__name__}: {e}", file=sys.stderr)
                check["gmm_error"] = f"{type(e).__name__}: {e}"
        diffs = [v for k, v in check.items() if k.endswith("_vs_ref") or k.endswith("_vs_dsray_experts")
                 or k.endswith("_vs_gmm_ceiling")]
        check["agree"] = bool(diffs) and all(d <= tol for d in diffs)
        del outs, ref
    print(f"[{name}] check: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in check.items()))

    # ---- timing --------------------------------------------------------------------------------------
    rows = []
    with torch.inference_mode():
        for k, f in impls.items():
            slow = k in ("hf_eager", "dsray_loop")
            r = C.bench(f, device, args.warmup, max(3, args.iters // 2) if slow and args.iters > 6 else args.iters)
            fl = routed_f if k.startswith("gmm") else routed_f + shared_f
            r.update(impl=k, tokens_per_s=T / (r["ms"] / 1e3), tflops=fl / (r["ms"] / 1e3) / 1e12,
                     flops=fl)
            rows.append(r)
            print(f"[{name}] {k:14s} {r['ms']:9.3f} ms  {r['tflops']:7.2f} TFLOP/s")
        # where dsray_grouped's time goes beyond the ceiling: each piece of MoE.forward alone, same data
        from dsray.model.moe import combine_weighted

        y_R = ceiling() if "gmm_ceiling" in impls else ours.experts(xs, counts)

        def permute():
            o = ids_TK.flatten().argsort(stable=True)
            torch.bincount(ids_TK.flatten(), minlength=E).tolist()
            return x[o // K]

        def unpermute_combine():
            y = torch.empty_like(y_R).index_copy(0, order, y_R).view(T, K, -1)
            return combine_weighted(y, weights_TK)

        parts = {"gate": lambda: ours.gate(x), "permute (argsort, counts to host, gather)": permute,
                 "routed experts (= gmm_ceiling)": ceiling if "gmm_ceiling" in impls else None,
                 "unpermute + weighted combine (fp32)": unpermute_combine,
                 "shared experts": ours.shared_experts}
        breakdown = {}
        for k, f in parts.items():
            if f is None:
                continue
            fn = (lambda f=f: f(x)) if k == "shared experts" else f
            breakdown[k] = C.bench(fn, device, args.warmup, args.iters)["ms"]
        print(f"[{name}] dsray_grouped pieces (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items()))
    by = {r["impl"]: r for r in rows}
    ceil = by.get("gmm_ceiling")
    for r in rows:
        if "hf_eager" in by:
            r["speedup_vs_hf_eager"] = by["hf_eager"]["ms"] / r["ms"]
        if ceil:
            r["rate_vs_gmm_ceiling"] = r["tflops"] / ceil["tflops"]
            r["time_vs_gmm_ceiling"] = ceil["ms"] / r["ms"]
    mean = T * K / E
    result = {
        "shape": name, "dtype": str(dtype).removeprefix("torch."), **s, "tokens": T,
        "routed_flops": routed_f, "shared_flops": shared_f,
        "routing": {"max_over_mean": max(counts) / mean, "min_over_mean": min(counts) / mean,
                    "empty_experts": sum(c == 0 for c in counts)},
        "check": check, "rows": rows, "dsray_grouped_breakdown_ms": breakdown,
    }
    if device == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del ours, hf, w, x, xs, h_fixed, wgu_t, y_R
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default=None, help=f"comma list of {sorted(SHAPES)} (default: by device)")
    ap.add_argument("--tokens", type=int, default=0, help="override every shape's token count")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--iters", type=int, default=None, help="timed runs (median reported); default 20 cuda, 10 cpu")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bias-std", type=float, default=0.0,
                    help="std of the random routing bias (0: balanced; 0.01 skews V3 routing to max/mean ~2)")
    ap.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    args.iters = args.iters or (20 if device == "cuda" else 10)
    args.warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 2)
    names = (args.shapes.split(",") if args.shapes else (["v3", "v2lite"] if device == "cuda"
                                                         else ["v3-cpu", "v2lite-cpu"]))
    for n in names:
        if n not in SHAPES:
            ap.error(f"unknown shape {n!r}; choose from {sorted(SHAPES)}")
    extra: dict[str, Any] = {}
    if device == "cuda":  # context: the plain dense bf16 matmul rate of this GPU (8192^3, random data)
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        r = C.bench(lambda: a @ b, "cuda", 3, 10)
        extra["dense_bf16_matmul_8192"] = {**r, "tflops": 2 * 8192**3 / (r["ms"] / 1e3) / 1e12}
        print(f"dense bf16 matmul 8192^3: {extra['dense_bf16_matmul_8192']['tflops']:.0f} TFLOP/s")
        del a, b
        torch.cuda.empty_cache()
    results = [run_shape(n, SHAPES[n], args, device, dtype) for n in names]

    cols = [("impl", "impl", "s"), ("ms", "ms", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"),
            ("tflops", "TFLOP/s", ".2f"), ("speedup_vs_hf_eager", "x HF eager", ".2f"),
            ("rate_vs_gmm_ceiling", "x gmm rate", ".3f")]
    ok = True
    for r in results:
        print(f"\n== {r['shape']}: T={r['tokens']} D={r['hidden']} I={r['inter']} E={r['experts']} "
              f"K={r['topk']} groups={r['n_group']}/{r['topk_group']} shared={r['shared']} {r['dtype']} "
              f"on {device}; outputs agree: {r['check']['agree']}")
        print(C.table(r["rows"], cols))
        if r.get("dsray_grouped_breakdown_ms"):
            print("dsray_grouped pieces alone (ms): " + ", ".join(
                f"{k} {v:.3f}" for k, v in r["dsray_grouped_breakdown_ms"].items()))
        ok &= r["check"]["agree"]
    targets = {}
    for r in results:
        by = {x["impl"]: x for x in r["rows"]}
        g = by.get("dsray_grouped")
        if g and "rate_vs_gmm_ceiling" in g and "speedup_vs_hf_eager" in g:
            targets[r["shape"]] = {"rate_vs_gmm_ceiling": g["rate_vs_gmm_ceiling"], "target_rate": 0.8,
                                   "speedup_vs_hf_eager": g["speedup_vs_hf_eager"], "target_speedup": 5.0,
                                   "met": g["rate_vs_gmm_ceiling"] >= 0.8 and g["speedup_vs_hf_eager"] >= 5.0}
    if targets and device != "cuda":
        print("\n(DESIGN.md's targets are set for the full shapes on an H200; CPU ratios are informational)")
        for v in targets.values():
            v["met"] = None
    elif targets:
        print("\ntargets (DESIGN.md: >= 0.8x grouped-GEMM rate, >= 5x HF eager) for dsray_grouped:")
        for k, v in targets.items():
            print(f"  {k}: {v['rate_vs_gmm_ceiling']:.3f}x gmm rate, {v['speedup_vs_hf_eager']:.2f}x HF eager "
                  f"-> {'met' if v['met'] else 'NOT met'}")
    C.write_result("bench_moe", device, {"args": vars(args), **extra, "results": results, "targets": targets,
                                         "outputs_agree": ok}, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
