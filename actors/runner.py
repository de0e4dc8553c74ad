"""The run: sources -> model -> sink in one driver loop, bounded, restartable, drained on a signal.

One window's way, a method of `_Loop` per step, in this order in the file:

1. `_request`: the loop calls ``next`` on the stream's source pool actor (`actors.pools`) while
   the stream has fewer than ``runtime.max_in_flight_per_stream`` windows in flight and the run
   fewer than ``runtime.max_in_flight`` (in flight, and waiting for the sink). The stream's record
   (`actors.streams.StreamStatus`) numbers the window (``seq``) and counts it in flight.
2. `_on_source`: the call's small `SourceEvent` comes back; the window stays in the object store.
   A window is held at the driver; an end of stream moves its record to ``ending``.
3. `_send`: held windows go to the `ModelActor` in ``infer_many`` calls of up to a batch, when
   `send_now` says so (one actor call costs the model actor about as much CPU as a small batch).
   The model actor runs each stream's windows in ``seq`` order, in whatever order they arrive.
4. `_on_model`: the call's list of outcomes comes back; each result goes to the `SinkActor` by
   reference, unread. A window the model failed on fails its stream (one ``errors`` row).
5. `_on_sink`: the sink has taken the result; it commits it with its next flush.

When a model call finds the actor dead, the loop's next step is `_recover_model`; when a source
call finds its pool dead, once the pool's other calls have settled, `_recover_sources`. Both keep
to one restart budget (`actors.restarts`). `stop` (SIGINT / SIGTERM) stops step 1; the loop ends
once nothing is in flight or waiting for the sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.metrics import Metrics
from actors.plan import plan_actors, shipped_inputs, start_distill, start_model, start_sink
from actors.pools import SourcePools, pool_name
from actors.restarts import RestartBudget, RunFailed, await_restart, last_line
from actors.source import ErrorRecord, SourceEvent
from actors.streams import RunningPipeline, RunSummary, StreamStatus
from pipeline.config import Config
from pipeline.errors import CheckpointError, ConfigError, SourceRestarted

RESEND_SETTLE_S = 5.0
SINK_TICK_S = 1.0


ProgressCallback = Callable[[RunningPipeline], None]


def run(
    config: Config,
    output: str | Path | None = None,
    *,
    max_windows: int | None = None,
    realtime: bool | None = None,
    on_start: ProgressCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunSummary:
    """Run the pipeline on the already initialised Ray until every stream ends or `stop` drains it.

    ``output`` defaults to ``config.output.dir``; ``max_windows`` caps windows per stream;
    ``realtime`` defaults to ``config.runtime.realtime``. ``on_start`` gets the `RunningPipeline`
    once the actors exist, ``on_progress`` after every step of the loop (a few times a second at
    least). With ``distill.enabled`` a `DistillActor` trains a student from the model's batches
    (see `actors.distill`).
    """
    if not ray.is_initialized():
        raise RuntimeError("actors.runner.run needs an initialised Ray (call ray.init first)")
    if config.distill.enabled and config.model.student is not None:
        raise ConfigError("distill.enabled with model.student: the pipeline would distil a student from a student; "
                          "unset one of them")
    started = time.monotonic()
    out_dir = Path(output if output is not None else config.output.dir)
    opts = plan_actors(config, ray.available_resources())
    sink = start_sink(config, out_dir, opts)
    distill = start_distill(config, out_dir, opts, sink) if config.distill.enabled else None
    model = start_model(config, opts, distill)
    actors = [a for a in (sink, distill, model) if a is not None]
    try:
        if distill is not None:
            _started(distill.info.remote(), "the distill actor")
        info = _started(model.info.remote(), "the model actor")
        resume = _started(sink.resume_points.remote([s.id for s in config.streams]), "the sink")
        ray.get(sink.set_model.remote(info["model"]))
        try:
            shipped = shipped_inputs(config)
        except CheckpointError as exc:
            raise RunFailed(f"the model's config could not be read here: {exc}") from None
        pace = config.runtime.realtime if realtime is None else realtime
        pools = SourcePools(config, opts, realtime=pace, shipped=shipped)
        actors.extend(pools.handles.values())
        pools.start()
        pools.add({s.id: (resume.get(s.id, 0), 0, max_windows) for s in config.streams})
        streams = {s.id: StreamStatus(s.id, start_window=resume.get(s.id, 0)) for s in config.streams}
        loop = _Loop(config, RunningPipeline(model, sink, pools.handles, streams, pools.assignment), pools, max_windows)
        if on_start is not None:
            on_start(loop.pipeline)
        loop.run(on_progress)
        distilled = _finish_distill(model, distill) if distill is not None else None
        committed: dict[str, int] = {}
        try:
            committed = ray.get(sink.close.remote())
        except (RayActorError, RayTaskError) as exc:
            loop.fatal = loop.fatal or f"the sink could not commit the last rows: {last_line(exc)}"
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
        for a in actors:
            ray.kill(a)


def send_now(held: int, at_model: int, batch_size: int) -> bool:
    """Whether the driver sends its ``held`` decoded windows to the model now, in one call: once
    they fill a batch, or at once while the model has less than a batch of work (``at_model``
    windows sent and not yet returned), so it never waits on the driver and a quiet live stream
    pays no latency. Holding them otherwise makes calls of about a batch, which is what spreads
    Ray's cost per call."""
    return held > 0 and (held >= batch_size or at_model < batch_size)


