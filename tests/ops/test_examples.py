"""Examples are short, say how to run them, and run."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)


def test_examples_are_short_and_documented():
    assert len(EXAMPLES) >= 4
    for f in EXAMPLES:
        text = f.read_text()
        assert len(text.splitlines()) <= 60, f
        doc = ast.get_docstring(ast.parse(text))
        assert doc and "Run" in doc, f"{f.name}: docstring must say how to run it"


def run(name: str, *args: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    return r.stdout


def test_train_generate_and_read_stats(tmp_path):
    out = run("train_ep.py", cwd=tmp_path)
    assert "step 100" in out and (tmp_path / "runs/example/checkpoint/model.safetensors.index.json").exists()
    gen = run("generate.py", cwd=tmp_path)
    assert gen.count("greedy :") == 3 and gen.count("sampled:") == 3
    stats = run("router_stats.py", "--file", "runs/example/checkpoint", cwd=tmp_path)
    assert "engine example" in stats and "MaxVio" in stats


def test_scale_experts(tmp_path):
    out = run("scale_experts.py", cwd=tmp_path)
    assert "scaled to 4 shards" in out and "experts per shard [4, 4, 4, 4]" in out and "step 80" in out
