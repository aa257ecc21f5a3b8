"""FP8 dispatch (e4m3 rows, 1 x 128 fp32 scales, combine in the model dtype) against the same dispatcher
sending rows in the model dtype, over gloo (world 2 as a subgroup of a 3-process pool, and world 3 with
an expert-only rank), fp32 and bf16; plus the row quantiser on its own.

The bound. e4m3 keeps 3 mantissa bits: round to nearest is off by at most half a step, 2^-4 |q| for
normal q (|q| >= 2^-6) and 2^-10 below (subnormal step 2^-9). A tile is scaled so that its amax maps to
448, hence per element |x~ - x| <= b = 2^-4 |x| + 2^-10 scale (<= 2^-4 amax of the tile); in bf16 the
receiver's cast adds 2^-9 |x~|. The experts here are linear (y_e = x W_e), so the error propagates
exactly through |.|: |y~ - y|_tj <= sum_k |w_tk| (b_t @ |W_e|)_j, and likewise for the gate-weight and
expert-weight gradients. Backward is straight-through: dL/dx must equal the reference's (the gradient of
the received rows goes back unquantised, and with linear experts it does not depend on x~).
Each check adds the arithmetic's own rounding: c x the same propagation with |x| + b in place of b,
c = 1e-5 (fp32) or 2^-6 (bf16: each run rounds its products, sums and casts).

Shape legend: T tokens, K experts per token, D hidden, E experts, B scale tiles.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import RankPool, assert_close
from dsray.fp8 import dequantize_fp8_rows, quantize_fp8_blockwise, quantize_fp8_rows
from dsray.parallel import AllToAllDispatcher, Placement
from dsray.parallel.dispatch import parse_dispatch_dtype
from test_dispatch import _group, loop_experts, make_problem

FP8 = torch.float8_e4m3fn
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6}


def elementwise_bound(x_TD: torch.Tensor) -> torch.Tensor:
    """b_TD (float64): the most the fp8 round trip may move each element of x (fp32 dequantisation)."""
    _, scale_TB = quantize_fp8_rows(x_TD)
    scale_TD = scale_TB.double().repeat_interleave(128, dim=1)[:, : x_TD.shape[1]]
    return 2.0**-4 * x_TD.double().abs() + 2.0**-10 * scale_TD


def problem(spec: dict) -> dict:
    """test_dispatch's problem with a spread of magnitudes inside every tile (columns scaled 1e-4 .. 10,
    so that subnormal e4m3 values and values flushed to zero occur) and one all-zero token."""
    p = make_problem(spec)
    spread_D = torch.logspace(-4, 1, spec["D"], dtype=torch.float64)
    p["x"] = [(x.double() * spread_D).to(spec["dtype"]) for x in p["x"]]
    if spec["tokens"][0]:
        p["x"][0][0] = 0
    return p


# ---- the quantiser ----------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [128, 200, 5, 384])
def test_quantize_rows_bound_and_blockwise_agreement(D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(33, D, generator=g, dtype=torch.float64) * torch.logspace(-5, 2, D, dtype=torch.float64)
    x = x.float()
    x[3] = 0
    q, scale = quantize_fp8_rows(x)
    assert q.dtype == FP8 and q.shape == (33, D) and scale.shape == (33, -(-D // 128))
    y = dequantize_fp8_rows(q, scale)
    err = (y.double() - x.double()).abs()
    b = elementwise_bound(x)
    assert (err <= b * (1 + 1e-6)).all(), f"max err / bound {(err / b.clamp_min(1e-300)).max():.3f}"
    # the bound is at most 2^-4 of the tile's amax (2^-10 scale = 2^-10 amax / 448 is far smaller)
    pad = scale.shape[1] * 128 - D
    amax_TD = F.pad(x.abs().double(), (0, pad)).view(33, -1, 128).amax(2).repeat_interleave(128, 1)[:, :D]
    assert (err <= 2.0**-4 * amax_TD * (1 + 1e-6)).all()
    assert torch.equal(y[3], torch.zeros(D))
    # same fp8 values as the checkpoint quantiser with 1 x 128 blocks (scales differ on zero tiles only)
    q_ref, s_ref = quantize_fp8_blockwise(x, (1, 128))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    nonzero = x.abs().view(33, -1).amax(1) > 0
    assert torch.equal(scale[nonzero], s_ref[nonzero])
    # bf16 out: one more rounding of 2^-9
    yb = dequantize_fp8_rows(q, scale, torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.bfloat16())
    with pytest.raises(ValueError, match="scale_inv has shape"):
        dequantize_fp8_rows(q, scale[:, :1] if scale.shape[1] > 1 else scale[:1])


def test_parse_dispatch_dtype():
    assert parse_dispatch_dtype(None) is None
    assert parse_dispatch_dtype("float8_e4m3fn") is FP8
    assert parse_dispatch_dtype(FP8) is FP8
    for bad in ("fp8", "bfloat16", torch.bfloat16, torch.float8_e5m2, 8):
        with pytest.raises(ValueError, match="dispatch_dtype="):
            parse_dispatch_dtype(bad)


# ---- over gloo --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    with RankPool(3, timeout_s=60) as p:
        yield p


def fp8_layer(rank: int, world_size: int, spec: dict) -> dict | None:
    """One layer, forward and backward, with rows in the model dtype ("ref") and in fp8; then the
    same forward under inference_mode."""
    group = _group(spec)
    if group is None:
        return None
    r = dist.get_rank(group)
    p = problem(spec)
    L = p["layers"][0]
    placement = Placement.from_dict(spec["placement"])
    local = list(placement.local_experts(r))
    T, D, dtype = spec["tokens"][r], spec["D"], spec["dtype"]
    out = {}
    for name, dd in (("ref", None), ("fp8", spec["fp8_as"])):
        d = AllToAllDispatcher(placement, group, dispatch_dtype=dd)
        W = L["W"][local].clone().requires_grad_()
        x = p["x"][r].clone().requires_grad_()  # [0, D] on expert-only ranks: carries the backward
        w = L["w"][r].clone().requires_grad_()
        x_RD, counts, meta = d.dispatch(x, w, L["ids"][r])
        y = d.combine(loop_experts(x_RD, counts, W), meta)
        assert y.dtype == dtype and x_RD.dtype == dtype
        if T:
            (y * p["cot"][r]).sum().backward()
        else:
            y.backward(torch.zeros(0, D, dtype=dtype))
        with torch.inference_mode():
            x2_RD, counts2, meta2 = d.dispatch(p["x"][r], L["w"][r], L["ids"][r])
            y_inf = d.combine(loop_experts(x2_RD, counts2, L["W"][local]), meta2)
        out[name] = {"y": y.detach(), "y_inf": y_inf, "x_grad": x.grad, "w_grad": w.grad,
                     "W_grad": {e: W.grad[s] for s, e in enumerate(local)},
                     "rows": meta.rows_sent, "bytes": meta.bytes_sent, "K": L["ids"][r].shape[1]}
    return out


SCENARIOS = {
    # world 2 (global ranks 0 and 2), both with tokens and experts; D = 200: one whole tile + a ragged one
    "world2": {"seed": 3, "E": 6, "K": 2, "D": 200, "tokens": [7, 5], "group_ranks": [0, 2],
               "allowed": [list(range(6))], "placement": Placement.linear(6, [0, 1], 2).to_dict()},
    # world 3: a driver without experts, a driver with experts, an expert-only rank; expert 1 replicated
    "world3": {"seed": 4, "E": 8, "K": 3, "D": 256, "tokens": [9, 4, 0], "allowed": [list(range(8))],
               "placement": Placement.round_robin(8, [1, 2], 3).with_replicas({1: 1}).to_dict()},
}


def bounds(spec: dict) -> dict:
    """Elementwise error bounds (float64) for y, the gate-weight grads and the expert-weight grads of
    the concatenated problem, in group-rank order (see the module docstring)."""
    p = problem(spec)
    L = p["layers"][0]
    x, ids, w, g = (torch.cat(t).double() for t in (p["x"], L["ids"], L["w"], p["cot"]))
    x_model = torch.cat(p["x"])
    ids = ids.long()
    b = elementwise_bound(x_model)
    if spec["dtype"] == torch.bfloat16:
        b = b + 2.0**-9 * (x.abs() + b)  # the receiver's cast of the dequantised rows to bf16
    absW = L["W"].double().abs()
    c = SLACK[spec["dtype"]]

    def propagate(e_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        A_TKD = torch.einsum("td,tkdj->tkj", e_TD, absW[ids])  # |error| through each chosen expert
        y = (w.abs()[:, :, None] * A_TKD).sum(1)
        w_grad = (g.abs()[:, None, :] * A_TKD).sum(2)
        W_grad = torch.zeros_like(absW).index_add_(
            0, ids.reshape(-1), torch.einsum("tk,td,tj->tkdj", w.abs(), e_TD, g.abs()).flatten(0, 1))
        return y, w_grad, W_grad

    err, mag = propagate(b), propagate(x.abs() + b)
    return {k: e + c * m for k, e, m in zip(("y", "w_grad", "W_grad"), err, mag)}


def _ratio(diff: torch.Tensor, bound: torch.Tensor) -> float:
    return float((diff / bound.clamp_min(1e-300)).max()) if diff.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fp8_dispatch_error_bounded_grads_flow_bytes_drop(pool, name, dtype):
    spec = {**SCENARIOS[name], "dtype": dtype, "fp8_as": "float8_e4m3fn" if dtype == torch.float32 else FP8}
    results = pool.run(fp8_layer, spec)
    results = [results[g] for g in (spec.get("group_ranks") or range(len(results)))]
    bd = bounds(spec)
    D, K, E = spec["D"], spec["K"], spec["E"]
    lo, report = 0, []
    W_diff = torch.zeros(E, D, D, dtype=torch.float64)
    for r, res in enumerate(results):
        ref, fp8 = res["ref"], res["fp8"]
        T = spec["tokens"][r]
        sl = slice(lo, lo + T)
        lo += T
        dy = (fp8["y"].double() - ref["y"].double()).abs()
        assert (dy <= bd["y"][sl]).all(), f"rank {r}: max |dy| / bound {_ratio(dy, bd['y'][sl]):.3f}"
        assert torch.equal(fp8["y_inf"], fp8["y"]), f"rank {r}: inference forward differs"
        if T:
            # straight-through: dL/dx is the reference's (linear experts: it does not depend on x~)
            assert_close(fp8["x_grad"], ref["x_grad"], 1e-6, f"rank {r} x grad")
            dw = (fp8["w_grad"].double() - ref["w_grad"].double()).abs()
            assert (dw <= bd["w_grad"][sl]).all(), f"rank {r}: max |dw grad| / bound {_ratio(dw, bd['w_grad'][sl])}"
            assert fp8["w_grad"].abs().sum() > 0
            report.append((f"rank {r}", float(dy.max() / ref["y"].double().abs().max()), _ratio(dy, bd["y"][sl]),
                           _ratio(dw, bd["w_grad"][sl])))
        for e, grad in fp8["W_grad"].items():
            W_diff[e] += grad.double() - ref["W_grad"][e].double()
        # bytes: same rows, each 2K fp32 side values; fp8 rows are D bytes + ceil(D/128) fp32 scales
        assert fp8["rows"] == ref["rows"]
        el = torch.empty((), dtype=dtype).element_size()
        assert ref["bytes"] == ref["rows"] * (D * el + 2 * K * 4)
        assert fp8["bytes"] == fp8["rows"] * (D + 2 * K * 4 + -(-D // 128) * 4)
        assert (fp8["bytes"] < ref["bytes"]) or ref["rows"] == 0
    # expert-weight grads summed over replicas
    assert (W_diff.abs() <= bd["W_grad"]).all(), f"W grad: max |diff| / bound {_ratio(W_diff.abs(), bd['W_grad'])}"
    print(f"\n{name} {dtype}: (rank, max|dy|/max|y_ref|, max|dy|/bound, max|dw grad|/bound):", report,
          "W grad diff/bound", _ratio(W_diff.abs(), bd["W_grad"]),
          "bytes ref/fp8 per rank", [(res["ref"]["bytes"], res["fp8"]["bytes"]) for res in results])
