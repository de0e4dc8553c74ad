"""The run's source pool actors, seen from the driver: which pool hosts which stream, and their
restarts.

`SourcePools` starts ``runtime.source_actors`` pools (`actors.source_pool.SourcePoolActor`), the
first of them each on a node that a stream is pinned to (``streams[].node``; more pools when more
nodes are named), and assigns the streams to them by rendezvous hashing (`actors.assign`; a pinned
stream goes to a pool on its node) and sends each stream's ``next`` calls to its pool. When a pool's
process dies, Ray restarts it empty; `recover` then counts the restart against the actor's
budget (`actors.restarts.RestartBudget`), waits for it (a pool pinned to a node that left is
awaited without blocking the run, up to ``sources.node_wait_s``: `poll`), and returns its streams
so that the runner adds them again (to the same pool: the assignment depends only on the stream and the live pools). A
pool past its budget, that does not come back, or unpinned on a node that left (when other pools
are live), is killed for good and leaves the live set, so its streams go to their next pool by
the same hashing.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import (ActorUnavailableError, ActorUnschedulableError, GetTimeoutError, RayActorError,
                            RayTaskError)

from actors.assign import assign, rendezvous, resolve_node
from actors.placement import Pending, await_started, describe, node_alive
from actors.plan import ActorOptions, start_source_pool
from actors.restarts import RESTART_TIMEOUT_S, ActorGone, RestartBudget, await_restart, last_line
from actors.source import OpenStream, SourceEvent
from pipeline.config import Config, StreamConfig
from pipeline.errors import ConfigError

# A ``next`` call fails so when its pool died, or when it was pinned to a node that has left.
CALL_FAILED = (RayActorError, RayTaskError, ActorUnschedulableError)
NODE_LOOKUP_S = 1.0  # how often an awaited pool looks for a node matching its pin again


def event_or_error(ref: ray.ObjectRef) -> SourceEvent | BaseException:
    """One ``next`` call's event, or the error of a call that failed."""
    try:
        return ray.get(ref)
    except CALL_FAILED as exc:
        return exc


def pool_name(pool: str) -> str:
    """How messages and the restart budget name a pool."""
    return f"source pool actor {pool}"


