"""What a run asks of the cluster: Ray resources per actor, planned node by node so that no actor
asks more than one node offers, the actors started with them, and what the sources ship of a
window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.predictor import ShippedModel

from actors.distill import DistillActor
from actors.model import BuildPredictor, ModelActor
from actors.predictor import model_config
from actors.sink import SinkActor
from actors.source import OpenStream
from actors.source_pool import SourcePoolActor
from pipeline.config import Config, config_hash
from pipeline.errors import ConfigError

# Ray restarts the model, sink and distill actors and the source pools without limit; the runner holds them to
# runtime.max_restarts_per_hour (actors.restarts).
RESTART_ALWAYS = -1
POOL_SPARE_CALLS = 4  # threads beyond the in-flight bound, for `info` and `add`


@dataclass(frozen=True)
class NodeOffer:
    """One live Ray node and the logical resources it offers in all."""

    node_id: str
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class ReplicaPlan:
    """One model replica's ask: its node (None: wherever Ray places it), CPUs and GPUs."""

    node: str | None
    cpus: float
    gpus: float


@dataclass
class ActorOptions:
    """Ray resources for the actors, derived from the cluster's nodes and the config."""

    device: str
    replicas: list[ReplicaPlan]
    source_cpus: float  # per source pool actor
    sink_cpus: float
    source_actors: int = 1
    distill_cpus: float = 0.0
    distill_gpus: float = 0.0
    distill_device: str = "cpu"
    driver_node: str | None = None  # the sink's node

    @property
    def model_cpus(self) -> float:
        """The CPUs of the first replica."""
        return self.replicas[0].cpus

    @property
    def model_gpus(self) -> float:
        """The GPUs of the first replica."""
        return self.replicas[0].gpus


