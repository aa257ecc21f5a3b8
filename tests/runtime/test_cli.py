"""The `dsray` command as a user runs it: subprocesses with their own embedded Ray."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONUNBUFFERED": "1"}
ENV.pop("RAY_ADDRESS", None)


def dsray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


DSRAY_WORKER = re.compile(r"ray::(DriverRank|ExpertShard|Router)\b")


def _running(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running. psutil compares start times, so a pid reused by someone else's
    process does not count; a zombie has exited (it only waits to be reaped) and does not count either."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _ray_workers(procs: Iterable[psutil.Process]) -> list[str]:
    """'pid cmdline' of the running dsray actor processes among `procs` (Ray sets an actor's process
    title, i.e. its cmdline, to `ray::ClassName...`; the kernel's 15-byte name would cut ExpertShard)."""
    return [d for d in map(_describe, _running(procs)) if DSRAY_WORKER.match(d.split(" ", 1)[1])]


def _describe(p: psutil.Process) -> str:
    try:  # Ray pads an actor's process title with spaces
        return f"{p.pid} {' '.join(p.cmdline()).strip()}"
    except psutil.NoSuchProcess:  # exited meanwhile
        return f"{p.pid} (exited)"


def test_train_generate_report(tmp_path: Path):
    ck, png = tmp_path / "ck", tmp_path / "r.png"
    r = dsray("train", "--steps", "4", "--drivers", "2", "--shards", "2", "--batch-size", "4", "--seq-len", "32",
              "--save", str(ck), "--report", str(png), "--no-metrics", "--name", "clitrain")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "saved checkpoint" in r.stdout and (ck / "model.safetensors.index.json").exists() and png.stat().st_size > 10_000
    assert "MaxVio" in r.stdout  # the per-layer load table
    g = dsray("generate", "--checkpoint", str(ck), "--prompt", "KING:", "--prompt", "HAMLET:", "--max-new-tokens",
              "8", "--shards", "1", "--no-metrics", "--name", "cligen")
    assert g.returncode == 0, g.stderr[-3000:]
    assert g.stdout.startswith("KING:") and "\nHAMLET:" in g.stdout and "2 prompt(s)" in g.stderr
    rep = dsray("report", str(ck), "--out", str(tmp_path / "again.png"))
    assert rep.returncode == 0 and (tmp_path / "again.png").exists()


def test_bad_input_exits_nonzero_with_a_clear_message(tmp_path: Path):
    r = dsray("generate", "--checkpoint", str(tmp_path / "nowhere"), "--no-metrics")
    assert r.returncode == 2 and "nowhere" in r.stderr
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    (tmp_path / "x" / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    r = dsray("generate", "--checkpoint", str(tmp_path / "x"), "--no-metrics")
    assert r.returncode == 2 and "unpickle" in r.stderr
    r = dsray("train", "--preset", "nope", "--steps", "1")
    assert r.returncode == 2 and "nope" in r.stderr
    r = dsray("report", str(tmp_path / "none"))
    assert r.returncode == 2 and "none" in r.stderr


def test_ctrl_c_stops_every_actor_and_process():
    """Ctrl-C on `dsray train` ends it with exit code 130 and leaves none of its processes behind.

    Only this test's own processes are looked at (other people may run Ray on this machine): the
    embedded Ray's gcs_server and raylet are children of the `dsray train` process and the actors'
    workers children of the raylet, so everything the run started is a descendant of the process
    started here. Their set is recorded while the job runs (at each of the first step lines, in case a
    worker starts late), and after Ctrl-C every one of them must be gone, not only the actors."""
    p = subprocess.Popen([sys.executable, "-m", "dsray.cli", "train", "--steps", "100000", "--log-every", "1",
                          "--shards", "2", "--no-metrics", "--name", "ctrlc"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    tracked: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 120
        seen, steps = "", 0
        while time.monotonic() < deadline and steps < 3:
            line = p.stdout.readline()
            if not line:  # EOF: the run died
                break
            seen += line
            if line.startswith("step"):
                steps += 1
                tracked.update((c.pid, c) for c in psutil.Process(p.pid).children(recursive=True))
        assert steps, seen[-2000:]
        workers = _ray_workers(tracked.values())
        assert {DSRAY_WORKER.match(w.split(" ", 1)[1]).group(1) for w in workers} == {
            "DriverRank", "ExpertShard", "Router"}, f"the ranks should be running now: {workers}"
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=60)
        rest = p.stdout.read()
        assert rc == 130, rest[-2000:]
        assert "interrupted" in rest
        deadline = time.monotonic() + 20
        while _running(tracked.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_workers(tracked.values())
        left = [_describe(q) for q in _running(tracked.values())]
        assert not left, f"processes of the run still alive after Ctrl-C: {left}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        for q in _running(tracked.values()):  # Ray's workers call setsid: not in p's process group
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
