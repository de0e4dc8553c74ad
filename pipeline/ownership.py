"""One writer per output folder: a file lock on a local disk, a lease object on a store.

**Local disk.** An exclusive ``flock`` on ``_manifest/.lock``; the kernel releases it when the
process dies, so a crashed writer never blocks the next.

**Object store** (no locks there). ``_lease.json`` holds the owner's id and an expiry (Unix
seconds). A writer takes the folder when there is no lease, the lease is its own owner id (a
restarted sink of the same run), or the lease has expired; it renews the lease every third of
its time to live (the sink's tick) and stops with an `OutputError` if it finds another owner's
lease there (it lost the folder). A live lease of another owner is refused with one line naming
the folder and the owner. A lease is advisory, not a consensus lock: two writers that start
within the same instant can both read "no lease"; each reads its lease back after writing it, and
the loser fails at once or at its next renewal.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO

from pipeline.errors import OutputError
from pipeline.outputfs import OutputFS

LEASE = "_lease.json"
LOCK = "_manifest/.lock"
LEASE_S = 60.0


def default_owner() -> str:
    """An owner id unique to this process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class FolderLock:
    """The local folder's exclusive lock (see the module docstring)."""

    def __init__(self, out: OutputFS) -> None:
        path = out.path(LOCK)
        out.fs.create_dir(path.rpartition("/")[0], recursive=True)
        self._fh: IO[str] | None = open(path, "a")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise OutputError("another writer has this output folder open; use another --output",
                              source=out.where) from None

    def renew(self) -> None:
        """Nothing to renew: the lock lasts as long as the process."""

    def release(self) -> None:
        """Unlock."""
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class Lease:
    """The store folder's lease object (see the module docstring); ``clock`` gives Unix seconds."""

    def __init__(self, out: OutputFS, owner: str, ttl_s: float = LEASE_S, clock: Callable[[], float] = time.time) -> None:
        self.out, self.owner, self.ttl_s, self.clock = out, owner, ttl_s, clock
        held = self._read()
        if held is not None and held["owner"] != owner and held["expires"] > clock():
            raise OutputError(
                f"output folder is owned by {held['owner']} until {_iso(held['expires'])} (its lease, {LEASE}); "
                "stop that run, use another output folder, or wait for the lease to expire", source=out.where)
        self._renewed = 0.0
        self._write()
        self._check()

    def renew(self) -> None:
        """Extend the lease when a third of its time has passed; `OutputError` if another owner took it."""
        if self.clock() - self._renewed >= self.ttl_s / 3:
            self._check()
            self._write()

    def release(self) -> None:
        """Delete the lease if it is still ours."""
        held = self._read()
        if held is not None and held["owner"] == self.owner:
            self.out.delete(LEASE)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.out.read_bytes(LEASE))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError):  # torn by hand: treat as no lease
            return None

    def _write(self) -> None:
        now = self.clock()
        body = {"owner": self.owner, "expires": now + self.ttl_s, "renewed": now}
        self.out.write_bytes(LEASE, json.dumps(body).encode())
        self._renewed = now

    def _check(self) -> None:
        held = self._read()
        if held is None or held["owner"] != self.owner:
            who = "nobody" if held is None else held["owner"]
            raise OutputError(f"lost the output folder's lease to {who}; another writer took it", source=self.out.where)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
