"""Shared fixtures: one Ray instance per test session, started only when a test asks for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and no dashboard, shut down at the end of the session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
