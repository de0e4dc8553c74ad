"""SIGINT / SIGTERM during a run: the first drains it, a second aborts (the command line's handlers)."""

from __future__ import annotations

import signal
import sys
from typing import Any


class SignalDrain:
    """SIGINT / SIGTERM: the first asks the run to drain and commit, a second aborts."""

    def __init__(self) -> None:
        self.pipeline = None
        self.requested = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (Ray's own SIGTERM handler would exit without a drain)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        # Before the actors answer there is nothing to drain: the run ends at once.
        if self.requested or self.pipeline is None:
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True
        print(f"{signal.Signals(signum).name}: draining windows in flight, then committing", file=sys.stderr)
        if self.pipeline is not None:
            self.pipeline.stop()

    def attach(self, pipeline: Any) -> None:
        """Called with the running pipeline; stops it at once if a signal came first."""
        self.pipeline = pipeline
        if self.requested:
            pipeline.stop()
