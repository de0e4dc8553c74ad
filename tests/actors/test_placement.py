"""Starting a run's actors: one that cannot be placed ends the wait in time with one line naming
it and its ask, and a signal before the actors answer ends the run at once."""

from __future__ import annotations

import signal

import pytest
import ray

from actors.placement import Pending, await_started, describe
from actors.restarts import RunFailed
from actors.signals import SignalDrain


def test_an_actor_that_cannot_be_placed_ends_the_wait_naming_it_and_its_ask(ray_session):
    class Probe:  # local: Ray ships it by value (the workers cannot import this test module)
        def info(self) -> str:
            return "up"

    placed = ray.remote(Probe).options(num_cpus=0).remote()
    nowhere = ray.remote(Probe).options(num_cpus=0, resources={"no_such_node": 1}).remote()
    try:
        assert await_started([Pending(placed.info.remote(), "the probe", describe(0))], 30) == ["up"]
        late = (r"^model replica 1 was not placed within runtime.schedule_timeout_s = 1 s: "
                r"it asks for 3 CPU, 1 GPU on node abcdefabcdef\.\.\.; the nodes have 2 CPUs$")
        with pytest.raises(RunFailed, match=late):
            await_started([Pending(placed.info.remote(), "the probe", describe(0)),
                           Pending(nowhere.info.remote(), "model replica 1", describe(3, 1, "abcdefabcdef0123"))], 1)
    finally:
        ray.kill(placed)
        ray.kill(nowhere)


class _Running:
    stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_a_signal_before_the_actors_answer_ends_the_run_at_once_and_after_drains_it():
    early = SignalDrain()
    with pytest.raises(KeyboardInterrupt):
        early._handle(signal.SIGTERM, None)
    drain, running = SignalDrain(), _Running()
    drain.attach(running)
    drain._handle(signal.SIGTERM, None)
    assert running.stopped and drain.requested
    with pytest.raises(KeyboardInterrupt):  # a second one stops at once
        drain._handle(signal.SIGTERM, None)