class SourcePools:
    """The pools of one run (see the module docstring); ``handles`` by pool id ("0", "1", ...);
    ``open_stream`` replaces the sources' opener (the benches' replay)."""

    def __init__(self, cfg: Config, opts: ActorOptions, *, realtime: bool,
                 shipped: tuple[int | None, tuple[int | None, int] | None],
                 open_stream: OpenStream | None = None) -> None:
        nodes = ray.nodes() if any(s.node is not None for s in cfg.streams) else []
        self._pins: dict[str, str | None] = {
            s.id: None if s.node is None else resolve_node(s.id, s.node, nodes) for s in cfg.streams
        }
        pinned = sorted({n for n in self._pins.values() if n is not None})
        count = max(opts.source_actors, len(pinned))
        self._nodes = {str(i): pinned[i] if i < len(pinned) else None for i in range(count)}
        self._cpus = opts.source_cpus
        self._node_wait_s = cfg.sources.node_wait_s

        def spawn(pid: str, node: str | None) -> Any:
            return start_source_pool(cfg, opts, int(pid), realtime=realtime, shipped=shipped, node=node,
                                     open_stream=open_stream)

        self._spawn = spawn
        self.handles: dict[str, Any] = {pid: spawn(pid, node) for pid, node in self._nodes.items()}
        self._streams = {s.id: s for s in cfg.streams}
        self._info: dict[str, dict[str, Any]] = {}
        self.assignment: dict[str, str] = {}
        self._stopped = False
        # pool -> (deadline, its info call; None once Ray cannot place it on its node id)
        self._awaited: dict[str, tuple[float, ray.ObjectRef | None]] = {}
        self._looked = 0.0  # when an awaited pool last looked for its node (`_find_node`)

    def start(self, timeout_s: float) -> None:
        """Wait for every pool to answer and assign the streams (`RunFailed` naming a pool that
        could not start, or was not placed within ``timeout_s``)."""
        pending = [Pending(h.info.remote(), pool_name(pid), describe(self._cpus, node=self._nodes[pid]))
                   for pid, h in self.handles.items()]
        self._info = dict(zip(self.handles, await_started(pending, timeout_s)))
        self.assignment = assign(self._pins, {pid: info["node"] for pid, info in self._info.items()})

    def stop(self) -> None:
        """Tell every pool the run drains (`SourcePoolActor.stop`); once."""
        if not self._stopped:
            self._stopped = True
            for handle in self.handles.values():
                handle.stop.remote()

    def pool_of(self, stream_id: str) -> str | None:
        """The id of the pool hosting ``stream_id`` (None once no live pool hosts it)."""
        return self.assignment.get(stream_id)

    def hosts(self, stream_id: str) -> bool:
        """Whether a live pool hosts ``stream_id`` (False once its pinned node has none left)."""
        return stream_id in self.assignment

    def handle_of(self, stream_id: str) -> Any:
        """The actor handle of the pool hosting ``stream_id``."""
        return self.handles[self.assignment[stream_id]]

    def add(self, starts: dict[str, tuple[int, int, int | None]]) -> None:
        """Host each stream on its pool: ``starts[stream] = (start_window, first_seq, max_windows)``."""
        by_pool: dict[str, list[tuple[StreamConfig, int, int, int | None]]] = {}
        for sid, (start, seq, cap) in starts.items():
            by_pool.setdefault(self.assignment[sid], []).append((self._streams[sid], start, seq, cap))
        ray.get([self.handles[pid].add.remote(items) for pid, items in by_pool.items()])

    def resume(self, starts: dict[str, tuple[int, int, int | None]],
               timeout_s: float = RESTART_TIMEOUT_S) -> dict[str, list[tuple[str, BaseException]]]:
        """`add` the streams to their pools, the running loop's way: returns, by pool, the streams
        of a pool whose node left or that did not answer within ``timeout_s`` (the caller recovers
        that pool as one whose calls failed, which adds them again)."""
        by_pool: dict[str, dict[str, tuple[int, int, int | None]]] = {}
        for sid, start in starts.items():
            by_pool.setdefault(self.assignment[sid], {})[sid] = start
        failed: dict[str, list[tuple[str, BaseException]]] = {}
        for pid, mine in by_pool.items():
            items = [(self._streams[sid], start, seq, cap) for sid, (start, seq, cap) in mine.items()]
            try:
                if self._node_left(pid):
                    raise ActorGone(f"{pool_name(pid)}'s node left")
                ray.get(self.handles[pid].add.remote(items), timeout=timeout_s)
            except (ActorGone, RayActorError, ActorUnschedulableError, GetTimeoutError) as exc:
                failed[pid] = [(sid, exc) for sid in mine]
        return failed

    def host(self, stream: StreamConfig) -> None:
        """Assign a stream added while running to a live pool (`add` then starts it there)."""
        pin = None if stream.node is None else resolve_node(stream.id, stream.node, ray.nodes())
        self._streams[stream.id], self._pins[stream.id] = stream, pin
        live = {pid: info["node"] for pid, info in self._info.items()}
        self.assignment[stream.id] = assign({stream.id: pin}, live)[stream.id]

    def restarted(self, pool: str) -> bool:
        """Whether ``pool``'s process changed since it last answered (it died and was restarted, or
        its node left)."""
        if self._node_left(pool):
            return True
        try:
            info = await_restart(self.handles[pool], pool_name(pool))
        except ActorGone:
            return True
        return info["pid"] != self._info[pool]["pid"]

    def _node_left(self, pool: str) -> bool:
        """Whether the node ``pool`` last answered from has left the cluster."""
        node = self._info.get(pool, {}).get("node")
        return node is not None and not node_alive(node)

    def recover(self, pool: str, budget: RestartBudget) -> tuple[list[str], str | None]:
        """After ``pool`` died: the streams it hosted, now assigned to a live pool, and why it left
        the live set (None: it was restarted and keeps its streams). A pool pinned to a node that
        left is awaited, without blocking, up to ``sources.node_wait_s`` (`awaited`, `poll`); it
        keeps its pinned streams and the others move to the live pools (returned, why "its node left")."""
        streams = self.hosted(pool)
        why = None
        left, pinned = self._node_left(pool), self._nodes.get(pool) is not None
        if left and not pinned and len(self.handles) > 1:
            # Its streams move at once rather than wait, maybe long, for room on another node.
            why = "its node left"
        elif not budget.spend(pool_name(pool)):
            why = f"it died more than {budget.per_hour} times within an hour"
        elif left and pinned:
            self._awaited[pool] = (time.monotonic() + self._node_wait_s, self.handles[pool].info.remote())
            live = [pid for pid in self._info if pid != pool and pid not in self._awaited]
            moved = [sid for sid in streams if self._pins[sid] is None] if live else []
            for sid in moved:
                self.assignment[sid] = rendezvous(sid, live)
            return moved, "its node left"
        else:
            try:
                self._info[pool] = await_restart(self.handles[pool], pool_name(pool), RESTART_TIMEOUT_S)
            except ActorGone as exc:
                why = str(exc)
        if why is not None:
            self._leave(pool)
        return streams, why

    def awaited(self, pool: str) -> bool:
        """Whether ``pool`` is awaited on its pinned node (`recover`)."""
        return pool in self._awaited

    def awaits(self, stream_id: str) -> bool:
        """Whether ``stream_id``'s pool is awaited on its pinned node (no ``next`` calls meanwhile)."""
        return self.assignment.get(stream_id) in self._awaited

    def poll(self) -> list[tuple[str, list[str], str | None]]:
        """The awaited pools whose wait ended: ``(pool, its streams, why it left the live set)``,
        why None when it was restarted on its node, or started on a node that its streams' pin
        names again (a node that rejoins gets a new id: pin by IP or resource to be found again);
        then it keeps its streams."""
        ended = []
        look = time.monotonic() - self._looked >= NODE_LOOKUP_S
        self._looked = time.monotonic() if look else self._looked
        for pool, (deadline, ref) in list(self._awaited.items()):
            why = None
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                try:
                    self._info[pool] = ray.get(ref)
                except ActorUnavailableError:  # still restarting: ask again
                    self._awaited[pool] = (deadline, self.handles[pool].info.remote())
                    continue
                except ActorUnschedulableError:  # its node id is gone for good: look for its pin elsewhere
                    self._awaited[pool] = (deadline, None)
                except RayActorError as exc:
                    why = f"it could not be restarted: {last_line(exc)}"
                else:
                    ended.append((pool, self.hosted(pool), None))
                    del self._awaited[pool]
                    continue
            if why is None and look and (node := self._find_node(pool)) is not None:
                ray.kill(self.handles[pool], no_restart=True)
                self.handles[pool], self._nodes[pool] = self._spawn(pool, node), node
                for sid in self.hosted(pool):
                    self._pins[sid] = node
                self._awaited[pool] = (deadline, self.handles[pool].info.remote())
                continue
            if why is None and time.monotonic() < deadline:
                continue
            streams = self.hosted(pool)
            del self._awaited[pool]
            self._leave(pool)
            ended.append((pool, streams, why or f"its node did not come back within sources.node_wait_s = "
                                                f"{self._node_wait_s:g} s"))
        return ended

    def _find_node(self, pool: str) -> str | None:
        """A live node, other than the one that left, that the pin of ``pool``'s streams names."""
        nodes = ray.nodes()
        for sid in self.hosted(pool):
            try:
                node = resolve_node(sid, self._streams[sid].node, nodes)
            except ConfigError:
                continue
            if node != self._nodes[pool]:
                return node
        return None

    def hosted(self, pool: str) -> list[str]:
        """The streams assigned to ``pool``."""
        return [sid for sid, p in self.assignment.items() if p == pool]

    def _leave(self, pool: str) -> None:
        """Kill ``pool`` for good; its streams go to their next live pool (none: no longer hosted)."""
        streams = self.hosted(pool)
        ray.kill(self.handles.pop(pool), no_restart=True)
        self._info.pop(pool, None)
        live = {pid: info["node"] for pid, info in self._info.items()}
        for sid in streams:
            pin = self._pins[sid]
            home = [pid for pid, node in live.items() if pin is None or node == pin]
            if home:
                self.assignment[sid] = rendezvous(sid, home)
            else:
                del self.assignment[sid]
