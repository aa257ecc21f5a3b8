"""Run a function on N gloo ranks in spawned processes on 127.0.0.1.

    with RankPool(4) as pool:              # spawn once (importing torch is the slow part) ...
        results = pool.run(check_fn, arg)  # ... run many checks: check_fn(rank, world_size, arg) on every rank
    results = run_ranks(check_fn, 2, arg)  # one-off

`fn` must be importable by name (a module-level function). Its return value comes back by value
(plain pickle, no shared memory). Every wait is bounded: a rank that raises, dies or hangs fails the
run with its traceback, and the pool kills its processes (a later `run` spawns fresh ones).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

ADDR = "127.0.0.1"


def _worker(rank: int, world_size: int, port: int, timeout_s: float, cmd_q, res_q) -> None:
    os.environ.update(MASTER_ADDR=ADDR, MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # N ranks share 2 cores
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(ADDR, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        res_q.put((rank, "ready", None))
    except BaseException:
        res_q.put((rank, "error", traceback.format_exc()))
        return
    try:
        while True:
            job = cmd_q.get()
            if job is None:
                break
            fn, args = job
            try:
                res_q.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
            except BaseException:
                res_q.put((rank, "error", traceback.format_exc()))
                break
    finally:
        dist.destroy_process_group()


class RankPool:
    """`world_size` spawned processes in one gloo group, running functions in lockstep."""

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._procs: list[mp.Process] = []

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        # The store server lives in this process: no port race, ranks only connect to it.
        self._store = dist.TCPStore(ADDR, 0, self.world_size + 1, is_master=True,
                                    timeout=datetime.timedelta(seconds=self.timeout_s), wait_for_workers=False)
        self._res_q = ctx.Queue()
        self._cmd_qs = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, self.world_size, self._store.port, self.timeout_s, self._cmd_qs[r], self._res_q))
            for r in range(self.world_size)
        ]
        try:
            for p in self._procs:
                p.start()
        except BaseException:
            self.close(graceful=False)
            raise
        self._collect("ready")

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """`fn(rank, world_size, *args)` on every rank; the results by rank."""
        if not self._procs:
            self._start()
        for q in self._cmd_qs:
            q.put((fn, args))
        return [pickle.loads(b) for b in self._collect("ok")]

    def _collect(self, expect: str) -> list[Any]:
        results: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        try:
            while len(results) < self.world_size:
                try:
                    rank, status, payload = self._res_q.get(timeout=0.2)
                except queue.Empty:
                    dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if not p.is_alive() and r not in results]
                    if dead:
                        raise RuntimeError(f"rank(s) exited without a result (rank, exitcode): {dead}") from None
                    if time.monotonic() > deadline:
                        missing = sorted(set(range(self.world_size)) - set(results))
                        raise TimeoutError(f"rank(s) {missing} gave no result within {self.timeout_s} s") from None
                    continue
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                assert status == expect, (rank, status)
                results[rank] = payload
        except BaseException:
            self.close(graceful=False)
            raise
        return [results[r] for r in range(self.world_size)]

    def close(self, graceful: bool = True) -> None:
        if not self._procs:
            return
        if graceful:
            for q in self._cmd_qs:
                q.put(None)
        started = [p for p in self._procs if p.pid is not None]
        deadline = time.monotonic() + (5.0 if graceful else 0.0)
        for p in started:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in started:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for q in [self._res_q, *self._cmd_qs]:
            q.close()
            q.cancel_join_thread()
        self._procs = []
        del self._store


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """`fn(rank, world_size, *args)` on `world_size` fresh gloo ranks; the results by rank."""
    with RankPool(world_size, timeout_s) as pool:
        return pool.run(fn, *args)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """`|actual - expected| <= rtol * max|expected|` elementwise; on failure print max/mean diff."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    scale = e.abs().max().item() if e.numel() else 0.0
    tol = rtol * max(scale, 1e-30)
    if diff.numel() and diff.max().item() > tol:
        raise AssertionError(
            f"{what}: max diff {diff.max().item():.3e} (tol {tol:.3e}), mean diff {diff.mean().item():.3e}, "
            f"max |expected| {scale:.3e}"
        )
