import json

import pytest
import torch

from dsray.parallel.placement import Placement


def test_linear_uneven_and_driver_ranks():
    p = Placement.linear(8, expert_ranks=[1, 2, 3], world_size=4)
    assert p.slots == ((), (0, 1, 2), (3, 4, 5), (6, 7))
    assert p.world_size == 4 and p.version == 0
    assert p.experts_per_rank() == [0, 3, 3, 2]
    assert p.expert_ranks == [1, 2, 3]
    assert p.local_experts(0) == () and p.local_experts(3) == (6, 7)
    assert p.replicas(4) == [(2, 1)]
    assert torch.equal(p.n_replicas, torch.ones(8, dtype=torch.int64))
    # fewer experts than ranks: the last rank hosts nothing
    assert Placement.linear(2, [0, 1, 2], 3).slots == ((0,), (1,), ())


def test_round_robin_and_from_table():
    p = Placement.round_robin(7, [2, 0], world_size=3)
    assert p.slots == ((1, 3, 5), (), (0, 2, 4, 6))
    t = Placement.from_table({0: [3, 1], 2: [0, 2]}, n_experts=4, world_size=3)
    assert t.slots == ((3, 1), (), (0, 2))
    assert t.replicas(1) == [(0, 1)]
    assert Placement.from_table([[0], [1, 2]], 3, 2).slots == ((0,), (1, 2))
    assert Placement(3, [[0], [1, 2]]).slots == ((0,), (1, 2))  # lists normalised to tuples


def test_route_table_pads_replicas():
    p = Placement.from_table([[0, 1], [1, 2], [2, 1]], 3, 3)
    rt = p.route_table("cpu")
    assert rt.max_replicas == 3 and rt.max_slots == 2
    assert rt.n_replicas.tolist() == [1, 3, 2]
    assert rt.rank_ER.tolist() == [[0, -1, -1], [0, 1, 2], [1, 2, -1]]
    assert rt.slot_ER.tolist() == [[0, -1, -1], [1, 0, 1], [1, 0, -1]]
    assert Placement.linear(2, [0], 2).route_table("cpu").max_slots == 2


def test_with_replicas_counts_and_pairs():
    p = Placement.linear(8, [0, 1, 2], 3)  # 3, 3, 2
    q = p.with_replicas({0: 2})
    assert q.version == 1
    # least-loaded first: rank 2 (2 slots), then rank 1; appended after existing slots
    assert q.slots == ((0, 1, 2), (3, 4, 5, 0), (6, 7, 0))
    assert q.replicas(0) == [(0, 0), (1, 3), (2, 2)]
    assert q.n_replicas.tolist() == [3, 1, 1, 1, 1, 1, 1, 1]
    r = q.with_replicas([(7, 0), (3, 2)])
    assert r.version == 2 and r.slots == ((0, 1, 2, 7), (3, 4, 5, 0), (6, 7, 0, 3))
    assert p.version == 0 and p.slots == ((0, 1, 2), (3, 4, 5), (6, 7))  # immutable


def test_rebalanced_moves_replicas_to_hot_experts():
    p = Placement.linear(8, [0, 1, 2], 3).with_replicas({0: 2})  # replicas on a cold expert
    load = [1, 1, 1, 1, 1, 1, 1, 90]  # expert 7 is hot
    q = p.rebalanced(load, n_extra_slots=2)
    assert q.version == p.version + 1
    assert q.n_slots == 8 + 2
    assert q.n_replicas.tolist() == [1, 1, 1, 1, 1, 1, 1, 3]
    assert [r for r, _ in q.replicas(0)] == [0]  # expert 0 keeps its home only
    assert q.slots == ((0, 1, 2, 7), (3, 4, 5, 7), (6, 7))  # replica of 0 dropped, 7 appended
    # same load again: nothing moves
    assert q.rebalanced(load, 2).slots == q.slots
    # hot spot moves: replicas follow it, homes stay
    q2 = q.rebalanced([1, 1, 50, 1, 1, 1, 1, 1], 1)
    assert q2.n_replicas.tolist() == [1, 1, 2, 1, 1, 1, 1, 1]
    for e in range(8):
        home_rank = 0 if e < 3 else (1 if e < 6 else 2)
        assert home_rank in [r for r, _ in q2.replicas(e)]
    # a replica goes to a rank with little load
    q3 = Placement.linear(6, [0, 1, 2], 3).rebalanced([100, 0, 5, 5, 0, 0], 1)
    assert q3.slots == ((0, 1), (2, 3), (4, 5, 0))


