"""Waiting for a run's actors to be placed on a node and to answer, within
``runtime.schedule_timeout_s``.

An actor that asks for more than any node has left waits in Ray's queue without a word; the
run instead ends (`RunFailed`, exit 1) with one line naming the actor and what it asked for.
The wait is cut into short slices so that a signal handler (SIGINT / SIGTERM) runs in time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.restarts import RunFailed, last_line

SLICE_S = 0.25


@dataclass
class Pending:
    """An actor's first call: ``ref`` its answer, ``what`` how a message names the actor and
    ``asks`` the resources it asked for, in words (e.g. "1 CPU on node 3f2a...")."""

    ref: ray.ObjectRef
    what: str
    asks: str


def describe(cpus: float, gpus: float = 0.0, node: str | None = None) -> str:
    """An actor's ask in words: ``"0.5 CPU, 1 GPU on node 3f2a9c1e0b7d..."``."""
    parts = [f"{cpus:g} CPU"] + ([f"{gpus:g} GPU"] if gpus else [])
    return ", ".join(parts) + ("" if node is None else f" on node {node[:12]}...")


def await_started(pending: list[Pending], timeout_s: float) -> list[Any]:
    """Each first call's answer, in order; `RunFailed` naming the first actor that could not
    start, or that had not answered after ``timeout_s`` (with the nodes' CPUs, for the user to
    compare with its ask)."""
    deadline = time.monotonic() + timeout_s
    refs = [p.ref for p in pending]
    while True:
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=SLICE_S)
        if not waiting:
            break
        if time.monotonic() > deadline:
            late = next(p for p in pending if p.ref in set(waiting))
            offers = ", ".join(f"{n['Resources'].get('CPU', 0):g}" for n in ray.nodes() if n.get("Alive", True))
            raise RunFailed(f"{late.what} was not placed within runtime.schedule_timeout_s = {timeout_s:g} s: "
                            f"it asks for {late.asks}; the nodes have {offers} CPUs")
    answers = []
    for p in pending:
        try:
            answers.append(ray.get(p.ref))
        except RayActorError as exc:
            raise RunFailed(f"{p.what} could not start: {last_line(exc)}") from None
    return answers


def node_alive(node_id: str) -> bool:
    """Whether node ``node_id`` is a live node of the cluster (`ray.nodes()`)."""
    return any(n["NodeID"] == node_id and n.get("Alive", True) for n in ray.nodes())
