"""Getting a Ray cluster and fitting ranks onto it, with answers in seconds rather than silent waits.

- `connect(address)`: with RAY_ADDRESS set (inside `ray job submit`) or `address="auto"`/an address, join
  that cluster; otherwise start an embedded local Ray of our own, even when another cluster runs on
  this host (`address="local"`: never joins someone else's `ray start --head` by accident). Token auth
  stays as Ray 2.60 sets it (on for new local clusters); only its one-line warning is silenced.
- `Resources`: what one rank asks for. `check_fits(bundles, strategy)`: can the cluster's nodes ever hold
  these bundles? If not, a ValueError that says what was asked and what the cluster has.
- `wait_placed(pg, ...)`: wait for a placement group with a progress line every few seconds naming
  what is missing, and a bounded timeout.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("dsray")
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@dataclass
class Resources:
    """What one rank asks Ray for: CPUs, GPUs and custom resources (e.g. {"node:10.0.0.5": 0.01})."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        return {k: v for k, v in b.items() if v}

    @classmethod
    def of(cls, r: "Resources | dict | None", device: str) -> "Resources":
        if isinstance(r, Resources):
            return r
        r = dict(r or {})
        res = cls(num_cpus=float(r.pop("num_cpus", 1.0)),
                  num_gpus=float(r.pop("num_gpus", 1.0 if device == "cuda" else 0.0)),
                  resources=dict(r.pop("resources", r)))
        if res.num_cpus < 0 or res.num_gpus < 0 or any(v < 0 for v in res.resources.values()):
            raise ValueError(f"resources {res}: amounts must be >= 0")
        return res


def connect(address: str | None = None, min_cpus: int = 1) -> tuple[bool, str]:
    """Join a cluster or start our own local Ray. Returns (started_here, a sentence saying which)."""
    import ray

    if ray.is_initialized():
        return False, "using the Ray this process is already connected to"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    auth = logging.getLogger(_AUTH_LOGGER)
    level = auth.level
    auth.setLevel(logging.ERROR)  # "token authentication is enabled..." on every command, otherwise
    try:
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
            except ConnectionError as e:
                raise RuntimeError(f"no Ray cluster found at {address!r} (start one with `ray start --head`, "
                                   "or set RAY_ADDRESS / --address)") from None
            cpus = ray.cluster_resources().get("CPU", 0)
            return False, f"joined the Ray cluster at {address} ({cpus:g} CPUs, {len(ray.nodes())} node(s))"
        # Logical CPUs are scheduling tokens: ranks mostly wait in collectives and use one thread each,
        # so the embedded Ray offers more than the cores (room for Engine.scale to add shards).
        cpus = max(os.cpu_count() or 1, min_cpus, 32)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)
        return True, f"started an embedded local Ray ({cpus} logical CPUs; --address auto joins a running one)"
    finally:
        auth.setLevel(level)


def _check_reachable(address: str) -> None:
    """A dead address makes ray.init retry for minutes: look for a listener first (a few seconds)."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address_or_die  # Ray is pinned to 2.60

    if address.startswith("ray://"):
        return  # Ray Client: its own handshake and timeout
    try:
        host, port = canonicalize_bootstrap_address_or_die(address).rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=3).close()
    except (ConnectionError, OSError, ValueError):
        raise RuntimeError(f"no Ray cluster found at {address!r} (start one with `ray start --head`, "
                           "or set RAY_ADDRESS / --address)") from None


def _fit(bundles: list[dict[str, float]], nodes: list[dict[str, float]], strategy: str) -> bool:
    """First-fit decreasing of `bundles` into per-node capacities under a Ray placement strategy."""
    need = lambda b: sum(b.values())  # noqa: E731 - size key for the decreasing order
    order = sorted(bundles, key=need, reverse=True)
    if strategy == "STRICT_PACK":
        total = {k: sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b}
        return any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in total.items()) for n in nodes)
    free = [dict(n) for n in nodes]
    used: set[int] = set()
    for b in order:
        for i, n in enumerate(free):
            if strategy == "STRICT_SPREAD" and i in used:
                continue
            if all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items()):
                for k, v in b.items():
                    n[k] = n.get(k, 0.0) - v
                used.add(i)
                break
        else:
            return False
    return True


def _summary(res: list[dict[str, float]]) -> str:
    keys = ("CPU", "GPU")
    return "; ".join(", ".join(f"{k} {n.get(k, 0):g}" for k in keys) for n in res) or "no nodes"


def check_fits(bundles: list[dict[str, float]], strategy: str, wait_for_nodes_s: float = 0.0) -> None:
    """ValueError at once if the cluster's nodes (their total resources) can never hold `bundles`.

    On an autoscaling cluster new nodes may come: `wait_for_nodes_s` > 0 keeps checking that long."""
    import ray

    deadline = time.monotonic() + wait_for_nodes_s
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if _fit(bundles, nodes, strategy):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(2.0)
    asked = {}
    for b in bundles:
        key = tuple(sorted(b.items()))
        asked[key] = asked.get(key, 0) + 1
    what = ", ".join(f"{n} x {dict(k)}" for k, n in asked.items())
    raise ValueError(f"the ranks need {what} ({strategy}) but this cluster's nodes have {_summary(nodes)}: "
                     "ask for fewer ranks or fewer CPUs/GPUs per rank (--cpus-per-rank 0.5), or add nodes"
                     + ("" if wait_for_nodes_s else " (on an autoscaling cluster, --wait-for-nodes SECONDS)"))


def wait_placed(pg: Any, bundles: list[dict[str, float]], timeout_s: float, every_s: float = 10.0) -> None:
    """Wait for `pg`, saying every `every_s` what it waits for; RuntimeError after `timeout_s`."""
    import ray

    deadline, t0 = time.monotonic() + timeout_s, time.monotonic()
    while True:
        left = deadline - time.monotonic()
        ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(every_s, left)))
        if ready:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"placement group of {len(bundles)} bundle(s) not placed within {timeout_s:.0f}s; "
                               f"the cluster has {ray.available_resources()} available now (other jobs may "
                               "hold the rest)")
        log.warning("dsray: waiting %.0fs for resources for %d rank(s) %s; available now: %s",
                    time.monotonic() - t0, len(bundles), bundles[0], ray.available_resources())
