"""The driver loop of one run (`Loop`): sources -> model -> sink, bounded and restartable.

One window's way, a method of `Loop` per step, in this order in the file:
1. `_request`: the loop calls ``next`` on the stream's source pool actor (`actors.pools`) within
   the in-flight bounds (`actors.batching.fair_share`). The stream's record
   (`actors.streams.StreamStatus`) numbers the window (``seq``) and counts it in flight.
2. `_on_source`: the call's small `SourceEvent` comes back; the window stays in the object store.
   A window is held at the driver; an end of stream moves its record to ``ending``.
3. `_send`: held windows go to their stream's model replica (`actors.replicas`) in ``infer_many``
   calls of up to a batch, when `send_now` says so (one actor call costs the model actor about as
   much CPU as a small batch). A replica runs each stream's windows in ``seq`` order, in whatever
   order they arrive.
4. `_on_model`: the call's list of outcomes comes back; each result goes to the `SinkActor` by
   reference, unread, through `actors.sink_guard.SinkGuard`, which keeps it until it is committed.
   A window the model failed on fails its stream (one ``errors`` row).
5. `_on_sink`: the sink has taken the result; it commits it with its next flush (the guard
   recovers a sink that died, see there).

A model call that finds its replica dead leads to `_recover_model`; a source call that finds its
pool dead, once the pool's other calls have settled, to `_recover_sources` (a pool pinned to a
node that left is awaited by `_poll_pools`, the other streams going on); a model call whose windows
were lost with a node, to `_redecode`; one restart budget (`actors.restarts`). `stop` (SIGINT / SIGTERM) stops step 1; the loop ends once nothing is in
flight or waiting for the sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from actors.control import StreamControl
from actors.deaths import death_cause
from actors.batching import Call, fair_share, send_now
from actors.distill_watch import DistillWatch
from actors.memory import HeapTrimmer
from actors.metrics import Metrics
from actors.pools import CALL_FAILED, SourcePools, event_or_error, pool_name
from actors.replicas import ModelReplicas, delivered, replica_name
from actors.restarts import RestartBudget, RunFailed, last_line
from actors.resume import drop_given_up, rewind
from actors.sink_guard import SinkGuard
from actors.source import ErrorRecord
from actors.streams import RunningPipeline
from pipeline.config import Config
from pipeline.errors import ModelRestarted, SourceRestarted

RESEND_SETTLE_S = 5.0
SINK_TICK_S = 1.0

ProgressCallback = Callable[[RunningPipeline], None]


class Loop:
    """The driver loop of one run (see the module docstring)."""

    def __init__(self, cfg: Config, pipeline: RunningPipeline, pools: SourcePools, replicas: ModelReplicas,
                 max_windows: int | None) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.pools = pools
        self.replicas = replicas
        self.max_windows = max_windows
        self.budget = RestartBudget(cfg.runtime.max_restarts_per_hour)
        self.lost_pools: dict[str, list[tuple[str, BaseException]]] = {}  # pool -> (stream, error) of failed calls
        self.lost_since = 0.0  # when the first of lost_pools was marked
        self.awaited: dict[str, str] = {}  # pools awaited on their pinned node -> how they died
        self.streams = pipeline.streams
        self.sink = SinkGuard(pipeline.sink, self.budget, self.restarted)
        self.distill: DistillWatch | None = None
        self.control: StreamControl | None = None
        self.source_calls: dict[ray.ObjectRef, Call] = {}  # by the source event's reference
        self.held: list[Call] = []  # decoded windows not yet sent to the model (see send_now)
        self.sent_seq: dict[str, int] = {}  # the highest seq of each stream sent to the model
        self.late_ends: list[tuple[Call, Any]] = []  # ends of stream read before an earlier call's reply
        self.model_calls: dict[ray.ObjectRef, list[Call]] = {}  # by the model call's outcome list
        self.lost_replicas: dict[str, BaseException] = {}  # a model call found its replica dead: recover first
        self.fatal: str | None = None
        self.metrics = Metrics()
        self.trim = HeapTrimmer()
        self._last_tick = time.monotonic()

    def run(self, on_progress: ProgressCallback | None) -> None:
        try:
            while True:
                if self.control is not None:
                    self.control.serve()
                if self.lost_replicas:
                    self._recover_model()
                if self.lost_pools and self._pools_settled():
                    self._recover_sources()
                if self.awaited:
                    self._poll_pools()
                # Each replica learns which streams may still send windows (when that changed).
                self.replicas.tell_open(sorted(sid for sid, st in self.streams.items() if st.open))
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
        waiting = [*self.source_calls, *self.model_calls, *self.sink.calls]
        if waiting:
            ray.wait(waiting, num_returns=1, timeout=0.25)
            ready = set(ray.wait(waiting, num_returns=len(waiting), timeout=0)[0])
            self._on_source([r for r in self.source_calls if r in ready])
            self._on_model([r for r in self.model_calls if r in ready])
            self._on_sink([r for r in self.sink.calls if r in ready])
        now = time.monotonic()
        if now - self._last_tick >= SINK_TICK_S:
            self._last_tick = now
            self.sink.tick()
            self.trim()
            if self.distill is not None and (rows := self.distill.poll([s for s in self.streams if self.streams[s].open])):
                self.sink.write_errors(rows)

    # -- 1. source -------------------------------------------------------------------------
    def _request(self) -> None:
        """Top up each stream's ``next`` calls, one stream at a time in turn, within both bounds
        and each stream's `fair_share` of the run's."""
        total = self.cfg.runtime.max_in_flight
        asking = sum(1 for st in self.streams.values() if st.asks_source)
        per_stream = fair_share(self.cfg.runtime.max_in_flight_per_stream, total, asking)
        if self.pipeline.at_sink >= total:
            return
        in_flight = self.pipeline.in_flight
        asked = True
        while asked and in_flight < total:
            asked = False
            for st in self.streams.values():
                if in_flight >= total:
                    break
                lost = self.pools.pool_of(st.stream_id) in self.lost_pools or self.pools.awaits(st.stream_id)
                if st.asks_source and st.in_flight < per_stream and not lost:
                    seq = st.requested()
                    event, window = self.pools.handle_of(st.stream_id).next.remote(st.stream_id, seq)
                    self.source_calls[event] = Call(st.stream_id, seq, window)
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
        except CALL_FAILED:
            events = [event_or_error(ref) for ref in done]
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
                if (pool := self.pools.pool_of(call.stream_id)) is not None:  # else its stream has ended already
                    self._lose_pool(pool, [(call.stream_id, ev)])
                st.lost(call.seq)
                continue
            if st.after_loss(call.seq):  # the restarted source decodes it again
                st.released(call.seq)
                continue
            errors.extend(ev.errors)
            st.decoded(call.seq, ev.window_id)
            call.window_id = ev.window_id
            if ev.window_id is not None and st.takes_windows:
                self.held.append(call)
                continue
            st.released(call.seq)
            if ev.done and st.asks_source:
                if ev.failure is not None:
                    errors.append(ev.failure)
                st.source_ended(None if ev.failure is None else f"{ev.failure.kind}: {ev.failure.message}")
        if errors:
            self.sink.write_errors(errors)

    # -- 3. to the model -------------------------------------------------------------------
    def _send(self) -> None:
        """Send the held windows to the model in calls of at most a batch, when `send_now` says so;
        the windows of a stream the model has failed are dropped."""
        for call in [c for c in self.held if not self.streams[c.stream_id].takes_windows]:
            self.held.remove(call)
            self.streams[call.stream_id].released(call.seq)
        size = self.cfg.model.batch_size
        by_replica: dict[str, list[Call]] = {}
        for c in self.held:
            by_replica.setdefault(self.replicas.replica_of(c.stream_id), []).append(c)
        self.held = []
        for rid, mine in by_replica.items():
            # The replica already parks a later window of the stream and waits for this one (a
            # threaded pool's replies can overtake each other): send it at once, whatever `send_now` says.
            awaited = any(c.seq < self.sent_seq.get(c.stream_id, -1) for c in mine)
            if rid in self.lost_replicas or not (awaited or send_now(len(mine), self._at_model(rid), size)):
                self.held.extend(mine)
                continue
            waiting = [c for c in mine if self.streams[c.stream_id].waits_for_chain(c.seq)]
            self.held.extend(waiting)
            ready = [c for c in mine if c not in waiting]
            # A call's results return together, so one huge call would leave the model idle while
            # the driver refills it.
            for i in range(0, len(ready), size):
                calls = ready[i : i + size]
                flags = [(c.seq, self.streams[c.stream_id].starts_chain(c.seq)) for c in calls]
                outcomes, *results = self.replicas.handle_of(rid).infer_many.options(
                    num_returns=len(calls) + 1).remote(flags, *(c.window for c in calls))
                for call, result in zip(calls, results):
                    call.result, call.replica = result, rid
                    self.sent_seq[call.stream_id] = max(call.seq, self.sent_seq.get(call.stream_id, -1))
                self.model_calls[outcomes] = calls

    # -- 4. from the model -----------------------------------------------------------------
    def _on_model(self, done: list[ray.ObjectRef]) -> None:
        """Read the finished model calls' outcomes and pass their results to the sink; a window the
        model failed on fails its stream. A call that found the actor dead stays for recovery."""
        results: list[tuple[Call, ray.ObjectRef]] = []
        errors: list[ErrorRecord] = []
        for ref in done:
            try:
                outcomes = ray.get(ref)
            except (RayTaskError, ObjectLostError) as exc:  # the call failed, or lost its windows: all of them
                if isinstance(exc, ObjectLostError) or isinstance(exc.cause, ObjectLostError):
                    self._redecode(self.model_calls.pop(ref))
                    continue
                outcomes = [exc.cause if isinstance(exc.cause, BaseException) else exc] * len(self.model_calls[ref])
            except RayActorError as exc:
                self.lost_replicas[self.model_calls[ref][0].replica] = exc
                continue
            for call, outcome in zip(self.model_calls.pop(ref), outcomes):
                st = self.streams[call.stream_id]
                if call.dropped:  # given up and released (`drop_given_up`); decoded again
                    continue
                if not isinstance(outcome, BaseException):
                    results.append((call, call.result))
                    continue
                st.released(call.seq)
                if st.takes_windows:
                    errors.append(ErrorRecord.from_exception(call.stream_id, outcome))
                    st.fail(f"{type(outcome).__name__}: {outcome}")
        if errors:
            self.sink.write_errors(errors)
        # A failed stream's results still go: its windows that ran before the failure.
        if results:
            for call, _ in results:
                self.streams[call.stream_id].to_sink(call.seq)
                call.window = None  # the model has run it; a result lost later is decoded again
            self.sink.write([call for call, _ in results])

    def _redecode(self, calls: list[Call], lost: str = "window {} was lost before the model ran it") -> None:
        """Windows lost with their data on a node that left (`actors.resume.rewind`): a model call's
        inputs, or (``lost`` says which, formatted with the window id) results the sink had not
        taken. Each of their streams goes back to its lowest lost window, decoded again by its
        pool (or ends there, when no pool is left for it), with one ``errors`` row."""
        back, self.held, self.late_ends = rewind(self.streams, [c for c in calls if not c.dropped], self.held,
                                                 self.late_ends, self.model_calls.values(), self.source_calls)
        errors = []
        for sid, w in back.items():
            # A stream whose pool left for good (its pinned node did not come back) has nothing to decode it.
            orphaned = not self.pools.hosts(sid) and self.streams[sid].asks_source
            then = (f"ends at window {w}, no source actor is left for it" if orphaned
                    else f"goes back to window {w} and decodes it again, state reset")
            error = SourceRestarted(f"{lost.format(w)} (its data were on a node that left); the stream {then}",
                                    stream_id=sid)
            if orphaned:
                self.streams[sid].source_ended(f"SourceRestarted: {error}")
            errors.append(ErrorRecord.from_exception(sid, error, w))
        self.sink.write_errors(errors)
        starts = {sid: (w, self.streams[sid].next_seq, self._cap(sid)) for sid, w in back.items()
                  if self.pools.hosts(sid) and self.pools.pool_of(sid) not in self.lost_pools
                  and not self.pools.awaits(sid)}  # a pool being recovered adds the stream from there
        self._add(starts)

    def _recover_model(self) -> None:
        """For each dead replica: wait for its restart, or move its streams to the live replicas
        (`ModelReplicas.recover`); keep the results it delivered and resend every other window
        sent to it, each of its streams' lowest window without a result starting a new state
        chain, with one ``errors`` row per stream."""
        lost, self.lost_replicas = sorted(self.lost_replicas.items()), {}
        errors: list[ErrorRecord] = []
        for rid, exc in lost:
            self.restarted("model")
            streams, gone = self.replicas.recover(rid, self.budget)
            # Calls to the dead incarnation fail quickly; a call sent while it restarted may sit in
            # the new one waiting for its chain: it is resent too, and the resend supersedes it.
            pending = [ref for ref, calls in self.model_calls.items() if calls[0].replica == rid]
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=RESEND_SETTLE_S)
            self._on_model([ref for ref in ready if delivered(ref)])
            resend = [call for ref in pending for call in self.model_calls.pop(ref, []) if not call.dropped]
            what = f"died ({death_cause(exc)}); restarted" if gone is None else f"was lost ({gone}); stream moved to {{}}"
            for sid in [s for s in streams if self.streams[s].takes_windows]:
                self.streams[sid].restart_chain()
                mine = [c.window_id for c in resend if c.stream_id == sid and c.window_id is not None]
                msg = (f"{replica_name(rid)} {what.format(replica_name(self.replicas.replica_of(sid)))}, "
                       f"{len(mine)} windows resent, state reset")
                errors.append(ErrorRecord.from_exception(sid, ModelRestarted(msg, stream_id=sid), min(mine, default=None)))
            self.held = resend + self.held
        self.sink.write_errors(errors)

    def _recover_sources(self) -> None:
        """Resume the streams of every pool whose calls failed (see the README's "Restarts"): each
        of a dead pool's streams is added again, restarted or moved, with one ``errors`` row; a
        failed call to a pool that did not die is a bug in it, and its stream fails."""
        lost, self.lost_pools = self.lost_pools, {}
        for ref, call in list(self.source_calls.items()):  # calls that did not settle (see _pools_settled)
            if self.pools.pool_of(call.stream_id) in lost:
                del self.source_calls[ref]
                self.streams[call.stream_id].lost(call.seq)
        self.held, self.late_ends = drop_given_up(self.streams.values(), self.held, self.late_ends, self.model_calls.values())
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
            self.restarted("source")
            cause = death_cause(failed[0][1])
            recovered = self.pools.recover(pool, self.budget)
            if self.pools.awaited(pool):  # pinned to a node that left (`_poll_pools`)
                self.awaited[pool] = cause
                for sid in [s for s in self.pools.hosted(pool) if self.streams[s].asks_source]:
                    msg = (f"{pool_name(pool)} died ({cause}; its node left); stream waits up to "
                           f"sources.node_wait_s = {self.cfg.sources.node_wait_s:g} s for its node")
                    errors.append(ErrorRecord.from_exception(sid, SourceRestarted(msg, stream_id=sid),
                                                             self.streams[sid].next_window))
            self._resume_pool(pool, *recovered, cause, errors, starts)
        self._add(starts)
        if errors:
            self.sink.write_errors(errors)

    def _resume_pool(self, pool: str, streams: list[str], why: str | None, cause: str, errors: list[ErrorRecord],
                     starts: dict[str, tuple[int, int, int | None]]) -> None:
        """After ``pool`` died (``cause``) and was restarted (``why`` None) or left the live set
        (``why``): each of its ``streams`` that asks for windows gets its ``errors`` row and its
        place in ``starts`` (from where it resumes), or ends when no pool is left for it."""
        cause += "" if why is None else f"; {why}"
        for sid in [s for s in streams if self.streams[s].asks_source]:
            st, left = self.streams[sid], self.pools.hosts(sid)
            where = f" on {pool_name(self.pools.pool_of(sid))}" if why is not None and left else ""
            msg = (f"{pool_name(pool)} died ({cause}); stream "
                   f"{'resumed' if left else 'ended, no source actor is left for it,'} at window {st.next_window}{where}")
            errors.append(ErrorRecord.from_exception(sid, SourceRestarted(msg, stream_id=sid), st.next_window))
            if not left:
                st.source_ended(f"SourceRestarted: {msg}")
                continue
            st.source_restarted()
            starts[sid] = (st.next_window, st.next_seq, self._cap(sid))

    def _poll_pools(self) -> None:
        """Resume the streams of pools awaited on their pinned node, once each wait ends."""
        errors: list[ErrorRecord] = []
        starts: dict[str, tuple[int, int, int | None]] = {}
        for pool, streams, why in self.pools.poll():
            self._resume_pool(pool, streams, why, self.awaited.pop(pool), errors, starts)
        self._add(starts)
        if errors:
            self.sink.write_errors(errors)

    def _add(self, starts: dict[str, tuple[int, int, int | None]]) -> None:
        """Add the streams of ``starts`` to their pools; a pool that fails is recovered in turn
        (its node may leave between the two)."""
        for pool, failed in self.pools.resume(starts).items():
            self._lose_pool(pool, failed)

    def _lose_pool(self, pool: str, failed: list[tuple[str, BaseException]]) -> None:
        """Mark ``pool`` for `_recover_sources`: ``failed`` are its streams' failed calls' errors."""
        self.lost_since = self.lost_since if self.lost_pools else time.monotonic()
        self.lost_pools.setdefault(pool, []).extend(failed)

    def _cap(self, stream_id: str) -> int | None:
        """The windows ``stream_id``'s source may still deliver under ``--max-windows``."""
        return None if self.max_windows is None else self.max_windows - self.streams[stream_id].delivered

    def _pools_settled(self) -> bool:
        """Whether the lost pools' other calls are in, or have had `RESEND_SETTLE_S` to come in
        (a call queued for a pool that Ray cannot place again, its node gone, never comes back)."""
        return time.monotonic() - self.lost_since >= RESEND_SETTLE_S or not any(
            self.pools.pool_of(c.stream_id) in self.lost_pools for c in self.source_calls.values())

    # -- 5. sink ---------------------------------------------------------------------------
    def _on_sink(self, done: list[ray.ObjectRef]) -> None:
        """Count the results the sink has taken; decode again those lost before it took them;
        `RunFailed` if it failed."""
        taken, lost = self.sink.done(done)
        for sid in taken:
            self.streams[sid].written()
        for call in lost:
            self.streams[call.stream_id].result_lost()
        if redo := [c for c in lost if self.streams[c.stream_id].takes_windows]:
            self._redecode(redo, "the model's result for window {} was lost before the sink took it")

    def restarted(self, actor: str) -> None:
        self.pipeline.restarts += 1
        self.metrics.restarts.inc(tags={"actor": actor})

    # -- bookkeeping -----------------------------------------------------------------------
    def _at_model(self, replica: str | None = None) -> int:
        """Windows sent to the model (to ``replica`` only, if given) and not yet returned."""
        return sum(len(calls) for calls in self.model_calls.values() if replica in (None, calls[0].replica))

    def _publish(self) -> None:
        self.pipeline.model_queue = self._at_model() + len(self.held)
        self.metrics.queue_depth.set(self.pipeline.in_flight, tags={"stage": "in_flight"})
        self.metrics.queue_depth.set(self.pipeline.at_sink, tags={"stage": "sink"})
        self.metrics.streams_active.set(sum(1 for st in self.streams.values() if not st.finished))
        if ended := self.pipeline.newly_finished():  # the sink has all their rows: it commits and publishes them
            self.sink.end_streams(ended)
