"""Resource planning for the actors (CPUs, GPUs, the distill actor) and the helpers' CPU priority."""

from __future__ import annotations

import os

import pytest
import ray

from actor_inputs import make_cfg
from actors.plan import NodeOffer, plan_actors
from actors.sink import SinkActor
from actors.source_pool import SourcePoolActor
from pipeline.errors import ConfigError


def one(cpus: float, gpus: float = 0.0) -> list[NodeOffer]:
    return [NodeOffer("node-a", cpus, gpus)]


def test_plan_actors_splits_cpus_and_resolves_the_device():
    cfg = make_cfg(4)
    cpu = plan_actors(cfg, one(2.0))
    assert cpu.device == "cpu" and cpu.model_cpus == 1 and cpu.model_gpus == 0
    assert cpu.model_cpus + cpu.source_actors * cpu.source_cpus + cpu.sink_cpus <= 2.0 + 1e-9
    for n in (1, 3, 7):
        p = plan_actors(make_cfg(n), one(2.0))
        assert p.model_cpus + p.source_actors * p.source_cpus + p.sink_cpus <= 2.0
    assert plan_actors(cfg, one(16.0)).model_cpus == 8
    gpu = plan_actors(cfg, one(8.0, 1.0))
    assert gpu.device == "cuda" and gpu.model_gpus == 1 and gpu.model_cpus == 1
    assert plan_actors(make_cfg(4, device="cpu"), one(8.0, 1.0)).device == "cpu"
    with pytest.raises(ConfigError, match="no GPU"):
        plan_actors(make_cfg(4, device="cuda"), one(8.0))


def test_plan_actors_asks_no_node_for_more_than_it_has():
    # The cluster: a head of 1 CPU and three nodes of 2. Planned on the total (7) the one
    # model actor asked for 3 CPUs, which no node has, and the run waited forever.
    nodes = [NodeOffer("head", 1.0), NodeOffer("n1", 2.0), NodeOffer("n2", 2.0), NodeOffer("n3", 2.0)]
    cfg = make_cfg(8)
    plan = plan_actors(cfg, nodes, driver_node="head")
    assert plan.model_cpus == 1 and len(plan.replicas) == 1 and plan.replicas[0].node == "n1"
    cfg.model.replicas = "auto"
    auto = plan_actors(cfg, nodes, driver_node="head")
    assert [(r.node, r.cpus) for r in auto.replicas] == [("n1", 1.0), ("n2", 1.0), ("n3", 1.0), ("head", 0.5)]
    # Each node's leftover (1 CPU, 0.5 on the head) holds its even share of the pools, and the head
    # the sink as well.
    assert auto.source_actors == 3 and auto.source_cpus == 0.4 and auto.sink_cpus == 0.1
    cfg.model.replicas = 6  # more replicas than nodes: they share their node's half
    assert [r.cpus for r in plan_actors(cfg, nodes).replicas] == [0.5, 0.5, 1.0, 0.5, 0.5, 0.5]
    cfg.model.replicas = "auto"
    gpus = plan_actors(cfg, [NodeOffer("g", 8.0, 2.0), NodeOffer("h", 4.0)])
    assert [(r.node, r.cpus, r.gpus) for r in gpus.replicas] == [(None, 1.0, 1.0)] * 2 and gpus.device == "cuda"


def test_plan_actors_makes_room_for_the_distill_actor():
    cfg = make_cfg(4)
    cfg.distill.enabled = True
    cpu = plan_actors(cfg, one(2.0))
    assert cpu.distill_cpus > 0 and cpu.distill_device == "cpu" and cpu.distill_gpus == 0
    assert cpu.model_cpus + cpu.source_actors * cpu.source_cpus + cpu.sink_cpus + cpu.distill_cpus <= 2.0
    gpu = plan_actors(cfg, one(8.0, 1.0))
    assert (gpu.model_gpus, gpu.distill_gpus, gpu.distill_device) == (0.5, 0.5, "cuda")
    cfg.model.num_gpus = 1.0  # the model takes the whole GPU: the student trains on the CPU
    assert plan_actors(cfg, one(8.0, 1.0)).distill_device == "cpu"


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
