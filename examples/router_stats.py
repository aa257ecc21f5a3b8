"""Read a running engine's Router statistics by name (what `dsray status` prints), or a saved run's.

Run:  dsray train --name live --steps 500 &   python examples/router_stats.py live
      python examples/router_stats.py --file runs/demo/checkpoint
"""

import sys

import numpy as np

if sys.argv[1:2] == ["--file"]:
    from dsray.report import load_stats

    stats = load_stats(sys.argv[2])
else:
    import ray

    from dsray.runtime import attach_router

    ray.init(address="auto", log_to_driver=False)
    stats = ray.get(attach_router(sys.argv[1] if len(sys.argv) > 1 else "dsray").stats.remote())

print(f"engine {stats['engine']}  step {stats['step']}  placement v{stats['placement'].get('version', 0)}")
for layer, bias, counts in zip(stats["moe_layers"], stats["bias"], stats["history"]["counts"][-1]):
    c = np.asarray(counts, dtype=float)
    mv = (c.max() - c.mean()) / max(c.mean(), 1e-9)
    print(f"layer {layer:3d}  MaxVio {mv:5.2f}  hottest e{int(c.argmax()):<4d} coldest e{int(c.argmin()):<4d} "
          f"bias [{min(bias):+.3f}, {max(bias):+.3f}]")
