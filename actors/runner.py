"""Wiring: sources -> model -> sink with bounded in-flight windows, restarts and a clean drain.

The driver loop owns the flow of windows. A window is *in flight* from the ``next`` call that
asks its source for it until the model has returned its result; the loop asks a source for
another window only while that stream has fewer than ``runtime.max_in_flight_per_stream`` in
flight, the run fewer than ``runtime.max_in_flight``, and fewer than ``runtime.max_in_flight``
results wait for the sink, so no queue anywhere grows without bound. (Results are released to
the sink stage rather than held in flight so that a slow commit does not stall decoding for the
length of a round trip.) Each step the driver waits on the sources' small events, the model's
outcome lists and sink writes together (one ``ray.wait`` pair). Decoded windows go to the model
several at a time, in one ``infer_many`` call (the model actor, an asyncio actor, orders each
stream's windows itself), because Ray's cost per actor call is about 2 ms of the model actor's
CPU, as much as a small model's forward pass: `send_now` holds them at the driver while the
model has a batch of work, until they fill a batch. A window is sent only once decoded, so
a slow or stalled source holds up no other stream's windows. The results stay in the object
store and go to the sink by reference, unread.

Restarts: the model actor is created with ``max_restarts`` and no automatic task retries. When
it dies the driver waits for the new incarnation and resends every window whose result it has
not received, in order, each stream's first one starting a new state chain (``state_reset``);
results it did receive are kept, so no window is missing or repeated. A source that fails ends
its own stream only (one ``errors`` row); other streams go on.

Stopping: `RunningPipeline.stop` (the CLI calls it on SIGINT / SIGTERM) stops asking sources for
windows, lets every window in flight reach the sink, and commits.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from actors.distill import DistillActor
from actors.metrics import Metrics
from actors.model import BuildPredictor, Collate, ModelActor
from actors.sink import SinkActor
from actors.source import ErrorRecord, OpenStream, SourceActor, SourceEvent
from pipeline.config import Config, config_hash
from pipeline.errors import ConfigError

MODEL_MAX_RESTARTS = 3
MODEL_RESTART_TIMEOUT_S = 120.0
RESEND_SETTLE_S = 5.0
SINK_TICK_S = 1.0


class RunFailed(RuntimeError):
    """The run could not go on (the model or the sink is gone for good)."""


@dataclass
class StreamStatus:
    """Progress of one stream in this run."""

    stream_id: str
    start_window: int = 0
    windows: int = 0  # windows whose rows the sink has taken
    in_flight: int = 0  # between the source request and the model's result
    at_sink: int = 0  # results sent to the sink, not yet taken
    state: str = "running"  # running | done | failed | stopped
    error: str | None = None


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` follows the CLI's convention (0, 1 or 3)."""

    streams: dict[str, StreamStatus]
    wall_s: float
    restarts: int = 0
    stopped: bool = False
    fatal: str | None = None
    committed: dict[str, int] = field(default_factory=dict)
    distill: dict[str, Any] | None = None  # the DistillActor's summary (or its error) when distilling

    @property
    def windows(self) -> int:
        """Windows written by this run, all streams."""
        return sum(s.windows for s in self.streams.values())

    @property
    def failed(self) -> list[str]:
        """Streams that ended with an error."""
        return [s.stream_id for s in self.streams.values() if s.state == "failed"]

    @property
    def exit_code(self) -> int:
        """0: every stream ended normally (or drained on a signal); 1: all failed or the run could
        not go on; 3: some streams failed while others finished."""
        if self.fatal is not None or len(self.failed) == len(self.streams):
            return 1
        return 3 if self.failed else 0


@dataclass
class ActorOptions:
    """Ray resources for the actors, derived from the cluster and the config."""

    device: str
    model_cpus: float
    model_gpus: float
    source_cpus: float
    sink_cpus: float
    distill_cpus: float = 0.0
    distill_gpus: float = 0.0
    distill_device: str = "cpu"


