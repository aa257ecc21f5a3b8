"""Placement changes and scaling of a running Engine, at step boundaries, rank to rank.

Every change is the same three moves:
  1. plan: the new Placement (version + 1) and, for each shard rank of the new layout, which experts it
     must receive from which current holder (a kept expert comes from the rank itself);
  2. export: each holder returns the weights and AdamW moments of exactly the experts one destination
     needs (`ExpertShard.export_experts`); Ray keeps those bytes in the holder's node object store and
     hands the Engine only a reference;
  3. adopt: each destination pulls its references straight from the holders (`ExpertShard.adopt`),
     drivers re-route (`set_placement`), the Router records the version and the bytes moved.
No expert tensor passes through the job driver. Scaling adds a leave/rejoin of the process group and
starts or stops shard actors in between (their experts were exported before they stopped).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from dsray.parallel.placement import Placement
from dsray.runtime.rank import RankSpec

if TYPE_CHECKING:
    from dsray.runtime.engine import Engine

log = logging.getLogger("dsray")


def _plan(old: Placement, new: Placement, dest_ranks: list[int]) -> dict[int, dict[int, list[int]]]:
    """dest rank -> {source rank -> experts}: the first current replica of each needed expert, the
    destination itself when it already holds it."""
    plan: dict[int, dict[int, list[int]]] = {}
    for r in dest_ranks:
        mine = set(old.local_experts(r)) if r < old.world_size else set()
        for e in new.local_experts(r):
            src = r if e in mine else old.replicas(e)[0][0]
            plan.setdefault(r, {}).setdefault(src, []).append(e)
    return plan


def _expert_bytes(eng: "Engine") -> tuple[int, bool]:
    """Bytes of one logical expert over all hosted layers (weights), and whether moments travel too."""
    cfg = eng.cfg
    per = len(eng.moe_layers) * 3 * cfg.hidden_size * cfg.moe_intermediate_size * eng.dtype_bytes
    return per, eng.trained


def _export(eng: "Engine", plan: dict[int, dict[int, list[int]]]) -> tuple[dict[int, list], int]:
    per, moments = _expert_bytes(eng)
    parts: dict[int, list] = {}
    moved = 0
    for dest, sources in plan.items():
        for src, experts in sources.items():
            ref = eng.group.execute_async("export_experts", [(experts,)], ranks=[src])[src]
            parts.setdefault(dest, []).append(ref)
            if src != dest:
                moved += per * len(experts) * (3 if moments else 1)
    return parts, moved


def _adopt(eng: "Engine", new: Placement, parts: dict[int, list], what: str) -> None:
    D, world = eng.D, eng.D + eng.S
    step = eng.optim_step
    futs = eng.group.execute_async("adopt", [(new.to_dict(), parts.get(r, []), step) for r in range(D, world)],
                                   ranks=range(D, world))
    futs.update(eng.group.execute_async("set_placement", [(new.to_dict(),)] * D, ranks=range(D)))
    eng.group.wait(futs, eng.step_timeout_s, what)
    eng.placement = new
    for spec in eng.group.specs:
        spec.placement, spec.n_shards = new.to_dict(), eng.S


def set_placement(eng: "Engine", new: Placement) -> int:
    """Move to `new` (same shards); returns the bytes moved rank to rank."""
    t0 = time.perf_counter()
    new = Placement(new.n_experts, new.slots, version=max(new.version, eng.placement.version + 1))
    parts, moved = _export(eng, _plan(eng.placement, new, list(range(eng.D, eng.D + eng.S))))
    _adopt(eng, new, parts, f"placement v{new.version}")
    eng.record_change("placement", new, moved, time.perf_counter() - t0)
    return moved


def scale(eng: "Engine", num_shards: int, placement: Any = "linear") -> int:
    """Change the number of shards; experts and their optimizer state are redistributed by `placement`.
    Returns the bytes moved."""
    t0 = time.perf_counter()
    old_S, D = eng.S, eng.D
    world = D + num_shards
    new = eng.make_placement(placement, list(range(D, world)), world)
    new = Placement(new.n_experts, new.slots, version=eng.placement.version + 1)
    parts, moved = _export(eng, _plan(eng.placement, new, list(range(D, world))))
    import ray

    ray.wait([r for refs in parts.values() for r in refs], num_returns=sum(map(len, parts.values())),
             timeout=eng.step_timeout_s)  # exports complete (owned by the Engine) before any holder stops
    eng.group.execute("leave_group", timeout=eng.step_timeout_s, what="leave process group")
    if num_shards < old_S:
        eng.group.remove_last(old_S - num_shards)
    else:
        base = eng.group.specs[-1]
        specs = [RankSpec(**{**base.__dict__, "rank": r, "n_shards": num_shards, "placement": new.to_dict(),
                             "load_experts": False}) for r in range(D + old_S, world)]
        eng.group.add(specs, eng.shard_resources)
    eng.S = num_shards
    for spec in eng.group.specs:
        spec.n_shards, spec.placement = num_shards, new.to_dict()
    eng.group.init_process_group(eng.step_timeout_s, n_shards=num_shards, placement=new.to_dict())
    _adopt(eng, new, parts, f"scale to {num_shards} shards")
    eng.record_change("scale", new, moved, time.perf_counter() - t0)
    return moved


class Placements:
    """The Engine's placement API (mixed into `Engine`): explicit placements, the Router's rebalance
    proposals, scaling, and requests queued from outside."""

    def make_placement(self, spec, shard_ranks: list[int], world: int) -> Placement:
        E = self.cfg.n_routed_experts
        if isinstance(spec, Placement):
            p = spec
        elif spec == "linear":
            p = Placement.linear(E, shard_ranks, world)
        elif spec in ("round_robin", "round-robin"):
            p = Placement.round_robin(E, shard_ranks, world)
        elif spec == "grouped":
            p = Placement.grouped(E, self.cfg.n_group, shard_ranks, world)
        elif isinstance(spec, dict) and "slots" in spec:
            p = Placement.from_dict(spec)
        elif isinstance(spec, (dict, list)):
            # explicit table: shard index (0..S-1) -> experts
            items = spec.items() if isinstance(spec, dict) else enumerate(spec)
            p = Placement.from_table({self.D + int(k): list(v) for k, v in items}, E, world)
        else:
            raise ValueError(f"placement={spec!r}: expected 'linear', 'round_robin', 'grouped', a Placement "
                             "or a table")
        if p.world_size != world or any(p.local_experts(r) for r in range(self.D)):
            raise ValueError(f"placement must put experts only on shard ranks {shard_ranks} of a world of {world}")
        return p

    # ---- placement changes (step boundaries), also queued from outside -------------------------------
    def set_placement(self, placement: Placement | dict | list | str) -> Placement:
        """Move to a new expert placement between steps: weights and AdamW state move rank to rank with
        each expert (replicas get copies), drivers re-route, the Router records the new version. No step
        is lost or repeated: the next train_step continues from the same state."""
        self._check()
        if not self.S:
            raise ValueError("set_placement needs expert shards (num_shards >= 1)")
        set_placement(self, self.make_placement(placement, list(range(self.D, self.D + self.S)), self.D + self.S))
        return self.placement

    def rebalance(self, n_extra_slots: int = 0, tolerance: float = 0.02) -> Placement:
        """The Router's proposal from its load window (EPLB-style replicas of the hottest experts on
        `n_extra_slots` extra slots, migration-aware within `tolerance`), applied; unchanged if none."""
        self._check()
        if not self.S:
            raise ValueError("rebalance needs expert shards (num_shards >= 1)")
        if n_extra_slots < 0:
            raise ValueError(f"n_extra_slots={n_extra_slots}: expected >= 0")
        proposal = self.router_call("propose_rebalance", n_extra_slots, tolerance)
        if proposal is None:
            return self.placement
        return self.set_placement(Placement.from_dict(proposal))

    def scale(self, num_shards: int, placement: str | dict | list = "linear") -> Placement:
        """Change the number of expert shards while the engine runs: new shard actors start (their own
        placement group) or stop, every rank joins a new process group, and experts with their optimizer
        state move rank to rank to the new `placement`."""
        self._check()
        if num_shards < 1 or not self.S:
            raise ValueError(f"scale: num_shards={num_shards}; scaling needs >= 1 shard before and after")
        if num_shards != self.S:
            try:
                scale(self, num_shards, placement)
            except BaseException:
                self._broken = True
                raise
        return self.placement

    def _apply_requests(self, every_s: float = 1.0) -> None:
        """Apply changes queued on the Router from outside (`dsray scale` / `dsray rebalance`)."""
        now = time.monotonic()
        if self.router is None or now - self._last_requests_check < every_s or not self.S:
            return
        self._last_requests_check = now
        for req in self.router_call("take_requests"):
            t0, before, err = time.perf_counter(), getattr(self, "last_change", None), ""
            try:
                if req["kind"] == "scale":
                    self.scale(int(req["num_shards"]))
                else:
                    self.rebalance(int(req.get("replicas", 0)))
            except (ValueError, RuntimeError) as e:
                err = str(e)
                log.error("dsray: request %s failed: %s", req, e)
            change = getattr(self, "last_change", None)
            moved = change["bytes_moved"] if change is not None and change is not before else 0
            self.router_call("confirm", req, self.placement.version, moved, time.perf_counter() - t0, err, wait=False)
            if self._broken:
                raise RuntimeError(f"request {req} left the engine broken: {err}")
