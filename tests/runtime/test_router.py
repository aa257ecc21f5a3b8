"""Router state machine (the class itself; the actor is exercised in test_engine.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsray.runtime.router import Router, maxvio


def test_maxvio_hand_computed():
    assert np.allclose(maxvio(np.array([[1, 2, 3, 6], [4, 4, 4, 4], [0, 0, 0, 0]])), [1.0, 0.0, 0.0])


def test_bias_rule_and_modes():
    r = Router("t", [1, 2], 4, {"version": 0}, gamma=0.01, metrics=False, window=2)
    c = np.array([[10, 0, 5, 5], [1, 1, 1, 1]])
    out = r.report("train", c)
    assert np.allclose(out["bias"], [[-0.01, 0.01, 0, 0], [0, 0, 0, 0]])
    assert out["bias"].dtype == np.float32 and out["step"] == 1
    r.report("forward", c)  # inference records load but never moves the bias
    assert np.allclose(r.get_bias(), [[-0.01, 0.01, 0, 0], [0, 0, 0, 0]]) and r.step == 1
    r.report("train", np.array([[5, 5, 5, 5], [1, 1, 1, 1]]))
    st = r.stats()
    assert st["maxvio_batch"] == [0.0, 0.0]
    assert np.isclose(st["maxvio_window"][0], maxvio(np.array([[15, 5, 10, 10]]))[0])  # window of 2 steps
    assert st["history"]["mode"] == ["train", "forward", "train"]
    frozen = Router("t", [1], 4, {"version": 0}, gamma=0.0, metrics=False)
    frozen.report("train", np.array([[9, 0, 0, 0]]))
    assert not frozen.get_bias().any()
    with pytest.raises(ValueError, match="gamma"):
        Router("t", [1], 4, {}, gamma=-1, metrics=False)


def test_stats_feed_report_and_top(tmp_path):
    from dsray.report import load_stats, render_report
    from dsray.top import render

    r = Router("t", [1, 2, 3], 8, {"version": 3}, metrics=False)
    rng = np.random.default_rng(0)
    for _ in range(5):
        r.report("train", rng.integers(0, 50, (3, 8)), loss=2.0, step_seconds=0.1, tokens=100)
    (tmp_path / "dsray_router.json").write_text(json.dumps(r.stats()))
    stats = load_stats(tmp_path)
    assert render_report(stats, tmp_path / "r.png").stat().st_size > 10_000
    from rich.console import Console

    con = Console(record=True, width=140)
    con.print(render(r.stats()))
    assert "placement v3" in con.export_text()
