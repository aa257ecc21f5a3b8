"""Shared bits of the benchmarks: machine/commit metadata, timing, tables, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("DSRAY_RESULTS") or ROOT / "benchmarks" / "results")  # GPU runs: $OUT
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def git_commit() -> dict[str, Any]:
    """HEAD and whether the tree had local changes; DSRAY_COMMIT wins (the GPU machine has no .git)."""
    env = os.environ.get("DSRAY_COMMIT")
    if env:
        return {"commit": env, "source": "DSRAY_COMMIT"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head + ("+dirty" if dirty else ""), "source": "git"}
    except Exception as e:  # noqa: BLE001 - metadata only
        return {"commit": "unknown", "source": f"git failed: {e}"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(), "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "device": device,
        # other work on the box skews CPU timings: 1-min load average at start and at the end of the run
        "loadavg_start": LOAD_AT_START, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_mem_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda)
    for mod in ("transformers", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def machine_tag(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).replace("NVIDIA", "").strip()
        return "gpu-" + "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    return f"cpu{os.cpu_count()}"


def bench(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> dict[str, float]:
    """Median/min/max milliseconds of `fn` over `iters` runs after `warmup` runs.

    CUDA: one pair of events around each call (the call's host syncs, e.g. .tolist(), are inside it)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "iters": iters,
            "warmup": warmup}


def rel_maxdiff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in fp32."""
    a, ref = a.float(), ref.float()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format)."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in cols])
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(row)) for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def write_result(name: str, device: str, payload: dict[str, Any], out: str | None = None) -> Path:
    date = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out) if out else RESULTS / f"{name}-{machine_tag(device)}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
           "git": git_commit(), "machine": machine_info(device), **payload}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
