"""The runner's side of the DistillActor: its restarts, and finishing it.

The distill actor is restarted by Ray (``max_restarts=-1``, no task retries); the new process
resumes the student from its last checkpoint (``<output>/_checkpoints/student``, written every
``distill.checkpoint_every`` steps), so the steps since then are lost, not the student. The model
actor never waits for it (its offers to the dead one fail and are dropped), so the runner notices a
death by asking the actor for its `info` about once a second: a call that fails or another process
id spends a restart of the run's budget (`actors.restarts`) and writes one ``errors`` row per
running stream (`DistillRestarted`). Past the budget the actor is killed for good and the run goes
on without distillation (the summary's ``distill`` says why).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.deaths import death_cause
from actors.restarts import ActorGone, RestartBudget, await_restart, last_line
from actors.source import ErrorRecord
from pipeline.errors import DistillRestarted

DISTILL = "the distill actor"


class DistillWatch:
    """Watches the run's ``distill`` actor (see the module docstring); ``on_restart`` is called
    with ``"distill"`` for each restart."""

    def __init__(self, distill: Any, budget: RestartBudget, on_restart: Callable[[str], None]) -> None:
        self.distill = distill
        self.budget = budget
        self._on_restart = on_restart
        self._pid = await_restart(distill, DISTILL)["pid"]
        self._ping: ray.ObjectRef | None = None
        self.gone: str | None = None  # why distillation stopped for good

    def poll(self, streams: list[str]) -> list[ErrorRecord]:
        """Look at the last `info` asked for and ask again; the ``errors`` rows of a restart."""
        if self.gone is not None:
            return []
        ref, self._ping = self._ping, self.distill.info.remote()
        if ref is None or not ray.wait([ref], timeout=0)[0]:
            return []
        try:
            pid = ray.get(ref)["pid"]
        except RayActorError as exc:
            return self._recover(exc, streams)
        return [] if pid == self._pid else self._recover(None, streams)

    def finish(self, flush: Callable[[], int], streams: list[str]) -> tuple[dict[str, Any], list[ErrorRecord]]:
        """Let the student take the batches offered to it, save it and send its last rows to the
        sink (before the sink closes): a JSON-ready summary, and the ``errors`` rows of a restart
        found on the way. A distillation failure does not fail the run: it is reported."""
        rows: list[ErrorRecord] = []
        while self.gone is None:
            try:
                dropped = flush()  # the replicas' offered batches, taken
                summary = ray.get(self.distill.finish.remote())
            except RayActorError as exc:  # died (or was restarting) at the end: finish the new one
                rows += self._recover(exc, streams)
                continue
            except RayTaskError as exc:
                return {"error": last_line(exc)}, rows
            return {**{k: v for k, v in summary.items() if k != "pid"}, "dropped_windows": dropped}, rows
        return {"error": self.gone}, rows

    def _recover(self, exc: BaseException | None, streams: list[str]) -> list[ErrorRecord]:
        self._ping = None
        self._on_restart("distill")
        why = death_cause(exc)
        if not self.budget.spend(DISTILL):
            ray.kill(self.distill, no_restart=True)
            self.gone = f"{DISTILL} died more than {self.budget.per_hour} times within an hour"
            msg = f"{DISTILL} died ({why}) more than {self.budget.per_hour} times within an hour; distillation stopped"
        else:
            try:
                info = await_restart(self.distill, DISTILL)
            except ActorGone as gone:
                self.gone = str(gone)
                msg = f"{DISTILL} died ({why}) and did not come back; distillation stopped"
            else:
                self._pid = info["pid"]
                msg = f"{DISTILL} died ({why}); restarted from its student checkpoint at step {info['steps']}"
        return [ErrorRecord.from_exception(sid, DistillRestarted(msg, stream_id=sid)) for sid in streams]
