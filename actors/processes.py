"""Which OS processes run which actors (for the benches' CPU and memory readings).

Its own small module because Ray ships `_process_ids` to the actor's worker by reference: the
worker imports this module, so it must not pull in torch (see `actors.bench`).
"""

from __future__ import annotations

import os
from typing import Any

import ray


def _process_ids(actor: Any) -> tuple[int, int]:
    """``(pid, parent pid)`` of the Ray worker running ``actor`` (the parent is the raylet)."""
    return os.getpid(), os.getppid()


def actor_pids(actors: list[Any]) -> list[tuple[int, int]]:
    """``(pid, raylet pid)`` of each actor's worker process."""
    return ray.get([a.__ray_call__.remote(_process_ids) for a in actors])
