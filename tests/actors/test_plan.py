"""Resource planning for the actors (CPUs, GPUs, the distill actor) and the helpers' CPU priority."""

from __future__ import annotations

import os

import pytest
import ray

from actor_inputs import make_cfg
from actors.plan import plan_actors
from actors.sink import SinkActor
from actors.source_pool import SourcePoolActor
from pipeline.errors import ConfigError


def test_plan_actors_splits_cpus_and_resolves_the_device():
    cfg = make_cfg(4)
    cpu = plan_actors(cfg, {"CPU": 2.0})
    assert cpu.device == "cpu" and cpu.model_cpus == 1 and cpu.model_gpus == 0
    assert cpu.model_cpus + cpu.source_actors * cpu.source_cpus + cpu.sink_cpus <= 2.0 + 1e-9
    for n in (1, 3, 7):
        p = plan_actors(make_cfg(n), {"CPU": 2.0})
        assert p.model_cpus + p.source_actors * p.source_cpus + p.sink_cpus <= 2.0
    assert plan_actors(cfg, {"CPU": 16.0}).model_cpus == 8
    gpu = plan_actors(cfg, {"CPU": 8.0, "GPU": 1.0})
    assert gpu.device == "cuda" and gpu.model_gpus == 1 and gpu.model_cpus == 1
    assert plan_actors(make_cfg(4, device="cpu"), {"CPU": 8.0, "GPU": 1.0}).device == "cpu"
    with pytest.raises(ConfigError, match="no GPU"):
        plan_actors(make_cfg(4, device="cuda"), {"CPU": 8.0})


def test_plan_actors_makes_room_for_the_distill_actor():
    cfg = make_cfg(4)
    cfg.distill.enabled = True
    cpu = plan_actors(cfg, {"CPU": 2.0})
    assert cpu.distill_cpus > 0 and cpu.distill_device == "cpu" and cpu.distill_gpus == 0
    assert cpu.model_cpus + cpu.source_actors * cpu.source_cpus + cpu.sink_cpus + cpu.distill_cpus <= 2.0
    gpu = plan_actors(cfg, {"CPU": 8.0, "GPU": 1.0})
    assert (gpu.model_gpus, gpu.distill_gpus, gpu.distill_device) == (0.5, 0.5, "cuda")
    cfg.model.num_gpus = 1.0  # the model takes the whole GPU: the student trains on the CPU
    assert plan_actors(cfg, {"CPU": 8.0, "GPU": 1.0}).distill_device == "cpu"


def test_helpers_lower_their_cpu_priority_as_configured(ray_session, tmp_path):
    def niceness(_actor) -> int:
        return os.nice(0)

    cfg = make_cfg(1)
    cfg.runtime.helper_nice = 2
    plain = ray.remote(SinkActor).options(num_cpus=0.01).remote(str(tmp_path / "a"), config_hash="x")
    sink = ray.remote(SinkActor).options(num_cpus=0.01).remote(str(tmp_path / "b"), config_hash="x", nice=1)
    src = ray.remote(SourcePoolActor).options(num_cpus=0.01).remote(cfg)
    try:
        base = ray.get(plain.__ray_call__.remote(niceness))  # Ray starts its workers at its own niceness
        assert base <= 17
        assert ray.get(sink.__ray_call__.remote(niceness)) == base + 1
        assert ray.get(src.__ray_call__.remote(niceness)) == base + 2
    finally:
        for a in (plain, sink, src):
            ray.kill(a)
    with pytest.raises(ValueError, match="helper_nice"):
        make_cfg(1).runtime.model_validate({"helper_nice": 25})
