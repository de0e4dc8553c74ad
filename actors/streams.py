"""Records of a run: each stream's `StreamStatus`, the live `RunningPipeline`, the `RunSummary`.

`StreamStatus` is the only place that counts a stream's windows in flight and changes its state::

    running --source ended--> ending --last window taken by the sink--> done
                                                                   (or failed: the source ended with an error)
    running | ending --the model failed one of its windows--> failed
    running | ending --the run ended first (a signal, or it could not go on)--> stopped
                                                                   (or failed: the source ended with an error)
    ending --windows lost after delivery are decoded again (`rewind`)--> running

Any other change raises `IllegalTransition`.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Any


class StreamState(enum.StrEnum):
    """Where a stream is in this run (its value is what the display and the summary print)."""

    RUNNING = "running"  # its source is asked for windows
    ENDING = "ending"  # its source has ended; its last windows are on their way to the sink
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"


_TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    StreamState.RUNNING: frozenset({StreamState.ENDING, StreamState.FAILED, StreamState.STOPPED}),
    StreamState.ENDING: frozenset({StreamState.DONE, StreamState.FAILED, StreamState.STOPPED, StreamState.RUNNING}),
    StreamState.DONE: frozenset(),
    StreamState.FAILED: frozenset(),
    StreamState.STOPPED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A stream state change the state machine does not allow (a bookkeeping bug, not a data problem)."""


