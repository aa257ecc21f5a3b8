"""`dsray report` PNG and `dsray top` view, on statistics of a small simulated balancing run."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from dsray.report import STATS_FILE, load_stats, render_report
from dsray.top import load_bar, render, run_top, stats_from_metrics

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


# ---- `dsray top` from a metrics endpoint's exposition text ------------------------------------------

# Labels Ray 2.60 adds to every series (besides WorkerId), as on a real metrics endpoint.
RAY_LABELS = {"Component": "core_worker", "NodeAddress": "127.0.0.1", "SessionName": "session_x", "Version": "2.60.0",
              "otel_scope_name": "ray._private.telemetry.open_telemetry_metric_recorder",
              "otel_scope_schema_url": "", "otel_scope_version": ""}


def exposition(samples: list[tuple[str, dict[str, str], float]], worker: str = "w1") -> str:
    """Prometheus text format as Ray's metrics agent serves it: one # TYPE per family, Ray's labels on
    every sample. Several calls (different `worker`) concatenate like an old and a restarted Router."""
    lines = []
    for name, labels, value in samples:
        kind = "counter" if name.endswith("_total") else "gauge"
        base = name.removesuffix("_total")
        lines.append(f"# TYPE {base} {kind}")
        tags = ",".join(f'{k}="{v}"' for k, v in {**RAY_LABELS, "WorkerId": worker, **labels}.items())
        lines.append(f"{name}{{{tags}}} {value!r}")
    return "\n".join(lines) + "\n"


def _engine_samples(engine: str, shares: dict[int, dict[int, float]], *, steps: dict[str, float],
                    version: float = 3.0, vio: float = 0.1) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for layer, by_expert in shares.items():
        out += [("ray_dsray_maxvio_batch", {"engine": engine, "layer": str(layer)}, vio * layer),
                ("ray_dsray_maxvio_window", {"engine": engine, "layer": str(layer)}, vio / 10 * layer)]
        for e, v in by_expert.items():
            tags = {"engine": engine, "layer": str(layer), "expert": str(e)}
            out += [("ray_dsray_expert_load_share", tags, v), ("ray_dsray_router_bias", tags, 0.001 * (e - 1))]
    out += [("ray_dsray_steps_total", {"engine": engine, "mode": m}, n) for m, n in steps.items()]
    out += [("ray_dsray_tokens_per_second", {"engine": engine, "mode": "train"}, 5000.0),
            ("ray_dsray_tokens_per_second", {"engine": engine, "mode": "generate"}, 70.0),
            ("ray_dsray_placement_version", {"engine": engine}, version)]
    return out


def test_stats_from_metrics_full_detail_and_a_restarted_router():
    full = {1: {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, 3: {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}}
    old = {1: {0: 0.3, 1: 0.2, 2: 0.3, 3: 0.2}}  # the previous Router's layer-1 gauges, not yet expired
    text = (exposition(_engine_samples("other", {1: {0: 1.0}}, steps={"train": 99.0}))
            + exposition(_engine_samples("e1", full, steps={"train": 3.0, "generate": 1.0}))
            + exposition(_engine_samples("e1", old, steps={"train": 4.0}, version=2.0, vio=0.05), worker="w0"))
    stats = stats_from_metrics(text, "e1")
    assert stats["engine"] == "e1" and stats["moe_layers"] == [1, 3] and stats["n_experts"] == 4
    assert stats["step"] == 7  # train steps of both Router processes (counters add up)
    assert stats["placement_version"] == 3  # gauges: max
    assert stats["tokens_per_s"] == 5000.0  # the mode with the most steps: train
    assert stats["maxvio_batch"] == pytest.approx([0.1, 0.3])
    assert stats["maxvio_window"] == pytest.approx([0.01, 0.03])
    assert [pytest.approx(c) for c in [[0.2, 0.2, 0.3, 0.3], [0.25] * 4]] == stats["last_counts"]  # shares: avg
    assert [pytest.approx([-0.001, 0.0, 0.001, 0.002])] * 2 == stats["bias"]
    text = _text(render(stats))
    assert "e1" in text and "step 7" in text and "placement v3" in text and "5,000" in text
    row = [ln for ln in text.splitlines() if ln.count("│") > 2 and ln.split("│")[1].strip() == "3"]
    assert row and "0.300" in row[0] and "0.030" in row[0] and "0 25.0%" in row[0], text


def test_stats_from_metrics_top_and_none_detail():
    # expert_detail="top" with top_n=2 of 8 experts: only the 2 coldest (0, 1) and 2 hottest (6, 7).
    top = {0: {0: 0.02, 1: 0.03, 6: 0.25, 7: 0.3}}
    stats = stats_from_metrics(exposition(_engine_samples("t", top, steps={"generate": 5.0})), "t", n_experts=8)
    rest = (1.0 - 0.6) / 4
    assert stats["last_counts"] == [pytest.approx([0.02, 0.03, rest, rest, rest, rest, 0.25, 0.3])]
    assert stats["step"] == 0 and stats["tokens_per_s"] == 70.0  # only generate steps
    text = _text(render(stats))
    assert "7 30.0%" in text and "0 2.0%" in text and "experts 8" in text
    # expert_detail="none": MaxVio per layer only.
    none = [s for s in _engine_samples("n", {2: {0: 1.0}, 4: {0: 1.0}}, steps={"train": 1.0})
            if s[0] not in ("ray_dsray_expert_load_share", "ray_dsray_router_bias")]
    stats = stats_from_metrics(exposition(none), "n")
    assert stats["moe_layers"] == [2, 4] and stats["last_counts"] == [[], []] and "n_experts" not in stats
    assert stats["maxvio_batch"] == pytest.approx([0.2, 0.4])
    assert "0.400" in _text(render(stats))


def test_fetch_metrics_names_the_url_it_cannot_read():
    import socket

    from dsray.top import fetch_metrics

    with socket.socket() as s:  # a loopback port that nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/metrics"
        with pytest.raises(RuntimeError, match=f"cannot read metrics at {url}"):
            fetch_metrics(url, timeout=5)
    with pytest.raises(RuntimeError, match="cannot read metrics at nowhere"):
        fetch_metrics("nowhere")


def test_top_knows_the_metrics_modes():
    from dsray import top
    from dsray.runtime import metrics

    assert top.MODES == metrics.MODES  # a copy, so that dsray.top does not import Ray


def test_stats_from_metrics_names_a_missing_engine():
    text = exposition(_engine_samples("alpha", {1: {0: 1.0}}, steps={"train": 1.0}))
    with pytest.raises(ValueError, match=r"'beta'.*engines there: alpha"):
        stats_from_metrics(text, "beta")
    with pytest.raises(ValueError, match="engines there: none"):
        stats_from_metrics("", "beta")
