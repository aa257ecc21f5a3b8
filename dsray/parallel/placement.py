"""Expert placement: which rank hosts which routed experts, in which local slot.

A `Placement` is an immutable, versioned table. `slots[rank]` lists the logical expert ids hosted by
`rank` in local-slot order (local slot index = position in the tuple). An expert may be hosted by
several ranks (replicas of a hot expert); a rank hosts an expert at most once; driver ranks host none.
Every change (`with_replicas`, `rebalanced`) returns a new Placement with `version + 1`, so ranks can
check that they dispatch with the same table (the dispatcher exchanges the version with the counts).

Group-aligned placement (`grouped`) makes the gate's group-limited routing bound the fan-out
(`max_fanout`, measured per token by `destinations`); `eplb` is DeepSeek's EPLB from scratch and
`rebalanced(..., tolerance=...)` its migration-aware variant, compared by `moved_slots`/`bytes_moved`.
The algorithms live in `dsray/parallel/rebalance.py`.

Rank numbers are ranks of the expert-parallel process group, not global ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from dsray.parallel import rebalance as rb
from dsray.parallel.rebalance import bytes_moved, moved_slots

__all__ = ["Placement", "RouteTable", "bytes_moved", "moved_slots"]


@dataclass(frozen=True)
class RouteTable:
    """Device tensors the dispatchers index with logical expert ids.

    Replica j of expert e (0 <= j < n_replicas[e]) lives on rank `rank_ER[e, j]` in local slot
    `slot_ER[e, j]`; entries j >= n_replicas[e] are padding (-1). Replicas are in rank order.
    """

    rank_ER: torch.Tensor  # int64 [n_experts, max_replicas]
    slot_ER: torch.Tensor  # int64 [n_experts, max_replicas]
    n_replicas: torch.Tensor  # int64 [n_experts]
    max_replicas: int
    max_slots: int  # max experts on any one rank (>= 1): the row stride of the count matrix


@dataclass(frozen=True)
class Placement:
    """Where each logical routed expert lives: `slots[rank]` is the tuple of logical expert ids hosted
    by that rank, in local-slot order. An expert may appear on several ranks (replicas). Ranks with no
    experts (driver ranks) have an empty tuple. Versioned: every change makes a new version."""

    n_experts: int
    slots: tuple[tuple[int, ...], ...]  # len == world_size
    version: int = 0
    _replicas: tuple[tuple[tuple[int, int], ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int) or self.n_experts < 1:
            raise ValueError(f"Placement.n_experts must be an int >= 1, got {self.n_experts!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"Placement.version must be an int >= 0, got {self.version!r}")
        if isinstance(self.slots, (str, bytes)) or not isinstance(self.slots, Sequence):
            raise ValueError(f"Placement.slots must be a sequence of per-rank sequences, got {self.slots!r}")
        if len(self.slots) < 1:
            raise ValueError(f"Placement.slots must have one entry per rank (world_size >= 1), got {self.slots!r}")
        slots: list[tuple[int, ...]] = []
        for rank, experts in enumerate(self.slots):
            if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence):
                raise ValueError(f"Placement.slots[{rank}] must be a sequence of expert ids, got {experts!r}")
            for e in experts:
                if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.n_experts:
                    raise ValueError(
                        f"Placement.slots[{rank}] has expert id {e!r} outside [0, {self.n_experts})"
                    )
            if len(set(experts)) != len(experts):
                dup = sorted({e for e in experts if list(experts).count(e) > 1})
                raise ValueError(f"Placement.slots[{rank}] hosts expert(s) {dup} more than once")
            slots.append(tuple(int(e) for e in experts))
        replicas: list[list[tuple[int, int]]] = [[] for _ in range(self.n_experts)]
        for rank, experts in enumerate(slots):
            for slot, e in enumerate(experts):
                replicas[e].append((rank, slot))
        missing = [e for e in range(self.n_experts) if not replicas[e]]
        if missing:
            raise ValueError(f"Placement.slots hosts no replica of expert(s) {missing}")
        # Frozen dataclass: normalise lists to tuples once, here.
        object.__setattr__(self, "slots", tuple(slots))
        object.__setattr__(self, "_replicas", tuple(tuple(r) for r in replicas))

    # ---- queries -------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return len(self.slots)

    @property
    def expert_ranks(self) -> list[int]:
        """Ranks hosting at least one expert."""
        return [r for r, s in enumerate(self.slots) if s]

    @property
    def n_slots(self) -> int:
        """Total expert slots over all ranks (n_experts + number of extra replicas)."""
        return sum(len(s) for s in self.slots)

    def local_experts(self, rank: int) -> tuple[int, ...]:
        self._check_rank(rank)
        return self.slots[rank]

    def replicas(self, expert: int) -> list[tuple[int, int]]:
        """`(rank, local_slot)` of every replica of `expert`, in rank order."""
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert {expert!r} outside [0, {self.n_experts})")
        return list(self._replicas[expert])

    @cached_property
    def n_replicas(self) -> torch.Tensor:
        """int64 [n_experts]: number of ranks hosting each expert."""
        return torch.tensor([len(r) for r in self._replicas], dtype=torch.int64)

    def experts_per_rank(self) -> list[int]:
        return [len(s) for s in self.slots]

    def route_table(self, device: torch.device | str = "cpu") -> RouteTable:
        max_r = max(len(r) for r in self._replicas)
        rank_ER = torch.full((self.n_experts, max_r), -1, dtype=torch.int64)
        slot_ER = torch.full((self.n_experts, max_r), -1, dtype=torch.int64)
        for e, reps in enumerate(self._replicas):
            for j, (rank, slot) in enumerate(reps):
                rank_ER[e, j] = rank
                slot_ER[e, j] = slot
        return RouteTable(
            rank_ER=rank_ER.to(device),
            slot_ER=slot_ER.to(device),
            n_replicas=self.n_replicas.to(device),
            max_replicas=max_r,
            max_slots=max(1, max(self.experts_per_rank())),
        )

    def rank_loads(self, load: Sequence[float]) -> list[float]:
        """Per-rank load when each expert's `load` is split evenly over its replicas (the dispatcher's
        rotation splits it to within one row per source rank)."""
        load = _check_load(load, self.n_experts, "rank_loads")
        return [sum(load[e] / len(self._replicas[e]) for e in s) for s in self.slots]

    def max_fanout(self, n_group: int, topk_group: int, top_k: int | None = None,
                   node_of_rank: Sequence[str] | None = None) -> int:
        """Worst-case number of distinct destination ranks (nodes, given `node_of_rank`) of one token
        under group-limited routing: `topk_group` of `n_group` contiguous expert groups kept, `top_k`
        experts among them (None: no top-k cap). Any replica counts (the dispatcher's rotation can pick
        each). Exact when C(n_group, topk_group) <= rebalance.MAX_GROUP_SUBSETS, else an upper bound."""
        rb.check_groups(self.n_experts, n_group, "max_fanout")
        if isinstance(topk_group, bool) or not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"max_fanout: topk_group must be an int in [1, n_group={n_group}], got {topk_group!r}")
        g = self.n_experts // n_group
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= topk_group * g):
            raise ValueError(f"max_fanout: top_k must be an int in [1, topk_group x group size = {topk_group * g}], "
                             f"got {top_k!r}")
        unit = rb.node_index(node_of_rank, self.world_size, "max_fanout")
        dest = [[sorted({unit[r] for r, _ in self._replicas[e]}) for e in range(grp * g, (grp + 1) * g)]
                for grp in range(n_group)]
        return rb.max_reach(dest, topk_group, top_k)[0]

    def chosen_replicas(self, ids_TK: torch.Tensor, source_rank: int = 0) -> torch.Tensor:
        """int64 [T, K]: which replica j of expert ids_TK[t, k] (a column of `route_table().rank_ER`) the
        dispatcher on `source_rank` sends assignment (t, k) to. The rule of dispatch.py: the i-th
        assignment of expert e in row-major (t, k) order goes to replica (i + source_rank) % n_replicas[e]."""
        if ids_TK.dim() != 2 or ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
            raise ValueError(f"ids_TK must be an integer [T, K] tensor, got {ids_TK.dtype} {tuple(ids_TK.shape)}")
        self._check_rank(source_rank)
        ids_N = ids_TK.reshape(-1).to(torch.int64)
        if ids_N.numel() and (int(ids_N.min()) < 0 or int(ids_N.max()) >= self.n_experts):  # host sync
            raise ValueError(f"ids_TK has expert ids outside [0, {self.n_experts})")
        n_rep = self.n_replicas.to(ids_N.device)
        sorted_e, by_e = torch.sort(ids_N, stable=True)
        per_e = torch.bincount(ids_N, minlength=self.n_experts)
        i_sorted = torch.arange(ids_N.numel(), device=ids_N.device) - (torch.cumsum(per_e, 0) - per_e)[sorted_e]
        i_N = torch.empty_like(i_sorted)
        i_N[by_e] = i_sorted
        return ((i_N + source_rank) % n_rep[ids_N]).view(ids_TK.shape)

    def destinations(self, ids_TK: torch.Tensor, source_rank: int = 0,
                     node_of_rank: Sequence[str] | None = None) -> torch.Tensor:
        """int64 [T]: distinct destination ranks (nodes, given `node_of_rank`) of each token routed to
        `ids_TK` from `source_rank`, replicas chosen as the dispatcher does (`chosen_replicas`)."""
        rep_TK = self.chosen_replicas(ids_TK, source_rank)
        T, K = ids_TK.shape
        dest_TK = self.route_table(ids_TK.device).rank_ER[ids_TK.to(torch.int64), rep_TK]
        if node_of_rank is not None:
            unit = rb.node_index(node_of_rank, self.world_size, "destinations")
            dest_TK = torch.tensor(unit, dtype=torch.int64, device=dest_TK.device)[dest_TK]
        if K == 0:
            return torch.zeros(T, dtype=torch.int64, device=ids_TK.device)
        d_TK = dest_TK.sort(dim=1).values
        return 1 + (d_TK[:, 1:] != d_TK[:, :-1]).sum(dim=1)

    # ---- constructors --------------------------------------------------------------------------

    @classmethod
    def linear(cls, n_experts: int, expert_ranks: Sequence[int], world_size: int) -> Placement:
        """Contiguous blocks of expert ids over `expert_ranks`, in the given order; the first
        `n_experts % len(expert_ranks)` ranks get one extra (8 over 3 ranks: 3, 3, 2)."""
        ranks = _check_expert_ranks(expert_ranks, world_size)
        slots: list[list[int]] = [[] for _ in range(world_size)]
        base, extra = divmod(n_experts, len(ranks))
        start = 0
        for i, r in enumerate(ranks):
            n = base + (1 if i < extra else 0)
            slots[r] = list(range(start, start + n))
            start += n
        return cls(n_experts, tuple(tuple(s) for s in slots))

    @classmethod
    def round_robin(cls, n_experts: int, expert_ranks: Sequence[int], world_size: int) -> Placement:
        """Expert e on `expert_ranks[e % len(expert_ranks)]`."""
        ranks = _check_expert_ranks(expert_ranks, world_size)
        slots: list[list[int]] = [[] for _ in range(world_size)]
        for e in range(n_experts):
            slots[ranks[e % len(ranks)]].append(e)
        return cls(n_experts, tuple(tuple(s) for s in slots))

    @classmethod
    def grouped(cls, n_experts: int, n_group: int, expert_ranks: Sequence[int], world_size: int,
                node_of_rank: Sequence[str] | None = None) -> Placement:
        """Every gate group (experts grp*g .. grp*g+g-1, g = n_experts / n_group) on as few shards as
        possible and, given `node_of_rank` (one node name per rank of the group), on one node.

        Nodes are taken in order of first appearance in `expert_ranks`, their shards in that order;
        without `node_of_rank` all shards form one node. Groups are spread evenly over nodes (to the
        node whose busiest shard grows least), then over each node's shards: with m groups on s
        shards, m >= s gives floor/ceil(m/s) whole groups per shard; m < s splits each group
        contiguously over floor/ceil(s/m) shards of its own. A token that keeps `topk_group` groups
        then reaches at most `topk_group` nodes and topk_group x ceil(s/m) shards (`max_fanout`).

        Balance: with nodes of equal size (or no `node_of_rank`), expert counts per shard differ by at
        most g, one group: whole groups are the unit when m >= s (floor/ceil(m/s) groups per shard, and
        m itself is floor/ceil(G/N) per node), and a shard holding part of one group holds 1..g experts.
        Splitting a group over shards to even the counts further would raise the fan-out bound. Unequal
        nodes: the same greedy, no bound claimed. Shards of a node left without a group (more nodes
        than groups) host nothing."""
        ranks = _check_expert_ranks(expert_ranks, world_size)
        rb.check_groups(n_experts, n_group, "grouped")
        nodes: dict[int, list[int]] = {}
        unit = rb.node_index(node_of_rank, world_size, "grouped") if node_of_rank is not None else [0] * world_size
        for r in ranks:
            nodes.setdefault(unit[r], []).append(r)
        slots: list[list[int]] = [[] for _ in range(world_size)]
        for r, experts in rb.group_layout(n_experts, n_group, list(nodes.values())).items():
            slots[r] = experts
        return cls(n_experts, tuple(tuple(s) for s in slots))

    @classmethod
    def eplb(cls, load: Sequence[float], n_experts: int, expert_ranks: Sequence[int], world_size: int,
             n_extra_slots: int) -> Placement:
        """DeepSeek EPLB's global policy from scratch, ignoring where experts are now (its README: the
        cost of moving weights is not considered): `n_extra_slots` replicas to the experts with the
        highest load per replica, then replicas heaviest first onto the least-loaded rank with room that
        does not host the expert; every rank ends with floor/ceil(slots / ranks) slots, sorted by id."""
        ranks = _check_expert_ranks(expert_ranks, world_size)
        load = _check_load(load, n_experts, "eplb")
        _check_extra(n_extra_slots, n_experts, len(ranks), "eplb")
        bins = rb.pack(rb.replica_counts(load, n_extra_slots, len(ranks)), load, len(ranks))
        slots: list[tuple[int, ...]] = [() for _ in range(world_size)]
        for i, r in enumerate(ranks):
            slots[r] = tuple(sorted(bins[i]))
        return cls(n_experts, tuple(slots))

    @classmethod
    def from_table(
        cls,
        table: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
        n_experts: int,
        world_size: int,
        version: int = 0,
    ) -> Placement:
        """From `{rank: experts}` (ranks not named host nothing) or a per-rank list of length
        `world_size`."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(table, Mapping):
            bad = [r for r in table if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world_size]
            if bad:
                raise ValueError(f"table has rank(s) {bad} outside [0, {world_size})")
            slots = tuple(tuple(table.get(r, ())) for r in range(world_size))
        else:
            if len(table) != world_size:
                raise ValueError(f"table has {len(table)} rank entries, world_size is {world_size}")
            slots = tuple(tuple(s) for s in table)
        return cls(n_experts, slots, version)

    # ---- changes (each returns version + 1) -----------------------------------------------------

    def with_replicas(self, extra: Mapping[int, int] | Sequence[tuple[int, int]]) -> Placement:
        """Add replica slots, appended after the target ranks' existing slots.

        `extra` is either `{expert: n_extra_replicas}` (each replica goes to the expert rank with the
        fewest slots that does not host the expert yet; ties to the lower rank) or a sequence of
        explicit `(expert, rank)` pairs.
        """
        slots = [list(s) for s in self.slots]
        if isinstance(extra, Mapping):
            candidates = self.expert_ranks
            for e, n in extra.items():
                if not 0 <= e < self.n_experts:
                    raise ValueError(f"with_replicas: expert {e!r} outside [0, {self.n_experts})")
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"with_replicas: count for expert {e} must be an int >= 0, got {n!r}")
                for _ in range(n):
                    free = [r for r in candidates if e not in slots[r]]
                    if not free:
                        raise ValueError(f"with_replicas: expert {e} is already on every expert rank {candidates}")
                    slots[min(free, key=lambda r: (len(slots[r]), r))].append(e)
        else:
            for pair in extra:
                if len(pair) != 2:
                    raise ValueError(f"with_replicas: expected (expert, rank) pairs, got {pair!r}")
                e, r = pair
                if not 0 <= r < self.world_size:
                    raise ValueError(f"with_replicas: rank {r!r} outside [0, {self.world_size})")
                if e in slots[r]:
                    raise ValueError(f"with_replicas: rank {r} already hosts expert {e}")
                slots[r].append(e)  # an out-of-range expert id is rejected by __post_init__
        return Placement(self.n_experts, tuple(tuple(s) for s in slots), self.version + 1)

    def rebalanced(self, load: Sequence[float], n_extra_slots: int, tolerance: float | None = None) -> Placement:
        """EPLB-style greedy replication for per-expert `load` (e.g. tokens routed last window).

        `tolerance` (migration-aware mode, `rebalance.migrate`): balance like `eplb` (same replica counts,
        floor/ceil slots per rank) with max rank load <= (1 + tolerance) x `eplb`'s for this `load`,
        moving as few slots as it finds. None: the rule below (homes never move).

        Replica counts start at one per expert; each of the `n_extra_slots` extra replicas goes to the
        expert with the highest load per replica. Each expert keeps its home slot (its replica with the
        lowest local slot index, ties to the lower rank: replicas are appended after home slots).
        Extra replicas are placed hottest expert first: an existing replica is kept if its rank has
        room (fewer weights move), otherwise the replica goes to the expert rank (a rank of this
        placement hosting >= 1 expert) with the least load per replica summed over its experts.
        Room: at most ceil(total slots / expert ranks) slots per rank. Surplus replicas are dropped.
        The result has exactly `n_experts + n_extra_slots` slots; kept slots keep their relative order.
        """
        load = _check_load(load, self.n_experts, "rebalanced")
        ranks = self.expert_ranks
        _check_extra(n_extra_slots, self.n_experts, len(ranks), "rebalanced")
        if tolerance is not None:
            return self._migrated(load, n_extra_slots, tolerance)
        count = rb.replica_counts(load, n_extra_slots, len(ranks))

        home = {(min(reps, key=lambda rs: (rs[1], rs[0]))[0], e) for e, reps in enumerate(self._replicas)}
        hosts: list[set[int]] = [set() for _ in range(self.world_size)]
        for r, e in home:
            hosts[r].add(e)
        room = max(-(-(self.n_experts + n_extra_slots) // len(ranks)), max(len(h) for h in hosts))
        new: list[list[int]] = [[] for _ in range(self.world_size)]

        def rank_load(r: int) -> float:
            return sum(load[e] / count[e] for e in hosts[r] | set(new[r]))

        for e in sorted(range(self.n_experts), key=lambda e: (-load[e] / count[e], e)):
            todo = count[e] - 1
            for r, _ in self._replicas[e]:
                if todo and e not in hosts[r] and len(hosts[r]) + len(new[r]) < room:
                    hosts[r].add(e)
                    todo -= 1
            for _ in range(todo):
                free = [r for r in ranks if e not in hosts[r] and e not in new[r]]
                roomy = [r for r in free if len(hosts[r]) + len(new[r]) < room] or free
                new[min(roomy, key=lambda r: (rank_load(r), len(hosts[r]) + len(new[r]), r))].append(e)
        slots = [[e for e in s if e in hosts[r]] + new[r] for r, s in enumerate(self.slots)]
        return Placement(self.n_experts, tuple(tuple(s) for s in slots), self.version + 1)

    def _migrated(self, load: list[float], n_extra_slots: int, tolerance: float) -> Placement:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
            raise ValueError(f"rebalanced: tolerance must be a finite number >= 0, got {tolerance!r}")
        ranks = self.expert_ranks
        count = rb.replica_counts(load, n_extra_slots, len(ranks))
        old = [set(self.slots[r]) for r in ranks]
        slots = [list(s) for s in self.slots]
        for r, new in zip(ranks, rb.migrate(count, load, old, tolerance)):
            # kept slots keep their relative order (their state does not move); new ones are appended
            slots[r] = [e for e in self.slots[r] if e in new] + [e for e in new if e not in self.slots[r]]
        return Placement(self.n_experts, tuple(tuple(s) for s in slots), self.version + 1)

    # ---- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"n_experts": self.n_experts, "slots": [list(s) for s in self.slots], "version": self.version}

    @classmethod
    def from_dict(cls, d: Mapping) -> Placement:
        missing = [k for k in ("n_experts", "slots") if k not in d]
        if missing:
            raise ValueError(f"Placement.from_dict: missing key(s) {missing} in {dict(d)!r}")
        slots = d["slots"]
        if isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence):
            raise ValueError(f"Placement.slots must be a list of lists, got {slots!r}")
        return cls(d["n_experts"], tuple(tuple(s) if isinstance(s, Sequence) else s for s in slots),
                   d.get("version", 0))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank!r} outside [0, {self.world_size})")


