"""Dispatchers vs references: LocalDispatcher vs a naive loop on one process, AllToAllDispatcher over
gloo (world sizes 2, 3, 4 as groups of one 4-process pool) vs LocalDispatcher on the concatenated
problem, forward and backward (x, expert weights and gate weights) over two layers; each token sent
once per destination rank.

Shape legend: T tokens, K experts per token, D hidden, E experts, R rows on a rank, S local slots.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import RankPool, assert_close
from dsray.model.dispatch import LocalDispatcher
from dsray.parallel import AllToAllDispatcher, Placement

RTOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def loop_experts(x_RD: torch.Tensor, counts: list[int], W_SDD: torch.Tensor) -> torch.Tensor:
    """Slot s: y = x @ W_SDD[s] on its contiguous block. Starts from x_RD[:0] so that y_RD stays in
    x_RD's graph on ranks without experts."""
    parts, start = [x_RD[:0]], 0
    for s, c in enumerate(counts):
        parts.append(x_RD[start : start + c] @ W_SDD[s])
        start += c
    return torch.cat(parts)


def make_problem(spec: dict) -> dict:
    """Deterministic from spec["seed"]: every process builds the same tensors."""
    g = torch.Generator().manual_seed(spec["seed"])
    E, D, K, dtype = spec["E"], spec["D"], spec["K"], spec["dtype"]
    layers = []
    for allowed in spec["allowed"]:  # per layer: expert ids tokens may pick
        allowed = torch.tensor(allowed)
        ids, w = [], []
        for T in spec["tokens"]:
            pick = torch.stack([torch.randperm(len(allowed), generator=g)[:K] for _ in range(T)]) if T else None
            ids.append(allowed[pick] if T else torch.zeros(0, K, dtype=torch.int64))
            w.append(torch.rand(T, K, generator=g).to(dtype))
        W = (torch.randn(E, D, D, generator=g) / D**0.5).to(dtype)
        layers.append({"ids": ids, "w": w, "W": W})
    x = [torch.randn(T, D, generator=g).to(dtype) for T in spec["tokens"]]
    cot = [torch.randn(T, D, generator=g).to(dtype) for T in spec["tokens"]]
    return {"x": x, "cot": cot, "layers": layers}