def test_dict_round_trip_is_json():
    p = Placement.linear(6, [1, 2], 3).with_replicas({5: 1})
    d = json.loads(json.dumps(p.to_dict()))
    q = Placement.from_dict(d)
    assert q == p and q.version == 1 and q.slots == p.slots


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Placement(0, ((),)), "n_experts"),
        (lambda: Placement(2, ()), "world_size"),
        (lambda: Placement(2, ((0,),)), r"no replica of expert\(s\) \[1\]"),
        (lambda: Placement(2, ((0, 2),)), "slots\\[0\\] has expert id 2"),
        (lambda: Placement(2, ((0, -1, 1),)), "expert id -1"),
        (lambda: Placement(2, ((0, 1, 1),)), r"slots\[0\] hosts expert\(s\) \[1\] more than once"),
        (lambda: Placement(2, ((0, 1),), version=-1), "version"),
        (lambda: Placement(2, "01"), "slots"),
        (lambda: Placement.linear(4, [], 2), "expert_ranks"),
        (lambda: Placement.linear(4, [0, 2], 2), r"rank\(s\) \[2\]"),
        (lambda: Placement.linear(4, [0, 0], 2), "duplicates"),
        (lambda: Placement.linear(4, [0], 0), "world_size"),
        (lambda: Placement.round_robin(0, [0], 1), "n_experts"),
        (lambda: Placement.from_table({3: [0]}, 1, 2), r"rank\(s\) \[3\]"),
        (lambda: Placement.from_table([[0]], 1, 2), "world_size is 2"),
        (lambda: Placement.linear(2, [0, 1], 2).with_replicas({0: 2}), "already on every expert rank"),
        (lambda: Placement.linear(2, [0, 1], 2).with_replicas({5: 1}), "expert 5"),
        (lambda: Placement.linear(2, [0, 1], 2).with_replicas([(0, 0)]), "rank 0 already hosts expert 0"),
        (lambda: Placement.linear(2, [0, 1], 2).with_replicas([(0, 7)]), "rank 7"),
        (lambda: Placement.linear(2, [0, 1], 2).rebalanced([1.0], 1), "load has 1 entries"),
        (lambda: Placement.linear(2, [0, 1], 2).rebalanced([1.0, -1.0], 1), "load must be"),
        (lambda: Placement.linear(2, [0, 1], 2).rebalanced([1.0, float("nan")], 1), "load must be"),
        (lambda: Placement.linear(2, [0, 1], 2).rebalanced([1.0, 1.0], 3), "n_extra_slots .* got 3"),
        (lambda: Placement.from_dict({"slots": [[0]]}), "n_experts"),
        (lambda: Placement.from_dict({"n_experts": 1, "slots": [[0]], "version": "x"}), "version"),
        (lambda: Placement.linear(2, [0], 1).local_experts(1), "rank 1"),
        (lambda: Placement.linear(2, [0], 1).replicas(2), "expert 2"),
    ],
)
def test_invalid_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- group-aligned placement and fan-out ------------------------------------------------------------

import itertools  # noqa: E402
from dataclasses import replace  # noqa: E402
from math import comb  # noqa: E402

from dist_utils import run_ranks  # noqa: E402

from dsray.config import preset  # noqa: E402
from dsray.model.moe import Gate  # noqa: E402
from dsray.parallel import rebalance as rb  # noqa: E402
from dsray.parallel.dispatch import AllToAllDispatcher  # noqa: E402
from dsray.parallel.placement import bytes_moved, moved_slots  # noqa: E402


def _nodes(n_nodes: int, per_node: int, interleaved: bool = False) -> list[str]:
    """Node name of each rank: blocks of `per_node` ranks, or rank r on node r % n_nodes."""
    return [f"n{(r % n_nodes) if interleaved else (r // per_node)}" for r in range(n_nodes * per_node)]


