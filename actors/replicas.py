"""The run's model replicas, seen from the driver: which replica owns which stream, what each is
told, and their restarts.

`ModelReplicas` starts one `actors.model.ModelActor` per entry of the plan (``model.replicas``,
`actors.plan.plan_actors`), each loading the checkpoint the driver read once and put in the
object store (`actors.predictor.ship_model`), and gives each stream to one replica by rendezvous
hashing over the live replicas (`actors.assign`): a stream's latent state lives in its replica,
and each replica batches its own streams. When a replica's process dies, Ray restarts it on its
node; `recover` counts the restart against the actor's budget and waits for it, and its streams
stay with it. A replica whose node left, past its budget, or that does not come back, is killed
for good and leaves the live set: its streams go to their next replica by the same hashing, and
only they move (a replica is not brought back within the run). With no replica left the run fails.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.assign import rendezvous
from actors.model import BuildPredictor
from actors.placement import Pending, describe, node_alive
from actors.plan import ActorOptions, start_model
from actors.predictor import ShippedModel
from actors.restarts import ActorGone, RestartBudget, RunFailed, await_restart
from pipeline.config import Config


def replica_name(rid: str) -> str:
    """How messages and the restart budget name a replica."""
    return f"model replica {rid}"


class ModelReplicas:
    """The replicas of one run (see the module docstring); ``handles`` by replica id ("0", "1", ...).

    ``model`` is the `ShippedModel` (or its object reference) every replica loads; ``build``
    replaces the model loader (the benches' stand-in predictor)."""

    def __init__(self, cfg: Config, opts: ActorOptions, distill: Any | None,
                 model: ray.ObjectRef | ShippedModel | None, build: BuildPredictor | None = None) -> None:
        self.handles: dict[str, Any] = {
            str(i): start_model(cfg, opts, i, distill, model, build) for i in range(len(opts.replicas))
        }
        self._asks = {str(i): describe(p.cpus, p.gpus, p.node) for i, p in enumerate(opts.replicas)}
        self._streams = [s.id for s in cfg.streams]
        self._info: dict[str, dict[str, Any]] = {}
        self._told: dict[str, list[str] | None] = {}
        self.assignment: dict[str, str] = {}

    def pending(self) -> list[Pending]:
        """Every replica's first call, for `actors.placement.await_started`."""
        return [Pending(h.info.remote(), replica_name(rid), self._asks[rid]) for rid, h in self.handles.items()]

    def started(self, infos: list[dict[str, Any]]) -> None:
        """Take the replicas' first answers (in `pending`'s order) and assign the streams."""
        self._info = dict(zip(self.handles, infos))
        self._assign()

    def _assign(self) -> None:
        live = list(self.handles)
        self.assignment = {sid: rendezvous(sid, live) for sid in self._streams}
        self._told = {rid: None for rid in live}

    def replica_of(self, stream_id: str) -> str:
        """The id of the replica that owns ``stream_id`` (a stream added while running: hashed now)."""
        if stream_id not in self.assignment:
            self.assignment[stream_id] = rendezvous(stream_id, list(self.handles))
        return self.assignment[stream_id]

    def handle_of(self, replica: str) -> Any:
        """The actor handle of replica ``replica``."""
        return self.handles[replica]

    def node_of(self, replica: str) -> str | None:
        """The node replica ``replica`` last answered from."""
        return self._info.get(replica, {}).get("node")

    def tell_open(self, open_ids: list[str]) -> None:
        """Tell each replica which of its streams may still send windows (when that changed)."""
        for rid, handle in self.handles.items():
            mine = [sid for sid in open_ids if self.assignment.get(sid) == rid]
            if mine != self._told.get(rid):
                handle.set_open_streams.remote(mine)
                self._told[rid] = mine

    def recover(self, replica: str, budget: RestartBudget) -> tuple[list[str], str | None]:
        """After ``replica`` died: the streams it owned (now owned by a live replica) and why it
        left the live set (None: it was restarted and keeps its streams). `RunFailed` when no
        replica is left."""
        streams = [sid for sid, rid in self.assignment.items() if rid == replica]
        name = replica_name(replica)
        node = self.node_of(replica)
        node_left = node is not None and not node_alive(node)
        why = None
        if node_left:
            # Its streams move at once rather than wait, maybe long, for room on another node.
            why = "its node left"
        elif not budget.spend(name):
            why = f"it died more than {budget.per_hour} times within an hour"
        else:
            try:
                self._info[replica] = await_restart(self.handles[replica], name)
            except ActorGone as exc:
                why = str(exc)
        self._told[replica] = None  # a new incarnation has not been told which streams are open
        if why is None:
            return streams, None
        ray.kill(self.handles.pop(replica), no_restart=True)
        self._info.pop(replica, None)
        self._told.pop(replica, None)
        if not self.handles:
            raise RunFailed(f"no model replica is left: {name} was lost ({why})")
        for sid in streams:
            self.assignment[sid] = rendezvous(sid, list(self.handles))
        return streams, why

    def distill_flush(self) -> int:
        """Let the student take the batches every replica offered; the windows they dropped."""
        return sum(ray.get([h.distill_flush.remote() for h in self.handles.values()]))


def delivered(ref: ray.ObjectRef) -> bool:
    """Whether a finished model call has its outcomes (not an error of a dead incarnation)."""
    try:
        ray.get(ref, timeout=0)
        return True
    except (RayActorError, RayTaskError, GetTimeoutError):
        return False
