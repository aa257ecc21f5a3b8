"""Helpers shared by runtime tests."""

from __future__ import annotations

import torch


def alive_dsray_actors(wait_s: float = 10.0) -> list[str]:
    """Named dsray actors still registered with the connected Ray (GCS; no dashboard needed)."""
    import time

    import ray

    deadline = time.monotonic() + wait_s
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("dsray-")]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


def reference_grads(model, cfg) -> dict[str, torch.Tensor]:
    """Single-process gradients under checkpoint keys (experts unstacked), to compare with Engine.grads()."""
    from dsray.model.hf import EXPERT_PARAM, expert_key, to_hf_name

    out = {}
    for n, p in model.named_parameters():
        m = EXPERT_PARAM.match(n)
        if m:
            layer = int(to_hf_name(m.group(1), cfg).split(".")[2])
            for e in range(p.shape[0]):
                out[expert_key(layer, e, m.group(2))] = p.grad[e]
        else:
            out[to_hf_name(n, cfg)] = p.grad
    return out
