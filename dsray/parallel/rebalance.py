"""The algorithms behind `Placement`'s group-aligned layout, fan-out bound and rebalancing.

Pure Python on lists of expert ids; `Placement` validates inputs and wraps these. Ranks are given as
positions 0..S-1 in a list of expert ranks (the caller maps them back to process-group ranks).

- `group_layout`: expert groups (contiguous id blocks of the gate's `n_group` groups) onto nodes, then
  onto the shards of each node, whole groups where possible.
- `max_reach`: worst-case number of distinct destinations of one token under group-limited routing.
- `replica_counts` + `pack`: EPLB-style replication (hottest load per replica first) and greedy
  bin-packing of replicas onto ranks by load; `pack` optionally sticks to where experts are now.
- `relabel`: the permutation of packed bins onto ranks that keeps the most (rank, expert) pairs
  (bins are interchangeable, so this changes bytes moved and nothing else).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsray.parallel.placement import Placement

# Above this many group subsets `max_reach` returns an upper bound instead of enumerating
# (V3's C(8, 4) = 70; C(64, 8) would be 4e9).
MAX_GROUP_SUBSETS = 20_000


def split(seq: Sequence, k: int) -> list[list]:
    """`k` contiguous chunks of `seq`; the first `len(seq) % k` get one extra (as Placement.linear)."""
    base, extra = divmod(len(seq), k)
    out, start = [], 0
    for i in range(k):
        n = base + (1 if i < extra else 0)
        out.append(list(seq[start:start + n]))
        start += n
    return out


def _busiest(m: int, s: int, g: int) -> int:
    """Experts on the busiest of `s` shards of a node holding `m` >= 1 groups of `g` (group_layout's rule)."""
    return -(-m // s) * g if m >= s else -(-g // (s // m))


def group_layout(n_experts: int, n_group: int, nodes: list[list[int]]) -> dict[int, list[int]]:
    """`{shard: expert ids}` for `n_group` contiguous groups over `nodes` (lists of shards).

    Groups go to nodes one at a time, each to the node whose busiest shard would grow least (ties: the
    node with fewer groups per shard, then the earlier node), so equal nodes get floor/ceil(G/N)
    groups. Node n takes the next contiguous block of its groups. Inside a node with m groups and s
    shards: m >= s -> shard i gets floor/ceil(m/s) whole groups; m < s -> group j gets a contiguous
    run of floor/ceil(s/m) shards and its experts are split contiguously over them. Shards of a node
    that gets no group host nothing.
    """
    g = n_experts // n_group
    m = [0] * len(nodes)
    for _ in range(n_group):
        n = min(range(len(nodes)), key=lambda n: (_busiest(m[n] + 1, len(nodes[n]), g), m[n] / len(nodes[n]), n))
        m[n] += 1
    out: dict[int, list[int]] = {}
    first = 0
    for n, shards in enumerate(nodes):
        groups = list(range(first, first + m[n]))
        first += m[n]
        if not groups:
            continue
        if len(groups) >= len(shards):
            for shard, chunk in zip(shards, split(groups, len(shards))):
                out[shard] = [e for grp in chunk for e in range(grp * g, (grp + 1) * g)]
        else:
            for grp, run in zip(groups, split(shards, len(groups))):
                for shard, experts in zip(run, split(range(grp * g, (grp + 1) * g), len(run))):
                    out[shard] = experts
    return out


def _matching(options: list[list[int]], limit: int) -> int:
    """Size of a maximum matching of items to units (`options[i]`: the units item i can use), stopping
    at `limit` (Kuhn's augmenting paths; sizes here are a few hundred at most)."""
    owner: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for u in options[i]:
            if u not in seen:
                seen.add(u)
                if u not in owner or augment(owner[u], seen):
                    owner[u] = i
                    return True
        return False

    size = 0
    for i in range(len(options)):
        if size >= limit:
            break
        size += augment(i, set())
    return size


def max_reach(dest: list[list[list[int]]], topk_group: int, top_k: int | None) -> tuple[int, bool]:
    """Worst case over tokens of the number of distinct destinations, and whether it is exact.

    `dest[grp][i]` = destinations (ranks or nodes) that the i-th expert of group `grp` can be sent to
    (one per replica). A token keeps any `topk_group` groups and any `top_k` experts in them, and each
    expert may go to any of its replicas (the dispatcher's rotation reaches each one, depending on
    earlier tokens), so the answer is max over group subsets of min(top_k, maximum matching of the
    subset's experts to destinations). Past MAX_GROUP_SUBSETS subsets: an upper bound (the sum of the
    `topk_group` largest per-group destination counts), flagged inexact.
    """
    limit = top_k if top_k is not None else sum(len(d) for d in dest)
    reach = [len({u for d in grp for u in d}) for grp in dest]
    if math.comb(len(dest), topk_group) > MAX_GROUP_SUBSETS:
        return min(limit, sum(sorted(reach, reverse=True)[:topk_group]), len({u for grp in dest for d in grp for u in d})), False
    single = all(len(d) == 1 for grp in dest for d in grp)
    best = 0
    for subset in itertools.combinations(range(len(dest)), topk_group):
        if single:  # one replica per expert: the reach is the union of destinations
            r = min(limit, len({d[0] for grp in subset for d in dest[grp]}))
        else:
            r = _matching([d for grp in subset for d in dest[grp]], limit)
        best = max(best, r)
        if best >= limit:
            break
    return best, True


def replica_counts(load: list[float], n_extra_slots: int, n_ranks: int) -> list[int]:
    """One replica per expert, then each extra one to the expert with the highest load per replica
    (ties to the lower id), at most one replica per rank."""
    count = [1] * len(load)
    for _ in range(n_extra_slots):
        e = max((e for e in range(len(load)) if count[e] < n_ranks), key=lambda e: (load[e] / count[e], -e))
        count[e] += 1
    return count


def pack(
    count: list[int],
    load: list[float],
    n_ranks: int,
    old: list[set[int]] | None = None,
    cap: float = math.inf,
    keep_first: bool = False,
) -> list[list[int]]:
    """Replicas onto `n_ranks` bins, heaviest (load / count) first, each to the least-loaded bin with
    room that does not hold that expert yet. Room: with q, r = divmod(total replicas, n_ranks), r bins
    end with q + 1 replicas and the rest with q (the same slot budget on every rank, within one).

    `old[i]` (sticky mode): the experts bin i holds now. A replica stays on a bin that holds its expert
    now when that bin has room and stays within `cap` load; the least-loaded such bin wins. With
    `keep_first`, all replicas that can stay are kept before any is moved (moves cannot take the room
    of a later keep); otherwise keeps and moves interleave in weight order (better balance).
    """
    w = [load[e] / count[e] for e in range(len(count))]
    items = sorted((e for e in range(len(count)) for _ in range(count[e])), key=lambda e: (-w[e], e))
    q, r = divmod(len(items), n_ranks)
    bins: list[list[int]] = [[] for _ in range(n_ranks)]
    held: list[set[int]] = [set() for _ in range(n_ranks)]
    loads = [0.0] * n_ranks

    def room(i: int) -> bool:
        return len(bins[i]) < q or (len(bins[i]) == q and sum(len(b) > q for b in bins) < r)

    def put(i: int, e: int) -> None:
        bins[i].append(e)
        held[i].add(e)
        loads[i] += w[e]

    def keep(e: int) -> int | None:
        ok = [i for i in range(n_ranks) if e in old[i] and e not in held[i] and room(i) and loads[i] + w[e] <= cap]
        return min(ok, key=lambda i: (loads[i], i)) if ok else None

    def place(e: int) -> None:
        free = [i for i in range(n_ranks) if room(i) and e not in held[i]]
        if not free:
            # Every bin with room already holds e. A full bin j without e holds more replicas than a
            # roomy bin i, so some e2 on j is missing from i: move e2 to i, then e goes to j.
            i = next(i for i in range(n_ranks) if room(i))
            j, e2 = min(((j, e2) for j in range(n_ranks) if e not in held[j] for e2 in bins[j] if e2 not in held[i]),
                        key=lambda p: (max(loads[i] + w[p[1]], loads[p[0]] - w[p[1]] + w[e]), p))
            bins[j].remove(e2)
            held[j].discard(e2)
            loads[j] -= w[e2]
            put(i, e2)
            free = [j]
        put(min(free, key=lambda i: (loads[i], len(bins[i]), i)), e)

    if old is not None and keep_first:
        rest = []
        for e in items:
            i = keep(e)
            if i is None:
                rest.append(e)
            else:
                put(i, e)
        items = rest
    for e in items:
        i = keep(e) if old is not None and not keep_first else None
        if i is None:
            place(e)
        else:
            put(i, e)
    return bins


def bin_loads(bins: list[list[int]], count: list[int], load: list[float]) -> list[float]:
    return [sum(load[e] / count[e] for e in b) for b in bins]


def relabel(bins: list[list[int]], old: list[set[int]]) -> list[int]:
    """`perm` maximising the (bin, expert) pairs kept when bin i goes to rank position perm[i].

    A maximum-weight perfect matching on the overlap matrix (Hungarian algorithm, O(S^3); S is the
    number of expert ranks, 8-256)."""
    n = len(bins)
    cost = [[-len(old[j].intersection(b)) for j in range(n)] for b in bins]
    INF = math.inf
    u, v, p, way = [0] * (n + 1), [0] * (n + 1), [0] * (n + 1), [0] * (n + 1)
    for i in range(1, n + 1):  # rows are added one at a time; p[j] = row matched to column j
        p[0], j0 = i, 0
        minv, used = [INF] * (n + 1), [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    perm = [0] * n
    for j in range(1, n + 1):
        perm[p[j] - 1] = j - 1
    return perm


def repair(count: list[int], load: list[float], old: list[set[int]], limit: float) -> list[list[int]] | None:
    """Fewest changes to the current placement `old` that meet the new replica `count`, `pack`'s slot
    budget and max bin load <= `limit`; None where the greedy gets stuck.

    1. Surplus replicas are dropped (free) from the bins with the most slots, then the most load;
       missing ones go to the least-loaded bin with room (one move each).
    2. While a bin is over the slot budget, one of its replicas moves to a bin under it. While the
       hottest bin is over `limit`, the cheapest change that brings it and its partner within
       `limit` is made: moving a replica (1 slot) before swapping two (2 slots); failing that, the
       change that lowers their larger load most. Each step lowers the hottest bin's load or the
       budget excess, so the loop ends."""
    n = len(old)
    w = [load[e] / count[e] for e in range(len(count))]
    q, r = divmod(sum(count), n)
    bins = [sorted(b) for b in old]
    loads = [sum(w[e] for e in b) for b in bins]

    def budget(i: int, extra: int = 0) -> bool:  # may bin i hold len + extra slots?
        m = len(bins[i]) + extra
        return m <= q or (m == q + 1 and sum(len(b) > q for j, b in enumerate(bins) if j != i) < r)

    def move(e: int, src: int | None, dst: int) -> None:
        if src is not None:
            bins[src].remove(e)
            loads[src] -= w[e]
        bins[dst].append(e)
        loads[dst] += w[e]

    for e in range(len(count)):
        hosts = [i for i in range(n) if e in bins[i]]
        for i in sorted(hosts, key=lambda i: (-len(bins[i]), -loads[i], i))[:max(0, len(hosts) - count[e])]:
            bins[i].remove(e)
            loads[i] -= w[e]
    for e in sorted(range(len(count)), key=lambda e: (-w[e], e)):
        for _ in range(count[e] - sum(e in b for b in bins)):
            free = [i for i in range(n) if e not in bins[i]]
            move(e, None, min(free, key=lambda i: (not budget(i, 1), loads[i], i)))
    for _ in range(4 * sum(count) + 4 * n):
        over = [i for i in range(n) if not budget(i)]
        if over:
            src = max(over, key=lambda i: (len(bins[i]), loads[i]))
            opts = [(max(loads[src] - w[e], loads[d] + w[e]), e, d) for d in range(n) if d != src and budget(d, 1)
                    for e in bins[src] if e not in bins[d]]
            if not opts:
                return None
            _, e, d = min(opts)
            move(e, src, d)
            continue
        src = max(range(n), key=lambda i: (loads[i], -i))
        if loads[src] <= limit:
            return bins
        best = None
        for d in range(n):
            if d == src:
                continue
            for a in bins[src]:
                if a in bins[d]:
                    continue
                for b in [None] + [b for b in bins[d] if b not in bins[src] and w[b] < w[a]]:
                    wb = 0.0 if b is None else w[b]
                    if b is None and not (budget(d, 1) and len(bins[src]) > 0):
                        continue
                    hi = max(loads[src] - w[a] + wb, loads[d] + w[a] - wb)
                    key = (hi > limit, 1 if b is None else 2, hi) if hi <= limit else (True, 0, hi)
                    if hi < loads[src] and (best is None or key < best[0]):
                        best = (key, a, b, d)
        if best is None:
            return None
        _, a, b, d = best
        move(a, src, d)
        if b is not None:
            move(b, d, src)
    return None


def migrate(count: list[int], load: list[float], old: list[set[int]], tolerance: float) -> list[list[int]]:
    """Migration-aware EPLB: per rank position, the experts it hosts after rebalancing.

    Reference: `pack` from scratch (what `Placement.eplb` builds), max bin load L. Candidates: that
    packing and four sticky ones (cap (1 + tolerance) L or L; keeps interleaved with moves or all
    first); each candidate's bins go to ranks by `relabel`. Returned: the candidate that moves the
    fewest slots among those with max load <= (1 + tolerance) L (ties: lower max load). The reference
    always qualifies, so the bound holds by construction and the result never moves more slots than
    the relabelled reference."""
    ref = pack(count, load, len(old))
    ref_max = max(bin_loads(ref, count, load))
    limit = ref_max * (1 + tolerance) * (1 + 1e-12)  # float sums in another order may differ in the last bit
    best: tuple[int, float, list[list[int]]] | None = None
    fixed = repair(count, load, old, limit)
    for bins in [ref] + ([fixed] if fixed is not None else []) + [
            pack(count, load, len(old), old, cap, first) for cap in (limit, ref_max * (1 + 1e-12)) for first in (False, True)]:
        top = max(bin_loads(bins, count, load))
        if top > limit:
            continue
        perm = relabel(bins, old)
        placed: list[list[int]] = [[] for _ in old]
        for i, b in enumerate(bins):
            placed[perm[i]] = b
        moved = sum(len(set(b) - old[i]) for i, b in enumerate(placed))
        if best is None or (moved, top) < best[:2]:
            best = (moved, top, placed)
    assert best is not None  # ref always qualifies
    return best[2]


def moved_slots(old: Placement, new: Placement) -> int:
    """Slots that a rank hosts in `new` but not in `old`: each costs one expert's state sent to that
    rank (ranks beyond `old`'s world size start empty). Reordering slots on a rank costs nothing here."""
    if old.n_experts != new.n_experts:
        raise ValueError(f"moved_slots: n_experts differ ({old.n_experts} vs {new.n_experts})")
    return sum(len(set(s) - set(old.slots[r] if r < old.world_size else ())) for r, s in enumerate(new.slots))


def bytes_moved(old: Placement, new: Placement, bytes_per_expert: int) -> int:
    """`moved_slots` x `bytes_per_expert` (weights, plus optimizer state when training: V3 bf16
    weights 3 x 7168 x 2048 x 2 B = 88,080,384 B, x3 with AdamW's two moments in the same dtype)."""
    if isinstance(bytes_per_expert, bool) or not isinstance(bytes_per_expert, int) or bytes_per_expert < 0:
        raise ValueError(f"bytes_moved: bytes_per_expert must be an int >= 0, got {bytes_per_expert!r}")
    return moved_slots(old, new) * bytes_per_expert


def check_groups(n_experts: int, n_group: int, where: str) -> None:
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"{where}: n_experts must be an int >= 1, got {n_experts!r}")
    if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group < 1 or n_experts % n_group:
        raise ValueError(f"{where}: n_group must be an int >= 1 dividing n_experts={n_experts}, got {n_group!r}")


def node_index(node_of_rank: Sequence[str] | None, world_size: int, where: str) -> list[int]:
    """Node index per rank (first appearance order), or the rank itself when `node_of_rank` is None."""
    if node_of_rank is None:
        return list(range(world_size))
    if isinstance(node_of_rank, (str, bytes)) or not isinstance(node_of_rank, Sequence) or len(node_of_rank) != world_size:
        raise ValueError(f"{where}: node_of_rank must name one node per rank ({world_size}), got {node_of_rank!r}")
    bad = [n for n in node_of_rank if isinstance(n, bool) or not isinstance(n, (str, int))]
    if bad:
        raise ValueError(f"{where}: node_of_rank entries must be node names (str or int), got {bad}")
    index: dict = {}
    return [index.setdefault(n, len(index)) for n in node_of_rank]
