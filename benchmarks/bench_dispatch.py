"""FP8 dispatch on one device: the cost of the 1x128 e4m3 round trip, and the MoE layer with it.

What FP8 dispatch adds to a layer is a quantise on the sender and a dequantise on the receiver
(`dsray.fp8.quantize_fp8_rows` / `dequantize_fp8_rows`); what it saves is half the row bytes on the wire
(measured across ranks by bench_ep_scaling.py). On one device there is no wire, so this measures the
added compute, side by side in one run:

  quant / dequant     the two functions alone on [T, D] rows (eager; `--compile` adds torch.compile'd ones)
  moe_grouped         dsray MoE forward through LocalDispatcher, grouped experts (gate, dispatch, experts,
                      combine, shared experts)
  moe_grouped_fp8     the same with each token's row through the fp8 round trip before dispatch (what a
                      receiving rank computes on when each token reaches one rank)
  moe_loop            the same MoE with the per-expert loop experts (the readable reference)

and the error of the fp8 layer output against the model-dtype one. Ray and torch.distributed are not used.

    python benchmarks/bench_dispatch.py --device cpu --shape small   # dry run, ~20 s
    python benchmarks/bench_dispatch.py --device cuda                # V3 shape, 8192 tokens, bf16
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import _common as C  # noqa: F401  (puts the repo root on sys.path)
import torch

from dsray.config import ModelConfig
from dsray.fp8 import dequantize_fp8_rows, quantize_fp8_rows
from dsray.model.moe import MoE

SHAPES = {
    "v3": dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
               num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, tokens=8192),
    # CPU dry run: D = 640 (5 tiles) keeps the shapes honest at a size 2 cores manage
    "small": dict(hidden_size=640, moe_intermediate_size=256, n_routed_experts=64, n_shared_experts=1,
                  num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, tokens=512),
}


def build(shape: dict, device: str, dtype: torch.dtype, seed: int) -> MoE:
    """MoE with N(0, 0.02) weights made on `device` in `dtype` (gate fp32), bias 0 (near-balanced)."""
    cfg = ModelConfig(**{k: v for k, v in shape.items() if k != "tokens"})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # experts and shared MLP in the model dtype; the gate fixes fp32 itself
    try:
        with torch.device("meta"):
            moe = MoE(cfg, impl="grouped")
    finally:
        torch.set_default_dtype(prev)
    moe = moe.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02, generator=g)
        moe.gate.e_score_correction_bias.zero_()
    return moe.eval()


def errors(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    d = (y.float() - ref.float())
    return {"rel_max": float(d.abs().max() / ref.float().abs().max()),
            "rel_rms": float(d.norm() / ref.float().norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: v3 on cuda, small on cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd quant/dequant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    args.shape = args.shape or ("v3" if args.device == "cuda" else "small")
    shape, dtype, dev = SHAPES[args.shape], getattr(torch, args.dtype), args.device
    T, D = args.tokens or shape["tokens"], shape["hidden_size"]
    K, I = shape["num_experts_per_tok"], shape["moe_intermediate_size"]
    t0 = time.perf_counter()
    moe = build(shape, dev, dtype, args.seed)
    x = torch.randn(T, D, generator=torch.Generator(device=dev).manual_seed(args.seed + 1), device=dev, dtype=dtype)
    print(f"built {args.shape} MoE on {dev} in {time.perf_counter() - t0:.1f} s", flush=True)

    def bench(fn):
        return C.bench(fn, dev, args.warmup, args.iters)

    rows: dict[str, dict] = {}
    nB = math.ceil(D / 128)
    el = x.element_size()
    # Bytes each function must touch at least: quant reads T*D*el, writes T*D + T*nB*4; dequant the reverse.
    q_bytes, dq_bytes = T * D * el + T * D + T * nB * 4, T * D + T * nB * 4 + T * D * el
    with torch.inference_mode():
        q, s = quantize_fp8_rows(x)
        xq = dequantize_fp8_rows(q, s, dtype)
        rows["quant"] = {**bench(lambda: quantize_fp8_rows(x)), "min_bytes": q_bytes}
        rows["dequant"] = {**bench(lambda: dequantize_fp8_rows(q, s, dtype)), "min_bytes": dq_bytes}
        if args.compile:
            try:
                cq, cdq = torch.compile(quantize_fp8_rows), torch.compile(dequantize_fp8_rows)
                q2, s2 = cq(x)
                assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
                assert torch.equal(cdq(q2, s2, dtype), xq)
                rows["quant_compiled"] = {**bench(lambda: cq(x)), "min_bytes": q_bytes}
                rows["dequant_compiled"] = {**bench(lambda: cdq(q, s, dtype)), "min_bytes": dq_bytes}
            except Exception as e:  # noqa: BLE001 - report and go on; the eager numbers stand
                print(f"torch.compile failed: {type(e).__name__}: {e}", file=sys.stderr)
                rows["compile_error"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        for name in ("quant", "dequant", "quant_compiled", "dequant_compiled"):
            if name in rows:
                rows[name]["GBps"] = rows[name]["min_bytes"] / rows[name]["ms"] / 1e6
        # round-trip error vs the bound (per element <= 2^-4 |x| + 2^-10 scale, + the cast to the model dtype)
        scale_TD = s.repeat_interleave(128, 1)[:, :D]
        bound = 2.0**-4 * x.float().abs() + 2.0**-10 * scale_TD
        bound = bound + (2.0**-9 if dtype == torch.bfloat16 else 2.0**-24) * (x.float().abs() + bound)
        d = (xq.float() - x.float()).abs()
        roundtrip = {"max_err_over_bound": float((d / bound).max()), **errors(xq, x)}

        def layer_fp8():
            w, ids, _ = moe.gate(x)
            xr = dequantize_fp8_rows(*quantize_fp8_rows(x), dtype)
            return moe.routed(xr, w, ids) + moe.shared_experts(x)

        y_ref = moe(x)
        y_fp8 = layer_fp8()
        moe.experts.impl = "loop"
        y_loop = moe(x)
        moe.experts.impl = "grouped"
        layer_err = {"fp8_vs_model_dtype": errors(y_fp8, y_ref), "loop_vs_grouped": errors(y_loop, y_ref)}
        rows["moe_grouped"] = bench(lambda: moe(x))
        rows["moe_grouped_fp8"] = bench(layer_fp8)
        moe.experts.impl = "loop"
        rows["moe_loop"] = bench(lambda: moe(x))
        moe.experts.impl = "grouped"
    flops = 3 * 2 * T * D * I * (K + shape["n_shared_experts"])
    for name in ("moe_grouped", "moe_grouped_fp8", "moe_loop"):
        rows[name]["TFLOPs"] = flops / rows[name]["ms"] / 1e9
    rows["moe_grouped_fp8"]["x_moe_grouped"] = rows["moe_grouped_fp8"]["ms"] / rows["moe_grouped"]["ms"]
    rows["moe_loop"]["x_moe_grouped"] = rows["moe_loop"]["ms"] / rows["moe_grouped"]["ms"]
    bytes_row = {"model_dtype": D * el + 2 * K * 4, "fp8": D + 2 * K * 4 + nB * 4}
    print(C.table([{"name": k, **v} for k, v in rows.items() if "ms" in v],
                  [("name", "what", ""), ("ms", "ms", ".3f"), ("GBps", "GB/s (min bytes)", ".0f"),
                   ("TFLOPs", "TFLOP/s", ".1f"), ("x_moe_grouped", "x moe_grouped", ".3f")]))
    print("round trip:", roundtrip)
    print("layer errors:", layer_err)
    print("dispatch bytes per (token, destination) row:", bytes_row)
    C.write_result("ep_dispatch", dev, {"args": vars(args), "shape": shape, "tokens": T, "results": rows,
                                        "roundtrip_error": roundtrip, "layer_error": layer_err,
                                        "dispatch_bytes_per_row": bytes_row, "flops_layer": flops}, args.out)


if __name__ == "__main__":
    main()
