"""Operating a running engine from outside: `dsray scale` / `dsray rebalance` queue requests on the named
Router; the engine applies them at its next step boundary and `dsray status` lists them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch

from dsray.runtime import Engine
from runtime_helpers import alive_dsray_actors


def test_scale_and_rebalance_requests_from_the_cli(local_ray):
    address = local_ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    batch = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with Engine.from_config("debug", num_drivers=1, num_shards=2, metrics=False, name="ops") as eng:
        eng.train_step(batch)
        # queue from the CLI while the engine keeps stepping in this process
        out: dict = {}

        def cli(*args):
            out[args[0]] = subprocess.run([sys.executable, "-m", "dsray.cli", *args, "--name", "ops", "--address",
                                           address, "--wait", "120"], env=env, capture_output=True, text=True,
                                          timeout=180)

        t = threading.Thread(target=cli, args=("scale", "--shards", "3"))
        t.start()
        while t.is_alive():
            eng.train_step(batch)
            eng._last_requests_check = 0.0  # look at the queue every step in this test
        t.join()
        assert out["scale"].returncode == 0, out["scale"].stderr
        assert "applied: placement v0 -> v1" in out["scale"].stdout and eng.num_shards == 3
        t = threading.Thread(target=cli, args=("rebalance", "--replicas", "2"))
        t.start()
        while t.is_alive():
            eng.train_step(batch)
            eng._last_requests_check = 0.0
        t.join()
        assert out["rebalance"].returncode == 0, out["rebalance"].stderr
        p = eng.placement
        assert p.version == 2 and sum(len(p.replicas(e)) > 1 for e in range(p.n_experts)) == 2
        st = subprocess.run([sys.executable, "-m", "dsray.cli", "status", "--name", "ops", "--address", address],
                            env=env, capture_output=True, text=True, timeout=120)
        assert st.returncode == 0, st.stderr
        assert "applied  #1 scale: v0 -> v1" in st.stdout and "applied  #2 rebalance: v1 -> v2" in st.stdout
        bad = subprocess.run([sys.executable, "-m", "dsray.cli", "scale", "--name", "ops", "--shards", "0",
                              "--address", address], env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "--shards 0" in bad.stderr
    assert not alive_dsray_actors()
