"""The runner's side of the SinkActor: every call to it, each result kept until it is committed,
and the sink's restarts.

The sink is restarted by Ray (``max_restarts=-1``, no task retries); the new process re-opens the
output folder, which recovers it from the manifest (`pipeline.parquet.OutputWriter`; the dead
process's ``flock`` went with it). The sink commits on its own flush policy, so rows it had taken
but not committed die with it: `SinkGuard` keeps the reference of each result sent until a
`actors.sink.SinkReply` names its window as committed, and each batch of ``errors`` rows until a
reply names the batch. When a call finds the sink dead, or a reply comes from another process,
it spends a restart of the run's budget (`actors.restarts`), waits for the new sink, drops what
the dead one had committed and resends the rest; each stream that had sent windows gets one
``errors`` row (`SinkRestarted`). An ``errors`` batch the dead sink committed without replying is
written again (that table is a log, not keyed by window).

A model result larger than Ray inlines lives in the object store of its replica's node; a write
call whose results left with that node fails without the sink taking any of them. `SinkGuard.done`
hands that call's windows back to the runner, which decodes them again (`actors.resume.rewind`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from actors.batching import Call
from actors.deaths import death_cause
from actors.restarts import ActorGone, RestartBudget, RunFailed, await_restart, last_line
from actors.sink import SinkReply
from actors.source import ErrorRecord
from pipeline.errors import SinkRestarted

SINK = "the sink"
RESEND_CHUNK = 64  # results per resent write call


class SinkGuard:
    """The calls to the run's ``sink`` (see the module docstring); ``on_restart`` is called with
    ``"sink"`` for each restart, before it is spent against ``budget``."""

    def __init__(self, sink: Any, budget: RestartBudget, on_restart: Callable[[str], None]) -> None:
        self.sink = sink
        self.budget = budget
        self._on_restart = on_restart
        self._pid = await_restart(sink, SINK)["pid"]
        self._epoch = 0  # restarts so far; a call sent before the last one may fail unnoticed
        # epoch, its windows, whether they are sent for the first time (not resent after a restart)
        self.calls: dict[ray.ObjectRef, tuple[int, list[Call], bool]] = {}
        self._held: dict[str, dict[int, Call]] = {}  # stream -> window -> its call (with its result), not committed
        self._errors: dict[int, list[ErrorRecord]] = {}  # batch -> rows, not committed
        self._batches = 0
        self.committed: dict[str, int] = {}  # windows committed in this run, per stream
        self._gone: str | None = None  # why the sink was given up (past its budget)

    def write(self, calls: list[Call]) -> None:
        """Send each of ``calls``' result to the sink, by reference, and keep it until committed."""
        for c in calls:
            self._held.setdefault(c.stream_id, {})[c.window_id] = c
        self.calls[self.sink.write.remote(*(c.result for c in calls))] = (self._epoch, calls, True)

    def write_errors(self, records: list[ErrorRecord]) -> None:
        """Send ``errors`` rows, kept until a reply names their batch."""
        if not records:
            return
        self._batches += 1
        self._errors[self._batches] = records
        self.sink.write_errors.remote(records, self._batches)

    def tick(self) -> None:
        """Let the sink commit if its flush is due."""
        self.calls[self.sink.tick.remote()] = (self._epoch, [], False)

    def end_streams(self, stream_ids: list[str]) -> None:
        """Streams that ended: the sink commits their rows and publishes all they committed."""
        self.calls[self.sink.end_streams.remote(stream_ids)] = (self._epoch, [], False)

    def done(self, refs: list[ray.ObjectRef]) -> tuple[list[str], list[Call]]:
        """Read finished calls. Returns the stream of each window the sink has taken (or that a
        restart made this guard's to resend), and the windows whose results were lost before the
        sink took them (no longer held here: the runner decodes them again). Recovers a dead sink;
        `RunFailed` past the budget or when a write failed in the sink itself."""
        taken: list[str] = []
        results_lost: list[Call] = []
        died: BaseException | None = None
        restarted = False
        for ref in refs:
            epoch, calls, first = self.calls.pop(ref)
            try:
                reply = ray.get(ref)
            except RayActorError as exc:
                taken.extend(c.stream_id for c in calls if first)
                if epoch == self._epoch:
                    died = exc
                continue
            except (RayTaskError, ObjectLostError) as exc:
                cause = exc.cause if isinstance(exc, RayTaskError) else exc
                if not isinstance(cause, ObjectLostError):
                    raise RunFailed(f"the sink failed, rows not committed are redone on resume: {last_line(exc)}") from None
                if not first:  # resent after a sink restart: the runner has counted them as taken
                    raise RunFailed("results of the model were lost with a node that left while the sink restarted; "
                                    "run again into the same output to redo the rows not committed "
                                    f"({last_line(exc)})") from None
                for c in calls:
                    if self._held.get(c.stream_id, {}).get(c.window_id) is c:
                        del self._held[c.stream_id][c.window_id]
                results_lost.extend(calls)
                continue
            taken.extend(c.stream_id for c in calls if first)
            self._take(reply)
            restarted = restarted or (epoch == self._epoch and reply.pid != self._pid)
        if died is not None or restarted:
            self._recover(died)
        return taken, results_lost

    def close(self) -> dict[str, int]:
        """Commit what is left (recovering a sink that died meanwhile); windows committed in this
        run, per stream."""
        if self._gone is not None:
            raise RunFailed(self._gone)
        while True:
            pending = list(self.calls)
            ray.wait(pending, num_returns=len(pending))
            if self.done(pending)[1]:  # the run's loop has ended: nothing decodes them again
                raise RunFailed("results of the model were lost with a node that left before the sink took them; "
                                "run again into the same output to redo the rows not committed")
            try:
                reply = ray.get(self.sink.close.remote())
            except RayActorError as exc:
                self._recover(exc)
                continue
            except RayTaskError as exc:
                raise RunFailed(f"the sink could not commit the last rows: {last_line(exc)}") from None
            self._take(reply)
            return dict(self.committed)

    def _take(self, reply: SinkReply) -> None:
        """Forget what ``reply`` says is committed."""
        for sid, ids in reply.windows.items():
            self._release(sid, ids, count=True)
        for sid, ids in reply.skipped.items():
            self._release(sid, ids, count=False)
        for batch in reply.errors:
            self._errors.pop(batch, None)

    def _release(self, sid: str, ids: list[int], *, count: bool) -> None:
        held = self._held.get(sid, {})
        n = sum(held.pop(w, None) is not None for w in ids)
        if count:
            self.committed[sid] = self.committed.get(sid, 0) + n

    def _recover(self, exc: BaseException | None) -> None:
        """Wait for the restarted sink; resend what it had not committed (see the module docstring)."""
        self._epoch += 1
        self._on_restart("sink")
        if not self.budget.spend(SINK):
            ray.kill(self.sink, no_restart=True)
            self._gone = (f"the sink died more than {self.budget.per_hour} times within an hour; "
                          "rows not committed are redone on resume")
            raise RunFailed(self._gone)
        try:
            self._pid = await_restart(self.sink, SINK)["pid"]
        except ActorGone as exc:
            self._gone = str(exc)
            raise
        held = {sid: sorted(ws) for sid, ws in self._held.items()}
        left = ray.get(self.sink.uncommitted.remote(held))
        for sid, ids in held.items():
            self._release(sid, sorted(set(ids) - set(left[sid])), count=True)
        for batch, records in self._errors.items():
            self.sink.write_errors.remote(records, batch)
        why = death_cause(exc)
        self.write_errors([
            ErrorRecord.from_exception(sid, SinkRestarted(
                f"the sink died ({why}); restarted, {len(left[sid])} windows redone", stream_id=sid))
            for sid in sorted(held)
        ])
        resend = [self._held[sid][w] for sid in sorted(left) for w in left[sid]]
        for i in range(0, len(resend), RESEND_CHUNK):
            chunk = resend[i : i + RESEND_CHUNK]
            self.calls[self.sink.write.remote(*(c.result for c in chunk))] = (self._epoch, chunk, False)