@dataclass
class _Call:
    """One window on its way from its source through the model."""

    stream_id: str
    seq: int
    window: ray.ObjectRef  # the Window (None at the end of the stream)
    result: ray.ObjectRef | None = None  # the model's WindowResult, once sent to the model


class _Loop:
    """The driver loop of one run (see the module docstring)."""

    def __init__(self, cfg: Config, pipeline: RunningPipeline, pools: SourcePools, max_windows: int | None) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.pools = pools
        self.max_windows = max_windows
        self.budget = RestartBudget(cfg.runtime.max_restarts_per_hour)
        self.lost_pools: dict[str, list[tuple[str, BaseException]]] = {}  # pool -> (stream, error) of failed calls
        self.streams = pipeline.streams
        self.model = pipeline.model
        self.sink = pipeline.sink
        self.source_calls: dict[ray.ObjectRef, _Call] = {}  # by the source event's reference
        self.held: list[_Call] = []  # decoded windows not yet sent to the model (see send_now)
        self.sent_seq: dict[str, int] = {}  # the highest seq of each stream sent to the model
        self.late_ends: list[tuple[_Call, Any]] = []  # ends of stream read before an earlier call's reply
        self.model_calls: dict[ray.ObjectRef, list[_Call]] = {}  # by the model call's outcome list
        self.sink_calls: dict[ray.ObjectRef, list[str]] = {}  # stream id of each result written
        self.model_lost = False  # a model call found the actor dead: recover before the next step
        self.fatal: str | None = None
        self.metrics = Metrics()
        self._open_told: list[str] | None = None  # the open streams the model actor was last told
        self._last_tick = time.monotonic()

    def run(self, on_progress: ProgressCallback | None) -> None:
        try:
            while True:
                if self.model_lost:
                    self._recover_model()
                if self.lost_pools and not any(
                    self.pools.pool_of(c.stream_id) in self.lost_pools for c in self.source_calls.values()
                ):
                    self._recover_sources()
                self._tell_open_streams()
                if not self.pipeline.stopping:
                    self._request()
                else:
                    self.pools.stop()
                idle = self.pipeline.in_flight == 0 and self.pipeline.at_sink == 0
                if idle and (self.pipeline.stopping or not any(st.asks_source for st in self.streams.values())):
                    break
                self._step()
                self._publish()
                if on_progress is not None:
                    on_progress(self.pipeline)
        except RunFailed as exc:
            self.fatal = str(exc)
        for st in self.streams.values():
            st.finish()

    def _step(self) -> None:
        """Send what is due to the model, wait for any call to finish, read every finished one."""
        self._send()
        waiting = [*self.source_calls, *self.model_calls, *self.sink_calls]
        if waiting:
            ray.wait(waiting, num_returns=1, timeout=0.25)
            ready = set(ray.wait(waiting, num_returns=len(waiting), timeout=0)[0])
            self._on_source([r for r in self.source_calls if r in ready])
            self._on_model([r for r in self.model_calls if r in ready])
            self._on_sink([r for r in self.sink_calls if r in ready])
        now = time.monotonic()
        if now - self._last_tick >= SINK_TICK_S:
            self._last_tick = now
            self.sink.tick.remote()

    # -- 1. source -------------------------------------------------------------------------
    def _request(self) -> None:
        """Top up each stream's ``next`` calls, one stream at a time in turn, within both bounds."""
        per_stream = self.cfg.runtime.max_in_flight_per_stream
        total = self.cfg.runtime.max_in_flight
        if self.pipeline.at_sink >= total:
            return
        in_flight = self.pipeline.in_flight
        asked = True
        while asked and in_flight < total:
            asked = False
            for st in self.streams.values():
                if in_flight >= total:
                    break
                lost = self.pools.pool_of(st.stream_id) in self.lost_pools
                if st.asks_source and st.in_flight < per_stream and not lost:
                    seq = st.requested()
                    event, window = self.pools.handle_of(st.stream_id).next.remote(st.stream_id, seq)
                    self.source_calls[event] = _Call(st.stream_id, seq, window)
                    in_flight += 1
                    asked = True

    # -- 2. decoded ------------------------------------------------------------------------
    def _on_source(self, done: list[ray.ObjectRef]) -> None:
        """Read the finished ``next`` calls' events (one ``ray.get`` for all, per call only when one
        failed): hold their windows for the model, end the streams that ended. A call that failed
        (its pool died, or a call reached the restarted pool before its streams were added again)
        marks its pool for `_recover_sources`. A pool's replies may overtake each other, so an end
        of stream waits until the stream's earlier calls are in (the first end may carry a failure)."""
        if not done and not self.late_ends:
            return
        calls = [self.source_calls.pop(ref) for ref in done]
        try:
            events = ray.get(done)
        except (RayActorError, RayTaskError):
            events = [_event(ref) for ref in done]
        errors: list[ErrorRecord] = []
        pairs, self.late_ends = [*self.late_ends, *zip(calls, events)], []
        for call, ev in sorted(pairs, key=lambda pair: pair[0].seq):
            st = self.streams[call.stream_id]
            if getattr(ev, "done", False) and any(
                c.stream_id == call.stream_id and c.seq < call.seq for c in self.source_calls.values()
            ):
                self.late_ends.append((call, ev))
                continue
            if isinstance(ev, BaseException):
                self.lost_pools.setdefault(self.pools.pool_of(call.stream_id), []).append((call.stream_id, ev))
                st.released(call.seq)
                continue
            errors.extend(ev.errors)
            if ev.window_id is not None:
                st.decoded(ev.window_id)
            if ev.window_id is not None and st.takes_windows:
                self.held.append(call)
                continue
            st.released(call.seq)
            if ev.done and st.asks_source:
                if ev.failure is not None:
                    errors.append(ev.failure)
                st.source_ended(None if ev.failure is None else f"{ev.failure.kind}: {ev.failure.message}")
        if errors:
            self.sink.write_errors.remote(errors)

    # -- 3. to the model -------------------------------------------------------------------
    def _send(self) -> None:
        """Send the held windows to the model in calls of at most a batch, when `send_now` says so;
        the windows of a stream the model has failed are dropped."""
        for call in [c for c in self.held if not self.streams[c.stream_id].takes_windows]:
            self.held.remove(call)
            self.streams[call.stream_id].released(call.seq)
        size = self.cfg.model.batch_size
        # The model already parks a later window of the stream and waits for this one (a threaded
        # pool's replies can overtake each other): send it at once, whatever `send_now` says.
        awaited = any(c.seq < self.sent_seq.get(c.stream_id, -1) for c in self.held)
        if not (awaited or send_now(len(self.held), self._at_model(), size)):
            return
        waiting = [c for c in self.held if self.streams[c.stream_id].waits_for_chain(c.seq)]
        held, self.held = [c for c in self.held if c not in waiting], waiting
        # A call's results return together, so one huge call would leave the model idle while
        # the driver refills it.
        for i in range(0, len(held), size):
            calls = held[i : i + size]
            flags = [(c.seq, self.streams[c.stream_id].starts_chain(c.seq)) for c in calls]
            outcomes, *results = self.model.infer_many.options(num_returns=len(calls) + 1).remote(
                flags, *(c.window for c in calls)
            )
            for call, result in zip(calls, results):
                call.result = result
                self.sent_seq[call.stream_id] = max(call.seq, self.sent_seq.get(call.stream_id, -1))
            self.model_calls[outcomes] = calls

    def _tell_open_streams(self) -> None:
        """Tell the model actor which streams may still send windows (when that changed)."""
        open_ids = sorted(sid for sid, st in self.streams.items() if st.open)
        if open_ids != self._open_told:
            self.model.set_open_streams.remote(open_ids)
            self._open_told = open_ids

    # -- 4. from the model -----------------------------------------------------------------
    def _on_model(self, done: list[ray.ObjectRef]) -> None:
        """Read the finished model calls' outcomes and pass their results to the sink; a window the
        model failed on fails its stream. A call that found the actor dead stays for recovery."""
        results: list[tuple[_Call, ray.ObjectRef]] = []
        errors: list[ErrorRecord] = []
        for ref in done:
            try:
                outcomes = ray.get(ref)
            except RayTaskError as exc:  # the call itself failed: every window in it did
                outcomes = [exc.cause if isinstance(exc.cause, BaseException) else exc] * len(self.model_calls[ref])
            except RayActorError:
                self.model_lost = True
                continue
            for call, outcome in zip(self.model_calls.pop(ref), outcomes):
                st = self.streams[call.stream_id]
                if not isinstance(outcome, BaseException):
                    results.append((call, call.result))
                    continue
                st.released(call.seq)
                if st.takes_windows:
                    errors.append(ErrorRecord.from_exception(call.stream_id, outcome))
                    st.fail(f"{type(outcome).__name__}: {outcome}")
        if errors:
            self.sink.write_errors.remote(errors)
        # A failed stream's results still go: its windows that ran before the failure.
        if results:
            for call, _ in results:
                self.streams[call.stream_id].to_sink(call.seq)
            ref = self.sink.write.remote(*(result for _, result in results))
            self.sink_calls[ref] = [call.stream_id for call, _ in results]

    def _recover_model(self) -> None:
        """Wait for the restarted model actor; keep the results the dead one delivered and resend
        every other window sent to it, each stream's lowest window without a result starting a new
        state chain."""
        self.model_lost = False
        self.pipeline.restarts += 1
        self.metrics.restarts.inc(tags={"actor": "model"})
        if not self.budget.spend("model actor"):
            ray.kill(self.model, no_restart=True)
            raise RunFailed(f"the model actor died more than {self.budget.per_hour} times within an hour")
        await_restart(self.model, "the model actor")
        # Calls to the dead incarnation fail quickly; a call sent while it restarted may sit in
        # the new one waiting for its chain: it is resent too, and the resend supersedes it.
        pending = list(self.model_calls)
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=RESEND_SETTLE_S)
        self._on_model([ref for ref in ready if _delivered(ref)])
        resend = [call for calls in self.model_calls.values() for call in calls]
        self.model_calls.clear()
        for st in self.streams.values():
            st.restart_chain()
        self._open_told = None  # the new incarnation has not been told which streams are open
        self.held = resend + self.held

    def _recover_sources(self) -> None:
        """Resume the streams of every pool whose calls failed (see the README's "Restarts"): each
        of a dead pool's streams is added again, restarted or moved, with one ``errors`` row; a
        failed call to a pool that did not die is a bug in it, and its stream fails."""
        lost, self.lost_pools = self.lost_pools, {}
        errors: list[ErrorRecord] = []
        starts: dict[str, tuple[int, int, int | None]] = {}
        for pool, failed in lost.items():
            if not self.pools.restarted(pool):
                for sid, exc in failed:
                    st = self.streams[sid]
                    if st.asks_source:
                        errors.append(ErrorRecord.from_exception(sid, exc, st.next_window))
                        st.source_ended(f"{type(exc).__name__}: {last_line(exc)}")
                continue
            self.pipeline.restarts += 1
            self.metrics.restarts.inc(tags={"actor": "source"})
            streams, why = self.pools.recover(pool, self.budget)
            for sid in [s for s in streams if self.streams[s].asks_source]:
                st, left = self.streams[sid], self.pools.hosts(sid)
                where = f" on {pool_name(self.pools.pool_of(sid))}" if why is not None and left else ""
                msg = (f"{pool_name(pool)} died{'' if why is None else f' ({why})'}; stream "
                       f"{'resumed' if left else 'ended, no source actor is left for it,'} at window {st.next_window}{where}")
                errors.append(ErrorRecord.from_exception(sid, SourceRestarted(msg, stream_id=sid), st.next_window))
                if not left:
                    st.source_ended(f"SourceRestarted: {msg}")
                    continue
                st.source_restarted()
                cap = None if self.max_windows is None else self.max_windows - st.delivered
                starts[sid] = (st.next_window, st.next_seq, cap)
        if starts:
            self.pools.add(starts)
        if errors:
            self.sink.write_errors.remote(errors)

    # -- 5. sink ---------------------------------------------------------------------------
    def _on_sink(self, done: list[ray.ObjectRef]) -> None:
        """Count the results the sink has taken; `RunFailed` if it failed."""
        if not done:
            return
        try:
            ray.get(done)
        except (RayActorError, RayTaskError) as exc:
            raise RunFailed(f"the sink failed, rows not committed are redone on resume: {exc}") from None
        for ref in done:
            for sid in self.sink_calls.pop(ref):
                self.streams[sid].written()

    # -- bookkeeping -----------------------------------------------------------------------
    def _at_model(self) -> int:
        """Windows sent to the model and not yet returned."""
        return sum(len(calls) for calls in self.model_calls.values())

    def _publish(self) -> None:
        self.pipeline.model_queue = self._at_model() + len(self.held)
        self.metrics.queue_depth.set(self.pipeline.in_flight, tags={"stage": "in_flight"})
        self.metrics.queue_depth.set(self.pipeline.at_sink, tags={"stage": "sink"})
        self.metrics.streams_active.set(sum(1 for st in self.streams.values() if not st.finished))


def _event(ref: ray.ObjectRef) -> SourceEvent | BaseException:
    """One ``next`` call's event, or the error of a call that failed."""
    try:
        return ray.get(ref)
    except (RayActorError, RayTaskError) as exc:
        return exc


def _delivered(ref: ray.ObjectRef) -> bool:
    """Whether a finished model call has its outcomes (not an error of the dead incarnation)."""
    try:
        ray.get(ref, timeout=0)
        return True
    except (RayActorError, RayTaskError, GetTimeoutError):
        return False


def _finish_distill(model: Any, distill: Any) -> dict[str, Any]:
    """Let the student take the batches offered to it, save it and send its last rows to the sink
    (before the sink closes). A distillation failure does not fail the run: it is reported."""
    try:
        dropped = ray.get(model.distill_flush.remote())
        return {**ray.get(distill.finish.remote()), "dropped_windows": dropped}
    except (RayActorError, RayTaskError) as exc:
        return {"error": last_line(exc)}


def _started(ref: ray.ObjectRef, what: str) -> Any:
    """The result of an actor's first call; `RunFailed` naming the cause if the actor could not start."""
    try:
        return ray.get(ref)
    except RayActorError as exc:
        raise RunFailed(f"{what} could not start: {last_line(exc)}") from None
