"""The `dsray` command as a user runs it: subprocesses with their own embedded Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONUNBUFFERED": "1"}
ENV.pop("RAY_ADDRESS", None)


def dsray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _ray_workers() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "ray::(DriverRank|ExpertShard|Router)"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def test_train_generate_report(tmp_path: Path):
    ck, png = tmp_path / "ck", tmp_path / "r.png"
    r = dsray("train", "--steps", "4", "--drivers", "2", "--shards", "2", "--batch-size", "4", "--seq-len", "32",
              "--save", str(ck), "--report", str(png), "--no-metrics", "--name", "clitrain")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "saved checkpoint" in r.stdout and (ck / "model.safetensors").exists() and png.stat().st_size > 10_000
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
    assert not _ray_workers(), "stray dsray workers before the test"
    p = subprocess.Popen([sys.executable, "-m", "dsray.cli", "train", "--steps", "100000", "--log-every", "1",
                          "--shards", "2", "--no-metrics", "--name", "ctrlc"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            seen += line
            if line.startswith("step"):
                break
        assert "step" in seen, seen[-2000:]
        assert _ray_workers(), "the ranks should be running now"
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=60)
        rest = p.stdout.read()
        assert rc == 130, rest[-2000:]
        assert "interrupted" in rest
        deadline = time.monotonic() + 20
        while _ray_workers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_workers()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
