"""Real local Ray for runtime tests: one embedded instance per test module, all on 127.0.0.1."""

from __future__ import annotations

import os

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # More logical CPUs than cores: ranks mostly wait in collectives; each uses one torch thread.
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