def plan_actors(cfg: Config, resources: dict[str, float]) -> ActorOptions:
    """Resolve ``model.device`` / ``model.num_gpus`` against the cluster and split its CPUs.

    On a CPU-only cluster the model gets half the CPUs (at least one) for torch threads and the
    sources and sink share the rest (with the distill actor when ``distill.enabled``); with a GPU
    the model needs one CPU to feed it. A distilling run on a GPU shares it: the model asks for
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
    n = len(cfg.streams)
    # Rounded down so the shares never add up to more than the cluster has (an actor that does
    # not fit would wait forever).
    source_share, distill_share = (0.6, 0.2) if distill else (0.8, 0.0)
    source_cpus = max(0.001, min(1.0, math.floor(rest * source_share * 1000 / n) / 1000))
    sink_cpus = max(0.001, min(1.0, math.floor(rest * 200) / 1000))
    distill_cpus = max(0.001, min(1.0, math.floor(rest * distill_share * 1000) / 1000)) if distill else 0.0
    distill_gpus = min(0.5, max(gpus - model_gpus, 0.0)) if distill and device == "cuda" else 0.0
    distill_device = "cuda" if distill_gpus > 0 else "cpu"
    return ActorOptions(
        device, model_cpus, model_gpus, source_cpus, sink_cpus, distill_cpus, distill_gpus, distill_device
    )


def shipped_frames(model_frames: int | None) -> int | None:
    """Trailing frames per window the sources ship for a model that reads ``model_frames`` (None:
    all): at least two, so flow and the sink's preview of the earlier frame still have theirs."""
    return None if model_frames is None else max(int(model_frames), 2)


def send_now(held: int, at_model: int, batch_size: int) -> bool:
    """Whether the driver sends its ``held`` decoded windows to the model now, in one call: once
    they fill a batch, or at once while the model has less than a batch of work (``at_model``
    windows sent and not yet returned), so it never waits on the driver and a quiet live stream
    pays no latency. Holding them otherwise makes calls of about a batch, which is what spreads
    Ray's cost per call."""
    return held > 0 and (held >= batch_size or at_model < batch_size)


def _points(value: Any) -> tuple[int | None, int] | None:
    """The model info's ``points`` as `pipeline.read.open_stream` takes it (Ray returns lists)."""
    return None if value is None else (value[0], int(value[1]))


@dataclass
class _Call:
    """One window on its way from its source through the model."""

    stream_id: str
    seq: int
    event: ray.ObjectRef  # the source's SourceEvent
    window: ray.ObjectRef  # the Window (None at the end of the stream)
    result: ray.ObjectRef | None = None  # the model's WindowResult (None at the end of the stream)


@dataclass
class _Stream:
    status: StreamStatus
    actor: Any
    exhausted: bool = False
    next_seq: int = 0
    chain_start: bool = True


class RunningPipeline:
    """The live run, handed to ``on_start`` / ``on_progress`` callbacks.

    ``model``, ``sink`` and ``sources`` (by stream id) are the actor handles, e.g. for a test to
    ``ray.kill(pipeline.model, no_restart=False)``; `stop` asks for a drain.
    """

    def __init__(self, model: Any, sink: Any, sources: dict[str, Any], streams: dict[str, StreamStatus]) -> None:
        self.model = model
        self.sink = sink
        self.sources = sources
        self.streams = streams
        self.started = time.monotonic()
        self.restarts = 0
        self.model_queue = 0
        self.in_flight = 0
        self.at_sink = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop asking sources for windows; what is in flight still reaches the sink."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether `stop` was called."""
        return self._stop.is_set()

    @property
    def windows(self) -> int:
        """Windows the sink has taken so far in this run."""
        return sum(s.windows for s in self.streams.values())

    @property
    def windows_per_s(self) -> float:
        """Mean rate since the start of the run."""
        return self.windows / max(time.monotonic() - self.started, 1e-9)


ProgressCallback = Callable[[RunningPipeline], None]


