"""A new user's first hour, scripted: the README's commands and the mistakes people make, on a box where
another Ray cluster (`ray start --head`, 2 CPUs) already runs. Every step is a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prom_utils

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, **prom_utils.LOOPBACK_ENV, "PYTHONUNBUFFERED": "1"}
for k in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
    ENV.pop(k, None)


def dsray(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, f"exit {r.returncode}, expected {code}\n{r.stderr[-3000:]}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{r.stderr}"
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def head():
    with prom_utils.RayHead(num_cpus=2) as h:
        yield h


def test_first_hour(head, tmp_path: Path) -> None:
    # The README's main command, twice: each run gets its own folder, nothing is replaced.
    demo_args = ("demo", "--steps", "20", "--max-new-tokens", "20", "--no-metrics")
    ok(dsray(*demo_args, cwd=tmp_path))
    time.sleep(1.1)  # run folders are named by the second
    r = ok(dsray(*demo_args, cwd=tmp_path))
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((p / "checkpoint" / "model.safetensors.index.json").exists() and (p / "report.png").exists()
                                  for p in runs), runs
    assert "started an embedded local Ray" in r.stdout  # beside the running head, not joined to it
    assert "ROMEO" in r.stdout and "saved checkpoint" in r.stdout

    # --save into a folder holding someone's file: refused at once, before Ray starts; the file stays.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    t0 = time.monotonic()
    r = dsray("train", "--steps", "5", "--save", str(mine), cwd=tmp_path)
    one_line_error(r, 2, "notes.txt", "not a dsray checkpoint")
    assert time.monotonic() - t0 < 15 and (mine / "notes.txt").read_text() == "keep me"
    r = dsray("train", "--steps", "5", "--save", str(mine), "--overwrite", cwd=tmp_path)
    one_line_error(r, 2, "notes.txt")  # --overwrite never deletes foreign files either

    # Train, then the same folder again: needs --overwrite, which replaces the checkpoint.
    ck = tmp_path / "ck"
    train = ("train", "--steps", "6", "--batch-size", "4", "--save", str(ck), "--no-metrics", "--name", "walk")
    ok(dsray(*train, "--report", str(tmp_path / "run.png"), cwd=tmp_path))
    assert (tmp_path / "run.png").stat().st_size > 10_000
    before = (ck / "dsray_state.json").read_text()
    one_line_error(dsray(*train, cwd=tmp_path), 2, "--overwrite")
    assert (ck / "dsray_state.json").read_text() == before
    ok(dsray(*train, "--steps", "7", "--overwrite", cwd=tmp_path))
    assert '"step": 7' in (ck / "dsray_state.json").read_text()
    assert next(ck.glob("model-*.safetensors")).stat().st_mode & 0o777 == (ck / "config.json").stat().st_mode & 0o777
    one_line_error(dsray("demo", "--max-new-tokens", "-5", cwd=tmp_path), 2, "--max-new-tokens -5")
    one_line_error(dsray("generate", "--checkpoint", str(ck), "--max-new-tokens", "-5", cwd=tmp_path), 2,
                   "--max-new-tokens -5")

    # Generate and report.
    g = ok(dsray("generate", "--checkpoint", str(ck), "--prompt", "KING:", "--max-new-tokens", "8", "--shards", "1",
                 "--no-metrics", cwd=tmp_path))
    assert g.stdout.startswith("KING:")
    ok(dsray("report", str(ck), "--out", str(tmp_path / "rep.png"), cwd=tmp_path))
    one_line_error(dsray("report", str(ck), "--out", str(tmp_path / "rep.png"), cwd=tmp_path), 2, "--overwrite")

    # status / top: no Ray at an address, no engine on a cluster, then a running engine.
    one_line_error(dsray("status", "--address", "127.0.0.1:1", cwd=tmp_path, timeout=120), 1, "no Ray cluster")
    one_line_error(dsray("top", "--address", "127.0.0.1:1", cwd=tmp_path, timeout=120), 1, "no Ray cluster")
    one_line_error(dsray("status", "--address", head.address, cwd=tmp_path, env=head.env), 2,
                   "no running dsray engine named 'dsray'")
    # A cluster too small for the ranks: told within seconds what was asked and what there is.
    t0 = time.monotonic()
    r = dsray("train", "--address", head.address, "--drivers", "2", "--shards", "3", cwd=tmp_path, env=head.env)
    one_line_error(r, 2, "5 x {'CPU': 1.0}", "CPU 2")
    assert time.monotonic() - t0 < 30
    live = subprocess.Popen([sys.executable, "-m", "dsray.cli", "train", "--address", "auto", "--steps", "100000",
                             "--log-every", "1", "--cpus-per-rank", "0.5", "--no-metrics", "--name", "live"],
                            cwd=tmp_path, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = ""
        while not any(line.startswith("step") for line in seen.splitlines()):
            line = live.stdout.readline()
            assert line, seen[-2000:]
            seen += line
        assert "joined the Ray cluster" in seen, seen
        s = ok(dsray("status", "--name", "live", "--address", head.address, cwd=tmp_path, env=head.env))
        assert "dsray status" in s.stdout and "engine live" in s.stdout
        t = ok(dsray("top", "--name", "live", "--iterations", "1", "--address", head.address, cwd=tmp_path,
                     env=head.env))
        assert "MaxVio" in t.stdout
        live.send_signal(signal.SIGINT)
        assert live.wait(timeout=60) == 130
    finally:
        if live.poll() is None:
            os.killpg(live.pid, signal.SIGKILL)

    # The job example against the 2-CPU head it is documented with.
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "submit_job.py"), head.dashboard_url], cwd=ROOT,
                       env=head.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "final status: SUCCEEDED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_help_shows_defaults(tmp_path: Path) -> None:
    for cmd in ("train", "demo", "generate", "status", "top", "report"):
        out = ok(dsray(cmd, "--help", cwd=tmp_path)).stdout
        assert "(default:" in out, cmd
    assert "(default: 100)" in ok(dsray("train", "--help", cwd=tmp_path)).stdout