def cluster_nodes() -> list[NodeOffer]:
    """The live nodes of the Ray this process has joined, from `ray.nodes()`."""
    return [
        NodeOffer(n["NodeID"], float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
        for n in ray.nodes()
        if n.get("Alive", True)
    ]


def _floor(x: float) -> float:
    """Rounded down to a thousandth (at least one), so shares never add up to more than a node has."""
    return max(0.001, math.floor(x * 1000) / 1000)


def _model_share(cpus: float) -> float:
    """The CPUs of a node that go to the model replicas on it: half (whole CPUs, half of a lone one)."""
    return float(int(cpus // 2)) if cpus >= 2 else cpus / 2


def plan_actors(cfg: Config, nodes: list[NodeOffer], driver_node: str | None = None) -> ActorOptions:
    """Resolve ``model.device`` / ``model.num_gpus`` / ``model.replicas`` against the cluster's
    ``nodes`` and split each node's CPUs; no actor asks more than one node offers.

    On a CPU-only cluster ``replicas: auto`` is one per node; replicas go to the nodes in turn,
    largest first, and share half of their node's CPUs (whole CPUs; half of a 1-CPU node) for
    torch threads. The source pools, the sink (on ``driver_node``) and the distill actor share
    what the replicas leave: a pool asks at most what the node with the least left over can give
    each of its even share of the pools. ``runtime.source_actors: auto`` is the CPUs the replicas
    leave (at least one); never more pools than streams. With GPUs, ``auto`` is one replica per
    GPU, each asking one CPU to feed it and ``model.num_gpus`` (default one; half a GPU when
    distilling, the student trains on what is left, or on the CPU when nothing is).
    """
    if not nodes:
        raise ConfigError("the Ray cluster has no live node")
    gpus = sum(n.gpus for n in nodes)
    device = cfg.model.device
    if device == "auto":
        device = "cuda" if gpus > 0 and cfg.model.num_gpus != 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise ConfigError("model.device is cuda but the Ray cluster has no GPU")
    distill = cfg.distill.enabled
    wanted = cfg.model.replicas
    left = {n.node_id: n.cpus for n in nodes}
    if device == "cuda":
        model_gpus = cfg.model.num_gpus or (0.5 if distill else 1.0)
        count = max(1, int(gpus)) if wanted == "auto" else wanted
        replicas = [ReplicaPlan(None, 1.0, model_gpus)] * count
        # Where each replica lands is Ray's choice: take its CPU from every node's leftover alike.
        for node in left:
            left[node] = max(left[node] - count, 0.0)
    else:
        model_gpus = 0.0
        count = len(nodes) if wanted == "auto" else wanted
        order = sorted(nodes, key=lambda n: (-n.cpus, n.node_id))
        hosts = [order[i % len(order)] for i in range(count)]
        replicas = []
        for node in hosts:
            share = _model_share(node.cpus) / hosts.count(node)
            replicas.append(ReplicaPlan(node.node_id, share if share < 1 else float(int(share)), 0.0))
        for node in set(hosts):
            left[node.node_id] -= _model_share(node.cpus)
    rest = sum(left.values())
    least = min(left.values())
    n = min(len(cfg.streams), max(1, int(rest)) if cfg.runtime.source_actors == "auto" else cfg.runtime.source_actors)
    per_node = math.ceil(n / len(nodes))
    source_share, distill_share = (0.6, 0.2) if distill else (0.8, 0.0)
    source_cpus = _floor(min(1.0, least * source_share / per_node))
    sink_cpus = _floor(min(1.0, left.get(driver_node, least) * 0.2))
    distill_cpus = _floor(min(1.0, least * distill_share)) if distill else 0.0
    distill_gpus = min(0.5, max(gpus - model_gpus * len(replicas), 0.0)) if distill and device == "cuda" else 0.0
    distill_device = "cuda" if distill_gpus > 0 else "cpu"
    return ActorOptions(device, replicas, source_cpus, sink_cpus, n, distill_cpus, distill_gpus, distill_device,
                        driver_node)


def shipped_frames(model_frames: int | None) -> int | None:
    """Trailing frames per window the sources ship for a model that reads ``model_frames`` (None:
    all): at least two, so flow and the sink's preview of the earlier frame still have theirs."""
    return None if model_frames is None else max(int(model_frames), 2)


def shipped_inputs(cfg: Config) -> tuple[int | None, tuple[int | None, int] | None]:
    """What every source ships of a window for the configured model, from its config alone: the
    trailing frames (`shipped_frames`) and ``(scans, max_points)`` of its points adapter (None: all
    frames / no points adapter)."""
    model = model_config(cfg)
    return shipped_frames(model.video_frames), model.points


def start_sink(cfg: Config, output: str | Path, opts: ActorOptions) -> Any:
    """The `SinkActor` writing under ``output`` (a folder or a URI), on the driver's node (where a
    local ``output`` is the folder the user sees), restarted by Ray (`actors.sink_guard` resends
    what it had not committed), never retrying a call."""
    where = None if opts.driver_node is None else NodeAffinitySchedulingStrategy(opts.driver_node, soft=False)
    return (
        ray.remote(SinkActor)
        .options(num_cpus=opts.sink_cpus, max_restarts=RESTART_ALWAYS, max_task_retries=0, scheduling_strategy=where)
        .remote(str(output), config_hash=config_hash(cfg), nice=cfg.runtime.helper_nice,
                publish_every_s=cfg.output.publish_every_s, retain_days=cfg.output.retain_days)
    )


def start_distill(cfg: Config, output: Path, opts: ActorOptions, sink: Any,
                  teacher: ray.ObjectRef | None = None) -> Any:
    """The `DistillActor` training a student into ``output`` and sending its rows to ``sink``,
    restarted by Ray from its last checkpoint (`actors.distill_watch`), never retrying a call;
    ``teacher`` is the checkpoint the driver read (`actors.predictor.ship_model`)."""
    return (
        ray.remote(DistillActor)
        .options(num_cpus=opts.distill_cpus, num_gpus=opts.distill_gpus, max_restarts=RESTART_ALWAYS,
                 max_task_retries=0)
        .remote(cfg, str(output), sink, teacher, device=opts.distill_device, num_cpus=max(opts.distill_cpus, 1))
    )


def start_model(cfg: Config, opts: ActorOptions, index: int, distill: Any | None,
                model: ray.ObjectRef | ShippedModel | None, build: BuildPredictor | None = None) -> Any:
    """Model replica ``index`` (a `ModelActor`), restarted by Ray where it can place it (its
    planned node first; the runner keeps to the restart budget), never retrying a call (the runner
    resends); it may hold every window in flight at once. ``model`` is the checkpoint the driver
    read (`actors.predictor.ship_model`), put in the object store once for every replica;
    ``build`` replaces the model loader (the benches' stand-in predictor)."""
    plan = opts.replicas[index]
    where = None if plan.node is None else NodeAffinitySchedulingStrategy(plan.node, soft=True)
    return (
        ray.remote(ModelActor)
        .options(
            num_cpus=plan.cpus,
            num_gpus=plan.gpus,
            max_restarts=RESTART_ALWAYS,
            max_task_retries=0,
            max_concurrency=cfg.runtime.max_in_flight + 16,
            scheduling_strategy=where,
        )
        .remote(cfg, device=opts.device, num_cpus=plan.cpus, distill=distill, model=model, build=build)
    )


def start_source_pool(
    cfg: Config,
    opts: ActorOptions,
    index: int,
    *,
    realtime: bool,
    shipped: tuple[int | None, tuple[int | None, int] | None],
    node: str | None = None,
    open_stream: OpenStream | None = None,
) -> Any:
    """Source pool actor number ``index``, shipping ``shipped`` (`shipped_inputs`) of each window:
    restarted by Ray (the runner keeps to the restart budget and adds its streams again), never
    retrying a call, with a thread for every call the in-flight bounds allow. With a ``node`` id it
    runs on that node only (streams pinned there), else spread over the nodes. ``open_stream``
    replaces its streams' opener (the benches' replay)."""
    where = "SPREAD" if node is None else NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return (
        ray.remote(SourcePoolActor)
        .options(
            num_cpus=opts.source_cpus,
            max_restarts=RESTART_ALWAYS,
            max_task_retries=0,
            max_concurrency=cfg.runtime.max_in_flight + POOL_SPARE_CALLS,
            scheduling_strategy=where,
        )
        .remote(cfg, index=index, realtime=realtime, shipped=shipped, open_stream=open_stream)
    )