@dataclass
class StreamStatus:
    """Progress of one stream in this run.

    ``seq`` numbers the stream's ``next`` calls to its source in this run (0, 1, ...): a window's
    place in the source's order, by which the model actor runs them. A window is *in flight* from
    that call until the model's result for it (or its end) is read; ``at_sink`` counts results sent
    to the sink and not yet taken, ``windows`` those taken.
    """

    stream_id: str
    start_window: int = 0  # the first window id of this run (after the last committed one)
    windows: int = 0
    at_sink: int = 0
    state: StreamState = StreamState.RUNNING
    error: str | None = None
    next_seq: int = 0
    chain_from: int = 0  # seq of the window that starts the model's next state chain
    next_window: int = -1  # where its source resumes: the window after the last one delivered below its
    # lowest call not answered (start_window before any)
    delivered: int = 0  # windows its source delivered in this run (and the run kept)
    _in_flight: set[int] = field(default_factory=set, init=False, repr=False)
    _answered: int = field(default=0, init=False, repr=False)  # its source's lowest call not answered
    _ahead: dict[int, int | None] = field(default_factory=dict, init=False, repr=False)  # answers above it:
    # seq -> window id (None: an end of stream)
    _lost: int | None = field(default=None, init=False, repr=False)  # its lowest call lost with its source

    # -- what the runner may do with the stream --------------------------------------------
    @property
    def in_flight(self) -> int:
        """Windows between the ``next`` call and the model's result."""
        return len(self._in_flight)

    @property
    def asks_source(self) -> bool:
        """Whether the runner still asks the source for windows."""
        return self.state is StreamState.RUNNING

    @property
    def takes_windows(self) -> bool:
        """Whether a decoded window goes to the model (not once the model has failed the stream)."""
        return self.state in (StreamState.RUNNING, StreamState.ENDING)

    @property
    def open(self) -> bool:
        """Whether more of its windows may reach the model (a batch need not wait for a closed one)."""
        return self.state is StreamState.RUNNING or (self.state is StreamState.ENDING and bool(self._in_flight))

    @property
    def finished(self) -> bool:
        """Whether the stream has reached a final state."""
        return not _TRANSITIONS[self.state]

    def __post_init__(self) -> None:
        if self.next_window < 0:
            self.next_window = self.start_window

    def starts_chain(self, seq: int) -> bool:
        """Whether window ``seq`` starts a new state chain in the model actor."""
        return seq == self.chain_from

    def waits_for_chain(self, seq: int) -> bool:
        """Whether window ``seq`` starts a chain while windows of the stream's previous chain are
        still in flight: it goes to the model only after them, or they would be left waiting."""
        return seq == self.chain_from and any(s < seq for s in self._in_flight)

    # -- counts ----------------------------------------------------------------------------
    def requested(self) -> int:
        """A ``next`` call was made; returns its ``seq``."""
        seq = self.next_seq
        self.next_seq += 1
        self._in_flight.add(seq)
        return seq

    def decoded(self, seq: int, window_id: int | None) -> None:
        """Its source answered call ``seq`` with window ``window_id`` (None: an end of stream)."""
        if window_id is not None:
            self.delivered += 1
        self._ahead[seq] = window_id
        while self._answered in self._ahead:  # answers may come out of order: resume after the last in order
            answered = self._ahead.pop(self._answered)
            self.next_window = self.next_window if answered is None else answered + 1
            self._answered += 1

    def lost(self, seq: int) -> None:
        """Call ``seq`` was lost with its source (its process died before replying): no answer comes."""
        self._lost = seq if self._lost is None else min(self._lost, seq)
        self.released(seq)

    def after_loss(self, seq: int) -> bool:
        """Whether call ``seq`` comes after one lost with its source: its answer is given up, since the
        restarted source decodes the lost window and those after it again."""
        return self._lost is not None and seq > self._lost

    def give_up(self) -> list[int]:
        """The windows its source delivered after a call it lost leave the run, to be decoded again
        (the model would wait for the lost one forever): returns their seqs, released here."""
        given_up = sorted(s for s, window_id in self._ahead.items() if window_id is not None and self.after_loss(s))
        self.delivered -= len(given_up)
        for seq in given_up:
            del self._ahead[seq]
            if seq in self._in_flight:
                self.released(seq)
        return given_up

    def source_restarted(self) -> None:
        """Its source was restarted, resuming at ``next_window``: its lowest window the run does not
        own (see `give_up`). The next window starts a new state chain, since the calls lost with
        the old source left holes in ``seq``."""
        self._ahead.clear()
        self._answered = self.chain_from = self.next_seq
        self._lost = None

    def rewind(self, seq: int, window_id: int, given_up: int) -> None:
        """Window ``window_id`` (call ``seq``) was lost after its source delivered it (its data were
        in the object store of a node that left): it and every later call of the stream leave the
        run (``given_up`` of them had delivered a window), and its source decodes again from
        ``window_id`` with a new state chain. A stream whose source had ended runs again."""
        for s in [s for s in self._in_flight if s >= seq]:
            self._in_flight.remove(s)
        for s in [s for s in self._ahead if s >= seq]:
            del self._ahead[s]
        self.delivered -= given_up
        self.next_window = window_id
        self._answered = self.chain_from = self.next_seq
        self._lost = None
        if self.state is StreamState.ENDING:
            self._move(StreamState.RUNNING)
            self.error = None

    def released(self, seq: int) -> None:
        """Window ``seq`` leaves the run without a result: an end of stream, a dropped or failed window."""
        self._in_flight.remove(seq)
        self._settle()

    def to_sink(self, seq: int) -> None:
        """The model's result for window ``seq`` went to the sink."""
        self._in_flight.remove(seq)
        self.at_sink += 1

    def written(self) -> None:
        """The sink took one of the stream's results."""
        self.at_sink -= 1
        self.windows += 1
        self._settle()

    def result_lost(self) -> None:
        """One of its results went to the sink and was lost before the sink took it (the runner
        decodes it again, `rewind`, while the stream still takes windows)."""
        self.at_sink -= 1

    def restart_chain(self) -> None:
        """The model actor was restarted: the stream's lowest window without a result (or its next
        one) starts a new state chain; not one after a lost call (`after_loss`), which is given up."""
        self.chain_from = min((s for s in self._in_flight if not self.after_loss(s)), default=self.next_seq)

    # -- state -----------------------------------------------------------------------------
    def source_ended(self, error: str | None = None) -> None:
        """The source delivered its last window (``error``: it ended with this failure)."""
        self._move(StreamState.ENDING)
        self.error = error
        self._settle()

    def fail(self, error: str) -> None:
        """The model failed one of the stream's windows: nothing more of it goes to the model."""
        self._move(StreamState.FAILED)
        self.error = self.error or error

    def finish(self) -> None:
        """The run ended: a stream still running or with windows not taken by the sink is stopped."""
        if self.finished:
            return
        self._settle()
        if not self.finished:
            self._move(StreamState.FAILED if self.error else StreamState.STOPPED)

    def _settle(self) -> None:
        if self.state is StreamState.ENDING and not self._in_flight and not self.at_sink:
            self._move(StreamState.FAILED if self.error else StreamState.DONE)

    def _move(self, to: StreamState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"stream {self.stream_id!r}: {self.state.value} -> {to.value} is not a transition")
        self.state = to


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` follows the CLI's convention (0, 1 or 3)."""

    streams: dict[str, StreamStatus]
    wall_s: float
    restarts: int = 0
    stopped: bool = False
    fatal: str | None = None
    committed: dict[str, int] = field(default_factory=dict)
    distill: dict[str, Any] | None = None  # the DistillActor's summary (or its error) when distilling

    @property
    def windows(self) -> int:
        """Windows written by this run, all streams."""
        return sum(s.windows for s in self.streams.values())

    @property
    def failed(self) -> list[str]:
        """Streams that ended with an error."""
        return [s.stream_id for s in self.streams.values() if s.state is StreamState.FAILED]

    @property
    def exit_code(self) -> int:
        """0: every stream ended normally (or drained on a signal); 1: all failed or the run could
        not go on; 3: some streams failed while others finished."""
        if self.fatal is not None or len(self.failed) == len(self.streams):
            return 1
        return 3 if self.failed else 0


class RunningPipeline:
    """The live run, handed to ``on_start`` / ``on_progress`` callbacks.

    ``model`` (the first model replica), ``replicas`` (by replica id), ``sink`` and ``pools`` (the
    source pool actors by pool id) are the actor handles, e.g. for a test to
    ``ray.kill(pipeline.model, no_restart=False)``; ``assignment`` the pool id of each stream
    (`sources` its handle), ``owners`` its replica id; ``streams`` the per-stream records; `stop`
    asks for a drain.
    """

    def __init__(self, model: Any, sink: Any, pools: dict[str, Any], streams: dict[str, StreamStatus],
                 assignment: dict[str, str] | None = None, *, replicas: dict[str, Any] | None = None,
                 owners: dict[str, str] | None = None) -> None:
        self.model = model
        self.replicas = replicas if replicas is not None else {"0": model}
        self.owners = owners if owners is not None else {}
        self.sink = sink
        self.pools = pools
        self.assignment = assignment if assignment is not None else {}
        self.streams = streams
        self.started = time.monotonic()
        self.restarts = 0
        self.model_queue = 0  # windows held for the model or at it (set by the loop each step)
        self._stop = threading.Event()
        self._ended: set[str] = set()

    @property
    def sources(self) -> dict[str, Any]:
        """The handle of the pool actor hosting each stream, by stream id."""
        return {sid: self.pools[pid] for sid, pid in self.assignment.items() if pid in self.pools}

    def stop(self) -> None:
        """Stop asking sources for windows; what is in flight still reaches the sink."""
        self._stop.set()

    def newly_finished(self) -> list[str]:
        """Streams that reached a final state since the last call (the sink then publishes them)."""
        ended = [sid for sid, st in self.streams.items() if st.finished and sid not in self._ended]
        self._ended.update(ended)
        return ended

    @property
    def stopping(self) -> bool:
        """Whether `stop` was called."""
        return self._stop.is_set()

    @property
    def in_flight(self) -> int:
        """Windows between their source's ``next`` call and the model's result, all streams."""
        return sum(s.in_flight for s in self.streams.values())

    @property
    def at_sink(self) -> int:
        """Results sent to the sink and not yet taken, all streams."""
        return sum(s.at_sink for s in self.streams.values())

    @property
    def windows(self) -> int:
        """Windows the sink has taken so far in this run."""
        return sum(s.windows for s in self.streams.values())

    @property
    def windows_per_s(self) -> float:
        """Mean rate since the start of the run."""
        return self.windows / max(time.monotonic() - self.started, 1e-9)