def _check_grouped(p: Placement, n_group: int, ranks: list[int], node_of_rank: list[str] | None) -> None:
    """The properties `Placement.grouped` promises, checked from the table alone."""
    E = p.n_experts
    g = E // n_group
    node = node_of_rank or ["all"] * p.world_size
    shards_of = {n: [r for r in ranks if node[r] == n] for n in dict.fromkeys(node[r] for r in ranks)}
    groups_on: dict[str, list[int]] = {n: [] for n in shards_of}
    assert p.n_slots == E and all(not p.slots[r] for r in range(p.world_size) if r not in ranks)
    for grp in range(n_group):
        hosts = sorted({r for e in range(grp * g, (grp + 1) * g) for r, _ in p.replicas(e)})
        assert len({node[r] for r in hosts}) == 1, f"group {grp} spans nodes {hosts}"
        groups_on[node[hosts[0]]].append(grp)
    for n, shards in shards_of.items():
        m, s = len(groups_on[n]), len(shards)
        for grp in groups_on[n]:
            span = {r for e in range(grp * g, (grp + 1) * g) for r, _ in p.replicas(e)}
            if m >= s:  # whole groups: one shard each
                assert len(span) == 1, f"node {n}: {m} groups on {s} shards, group {grp} on {span}"
            else:  # split over floor/ceil(s/m) shards of its own (fewer when the group has fewer experts)
                assert len(span) in {min(g, s // m), min(g, -(-s // m))}, (n, grp, span)
                assert all(set(p.slots[r]) <= set(range(grp * g, (grp + 1) * g)) for r in span)
    sizes = [len(s) for s in shards_of.values()]
    if len(set(sizes)) == 1:  # equal nodes: groups per node within one, shard counts within one group
        counts = [len(groups_on[n]) for n in shards_of]
        assert max(counts) - min(counts) <= 1, counts
        per_shard = [len(p.slots[r]) for r in ranks]
        assert max(per_shard) - min(per_shard) <= g, per_shard


@pytest.mark.parametrize(
    "E, G, n_nodes, per_node",
    [(256, 8, 1, 8), (256, 8, 1, 6), (256, 8, 1, 12), (256, 8, 2, 8), (256, 8, 3, 8), (256, 8, 8, 8),
     (256, 8, 3, 1), (64, 8, 1, 5), (64, 8, 4, 3), (16, 4, 5, 2), (16, 4, 1, 10), (12, 3, 2, 4)],
)
def test_grouped_properties(E, G, n_nodes, per_node):
    S = n_nodes * per_node
    for node_of_rank in ([None] if n_nodes == 1 else [_nodes(n_nodes, per_node), _nodes(n_nodes, per_node, True)]):
        p = Placement.grouped(E, G, list(range(S)), S, node_of_rank)
        _check_grouped(p, G, list(range(S)), node_of_rank)


def test_grouped_hand_cases_and_driver_ranks():
    # V3 on 8 shards: one group per shard, the same table as linear
    assert Placement.grouped(256, 8, range(8), 8).slots == Placement.linear(256, range(8), 8).slots
    # 8 groups of 2 on 3 shards of one node: 3, 3, 2 whole groups
    p = Placement.grouped(16, 8, [1, 2, 3], 4)
    assert p.slots == ((), tuple(range(0, 6)), tuple(range(6, 12)), tuple(range(12, 16)))
    # 2 groups of 4 on 3 shards: group 0 split over 2 shards, group 1 whole on the third (counts 2, 2, 4)
    assert Placement.grouped(8, 2, [0, 1, 2], 3).slots == ((0, 1), (2, 3), (4, 5, 6, 7))
    # interleaved nodes: each group stays on its node's shards (ranks 0, 2 on "a"; 1, 3 on "b")
    q = Placement.grouped(8, 2, [0, 1, 2, 3], 4, ["a", "b", "a", "b"])
    assert q.slots == ((0, 1), (4, 5), (2, 3), (6, 7))
    # unequal nodes: node "a" has 1 shard, node "b" 3; 2 groups of 6 -> one per node
    u = Placement.grouped(12, 2, [0, 1, 2, 3], 4, ["a", "b", "b", "b"])
    assert u.slots == ((0, 1, 2, 3, 4, 5), (6, 7), (8, 9), (10, 11))
    # unequal nodes, the busiest shard decides: 2 groups of 4 on nodes of 1 and 4 shards both go to the
    # 4-shard node (2 experts per shard) rather than 4 experts on the lone shard
    assert Placement.grouped(8, 2, range(5), 5, ["a", "b", "b", "b", "b"]).slots == \
        ((), (0, 1), (2, 3), (4, 5), (6, 7))
    # more nodes than groups: the third node's shard hosts nothing
    assert Placement.grouped(4, 2, [0, 1, 2], 3, ["a", "b", "c"]).slots == ((0, 1), (2, 3), ())


def test_max_fanout_hand_cases():
    lin = Placement.linear(8, [0, 1, 2, 3], 4)  # group j (2 experts) on rank j
    assert lin.max_fanout(4, 2) == 2 and lin.max_fanout(4, 2, top_k=1) == 1 and lin.max_fanout(4, 4) == 4
    rr = Placement.round_robin(8, [0, 1, 2, 3], 4)  # group j on ranks 2j % 4, 2j % 4 + 1
    assert rr.max_fanout(4, 1) == 2 and rr.max_fanout(4, 2) == 4 and rr.max_fanout(4, 2, top_k=3) == 3
    # a replica of expert 0 on rank 3: group 0 (experts 0, 1) can now reach ranks 0 and 3
    rep = lin.with_replicas([(0, 3)])
    assert lin.max_fanout(4, 1) == 1 and rep.max_fanout(4, 1) == 2 and rep.max_fanout(4, 1, top_k=1) == 1
    # nodes: ranks 0, 1 on "a", 2, 3 on "b"; any two groups reach both nodes under round robin
    assert rr.max_fanout(4, 1, node_of_rank=["a", "a", "b", "b"]) == 1
    assert rr.max_fanout(2, 1, node_of_rank=["a", "a", "b", "b"]) == 2
    # a matching, not a union: two experts on the same two ranks reach 2 ranks, three need a third rank
    both = Placement.from_table([[0, 1], [0, 1], [2, 3]], 4, 3)  # group 0 = experts 0, 1 on ranks 0 and 1
    assert both.max_fanout(2, 1) == 2 and both.max_fanout(2, 1, top_k=1) == 1 and both.max_fanout(1, 1) == 3
    # experts 0 and 1 only on rank 0, expert 2 on ranks 1 and 2: 3 experts and 3 ranks in the union, but
    # a token reaches at most 2 ranks (a matching, Hall's condition fails for {0, 1})
    assert Placement.from_table([[0, 1], [2], [2]], 3, 3).max_fanout(1, 1) == 2
    # three experts that can each go to only ranks 0 or 1 still reach two ranks, not three
    trio = Placement.from_table([[0, 1, 2], [0, 1, 2], [3, 4, 5]], 6, 3)  # group 0 = experts 0-2
    assert trio.max_fanout(2, 1, top_k=3) == 2 and trio.max_fanout(2, 2, top_k=3) == 3


def _gate(E: int, G: int, topk_group: int, K: int, T: int, seed: int) -> torch.Tensor:
    """ids_TK from the real Gate (noaux_tc, sigmoid) with random weights, bias and inputs."""
    cfg = replace(preset("debug"), n_routed_experts=E, n_group=G, topk_group=topk_group, num_experts_per_tok=K)
    torch.manual_seed(seed)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias.normal_(std=0.1)
    with torch.no_grad():
        _, ids_TK, _ = gate(torch.randn(T, cfg.hidden_size))
    g = E // G
    assert ((ids_TK // g).sort(1).values.diff(dim=1) != 0).sum(1).add(1).max() <= topk_group  # group-limited
    return ids_TK


@pytest.mark.parametrize("E, G, topk_group, K, n_nodes, per_node", [(64, 8, 4, 8, 8, 2), (64, 8, 4, 8, 2, 6),
                                                                   (32, 8, 2, 4, 4, 3), (64, 8, 4, 8, 1, 12)])
def test_fanout_bound_holds_on_real_gate_routing(E, G, topk_group, K, n_nodes, per_node):
    S = n_nodes * per_node
    ids_TK = _gate(E, G, topk_group, K, T=4096, seed=E + S)
    for interleaved in (False, True):
        nodes = _nodes(n_nodes, per_node, interleaved)
        grouped = Placement.grouped(E, G, range(S), S, nodes)
        for p in (grouped, Placement.linear(E, range(S), S), Placement.round_robin(E, range(S), S),
                  grouped.rebalanced([1.0 + (e % 5) ** 2 for e in range(E)], E // 4, tolerance=0.05)):
            for unit in (None, nodes):
                bound = p.max_fanout(G, topk_group, K, node_of_rank=unit)
                for src in (0, S - 1):
                    measured = p.destinations(ids_TK, src, node_of_rank=unit)
                    assert measured.shape == (4096,) and measured.min() >= 1
                    assert measured.max() <= bound, (p.slots, unit, bound, measured.max())
        # the group-aligned table: a token reaches at most topk_group nodes, and that many often
        node_fanout = grouped.destinations(ids_TK, node_of_rank=nodes)
        if n_nodes >= topk_group:
            assert grouped.max_fanout(G, topk_group, K, node_of_rank=nodes) == topk_group
            assert node_fanout.max() == topk_group
        assert grouped.max_fanout(G, topk_group, K, node_of_rank=nodes) <= \
            Placement.round_robin(E, range(S), S).max_fanout(G, topk_group, K, node_of_rank=nodes)


def test_max_fanout_large_group_count_is_an_upper_bound():
    p = Placement.grouped(128, 64, range(16), 16)  # 64 groups of 2, 4 per shard
    assert comb(64, 8) > rb.MAX_GROUP_SUBSETS
    assert p.max_fanout(64, 8, top_k=8) == 8  # min(top_k, 8 groups x 1 shard, 16 shards)
    assert p.max_fanout(64, 8) == 8


def test_destinations_replica_rule_hand_case():
    p = Placement.from_table([[0, 1], [0]], 2, 2)  # expert 0 on ranks 0 and 1, expert 1 on rank 0
    ids = torch.tensor([[0, 1], [0, 1], [1, 0]])
    # source 0: expert 0's assignments 0, 1, 2 -> replicas 0, 1, 0; source 1 -> 1, 0, 1
    assert p.chosen_replicas(ids, 0).tolist() == [[0, 0], [1, 0], [0, 0]]
    assert p.destinations(ids, 0).tolist() == [1, 2, 1]
    assert p.destinations(ids, 1).tolist() == [2, 1, 2]
    assert p.destinations(ids, 1, node_of_rank=["x", "x"]).tolist() == [1, 1, 1]
    assert p.destinations(ids[:, :0]).tolist() == [0, 0, 0]


def _dispatch_counts(rank: int, world_size: int, spec: dict) -> list[int]:
    d = AllToAllDispatcher(Placement.from_dict(spec["placement"]))
    ids = spec["ids"][rank]
    with torch.no_grad():
        _, counts, _ = d.dispatch(torch.zeros(ids.shape[0], 4), torch.ones(ids.shape, dtype=torch.float32), ids)
    return counts


def test_chosen_replicas_match_the_dispatcher():
    """Rows per (rank, slot) predicted from `chosen_replicas` on every source rank equal what the real
    AllToAllDispatcher delivers over gloo (3 ranks, replicated hot experts)."""
    p = Placement.round_robin(9, [0, 1, 2], 3).rebalanced([1, 40, 1, 1, 25, 1, 1, 1, 3], 4)
    g = torch.Generator().manual_seed(3)
    ids = [torch.multinomial(torch.tensor([1., 40, 1, 1, 25, 1, 1, 1, 3]).expand(T, 9), 3, generator=g)
           for T in (23, 17, 0)]
    rt = p.route_table()
    expected = [[0] * len(p.slots[r]) for r in range(3)]
    for src, ids_TK in enumerate(ids):
        rep = p.chosen_replicas(ids_TK, src)
        for rank, slot in zip(rt.rank_ER[ids_TK, rep].flatten().tolist(), rt.slot_ER[ids_TK, rep].flatten().tolist()):
            expected[rank][slot] += 1
    assert run_ranks(_dispatch_counts, 3, {"placement": p.to_dict(), "ids": ids}) == expected


# ---- EPLB from scratch, migration-aware rebalancing, bytes moved -------------------------------------

def test_eplb_hand_case_and_slot_budget():
    # 6 experts on 3 ranks, 1 extra slot: expert 0 gets 2 replicas of weight 5; 7 slots -> 3, 2, 2
    p = Placement.eplb([10, 1, 1, 1, 1, 1], 6, [0, 1, 2], 3, 1)
    assert p.slots == ((0, 4), (0, 5), (1, 2, 3)) and p.version == 0
    assert p.rank_loads([10, 1, 1, 1, 1, 1]) == [6.0, 6.0, 3.0]
    # driver ranks host nothing; slot counts floor/ceil; replica counts by load per replica
    load = [float(x) for x in torch.rand(40, generator=torch.Generator().manual_seed(0)) ** 4 * 100]
    q = Placement.eplb(load, 40, [1, 3, 4], 5, 11)
    assert q.slots[0] == () and q.slots[2] == () and sorted(q.experts_per_rank()) == [0, 0, 17, 17, 17]
    assert q.n_replicas.tolist() == rb.replica_counts(load, 11, 3)


def _drifting_trace(E: int, steps: int, sigma: float, seed: int) -> list[list[float]]:
    """Zipf(1.1) loads over a popularity order that drifts: each expert's latent score random-walks."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(E, generator=g)
    out = []
    for _ in range(steps):
        u = u + sigma * torch.randn(E, generator=g)
        rank = torch.argsort(torch.argsort(-u))
        out.append((4096.0 / (rank + 1.0) ** 1.1).tolist())
    return out


@pytest.mark.parametrize("E, S, extra, tol", [(64, 8, 16, 0.05), (256, 8, 32, 0.05), (64, 8, 8, 0.0), (64, 16, 0, 0.1)])
def test_migration_aware_rebalance_on_drifting_trace(E, S, extra, tol):
    ranks = list(range(S))
    mig = scratch = Placement.linear(E, ranks, S)
    moved_mig = moved_scratch = 0
    for load in _drifting_trace(E, steps=8, sigma=0.4, seed=E + S):
        ref = Placement.eplb(load, E, ranks, S, extra)
        new = mig.rebalanced(load, extra, tolerance=tol)
        assert new.version == mig.version + 1 and new.n_slots == E + extra
        assert new.n_replicas.tolist() == ref.n_replicas.tolist()
        assert sorted(new.experts_per_rank()) == sorted(ref.experts_per_rank())  # same slot budget
        assert max(new.rank_loads(load)) <= (1 + tol) * max(ref.rank_loads(load)) * (1 + 1e-9)
        # never more than rebuilding from scratch from the same starting point (by construction)
        assert moved_slots(mig, new) <= moved_slots(mig, ref)
        moved_mig += moved_slots(mig, new)
        moved_scratch += moved_slots(scratch, ref)
        mig, scratch = new, ref
    assert moved_mig <= moved_scratch
    if tol > 0:
        assert moved_mig < 0.25 * moved_scratch, (moved_mig, moved_scratch)


def test_migration_aware_at_zero_tolerance_is_eplb_on_the_best_ranks():
    """tolerance=0: exactly EPLB's balance or better, and never more moves than EPLB's bins on their
    best assignment to ranks (`relabel`, itself checked by brute force below). On this trace the
    sticky and repair candidates rarely meet zero tolerance, so the relabelled bins are what wins."""
    E, S, extra = 64, 8, 16
    mig = Placement.linear(E, range(S), S)
    fewer = 0
    for load in _drifting_trace(E, steps=6, sigma=0.5, seed=1):
        ref = Placement.eplb(load, E, range(S), S, extra)
        new = mig.rebalanced(load, extra, tolerance=0.0)
        assert max(new.rank_loads(load)) <= max(ref.rank_loads(load)) * (1 + 1e-9)
        perm = rb.relabel([list(b) for b in ref.slots], [set(b) for b in mig.slots])
        best = sum(len(set(ref.slots[i]) - set(mig.slots[perm[i]])) for i in range(S))
        assert moved_slots(mig, new) <= best <= moved_slots(mig, ref)
        fewer += best < moved_slots(mig, ref)
        mig = new
    assert fewer >= 3  # the relabelling matters on this trace


def test_migration_aware_keeps_a_balanced_placement_and_default_is_unchanged():
    load = [float(x) for x in range(1, 33)]
    ref = Placement.eplb(load, 32, [0, 1, 2, 3], 4, 4)
    again = ref.rebalanced(load, 4, tolerance=0.0)
    assert moved_slots(ref, again) == 0 and again.version == 1
    # slot order: kept slots first in their old order, new ones appended
    p = Placement.linear(8, [0, 1, 2], 3)
    q = p.rebalanced([1, 1, 1, 1, 1, 1, 1, 90], 2, tolerance=0.1)
    for r in range(3):
        kept = [e for e in p.slots[r] if e in q.slots[r]]
        assert list(q.slots[r][:len(kept)]) == kept
    assert q.n_replicas.tolist() == [1, 1, 1, 1, 1, 1, 1, 3]
    # tolerance=None is the home-keeping rule of test_rebalanced_moves_replicas_to_hot_experts
    assert p.rebalanced([1, 1, 1, 1, 1, 1, 1, 90], 2, tolerance=None).slots == p.rebalanced(
        [1, 1, 1, 1, 1, 1, 1, 90], 2).slots == ((0, 1, 2, 7), (3, 4, 5, 7), (6, 7))


def test_relabel_finds_the_best_permutation():
    bins = [[0, 1], [2, 3], [4, 5]]
    old = [{4, 5}, {0, 9}, {2, 3}]
    assert rb.relabel(bins, old) == [1, 2, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # brute force over all permutations of 5 bins
        bins = [torch.randperm(12, generator=g)[:4].tolist() for _ in range(5)]
        old = [set(torch.randperm(12, generator=g)[:4].tolist()) for _ in range(5)]
        score = lambda perm: sum(len(old[perm[i]].intersection(b)) for i, b in enumerate(bins))  # noqa: E731
        assert score(rb.relabel(bins, old)) == max(score(p) for p in itertools.permutations(range(5)))


def test_bytes_moved_hand_cases():
    old = Placement.linear(4, [0, 1], 2)  # (0, 1), (2, 3)
    v3_expert = 3 * 7168 * 2048 * 2
    assert bytes_moved(old, old, v3_expert) == 0
    assert moved_slots(old, Placement.from_table([[1, 0], [3, 2]], 4, 2)) == 0  # reordering is free
    new = Placement.from_table([[0, 2], [2, 3, 1]], 4, 2)  # rank 0 gains 2, rank 1 gains 1; dropping is free
    assert moved_slots(old, new) == 2 and bytes_moved(old, new, v3_expert) == 2 * 88_080_384
    assert bytes_moved(old, new, 3 * v3_expert) == 6 * 88_080_384  # weights + AdamW moments
    grown = Placement.from_table([[0, 1], [2, 3], [3, 0]], 4, 3)  # a new rank starts empty
    assert moved_slots(old, grown) == 2 and moved_slots(grown, old) == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Placement.grouped(10, 3, [0], 1), r"n_group .* n_experts=10, got 3"),
        (lambda: Placement.grouped(8, 0, [0], 1), "n_group"),
        (lambda: Placement.grouped(0, 1, [0], 1), "n_experts"),
        (lambda: Placement.grouped(8, 2, [0, 1], 2, ["a"]), r"node_of_rank .* \(2\)"),
        (lambda: Placement.grouped(8, 2, [0, 1], 2, ["a", None]), r"node_of_rank entries .* \[None\]"),
        (lambda: Placement.grouped(8, 2, [0, 5], 2), r"rank\(s\) \[5\]"),
        (lambda: Placement.linear(8, [0, 1], 2).max_fanout(3, 1), "n_group"),
        (lambda: Placement.linear(8, [0, 1], 2).max_fanout(4, 5), r"topk_group .* got 5"),
        (lambda: Placement.linear(8, [0, 1], 2).max_fanout(4, 2, top_k=5), r"top_k .* = 4\], got 5"),
        (lambda: Placement.linear(8, [0, 1], 2).max_fanout(4, 2, node_of_rank="ab"), "node_of_rank"),
        (lambda: Placement.linear(8, [0, 1], 2).destinations(torch.zeros(2, 2)), "integer"),
        (lambda: Placement.linear(8, [0, 1], 2).destinations(torch.tensor([[8]])), r"outside \[0, 8\)"),
        (lambda: Placement.linear(8, [0, 1], 2).destinations(torch.tensor([[1]]), source_rank=2), "rank 2"),
        (lambda: Placement.eplb([1.0], 2, [0, 1], 2, 0), "eplb: load has 1 entries"),
        (lambda: Placement.eplb([1.0, float("inf")], 2, [0, 1], 2, 0), "eplb: load must be"),
        (lambda: Placement.eplb([1.0, 1.0], 2, [0, 1], 2, 3), r"eplb: n_extra_slots .* got 3"),
        (lambda: Placement.linear(2, [0, 1], 2).rebalanced([1.0, 1.0], 1, tolerance=-0.1), "tolerance .* -0.1"),
        (lambda: Placement.linear(2, [0, 1], 2).rebalanced([1.0, 1.0], 1, tolerance=float("nan")), "tolerance"),
        (lambda: moved_slots(Placement.linear(2, [0], 1), Placement.linear(3, [0], 1)), "n_experts differ"),
        (lambda: bytes_moved(Placement.linear(2, [0], 1), Placement.linear(2, [0], 1), -1), "bytes_per_expert .* -1"),
        (lambda: Placement.linear(2, [0], 1).rank_loads([1.0]), "rank_loads: load has 1"),
    ],
)
def test_new_api_invalid_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()
