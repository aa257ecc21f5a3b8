"""`dsray report` PNG and `dsray top` view, on statistics of a small simulated balancing run."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from dsray.report import STATS_FILE, load_stats, render_report
from dsray.top import load_bar, render, run_top

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def simulate_run(n_layers: int = 3, n_experts: int = 16, n_steps: int = 40, tokens: int = 512, top_k: int = 2,
                 gamma: float = 0.05, seed: int = 0) -> dict:
    """A toy router: fixed skewed affinities + bias updated by the sign rule (mean-centred), as the
    Router does it. Load starts collapsed on a few experts and spreads out as the bias grows."""
    g = torch.Generator().manual_seed(seed)
    affinity_LE = torch.randn(n_layers, n_experts, generator=g) * 2.0
    bias_LE = torch.zeros(n_layers, n_experts)
    hist = {"step": [], "maxvio_batch": [], "maxvio_window": [], "loss": [], "tokens_per_s": [], "counts": []}
    window_LE = torch.zeros(n_layers, n_experts)
    for step in range(1, n_steps + 1):
        scores_LTE = affinity_LE[:, None, :] + torch.randn(n_layers, tokens, n_experts, generator=g)
        ids_LTK = (scores_LTE + bias_LE[:, None, :]).topk(top_k, dim=-1).indices
        counts_LE = torch.stack([torch.bincount(ids.flatten(), minlength=n_experts) for ids in ids_LTK]).float()
        window_LE = 0.8 * window_LE + counts_LE
        err_LE = counts_LE.mean(dim=1, keepdim=True) - counts_LE
        bias_LE += gamma * torch.sign(err_LE)
        bias_LE -= bias_LE.mean(dim=1, keepdim=True)
        vio = lambda c: (c.max(dim=1).values / c.mean(dim=1) - 1).tolist()  # noqa: E731
        hist["step"].append(step)
        hist["maxvio_batch"].append(vio(counts_LE))
        hist["maxvio_window"].append(vio(window_LE))
        hist["loss"].append(None if step == 3 else 5.0 * 0.97 ** step + 1.0)  # one missing value
        hist["tokens_per_s"].append(None if step == 1 else 1000.0 + step)
        hist["counts"].append(counts_LE.long().tolist())
    return {"engine": "train", "step": n_steps, "moe_layers": list(range(1, n_layers + 1)), "n_experts": n_experts,
            "gamma": gamma, "placement": {"n_experts": n_experts, "slots": [list(range(n_experts))], "version": 2},
            "bias": bias_LE.tolist(), "history": hist}


@pytest.fixture(scope="module")
def stats() -> dict:
    return simulate_run()


def test_simulated_run_balances(stats):
    vio = stats["history"]["maxvio_batch"]
    assert max(vio[0]) > 1.0 and max(vio[-1]) < max(vio[0]) / 2, "the toy router should start skewed and balance"


def test_render_report_writes_png(stats, tmp_path):
    out = render_report(stats, tmp_path / "sub" / "report.png")
    data = out.read_bytes()
    assert out == tmp_path / "sub" / "report.png"
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 30_000, f"PNG only {len(data)} bytes: panels missing?"
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] >= 800 and img.shape[1] >= 1200
    assert list(tmp_path.joinpath("sub").iterdir()) == [out], "temp file left behind"


def test_render_report_without_loss_and_many_layers(tmp_path):
    s = simulate_run(n_layers=12, n_experts=64, n_steps=5)
    s["history"]["loss"] = [None] * 5
    del s["history"]["maxvio_window"]
    assert render_report(s, tmp_path / "r.png", last_n=2).read_bytes()[:8] == PNG_SIGNATURE


def test_render_report_empty_history(tmp_path):
    s = simulate_run(n_steps=1)
    s["history"] = {k: [] for k in s["history"]}
    assert render_report(s, tmp_path / "r.png").read_bytes()[:8] == PNG_SIGNATURE


def test_load_stats_paths(stats, tmp_path):
    run = tmp_path / "run"
    (run / "ckpt_000040").mkdir(parents=True)
    (run / "ckpt_000040" / STATS_FILE).write_text(json.dumps(stats))
    assert load_stats(run)["step"] == 40  # run dir: newest checkpoint below it
    assert load_stats(run / "ckpt_000040") == stats  # checkpoint dir
    (run / STATS_FILE).write_text(json.dumps({**stats, "step": 41}))
    assert load_stats(run)["step"] == 41  # run dir's own file wins
    assert load_stats(str(run / STATS_FILE))["step"] == 41  # the file itself


def test_load_stats_errors_name_file_and_key(stats, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_stats(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=STATS_FILE):
        load_stats(tmp_path)
    f = tmp_path / STATS_FILE
    f.write_text("{not json")
    with pytest.raises(ValueError, match=f"{STATS_FILE}.*not valid JSON"):
        load_stats(f)
    f.write_text(json.dumps({k: v for k, v in stats.items() if k != "bias"}))
    with pytest.raises(ValueError, match=f"{STATS_FILE}.*'bias'"):
        load_stats(tmp_path)
    f.write_text(json.dumps({**stats, "history": {k: v for k, v in stats["history"].items() if k != "counts"}}))
    with pytest.raises(ValueError, match=r"missing key 'history\.counts'"):
        load_stats(f)
    f.write_text(json.dumps({**stats, "history": {**stats["history"], "loss": [1.0]}}))
    with pytest.raises(ValueError, match=r"'history\.loss' has 1 entries"):
        load_stats(f)


def _live(stats: dict) -> dict:
    hist = stats["history"]
    return {**stats, "last_counts": hist["counts"][-1], "maxvio_batch": [0.123, 4.5, 0.0625],
            "maxvio_window": [0.25, 0.5, 0.75], "tokens_per_s": 12345.0, "placement_version": 7}


def _text(renderable) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_top(stats):
    live = _live(stats)
    text = _text(render(live))
    assert "train" in text and "step 40" in text and "placement v7" in text and "12,345" in text
    for value in ("0.123", "4.500", "0.062", "0.250", "0.750"):
        assert value in text, value
    lines = text.splitlines()
    for layer, counts in zip(live["moe_layers"], live["last_counts"]):
        hot = max(range(len(counts)), key=counts.__getitem__)
        share = f"{hot} {counts[hot] / sum(counts):.1%}"
        row = [ln for ln in lines if ln.count("│") > 2 and ln.split("│")[1].strip() == str(layer)]
        assert row and share in row[0], f"layer {layer}: {share!r} not in {row}"
    assert any(b in text for b in "▁▂▃▄▅▆▇█")


def test_render_top_falls_back_to_history_and_chunks(stats):
    text = _text(render(stats))  # saved file: no live fields
    assert f"{stats['history']['maxvio_batch'][-1][0]:.3f}" in text and "placement v2" in text
    bar = load_bar(list(range(100)), width=32)
    assert [len(ln) for ln in bar.splitlines()] == [32, 32, 32, 4]
    assert bar[0] == "▁" and bar.splitlines()[-1][-1] == "█"


def test_run_top_iterations():
    calls = []

    def fetch() -> dict:
        calls.append(1)
        return _live(simulate_run(n_steps=2))

    console = Console(record=True, width=120, force_terminal=False)
    run_top(fetch, interval=0.0, iterations=2, console=console)
    assert len(calls) == 2
    assert "MaxVio" in console.export_text()


def test_run_top_stops_on_ctrl_c():
    calls = []

    def fetch() -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _live(simulate_run(n_steps=2))

    run_top(fetch, interval=0.0, console=Console(record=True, width=120))
    assert len(calls) == 2