def _check_expert_ranks(expert_ranks: Sequence[int], world_size: int) -> list[int]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    ranks = list(expert_ranks)
    if not ranks:
        raise ValueError("expert_ranks must name at least one rank, got []")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world_size]
    if bad:
        raise ValueError(f"expert_ranks has rank(s) {bad} outside [0, {world_size})")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"expert_ranks has duplicates: {ranks}")
    return ranks


def _check_load(load: Sequence[float], n_experts: int, where: str) -> list[float]:
    if len(load) != n_experts:
        raise ValueError(f"{where}: load has {len(load)} entries, n_experts is {n_experts}")
    out = [float(x) for x in load]
    if any(not 0 <= x < float("inf") for x in out):  # also rejects NaN
        raise ValueError(f"{where}: load must be finite and >= 0, got {out}")
    return out


def _check_extra(n_extra_slots: int, n_experts: int, n_ranks: int, where: str) -> None:
    cap_total = n_experts * (n_ranks - 1)  # at most one replica of an expert per rank
    if isinstance(n_extra_slots, bool) or not isinstance(n_extra_slots, int) or not 0 <= n_extra_slots <= cap_total:
        raise ValueError(f"{where}: n_extra_slots must be an int in [0, {cap_total}], got {n_extra_slots!r}")

