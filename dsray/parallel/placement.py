"""Expert placement: which rank hosts which routed experts, in which local slot.

A `Placement` is an immutable, versioned table. `slots[rank]` lists the logical expert ids hosted by
`rank` in local-slot order (local slot index = position in the tuple). An expert may be hosted by
several ranks (replicas of a hot expert); a rank hosts an expert at most once; driver ranks host none.
Every change (`with_replicas`, `rebalanced`) returns a new Placement with `version + 1`, so ranks can
check that they dispatch with the same table (the dispatcher exchanges the version with the counts).

Rank numbers are ranks of the expert-parallel process group, not global ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch


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

    def rebalanced(self, load: Sequence[float], n_extra_slots: int) -> Placement:
        """EPLB-style greedy replication for per-expert `load` (e.g. tokens routed last window).

        Replica counts start at one per expert; each of the `n_extra_slots` extra replicas goes to the
        expert with the highest load per replica. Each expert keeps its home slot (its replica with the
        lowest local slot index, ties to the lower rank: replicas are appended after home slots).
        Extra replicas are placed hottest expert first: an existing replica is kept if its rank has
        room (fewer weights move), otherwise the replica goes to the expert rank (a rank of this
        placement hosting >= 1 expert) with the least load per replica summed over its experts.
        Room: at most ceil(total slots / expert ranks) slots per rank. Surplus replicas are dropped.
        The result has exactly `n_experts + n_extra_slots` slots; kept slots keep their relative order.
        """
        if len(load) != self.n_experts:
            raise ValueError(f"rebalanced: load has {len(load)} entries, n_experts is {self.n_experts}")
        load = [float(x) for x in load]
        if any(not 0 <= x < float("inf") for x in load):  # also rejects NaN
            raise ValueError(f"rebalanced: load must be finite and >= 0, got {load}")
        ranks = self.expert_ranks
        cap_total = self.n_experts * (len(ranks) - 1)
        if isinstance(n_extra_slots, bool) or not isinstance(n_extra_slots, int) or not 0 <= n_extra_slots <= cap_total:
            raise ValueError(f"rebalanced: n_extra_slots must be an int in [0, {cap_total}], got {n_extra_slots!r}")

        count = [1] * self.n_experts
        for _ in range(n_extra_slots):
            e = max((e for e in range(self.n_experts) if count[e] < len(ranks)),
                    key=lambda e: (load[e] / count[e], -e))
            count[e] += 1

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
