"""Restarting actors: one budget for every actor, and waiting for a restarted one.

Ray restarts a dead actor (the actors are created with ``max_restarts=-1`` and no task retries);
the runner decides whether that may go on. `RestartBudget` allows each actor
``runtime.max_restarts_per_hour`` restarts within any hour; past that, the runner kills the actor
for good and gives up what it held (the model: the run; a source pool: moves its streams to
the other pools, or fails them when none is left). `await_restart` waits until a restarted actor
answers again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, ActorUnschedulableError, GetTimeoutError, RayActorError

RESTART_TIMEOUT_S = 120.0
HOUR_S = 3600.0


class RestartBudget:
    """Restarts per actor within a rolling hour; ``clock`` is seconds (monotonic)."""

    def __init__(self, per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self._clock = clock
        self._times: dict[str, deque[float]] = {}

    def spend(self, actor: str) -> bool:
        """Count one restart of ``actor``; False when that is more than the hour allows."""
        now = self._clock()
        times = self._times.setdefault(actor, deque())
        while times and now - times[0] >= HOUR_S:
            times.popleft()
        if len(times) >= self.per_hour:
            return False
        times.append(now)
        return True


class RunFailed(RuntimeError):
    """The run could not go on (the model or the sink is gone for good)."""


class ActorGone(RunFailed):
    """A restarted actor did not come back (its message says which and why); for the model actor
    or a pool that cannot start, the run cannot go on."""


def await_restart(handle: Any, what: str, timeout_s: float = RESTART_TIMEOUT_S) -> Any:
    """The answer of ``handle.info()`` once the (restarted) actor gives one; `ActorGone` if it is
    dead for good or does not answer within ``timeout_s`` (less for an actor whose node left:
    Ray restarts it elsewhere only where its ask fits)."""
    deadline = time.monotonic() + timeout_s
    late = f"{what} did not come back within {timeout_s:g} s"
    while True:
        try:
            return ray.get(handle.info.remote(), timeout=max(deadline - time.monotonic(), 0.1))
        except ActorUnavailableError:  # still restarting
            if time.monotonic() > deadline:
                raise ActorGone(late) from None
            time.sleep(0.2)
        except (RayActorError, ActorUnschedulableError) as exc:
            raise ActorGone(f"{what} died and could not be restarted: {last_line(exc)}") from None
        except GetTimeoutError:
            raise ActorGone(late) from None


def last_line(exc: BaseException) -> str:
    """The last line of an actor error (the cause, without Ray's traceback)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return lines[-1] if lines else type(cause).__name__
