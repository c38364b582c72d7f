"""A real local Ray cluster shared by the tests in tests/ray (starting one costs ~3 s)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_4_cpus():
    """Local Ray with 4 logical CPUs on this 2-core machine (trainers, Serve and Tune share it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()
