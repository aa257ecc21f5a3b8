"""Automatic recovery from a dead DriverRank, ExpertShard or Router, inside the step that noticed it.

State kept off the rank that owns it:
  - every `snapshot_every` steps (and once at start) each rank returns a snapshot of its state
    (weights, AdamW moments, step counters) as a task result: the Engine owns the object, Ray keeps its
    bytes in the rank's node object store, so it outlives the rank's process; when shards run on other
    nodes than their ring neighbour, the neighbour pulls a copy too (`hold`), which outlives the node.
  - the Router's full state (bias, window, history, balancer) is taken at the same moment.
  - a journal of the steps since the snapshot (each a closure that re-runs the public step).

When a fan-out reports a dead rank (`RankFailure`): survivors get a few seconds to fail out of their
collectives (those still stuck are replaced too), every live rank leaves the process group, a fresh
actor starts in each dead rank's bundle (Ray reschedules a lost node's bundles where resources allow),
the world group is rebuilt, every rank restores the snapshot (the fresh ones from the dead ranks'
objects), the Router is restored (restarted if it died), the journaled steps are replayed, and finally
the interrupted step is re-issued and its result returned. On CPU (fp32, deterministic) the losses
after a recovery equal an undisturbed run's, and the Router counts every token exactly once.

What cannot be recovered raises RuntimeError naming it: a rank that dies twice within one step, a
replacement that cannot be placed, a snapshot lost together with its holder.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from dsray.runtime.group import RankFailure

if TYPE_CHECKING:
    from dsray.runtime.engine import Engine

log = logging.getLogger("dsray")


class Recovery:
    def __init__(self, eng: "Engine", grace_s: float = 5.0) -> None:
        self.eng, self.grace_s = eng, grace_s
        self.log: list[dict[str, Any]] = []
        # completed state-changing steps since the snapshot: (redo, the Router's answer to its report)
        self.journal: list[tuple[Callable[[], Any], dict[str, Any]]] = []
        self.recorded: list[dict[str, Any]] = []  # answers handed back while replaying
        self.pending: Callable[[], Any] | None = None  # the state-changing step in flight
        self.replaying = False
        self.snaps: dict[int, Any] = {}
        self.router_log: list[tuple[str, tuple, dict]] = []  # state-changing Router calls since the snapshot
        self.snapshot()

    # ---- bookkeeping around steps ----------------------------------------------------------------------
    def before_step(self, redo: Callable[[], Any]) -> None:
        """A state-changing step (train / grpo) starts; `redo()` re-runs it through the public API."""
        if not self.replaying:
            self.pending = redo

    def after_step(self, rep: dict[str, Any]) -> None:
        if self.replaying:
            return
        self.journal.append((self.pending, rep))
        self.pending = None
        k = self.eng.snapshot_every
        if k and len(self.journal) >= k:
            self.snapshot()

    def snapshot(self) -> None:
        """Ask every rank for its snapshot (queued behind nothing: the next step's calls run after it)."""
        eng = self.eng
        if not eng.snapshot_every or not eng.recovery_enabled:
            return
        snaps = eng.group.execute_async("snapshot")
        router_state = eng.router.state.remote()  # owned here: survives the Router
        # complete before it replaces the previous one: a rank that dies meanwhile still has a snapshot
        eng.group.wait(snaps, eng.step_timeout_s, "snapshot")
        self.snaps, self.router_state = snaps, router_state
        self.router_log = []
        self.engine_state = (eng._step, eng.optim_step, eng.trained, eng._bias.copy())
        self.journal = []
        nodes = [n["node_id"] for n in eng.group.nodes]
        for r in range(eng.D, eng.D + eng.S):  # ring of shards: r's snapshot also on the next shard
            peer = eng.D + (r - eng.D + 1) % eng.S
            if peer != r and nodes[peer] != nodes[r]:
                eng.group.execute_async("hold", [(r, [self.snaps[r]])], ranks=[peer])

    # ---- recovery --------------------------------------------------------------------------------------
    def recover(self, failure: RankFailure, what: str, calls: Callable[[], dict[int, Any]]) -> list[Any]:
        eng = self.eng
        t0 = time.perf_counter()
        router_dead = not self._router_alive()
        if not failure.dead and not router_dead:
            eng._broken = True  # a rank raised (bad input, a bug): not a lost process, nothing to restore
            raise failure
        if not self.snaps or not eng.snapshot_every:
            eng._broken = True
            raise RuntimeError(f"{failure}; recovery needs in-memory snapshots (snapshot_every >= 1)") from failure
        dead = self._settle(failure)
        try:
            self._rebuild(dead, router_dead)
            result = self._replay(what, calls, dead)
        except RankFailure as second:
            eng._broken = True
            raise RuntimeError(f"{what}: rank(s) {second.dead or list(second.failed)} failed again while "
                               f"recovering from the loss of rank(s) {dead}: {second}; the engine is stopped, "
                               "the last saved checkpoint is intact") from second
        except Exception as e:
            eng._broken = True
            raise RuntimeError(f"{what}: could not recover from the loss of rank(s) {dead}: {e}; the last saved "
                               "checkpoint is intact") from e
        seconds = time.perf_counter() - t0
        roles = sorted({"driver" if r < eng.D else "shard" for r in dead} | ({"router"} if router_dead else set()))
        entry = {"ranks": sorted(failure.dead), "replaced": dead, "router": router_dead, "cause": _cause(failure), "during": what,
                 "seconds": round(seconds, 3), "replayed_steps": len(self.journal)}
        self.log.append(entry)
        for role in roles:
            eng.router_call("add_extra", {"recovery": {"role": role, "seconds": seconds, **entry}}, wait=False)
        log.warning("dsray: recovered %s (rank(s) %s%s) during %s in %.2fs: %s", "/".join(roles), dead,
                    " + router" if router_dead else "", what, seconds, entry["cause"])
        return result

    def recover_router(self, cause: BaseException) -> None:
        """The Router died between rank steps: restart it from the snapshot's state plus the mirrored
        calls since (reports included), so it holds exactly what the dead one held."""
        import ray

        eng, t0 = self.eng, time.perf_counter()
        if not eng.snapshot_every:
            eng._broken = True
            raise RuntimeError(f"the Router died ({cause}) and recovery needs snapshots (snapshot_every >= 1)")
        try:
            ray.kill(eng.router, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        eng._start_router(None, 0, None, None)
        ray.get(eng.router.load_state.remote(self.router_state), timeout=60)
        for method, args, kw in self.router_log:
            ray.get(getattr(eng.router, method).remote(*args, **kw), timeout=60)
        seconds = time.perf_counter() - t0
        entry = {"ranks": [], "router": True, "cause": str(cause).splitlines()[0][:300], "during": "router call",
                 "seconds": round(seconds, 3), "replayed_steps": 0}
        self.log.append(entry)
        eng.router_call("add_extra", {"recovery": {"role": "router", **entry}}, wait=False)
        log.warning("dsray: recovered the Router in %.2fs (%d mirrored calls replayed): %s", seconds,
                    len(self.router_log), entry["cause"])

    def _router_alive(self) -> bool:
        try:
            self.eng._ray.get(self.eng.router.get_bias.remote(), timeout=5)
            return True
        except Exception:  # noqa: BLE001
            return False

    def _settle(self, failure: RankFailure) -> list[int]:
        """Let survivors fail out of their collectives; those still stuck after grace_s count as lost."""
        alive = self.eng.group.health(self.grace_s)
        return sorted({r for r, ok in alive.items() if not ok} | set(failure.dead)) if alive else failure.dead

    def _rebuild(self, dead: list[int], router_dead: bool) -> None:

        eng = self.eng
        g = eng.group
        survivors = [r for r in range(g.world_size) if r not in dead]
        try:  # bounded: a survivor that cannot leave is replaced as well
            g.execute("leave_group", ranks=survivors, timeout=max(self.grace_s, 10.0), what="leave process group")
        except RankFailure as f:
            dead = sorted(set(dead) | set(f.dead) | set(f.stuck) | set(f.failed))
        for r in dead:
            spec = g.specs[r]
            spec.load_experts = False
            g.replace(r, spec)
        g.init_process_group(eng.step_timeout_s)
        futs = {}
        for r in range(g.world_size):
            futs.update(g.execute_async("restore", [(self._snapshot_of(r, dead),)], ranks=[r]))
        g.wait(futs, eng.step_timeout_s, "restore snapshots")
        if router_dead:
            self.recover_router(RuntimeError("the Router died with rank(s) " + str(dead)))
        eng._step, eng.optim_step, eng.trained, bias = self.engine_state
        eng._bias = bias.copy()
        eng._report_placement()

    def _snapshot_of(self, r: int, dead: list[int]) -> Any:
        import ray

        ref = self.snaps[r]
        if r not in dead:
            return ref  # a survivor restores its own (an ObjectRef argument is resolved by Ray)
        try:
            ray.get(ref, timeout=60)
            return ref
        except Exception:  # noqa: BLE001 - lost with its node: the ring neighbour's copy
            eng = self.eng
            peer = eng.D + (r - eng.D + 1) % eng.S
            if r >= eng.D and peer != r:
                return eng.group.actors[peer].held_snapshot.remote(r)
            raise RuntimeError(f"the snapshot of rank {r} was lost with it and no peer holds a copy")

    def _replay(self, what: str, calls: Callable[[], dict[int, Any]], dead: list[int]) -> list[Any]:
        eng = self.eng
        self.replaying = True
        # The Router already counted the journaled steps: replays get its recorded answers back
        # instead of reporting twice (Engine._report), so every token is counted once.
        self.recorded = [rep for _, rep in self.journal]
        try:
            for redo, _ in self.journal:  # completed steps since the snapshot: same batches, same results
                redo()
            return eng.group.wait(calls(), eng.step_timeout_s, f"{what} (replayed after recovery)")
        finally:
            self.replaying, self.recorded = False, []


def _cause(failure: RankFailure) -> str:
    return str(failure).split(": ", 1)[-1][:300]