def run(
    config: Config,
    output: str | Path | None = None,
    *,
    max_windows: int | None = None,
    realtime: bool | None = None,
    on_start: ProgressCallback | None = None,
    on_progress: ProgressCallback | None = None,
    build: BuildPredictor | None = None,
    collate: Collate | None = None,
    open_stream: OpenStream | None = None,
) -> RunSummary:
    """Run the pipeline on the already initialised Ray until every stream ends or `stop` drains it.

    ``output`` defaults to ``config.output.dir``; ``max_windows`` caps windows per stream;
    ``realtime`` defaults to ``config.runtime.realtime``. ``on_start`` gets the `RunningPipeline`
    once the actors exist, ``on_progress`` after every step of the loop (a few times a second at
    least). ``build``, ``collate`` and ``open_stream`` replace the model loader,
    `pipeline.collate` and `pipeline.read.open_stream` (for tests). With ``distill.enabled`` a
    `DistillActor` trains a student from the model's batches (see `actors.distill`).
    """
    if not ray.is_initialized():
        raise RuntimeError("actors.run needs an initialised Ray (call ray.init first)")
    if config.distill.enabled and config.model.student is not None:
        raise ConfigError("distill.enabled with model.student: the pipeline would distil a student from a student; "
                          "unset one of them")
    started = time.monotonic()
    out_dir = Path(output if output is not None else config.output.dir)
    opts = plan_actors(config, ray.available_resources())
    sink = (
        ray.remote(SinkActor)
        .options(num_cpus=opts.sink_cpus, max_restarts=0)
        .remote(str(out_dir), config_hash=config_hash(config), nice=config.runtime.helper_nice)
    )
    actors: list[Any] = [sink]
    distill = None
    if config.distill.enabled:
        distill = (
            ray.remote(DistillActor)
            .options(num_cpus=opts.distill_cpus, num_gpus=opts.distill_gpus, max_restarts=0)
            .remote(config, str(out_dir), sink, device=opts.distill_device, num_cpus=max(opts.distill_cpus, 1))
        )
        actors.append(distill)
    model = (
        ray.remote(ModelActor)
        .options(
            num_cpus=opts.model_cpus,
            num_gpus=opts.model_gpus,
            max_restarts=MODEL_MAX_RESTARTS,
            max_task_retries=0,
            max_concurrency=config.runtime.max_in_flight + 16,
        )
        .remote(config, device=opts.device, num_cpus=opts.model_cpus, build=build, collate=collate, distill=distill)
    )
    actors.append(model)
    try:
        if distill is not None:
            _started(distill.info.remote(), "the distill actor")
        info = _started(model.info.remote(), "the model actor")
        ids = [s.id for s in config.streams]
        resume = _started(sink.resume_points.remote(ids), "the sink")
        ray.get(sink.set_model.remote(info["model"]))
        pace = config.runtime.realtime if realtime is None else realtime
        streams: dict[str, _Stream] = {}
        for s in config.streams:
            actor = (
                ray.remote(SourceActor)
                .options(num_cpus=opts.source_cpus, max_restarts=0)
                .remote(
                    s,
                    config,
                    start_window=resume.get(s.id, 0),
                    max_windows=max_windows,
                    realtime=pace,
                    video_frames=shipped_frames(info.get("video_frames")),
                    points=_points(info.get("points")),
                    open_stream=open_stream,
                )
            )
            actors.append(actor)
            streams[s.id] = _Stream(StreamStatus(s.id, start_window=resume.get(s.id, 0)), actor)
        loop = _Loop(config, model, sink, streams)
        if on_start is not None:
            on_start(loop.pipeline)
        loop.run(on_progress)
        distilled = _finish_distill(model, distill) if distill is not None else None
        committed: dict[str, int] = {}
        try:
            committed = ray.get(sink.close.remote())
        except (RayActorError, RayTaskError) as exc:
            loop.fatal = loop.fatal or f"the sink could not commit the last rows: {_last_line(exc)}"
        return RunSummary(
            {sid: st.status for sid, st in streams.items()},
            time.monotonic() - started,
            restarts=loop.pipeline.restarts,
            stopped=loop.pipeline.stopping,
            fatal=loop.fatal,
            committed=committed,
            distill=distilled,
        )
    finally:
        for a in actors:
            ray.kill(a)