def _to(obj, device):
    """Tensors in nested lists/dicts moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def reference(spec: dict) -> dict:
    """One process, LocalDispatcher, all tokens concatenated in group-rank order."""
    p = make_problem(spec)
    d = LocalDispatcher(spec["E"])
    x = torch.cat(p["x"]).requires_grad_()
    Ws = [L["W"].clone().requires_grad_() for L in p["layers"]]
    ws = [torch.cat(L["w"]).requires_grad_() for L in p["layers"]]
    h, ys = x, []
    for L, W, w in zip(p["layers"], Ws, ws):
        x_RD, counts, meta = d.dispatch(h, w, torch.cat(L["ids"]))
        y_TD = d.combine(loop_experts(x_RD, counts, W), meta)
        ys.append(y_TD.detach())
        h = h + y_TD
    (h * torch.cat(p["cot"])).sum().backward()
    return {"y": ys, "x_grad": x.grad, "W_grad": [W.grad for W in Ws], "w_grad": [w.grad for w in ws]}


def _group(spec: dict):
    """All ranks create the group (new_group is collective); non-members get None."""
    ranks = spec.get("group_ranks")
    if ranks is None:
        return dist.group.WORLD
    group = dist.new_group(ranks)
    return group if dist.get_rank() in ranks else None


def run_layers(rank: int, world_size: int, spec: dict) -> dict | None:
    """Every rank of the group: two layers forward, then backward (loss on token ranks, the
    empty-tensor pattern on expert-only ranks)."""
    group = _group(spec)
    if group is None:
        return None
    r = dist.get_rank(group)
    dev = torch.device(spec.get("device", "cpu"))  # a CUDA device under NCCL
    p = _to(make_problem(spec), dev)
    placement = Placement.from_dict(spec["placement"])
    d = AllToAllDispatcher(placement, group)
    local = list(placement.local_experts(r))
    Ws = [L["W"][local].clone().requires_grad_() for L in p["layers"]]
    T, D = spec["tokens"][r], spec["D"]
    token_rank = T > 0
    grad_x = r != spec.get("x_without_grad_rank")
    if token_rank:
        x = p["x"][r].clone().requires_grad_(grad_x)
    else:  # expert-only rank: an empty hidden state carries the autograd chain
        x = torch.zeros(0, D, dtype=spec["dtype"], device=dev, requires_grad=True)
    ws = [L["w"][r].clone().requires_grad_() for L in p["layers"]]
    h, ys, all_counts, sent = x, [], [], []
    for L, W, w in zip(p["layers"], Ws, ws):
        x_RD, counts, meta = d.dispatch(h, w, L["ids"][r])
        assert x_RD.shape == (sum(counts), D) and len(counts) == len(local)
        y_TD = d.combine(loop_experts(x_RD, counts, W), meta)
        assert y_TD.shape == (T, D)
        ys.append(y_TD.detach())
        all_counts.append(counts)
        sent.append(meta.rows_sent)
        assert meta.bytes_sent == meta.rows_sent * (D * x_RD.element_size() + 2 * L["ids"][r].shape[1] * 4)
        h = h + y_TD
    if token_rank:
        (h * p["cot"][r]).sum().backward()
    else:
        h.backward(torch.zeros(0, D, dtype=h.dtype, device=dev))
    W_grad = [{e: W.grad[s] for s, e in enumerate(local)} for W in Ws]
    res = {"y": ys, "x_grad": x.grad, "W_grad": W_grad, "w_grad": [w.grad for w in ws], "counts": all_counts,
           "sent": sent}
    return _to(res, "cpu")


def forward_only(rank: int, world_size: int, spec: dict) -> list | None:
    group = _group(spec)
    if group is None:
        return None
    r = dist.get_rank(group)
    p = make_problem(spec)
    placement = Placement.from_dict(spec["placement"])
    d = AllToAllDispatcher(placement, group)
    local = list(placement.local_experts(r))
    h, ys = p["x"][r], []
    with torch.inference_mode():
        for L in p["layers"]:
            x_RD, counts, meta = d.dispatch(h, L["w"][r], L["ids"][r])
            y_TD = d.combine(loop_experts(x_RD, counts, L["W"][local]), meta)
            ys.append(y_TD)
            h = h + y_TD
    return ys


def check_against_reference(spec: dict, results: list) -> None:
    ranks = spec.get("group_ranks") or list(range(len(results)))
    results = [results[g] for g in ranks]  # by group rank
    ref = reference(spec)
    dtype = spec["dtype"]
    offsets = [0]
    for T in spec["tokens"]:
        offsets.append(offsets[-1] + T)
    for r, res in enumerate(results):
        sl = slice(offsets[r], offsets[r + 1])
        for l in range(len(ref["y"])):
            assert_close(res["y"][l], ref["y"][l][sl], RTOL[dtype], f"rank {r} layer {l} y_TD")
            if spec["tokens"][r]:
                assert_close(res["w_grad"][l], ref["w_grad"][l][sl], GRAD_RTOL[dtype], f"rank {r} layer {l} w grad")
        if spec["tokens"][r] and r != spec.get("x_without_grad_rank"):
            assert_close(res["x_grad"], ref["x_grad"][sl], GRAD_RTOL[dtype], f"rank {r} x grad")
    for l, W_grad in enumerate(ref["W_grad"]):
        summed = torch.zeros_like(W_grad)
        for res in results:
            for e, grad in res["W_grad"][l].items():
                summed[e] += grad
        assert_close(summed, W_grad, GRAD_RTOL[dtype], f"layer {l} expert weight grads summed over replicas")


# ---- world of one ---------------------------------------------------------------------------------


def test_local_dispatcher_matches_naive_loop():
    spec = {"seed": 0, "E": 6, "D": 8, "K": 3, "dtype": torch.float32, "tokens": [11], "allowed": [list(range(6))]}
    p = make_problem(spec)
    x, ids, w, W = p["x"][0], p["layers"][0]["ids"][0], p["layers"][0]["w"][0], p["layers"][0]["W"]
    d = LocalDispatcher(6)
    xg, wg, Wg = (t.clone().requires_grad_() for t in (x, w, W))
    x_RD, counts, meta = d.dispatch(xg, wg, ids)
    assert counts == [int((ids == e).sum()) for e in range(6)]
    y_RD = loop_experts(x_RD, counts, Wg)
    # pure data movement: each expert's rows are its tokens in token order, bit for bit
    start = 0
    for e in range(6):
        t, _ = (ids == e).nonzero(as_tuple=True)
        assert torch.equal(x_RD[start:start + counts[e]], x[t])
        assert torch.equal(y_RD[start:start + counts[e]], x[t] @ W[e])
        start += counts[e]
    y_TD = d.combine(y_RD, meta)
    # naive per-token loop, forward and backward (gate weights included)
    xn, wn, Wn = (t.clone().requires_grad_() for t in (x, w, W))
    y_naive = torch.stack([sum(wn[t, k] * (xn[t] @ Wn[ids[t, k]]) for k in range(3)) for t in range(11)])
    assert_close(y_TD, y_naive, 1e-6, "y_TD vs naive")
    cot = torch.randn(11, 8)
    (y_TD * cot).sum().backward()
    (y_naive * cot).sum().backward()
    for a, b, what in ((xg, xn, "x"), (wg, wn, "gate weights"), (Wg, Wn, "W")):
        assert_close(a.grad, b.grad, 1e-6, f"{what} grad")


def test_local_dispatcher_edge_cases():
    d = LocalDispatcher(4)
    x_RD, counts, meta = d.dispatch(torch.zeros(0, 5), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int64))
    assert x_RD.shape == (0, 5) and counts == [0, 0, 0, 0]
    assert d.combine(x_RD, meta).shape == (0, 5)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        d.dispatch(torch.zeros(2, 5), torch.ones(2, 2), torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="ids_TK"):
        d.dispatch(torch.zeros(2, 5), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="y_RD"):
        d.combine(torch.zeros(1, 5), meta)
    # tokens marked invalid (left padding) go nowhere and come back as zeros
    x, ids = torch.randn(3, 5), torch.tensor([[0, 1], [2, 3], [1, 2]])
    x_RD, counts, meta = d.dispatch(x, torch.ones(3, 2), ids, torch.tensor([True, False, True]))
    assert counts == [1, 2, 1, 0]
    y = d.combine(x_RD, meta)
    assert torch.equal(y[1], torch.zeros(5)) and torch.allclose(y[0], 2 * x[0])


# ---- over gloo --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    with RankPool(4, timeout_s=60) as p:
        yield p


def _spec(**kw) -> dict:
    return {"seed": 1, "D": 8, "dtype": torch.float32, **kw}


SCENARIOS = {
    # 2 ranks (a subgroup of global ranks 1 and 3), both with tokens and experts, uneven split 3/2
    "world2": _spec(E=5, K=2, tokens=[6, 5], group_ranks=[1, 3], allowed=[range(5), range(5)],
                    placement=Placement.linear(5, [0, 1], 2).to_dict()),
    # 3 ranks: one driver with tokens and no experts, two expert-only ranks (T = 0), split 4/3,
    # expert 0 replicated on rank 2; layer 0 routes nothing to rank 2
    "world3": _spec(E=7, K=2, tokens=[9, 0, 0], group_ranks=[0, 1, 2], allowed=[[1, 2, 3], range(7)],
                    placement=Placement.linear(7, [1, 2], 3).with_replicas({0: 1}).to_dict()),
    # 4 ranks: drivers 0 (no experts) and 1 (hosts experts), expert-only 2 and 3; round robin with
    # EPLB replicas of hot experts (3 on every expert rank)
    "world4": _spec(E=10, K=3, tokens=[9, 4, 0, 0], allowed=[range(10), [0, 3, 5, 6, 9]],
                    placement=Placement.round_robin(10, [1, 2, 3], 4)
                    .rebalanced([1, 1, 1, 30, 1, 1, 1, 1, 1, 20], 3).to_dict()),
}
for s in SCENARIOS.values():
    s["allowed"] = [list(a) for a in s["allowed"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_all_to_all_matches_local(pool, name, dtype):
    spec = {**SCENARIOS[name], "dtype": dtype}
    results = pool.run(run_layers, spec)
    check_against_reference(spec, results)
    # each token crosses the wire once per destination rank (not once per expert)
    placement = Placement.from_dict(spec["placement"])
    p = make_problem(spec)
    for r, res in enumerate([results[g] for g in (spec.get("group_ranks") or range(len(results)))]):
        for l, L in enumerate(p["layers"]):
            want = int(placement.destinations(L["ids"][r], source_rank=r).sum()) if spec["tokens"][r] else 0
            assert res["sent"][l] == want, (name, r, l, res["sent"][l], want)
    if name == "world3":
        # layer 0 sends nothing to rank 2 (it hosts experts 4, 5, 6 and a replica of 0)
        assert results[2]["counts"][0] == [0, 0, 0, 0]
        assert sum(results[1]["counts"][0]) == 9 * 2
    if name == "world4":
        placement = Placement.from_dict(spec["placement"])
        assert placement.n_replicas[3] == 3 and placement.n_replicas[9] == 2
        # replicas of expert 3 all got rows in layer 1: (i + rank) % 3 spreads them
        for rank, slot in placement.replicas(3):
            assert results[rank]["counts"][1][slot] > 0


def test_all_to_all_rank_without_x_grad_and_inference(pool):
    # rank 1 has tokens whose x needs no grad: its dispatch still records the collective so that
    # the backward collectives of all ranks line up
    spec = {**SCENARIOS["world4"], "x_without_grad_rank": 1, "seed": 2}
    check_against_reference(spec, pool.run(run_layers, spec))
    ref = reference(spec)
    for r, ys in enumerate(pool.run(forward_only, spec)):
        lo = sum(spec["tokens"][:r])
        for l, y in enumerate(ys):
            assert_close(y, ref["y"][l][lo : lo + spec["tokens"][r]], 1e-6, f"inference rank {r} layer {l}")


def mismatch(rank: int, world_size: int, kind: str) -> str:
    """Every rank must raise the same error (and none hang)."""
    placement = Placement.linear(4, [0, 1, 2, 3], 4)
    if kind == "version" and rank == 2:
        placement = Placement(4, placement.slots, version=1)
    d = AllToAllDispatcher(placement, dispatch_dtype="float8_e4m3fn" if kind == "wire" and rank == 2 else None)
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.rand(3, 2)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    if kind == "ids" and rank == 3:
        ids = ids + 2
    if kind == "dtype" and rank == 1:
        x = x.detach().bfloat16().requires_grad_()
    try:
        if kind == "grad_mode" and rank == 0:
            with torch.no_grad():
                d.dispatch(x, w, ids)
        else:
            d.dispatch(x, w, ids)
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("version", "RuntimeError: ranks dispatch with different placement versions (by rank): [0, 0, 1, 0]"),
        ("ids", "ValueError: ids_TK on rank(s) [3] has expert ids outside [0, 4)"),
        ("grad_mode", "RuntimeError: rank(s) [0] dispatch with autograd disabled"),
        ("dtype", "RuntimeError: ranks dispatch rows of different dtype or width (by rank): "
                  "[torch.float32, torch.bfloat16, torch.float32, torch.float32], D = [4, 4, 4, 4]"),
        ("wire", "RuntimeError: ranks dispatch with different dispatch_dtype (by rank): "
                 "['model dtype', 'model dtype', 'float8_e4m3fn', 'model dtype']"),
    ],
)
def test_all_to_all_mismatch_raises_on_every_rank(pool, kind, expected):
    for msg in pool.run(mismatch, kind):
        assert msg.startswith(expected), msg


def wrong_world(rank: int, world_size: int) -> str:
    try:
        AllToAllDispatcher(Placement.linear(4, [0], 2))
    except ValueError as e:
        return str(e)
    return "no error"


def test_all_to_all_checks_world_size(pool):
    assert pool.run(wrong_world) == ["placement.world_size is 2 but the process group has 4 ranks"] * 4
