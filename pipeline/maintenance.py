"""The output writer's maintenance thread: merges, publications, retention and manifest compaction
run beside the commits instead of inside them.

A publication copies a whole period of a stream (an hour of flow is tens of MB) and a deep merge
an eighth of one; done inside a commit, every other stream's commit waits for the copy and the
pipeline behind the sink stalls with it. On its own thread, with the manifest's lock held only to
read the state and to append a record (see `pipeline.publish`), a commit waits at most for one
record, a retirement's deletions or a manifest compaction. The large copies run in child
processes and the small ones on this thread (`pipeline.partcopy`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Maintenance:
    """Runs ``work(stream_id)`` on one daemon thread for each stream marked `due`, oldest mark
    first, once however many marks a stream gets while it waits. The first exception stops the
    work; `check` (and `drain`) raise it in the caller's thread from then on."""

    def __init__(self, work: Callable[[str], None]) -> None:
        self._work = work
        self._due: dict[str, None] = {}
        self._busy = False
        self._stopping = False
        self._failure: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="output-maintenance", daemon=True)
        self._thread.start()

    def due(self, stream_id: str) -> None:
        """Mark ``stream_id`` as having work (a commit added parts)."""
        with self._cond:
            self._due[stream_id] = None
            self._cond.notify_all()

    def check(self) -> None:
        """Raise the exception that stopped the work, if one did."""
        if self._failure is not None:
            raise self._failure

    def drain(self) -> None:
        """Wait until no stream is due and no work runs; then `check`."""
        with self._cond:
            self._cond.wait_for(lambda: self._failure is not None or not (self._due or self._busy))
        self.check()

    def stop(self) -> None:
        """Finish the work under way, drop what is still due, and end the thread."""
        with self._cond:
            self._stopping = True
            self._due.clear()
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or bool(self._due))
                if self._stopping:
                    return
                stream_id = next(iter(self._due))
                del self._due[stream_id]
                self._busy = True
            try:
                self._work(stream_id)
            except BaseException as e:  # noqa: BLE001 - raised again by check() in the caller's thread
                with self._cond:
                    self._failure = e
                    self._busy = False
                    self._due.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()