class _Loop:
    """The driver loop of one run (see the module docstring)."""

    def __init__(self, cfg: Config, model: Any, sink: Any, streams: dict[str, _Stream]) -> None:
        self.cfg = cfg
        self.model = model
        self.sink = sink
        self.streams = streams
        self.source_calls: dict[ray.ObjectRef, _Call] = {}  # by the source event's reference
        self.model_calls: dict[ray.ObjectRef, list[_Call]] = {}  # by the model call's outcome list
        self.held: list[_Call] = []  # decoded windows not yet sent to the model (see send_now)
        self.sink_calls: dict[ray.ObjectRef, list[tuple[str, int]]] = {}
        self.in_flight = 0
        self.at_sink = 0
        self.fatal: str | None = None
        self.metrics = Metrics()
        self.pipeline = RunningPipeline(
            model, sink, {sid: st.actor for sid, st in streams.items()}, {sid: st.status for sid, st in streams.items()}
        )
        self._last_tick = time.monotonic()
        self._open_sent: list[str] | None = None

    # -- main loop -------------------------------------------------------------------------
    def run(self, on_progress: ProgressCallback | None) -> None:
        try:
            while True:
                self._update_open_streams()
                if not self.pipeline.stopping:
                    self._request_windows()
                idle = self.in_flight == 0 and self.at_sink == 0
                if idle and (self.pipeline.stopping or all(st.exhausted for st in self.streams.values())):
                    break
                self._step()
                self._publish()
                if on_progress is not None:
                    on_progress(self.pipeline)
        except RunFailed as exc:
            self.fatal = str(exc)
            for st in self.streams.values():
                if st.status.state == "running":
                    st.status.state = "stopped"
        for st in self.streams.values():
            if st.status.state == "running":
                st.status.state = "done" if st.exhausted else "stopped"

    def _update_open_streams(self) -> None:
        open_ids = sorted(sid for sid, st in self.streams.items() if not (st.exhausted and st.status.in_flight == 0))
        finished = [st for st in self.streams.values() if st.exhausted and st.status.in_flight == st.status.at_sink == 0]
        if open_ids != self._open_sent:
            self.model.set_open_streams.remote(open_ids)
            self._open_sent = open_ids
        for st in finished:
            if st.status.state == "running":
                st.status.state = "done"

    def _request_windows(self) -> None:
        """Top up each stream's ``next`` calls, round robin, within both in-flight bounds."""
        per_stream = self.cfg.runtime.max_in_flight_per_stream
        total = self.cfg.runtime.max_in_flight
        progress = True
        while progress and self.in_flight < total and self.at_sink < total:
            progress = False
            for st in self.streams.values():
                if st.exhausted or st.status.state == "failed" or st.status.in_flight >= per_stream:
                    continue
                if self.in_flight >= total:
                    break
                ev, win = st.actor.next.remote()
                st.status.in_flight += 1
                self.in_flight += 1
                seq, st.next_seq = st.next_seq, st.next_seq + 1
                self.source_calls[ev] = _Call(st.status.stream_id, seq, ev, win)
                progress = True

    def _infer(self, calls: list[_Call]) -> None:
        """Send ``calls``' windows (all decoded, each stream's in order) to the model in one call;
        the driver waits on the small list of outcomes, the results stay in the object store."""
        flags = []
        for call in calls:
            st = self.streams[call.stream_id]
            flags.append((call.seq, st.chain_start))
            st.chain_start = False
        ack, *results = self.model.infer_many.options(num_returns=len(calls) + 1).remote(
            flags, *(c.window for c in calls)
        )
        for call, result in zip(calls, results):
            call.result = result
        self.model_calls[ack] = calls

    def _send_held(self) -> None:
        at_model = sum(len(calls) for calls in self.model_calls.values())
        size = self.cfg.model.batch_size
        if send_now(len(self.held), at_model, size):
            held = sorted(self.held, key=lambda c: (c.stream_id, c.seq))
            self.held = []
            # Calls of at most a batch: a call's results return together, so one huge call would
            # leave the model idle while the driver refills it.
            for i in range(0, len(held), size):
                self._infer(held[i : i + size])

    def _step(self) -> None:
        self._send_held()
        waiting = list(self.source_calls) + list(self.model_calls) + list(self.sink_calls)
        if not waiting:
            return
        ray.wait(waiting, num_returns=1, timeout=0.25)
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        ready_set = set(ready)
        self._on_source([r for r in self.source_calls if r in ready_set])
        self._on_model([r for r in self.model_calls if r in ready_set])
        self._send_held()
        self._on_sink(ready_set)
        now = time.monotonic()
        if now - self._last_tick >= SINK_TICK_S:
            self._last_tick = now
            self.sink.tick.remote()

    # -- sources and model -----------------------------------------------------------------
    def _on_source(self, done: list[ray.ObjectRef]) -> None:
        """Read the finished ``next`` calls' events (one ``ray.get`` for all, per call only when a
        source died); their windows join those held for the model."""
        if not done:
            return
        calls = [self.source_calls.pop(ref) for ref in done]
        try:
            events = ray.get(done)
        except RayActorError:
            events = [self._event(c) for c in calls]
        errors: list[ErrorRecord] = []
        windows: list[_Call] = []
        # In call order: a stream's events (and so its end) are read in the order it produced them.
        for call, ev in sorted(zip(calls, events), key=lambda x: (x[0].stream_id, x[0].seq)):
            st = self.streams[call.stream_id]
            errors.extend(ev.errors)
            if ev.window_id is not None and st.status.state != "failed":
                windows.append(call)
                continue
            self._release(st, 1)
            if ev.window_id is None:
                st.exhausted = True
                if ev.failure is not None and st.status.state != "failed":
                    errors.append(ev.failure)
                    self._fail(st, f"{ev.failure.kind}: {ev.failure.message}")
        if errors:
            self.sink.write_errors.remote(errors)
        self.held.extend(windows)

    def _event(self, call: _Call) -> SourceEvent:
        """One call's source event; a source actor that died ends its stream with an errors row."""
        try:
            return ray.get(call.event)
        except RayActorError as exc:
            failure = ErrorRecord.from_exception(call.stream_id, exc)
            return SourceEvent(call.stream_id, done=True, failure=failure)

    def _on_model(self, done: list[ray.ObjectRef]) -> None:
        """Read the finished model calls' outcomes and pass the results on; a window the model
        failed on ends its stream (one errors row), the others go on."""
        if not done:
            return
        results: list[tuple[str, int, ray.ObjectRef]] = []
        errors: list[ErrorRecord] = []
        lost = False
        for ref in done:
            try:
                outcomes = ray.get(ref)
            except RayTaskError as exc:  # the call itself failed: every window in it did
                outcomes = [exc.cause if isinstance(exc.cause, BaseException) else exc] * len(self.model_calls[ref])
            except RayActorError:  # the model actor died: resent by _recover_model
                lost = True
                continue
            for call, outcome in zip(self.model_calls.pop(ref), outcomes):
                st = self.streams[call.stream_id]
                if isinstance(outcome, BaseException):
                    self._release(st, 1)
                    if st.status.state != "failed":
                        errors.append(ErrorRecord.from_exception(call.stream_id, outcome))
                        self._fail(st, f"{type(outcome).__name__}: {outcome}")
                else:
                    results.append((call.stream_id, outcome, call.result))
        if errors:
            self.sink.write_errors.remote(errors)
        self._to_sink(results)
        if lost:
            self._recover_model()

    def _recover_model(self) -> None:
        """Wait for the restarted model actor, then resend every window it did not return."""
        self.pipeline.restarts += 1
        self.metrics.restarts.inc(tags={"actor": "model"})
        deadline = time.monotonic() + MODEL_RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(self.model.info.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                break
            except ActorUnavailableError:  # still restarting
                if time.monotonic() > deadline:
                    raise RunFailed(f"the model actor did not come back within {MODEL_RESTART_TIMEOUT_S:.0f} s") from None
                time.sleep(0.2)
            except RayActorError as exc:
                raise RunFailed(f"the model actor died and could not be restarted: {_last_line(exc)}") from None
            except ray.exceptions.GetTimeoutError:
                raise RunFailed(f"the model actor did not come back within {MODEL_RESTART_TIMEOUT_S:.0f} s") from None
        # Calls to the dead incarnation fail quickly; keep the results it delivered (read as
        # usual). A call sent while it restarted may sit in the new one waiting for its chain:
        # it is resent too, and the resend supersedes it.
        pending = list(self.model_calls)
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=RESEND_SETTLE_S)
        delivered = []
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
                delivered.append(ref)
            except (RayActorError, RayTaskError, ray.exceptions.GetTimeoutError):
                pass
        self._on_model(delivered)
        resend = [call for calls in self.model_calls.values() for call in calls]
        self.model_calls.clear()
        self._open_sent = None  # the new incarnation has not been told which streams are open
        self._update_open_streams()
        for st in self.streams.values():  # each stream's next window sent starts a new chain
            st.chain_start = True
        self.held = resend + self.held
        self._send_held()

    # -- sink ------------------------------------------------------------------------------
    def _to_sink(self, results: list[tuple[str, int, ray.ObjectRef]]) -> None:
        """Hand results ``(stream id, window id, result reference)`` to the sink; they leave the
        in-flight count for the sink stage's."""
        for sid, _, _ in results:
            self._release(self.streams[sid], 1)
        # A failed stream's results still go: the windows decoded (and run) before its failure.
        if not results:
            return
        for sid, _, _ in results:
            self.streams[sid].status.at_sink += 1
        self.at_sink += len(results)
        ref = self.sink.write.remote(*(r for _, _, r in results))
        self.sink_calls[ref] = [(sid, wid) for sid, wid, _ in results]

    def _on_sink(self, ready: set) -> None:
        done = [r for r in self.sink_calls if r in ready]
        if not done:
            return
        try:
            ray.get(done)
        except (RayActorError, RayTaskError) as exc:
            raise RunFailed(f"the sink failed, rows not committed are redone on resume: {exc}") from None
        for ref in done:
            written = self.sink_calls.pop(ref)
            for sid, _ in written:
                st = self.streams[sid]
                st.status.windows += 1
                st.status.at_sink -= 1
            self.at_sink -= len(written)

    # -- bookkeeping -----------------------------------------------------------------------
    def _release(self, st: _Stream, n: int) -> None:
        st.status.in_flight -= n
        self.in_flight -= n

    def _fail(self, st: _Stream, message: str) -> None:
        st.status.state = "failed"
        st.status.error = message
        st.exhausted = True

    def _publish(self) -> None:
        self.pipeline.in_flight = self.in_flight
        self.pipeline.at_sink = self.at_sink
        self.pipeline.model_queue = sum(len(calls) for calls in self.model_calls.values()) + len(self.held)
        self.metrics.queue_depth.set(self.in_flight, tags={"stage": "in_flight"})
        self.metrics.queue_depth.set(self.at_sink, tags={"stage": "sink"})
        self.metrics.streams_active.set(sum(1 for st in self.streams.values() if st.status.state == "running"))


def _finish_distill(model: Any, distill: Any) -> dict[str, Any]:
    """Let the student take the batches offered to it, save it and send its last rows to the sink
    (before the sink closes). A distillation failure does not fail the run: it is reported."""
    try:
        dropped = ray.get(model.distill_flush.remote())
        return {**ray.get(distill.finish.remote()), "dropped_windows": dropped}
    except (RayActorError, RayTaskError) as exc:
        return {"error": _last_line(exc)}


def _started(ref: ray.ObjectRef, what: str) -> Any:
    """The result of an actor's first call; `RunFailed` naming the cause if the actor could not start."""
    try:
        return ray.get(ref)
    except RayActorError as exc:
        raise RunFailed(f"{what} could not start: {_last_line(exc)}") from None


def _last_line(exc: BaseException) -> str:
    """The last line of an actor error (the cause, without Ray's traceback)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return lines[-1] if lines else type(cause).__name__
