"""The run: starts the actors, runs the driver loop (`actors.loop.Loop`), drains on a signal,
closes the sink and returns the `RunSummary`; `run` is the entry point of the CLI, benches and tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from actors.control import ControlServer, StreamControl
from actors.distill_watch import DistillWatch
from actors.loop import Loop, ProgressCallback
from actors.model import BuildPredictor
from actors.placement import Pending, await_started, describe
from actors.plan import cluster_nodes, plan_actors, shipped_inputs, start_distill, start_sink
from actors.pools import SourcePools
from actors.predictor import ship_model
from actors.replicas import ModelReplicas
from actors.restarts import RunFailed
from actors.source import OpenStream
from actors.streams import RunningPipeline, RunSummary, StreamStatus
from pipeline.config import Config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.outputfs import is_uri
from pipeline.stream_set import with_saved_streams

def run(
    config: Config,
    output: str | Path | None = None,
    *,
    max_windows: int | None = None,
    realtime: bool | None = None,
    on_start: ProgressCallback | None = None,
    on_progress: ProgressCallback | None = None,
    build: BuildPredictor | None = None,
    open_stream: OpenStream | None = None,
) -> RunSummary:
    """Run the pipeline on the already initialised Ray until every stream ends or `stop` drains it.

    ``output`` (a folder or URI) defaults to ``config.output.dir``; ``max_windows`` caps windows
    per stream; ``realtime`` defaults to ``config.runtime.realtime``. ``on_start`` gets the
    `RunningPipeline` once the actors exist, ``on_progress`` after every step of the loop.
    ``build`` replaces the replicas' model loader and ``open_stream`` the sources' (the benches').
    """
    if not ray.is_initialized():
        raise RuntimeError("actors.runner.run needs an initialised Ray (call ray.init first)")
    if config.distill.enabled and config.model.student is not None:
        raise ConfigError("distill.enabled with model.student: the pipeline would distil a student from a student; "
                          "unset one of them")
    started = time.monotonic()
    out_dir = str(output if output is not None else config.output.dir)  # a path or a URI (s3://...)
    config = with_saved_streams(config, out_dir)  # streams added or removed while an earlier run ran
    opts = plan_actors(config, cluster_nodes(), ray.get_runtime_context().get_node_id())
    try:
        # Held here for the whole run: a restarted replica reads it again as its constructor argument
        # (what Ray's start-up warning about constructor arguments in the object store is about).
        model_ref = ray.put(ship_model(config)) if build is None else None
        shipped = shipped_inputs(config)
    except CheckpointError as exc:
        raise RunFailed(f"the model's checkpoint could not be read here: {exc}") from None
    sink = start_sink(config, out_dir, opts)
    distill = start_distill(config, out_dir, opts, sink, model_ref) if config.distill.enabled else None
    replicas = ModelReplicas(config, opts, distill, model_ref, build)
    actors = [a for a in (sink, distill, *replicas.handles.values()) if a is not None]
    control = None
    try:
        first = [Pending(sink.resume_points.remote([s.id for s in config.streams]), "the sink",
                         describe(opts.sink_cpus, node=opts.driver_node))]
        if distill is not None:
            first.append(Pending(distill.info.remote(), "the distill actor",
                                 describe(opts.distill_cpus, opts.distill_gpus)))
        resume, *answers = await_started(first + replicas.pending(), config.runtime.schedule_timeout_s)
        replicas.started(answers[-len(replicas.handles):])
        ray.get(sink.set_model.remote(answers[-1]["model"]))
        pace = config.runtime.realtime if realtime is None else realtime
        pools = SourcePools(config, opts, realtime=pace, shipped=shipped, open_stream=open_stream)
        actors.extend(pools.handles.values())
        pools.start(config.runtime.schedule_timeout_s)
        pools.add({s.id: (resume.get(s.id, 0), 0, max_windows) for s in config.streams})
        streams = {s.id: StreamStatus(s.id, start_window=resume.get(s.id, 0)) for s in config.streams}
        pipeline = RunningPipeline(replicas.handles["0"], sink, pools.handles, streams, pools.assignment,
                                   replicas=replicas.handles, owners=replicas.assignment)
        loop = Loop(config, pipeline, pools, replicas, max_windows)
        loop.distill = None if distill is None else DistillWatch(distill, loop.budget, loop.restarted)
        if not is_uri(out_dir):  # the endpoint's address is a local file: a run into a store has none
            control = ControlServer(Path(out_dir))  # once the sink holds the folder's lock: this run's
            loop.control = StreamControl(control, config, out_dir, pools, sink, streams, max_windows)
        if on_start is not None:
            on_start(loop.pipeline)
        loop.run(on_progress)
        distilled, rows = (None, []) if loop.distill is None else loop.distill.finish(replicas.distill_flush,
                                                                                     list(streams))
        loop.sink.write_errors(rows)
        try:
            committed = loop.sink.close()
        except RunFailed as exc:
            committed, loop.fatal = loop.sink.committed, loop.fatal or str(exc)
        return RunSummary(
            streams,
            time.monotonic() - started,
            restarts=loop.pipeline.restarts,
            stopped=loop.pipeline.stopping,
            fatal=loop.fatal,
            committed=committed,
            distill=distilled,
        )
    finally:
        if control is not None:
            control.close()
        for a in actors:
            ray.kill(a)


