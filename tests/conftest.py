"""Shared fixtures: one Ray instance per test session, started only when a test asks for it, and the
suite's one tiny model (`tiny.TINY`) as a config, a model and a checkpoint. A test that needs a
variant derives it from these (``tiny_config.merged({...})``) rather than writing its own."""

from __future__ import annotations

import os

import pytest
import torch

from jobs.datasets import default_data_settings
from perceiver_stream.checkpoint import save_checkpoint
from perceiver_stream.config import StreamingConfig
from perceiver_stream.streaming import StreamingPerceiverIO
from pipeline.sources.synthetic import CLASSES
from session_ray import SESSION_RAY
from tiny import TINY

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and no dashboard, shut down at the end of the session.

    ``address="local"``: a new Ray of its own even when another cluster runs on the machine."""
    import ray  # here, not at the top: a session without a Ray test never imports it

    ray.init(**SESSION_RAY, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config() -> StreamingConfig:
    """The tiny model's config (`tiny.TINY`): the one the hand-made batches of `tiny` are sized for."""
    return StreamingConfig.from_dict(TINY)


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> StreamingPerceiverIO:
    """The tiny model in eval mode, seed 0; shared by the session, so a test must not change it."""
    torch.manual_seed(0)
    return StreamingPerceiverIO(tiny_config).eval()


@pytest.fixture(scope="session")
def rig_config(tiny_config) -> StreamingConfig:
    """The tiny model for the synthetic rig's windows: the rig's eight classes."""
    return tiny_config.merged({"labels": {"class_names": CLASSES}})


@pytest.fixture(scope="session")
def tiny_checkpoint(rig_config, tmp_path_factory):
    """An untrained checkpoint of the rig's tiny model, named "tiny", "trained" on seeds 0 and 1 with
    the data settings it reads (video at the flow grid's size, audio at the mel adapter's rate)."""
    torch.manual_seed(0)
    meta = {"train_seeds": [0, 1], "data": default_data_settings(rig_config)}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", StreamingPerceiverIO(rig_config), meta)
