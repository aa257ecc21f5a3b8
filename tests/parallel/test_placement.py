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
