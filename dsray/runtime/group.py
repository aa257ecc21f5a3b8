"""RankGroup: the rank actors of one engine (Ray Train's WorkerGroup, for expert-parallel ranks).

    g = RankGroup(name, specs, resources, strategy="PACK")   # placement group, actors, node facts
    g.init_process_group()                                    # one torch.distributed world
    outs = g.execute("train_step", per_rank_args, what="train step 7")
    g.replace(rank)                                           # fresh actor in that rank's bundle
    g.shutdown()                                              # graceful, then kill, then remove the PG

Every wait is bounded and names the ranks that failed or are stuck, with each rank's liveness; the
first failure ends the wait at once (its peers would otherwise sit in a collective until the
process-group timeout). Failures come back as `RankFailure` so recovery can see which ranks died.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Sequence

from dsray.runtime.cluster import Resources, check_fits, wait_placed
from dsray.runtime.rank import RankSpec

log = logging.getLogger("dsray")
NAMESPACE = "dsray"


class RankFailure(RuntimeError):
    """A fan-out that did not complete: `dead` ranks whose process is gone, `failed` ranks that raised
    (rank -> message), `stuck` ranks that did not answer in time."""

    def __init__(self, what: str, dead: list[int], failed: dict[int, str], stuck: list[int],
                 alive: dict[int, bool]) -> None:
        self.what, self.dead, self.failed, self.stuck, self.alive = what, dead, failed, stuck, alive
        parts = []
        if dead:
            parts.append(f"rank(s) {dead} died")
        if failed:
            parts.append("; ".join(f"rank {r} failed: {m}" for r, m in failed.items()))
        if stuck:
            parts.append(f"rank(s) {stuck} did not finish in time")
        super().__init__(f"{what}: {'; '.join(parts)}; rank liveness {alive}")


def _actor_died(e: BaseException) -> bool:
    import ray

    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                          ray.exceptions.ActorUnavailableError))


class RankGroup:
    def __init__(self, name: str, specs: list[RankSpec], resources: list[Resources], *, strategy: str = "PACK",
                 init_timeout_s: float = 300.0, wait_for_nodes_s: float = 0.0) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.name, self.specs, self.resources = name, list(specs), list(resources)
        self.strategy, self.init_timeout_s = strategy, init_timeout_s
        self.actors: list[Any] = []
        self.bundle_of: list[tuple[Any, int]] = []  # rank -> (placement group, bundle index)
        self.pgs: list[Any] = []
        bundles = [r.bundle() for r in resources]
        check_fits(bundles, strategy, wait_for_nodes_s)
        pg = placement_group(bundles, strategy=strategy, name=f"dsray-{name}-{uuid.uuid4().hex[:6]}")
        self.pgs.append(pg)
        wait_placed(pg, bundles, init_timeout_s)
        for r, spec in enumerate(specs):
            self.bundle_of.append((pg, r))
            self.actors.append(self._start(spec, resources[r], pg, r))
        self.nodes = self.execute("node_info", timeout=init_timeout_s, what="start ranks")
        self._ray = ray

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def _start(self, spec: RankSpec, res: Resources, pg, bundle: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dsray.runtime.driver import DriverRank
        from dsray.runtime.shard import ExpertShard

        driver = spec.rank < spec.n_drivers
        env = {"env_vars": {"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}}
        return ray.remote(DriverRank if driver else ExpertShard).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=res.resources or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
            name=f"dsray-{self.name}-{'driver' if driver else 'shard'}-{spec.rank}-{uuid.uuid4().hex[:4]}",
            namespace=NAMESPACE, runtime_env=env, max_restarts=0,
        ).remote(spec)

    # ---- fan-out ---------------------------------------------------------------------------------------
    def execute_async(self, method: str, per_rank: Sequence[tuple] | None = None,
                      ranks: Sequence[int] | None = None, **kwargs: Any) -> dict[int, Any]:
        """Call `method` on `ranks` (default all), with `per_rank[i]` as the positional args of the i-th."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        per_rank = [()] * len(ranks) if per_rank is None else list(per_rank)
        if len(per_rank) != len(ranks):
            raise ValueError(f"{method}: {len(per_rank)} argument tuples for {len(ranks)} ranks")
        return {r: getattr(self.actors[r], method).remote(*args, **kwargs) for r, args in zip(ranks, per_rank)}

    def execute(self, method: str, per_rank: Sequence[tuple] | None = None, ranks: Sequence[int] | None = None,
                *, timeout: float, what: str | None = None, **kwargs: Any) -> list[Any]:
        return self.wait(self.execute_async(method, per_rank, ranks, **kwargs), timeout, what or method)

    def wait(self, futures: dict[int, Any], timeout: float, what: str, settle_s: float = 2.0) -> list[Any]:
        """Results in rank order, or RankFailure naming dead / failed / stuck ranks. After the first
        failure the others get `settle_s` to finish or fail, so the report says who died and who only
        failed because a peer did."""
        import ray

        by_ref = {f: r for r, f in futures.items()}
        pending, deadline = list(by_ref), time.monotonic() + timeout
        dead: list[int] = []
        failed: dict[int, str] = {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - classified and re-raised
                r = by_ref[ready[0]]
                if _actor_died(e):
                    dead.append(r)
                else:
                    failed[r] = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                deadline = min(deadline, time.monotonic() + settle_s)
        if dead or failed or pending:
            stuck = sorted(by_ref[f] for f in pending)
            raise RankFailure(what, sorted(dead), failed, stuck, self.health(1.0))
        return [ray.get(futures[r]) for r in sorted(futures)]

    def health(self, timeout: float = 5.0) -> dict[int, bool]:
        import ray

        pings = {r: a.ping.remote() for r, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=timeout)
        alive = {}
        for r, f in pings.items():
            try:
                alive[r] = f in ready and ray.get(f) == r
            except Exception:  # noqa: BLE001 - a dead actor's ping raises
                alive[r] = False
        return alive

    def init_process_group(self, timeout_s: float, **changes: Any) -> None:
        """Rank 0 reports (addr, port); every rank joins the world group (bounded wait)."""
        addr, port = self.execute("master_addr", ranks=[0], timeout=self.init_timeout_s)[0]
        self.execute("init_process_group", [(addr, port, timeout_s)] * self.world_size,
                     timeout=self.init_timeout_s, what="init process group", **changes)

    # ---- membership ------------------------------------------------------------------------------------
    def replace(self, rank: int, spec: RankSpec) -> None:
        """Start a fresh actor for `rank` in its bundle (the old one is killed first, freeing the bundle)."""
        import ray

        try:
            ray.kill(self.actors[rank], no_restart=True)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        pg, bundle = self.bundle_of[rank]
        self.specs[rank] = spec
        self.actors[rank] = self._start(spec, self.resources[rank], pg, bundle)
        self.nodes[rank] = self.execute("node_info", ranks=[rank], timeout=self.init_timeout_s,
                                        what=f"restart rank {rank}")[0]

    def add(self, specs: list[RankSpec], res: Resources) -> None:
        """New ranks at the end, in a placement group of their own (scale-up)."""
        import ray
        from ray.util.placement_group import placement_group

        bundles = [res.bundle()] * len(specs)
        check_fits(bundles, self.strategy)
        pg = placement_group(bundles, strategy=self.strategy)
        self.pgs.append(pg)
        if not ray.wait([pg.ready()], timeout=self.init_timeout_s)[0]:
            raise RuntimeError(f"scale: {len(bundles)} more bundle(s) {bundles[0]} not placed within "
                               f"{self.init_timeout_s:.0f}s; cluster has {ray.available_resources()}")
        first = self.world_size
        for i, spec in enumerate(specs):
            self.specs.append(spec)
            self.resources.append(res)
            self.bundle_of.append((pg, i))
            self.actors.append(self._start(spec, res, pg, i))
        self.nodes += self.execute("node_info", ranks=range(first, self.world_size), timeout=self.init_timeout_s,
                                   what="start new ranks")

    def remove_last(self, n: int) -> None:
        """Stop the last `n` ranks (scale-down)."""
        import ray

        for a in self.actors[-n:]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        del self.actors[-n:], self.specs[-n:], self.resources[-n:], self.bundle_of[-n:], self.nodes[-n:]

    def shutdown(self, graceful: bool = True, extra: Sequence[Any] = ()) -> None:
        """Leave the process group (bounded), kill every actor, remove the placement groups."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if graceful and self.actors:
            try:
                waits = [a.leave_group.remote() for a in self.actors] + list(extra)
                ray.wait(waits, num_returns=len(waits), timeout=10)
            except Exception:  # noqa: BLE001 - teardown continues regardless
                pass
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass
        self.pgs = []
