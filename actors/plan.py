"""What a run asks of the cluster: Ray resources per actor, the actors started with them, and
what the sources ship of a window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.distill import DistillActor
from actors.model import ModelActor
from actors.predictor import model_config
from actors.sink import SinkActor
from actors.source_pool import SourcePoolActor
from pipeline.config import Config, config_hash
from pipeline.errors import ConfigError

# Ray restarts the model, sink and distill actors and the source pools without limit; the runner holds them to
# runtime.max_restarts_per_hour (actors.restarts).
RESTART_ALWAYS = -1
POOL_SPARE_CALLS = 4  # threads beyond the in-flight bound, for `info` and `add`


@dataclass
class ActorOptions:
    """Ray resources for the actors, derived from the cluster and the config."""

    device: str
    model_cpus: float
    model_gpus: float
    source_cpus: float  # per source pool actor
    sink_cpus: float
    source_actors: int = 1
    distill_cpus: float = 0.0
    distill_gpus: float = 0.0
    distill_device: str = "cpu"


def plan_actors(cfg: Config, resources: dict[str, float]) -> ActorOptions:
    """Resolve ``model.device`` / ``model.num_gpus`` against the cluster and split its CPUs.

    On a CPU-only cluster the model gets half the CPUs (at least one) for torch threads and the
    source pools and sink share the rest (with the distill actor when ``distill.enabled``); with a
    GPU the model needs one CPU to feed it. ``runtime.source_actors: auto`` is the CPUs the model
    leaves (at least one); never more pools than streams. A distilling run on a GPU shares it: the model asks for
    ``model.num_gpus`` (default half a GPU) and the student trains on what is left, or on the CPU
    when nothing is.
    """
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    device = cfg.model.device
    if device == "auto":
        device = "cuda" if gpus > 0 and cfg.model.num_gpus != 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise ConfigError("model.device is cuda but the Ray cluster has no GPU")
    distill = cfg.distill.enabled
    model_gpus = (cfg.model.num_gpus or (0.5 if distill else 1.0)) if device == "cuda" else 0.0
    model_cpus = 1.0 if device == "cuda" else max(1.0, float(int(cpus // 2)))
    rest = max(cpus - model_cpus, 0.0)
    wanted = cfg.runtime.source_actors
    n = min(len(cfg.streams), max(1, int(cpus - model_cpus)) if wanted == "auto" else wanted)
    # Rounded down so the shares never add up to more than the cluster has (an actor that does
    # not fit would wait forever).
    source_share, distill_share = (0.6, 0.2) if distill else (0.8, 0.0)
    source_cpus = max(0.001, min(1.0, math.floor(rest * source_share * 1000 / n) / 1000))
    sink_cpus = max(0.001, min(1.0, math.floor(rest * 200) / 1000))
    distill_cpus = max(0.001, min(1.0, math.floor(rest * distill_share * 1000) / 1000)) if distill else 0.0
    distill_gpus = min(0.5, max(gpus - model_gpus, 0.0)) if distill and device == "cuda" else 0.0
    distill_device = "cuda" if distill_gpus > 0 else "cpu"
    return ActorOptions(
        device, model_cpus, model_gpus, source_cpus, sink_cpus, n, distill_cpus, distill_gpus, distill_device
    )


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
    """The `SinkActor` writing under ``output`` (a folder or a URI), restarted by Ray
    (`actors.sink_guard` resends what it had not committed), never retrying a call."""
    return (
        ray.remote(SinkActor)
        .options(num_cpus=opts.sink_cpus, max_restarts=RESTART_ALWAYS, max_task_retries=0)
        .remote(str(output), config_hash=config_hash(cfg), nice=cfg.runtime.helper_nice,
                publish_every_s=cfg.output.publish_every_s, retain_days=cfg.output.retain_days)
    )


def start_distill(cfg: Config, output: Path, opts: ActorOptions, sink: Any) -> Any:
    """The `DistillActor` training a student into ``output`` and sending its rows to ``sink``,
    restarted by Ray from its last checkpoint (`actors.distill_watch`), never retrying a call."""
    return (
        ray.remote(DistillActor)
        .options(num_cpus=opts.distill_cpus, num_gpus=opts.distill_gpus, max_restarts=RESTART_ALWAYS,
                 max_task_retries=0)
        .remote(cfg, str(output), sink, device=opts.distill_device, num_cpus=max(opts.distill_cpus, 1))
    )


def start_model(cfg: Config, opts: ActorOptions, distill: Any | None) -> Any:
    """The `ModelActor`, restarted by Ray (the runner keeps to the restart budget), never retrying
    a call (the runner resends); it may hold every window in flight at once."""
    return (
        ray.remote(ModelActor)
        .options(
            num_cpus=opts.model_cpus,
            num_gpus=opts.model_gpus,
            max_restarts=RESTART_ALWAYS,
            max_task_retries=0,
            max_concurrency=cfg.runtime.max_in_flight + 16,
        )
        .remote(cfg, device=opts.device, num_cpus=opts.model_cpus, distill=distill)
    )


def start_source_pool(
    cfg: Config,
    opts: ActorOptions,
    index: int,
    *,
    realtime: bool,
    shipped: tuple[int | None, tuple[int | None, int] | None],
    node: str | None = None,
) -> Any:
    """Source pool actor number ``index``, shipping ``shipped`` (`shipped_inputs`) of each window:
    restarted by Ray (the runner keeps to the restart budget and adds its streams again), never
    retrying a call, with a thread for every call the in-flight bounds allow. With a ``node`` id it
    runs on that node only (streams pinned there)."""
    where = None if node is None else NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return (
        ray.remote(SourcePoolActor)
        .options(
            num_cpus=opts.source_cpus,
            max_restarts=RESTART_ALWAYS,
            max_task_retries=0,
            max_concurrency=cfg.runtime.max_in_flight + POOL_SPARE_CALLS,
            scheduling_strategy=where,
        )
        .remote(cfg, index=index, realtime=realtime, shipped=shipped)
    )
