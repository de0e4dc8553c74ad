"""SinkActor: takes the model's results and commits them as Parquet (`pipeline.parquet`).

Rows are buffered and committed together (hidden part files, then the manifest) when
``FLUSH_WINDOWS`` windows are buffered or the oldest has waited ``FLUSH_S``, and on `close`.
After each commit the writer's maintenance thread merges the stream's parts and publishes its
closed periods, while the next commits go on; `end_streams` (a stream that ended) has it publish
everything that stream committed the same way, and `close` (the run drains) publishes everything
committed before it returns. `tick` also renews an object store's
lease; the lease's owner is the actor's id, so a restarted sink takes its own folder back.
Windows already committed for a stream (a resumed run, or results resent after a restart) are
dropped, so ``(stream_id, window_id)`` stays unique. The buffer is bounded by the flush policy and
by the runner's in-flight bounds (a window counts as in flight until `write` returns).

Every call that may commit (`write`, `tick`, `end_streams`, `close`) returns a `SinkReply`: what
its flush committed and the process id, so that the runner (`actors.sink_guard`) keeps each
result until it is committed and notices a restarted sink (Ray restarts it; the new one re-opens
the folder and recovers from the manifest).

``student`` rows (from the DistillActor) are committed with their window's rows when both are
buffered, or with a later flush once the window is committed; a student row whose window never
commits (its stream failed first) is not written.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from PIL import Image

from actors.memory import HeapTrimmer
from actors.metrics import Metrics
from actors.results import WindowResult
from actors.source import ErrorRecord, lower_priority
from pipeline.parquet import ErrorRow, FlowRow, OutputWriter, StudentRow

FLUSH_WINDOWS = 256
FLUSH_S = 5.0


@dataclass
class SinkReply:
    """What a sink call committed: ``windows`` ids per stream, the ``errors`` batches (numbers the
    runner gave `SinkActor.write_errors`), the ``skipped`` windows (committed before, dropped), and
    ``pid``, the sink process that answered."""

    pid: int
    windows: dict[str, list[int]] = field(default_factory=dict)
    errors: list[int] = field(default_factory=list)
    skipped: dict[str, list[int]] = field(default_factory=dict)


class SinkActor:
    """Writes ``windows``, ``flow`` (with the earlier frame as PNG), ``student`` and ``errors`` rows
    under ``output`` (a local folder or a `pyarrow.fs` URI; see the module docstring and
    `OutputWriter` for ``publish_every_s`` and ``retain_days``); ``nice`` lowers its process's CPU
    priority."""

    def __init__(self, output: str, *, config_hash: str, model: str = "", nice: int = 0,
                 publish_every_s: float = 3600.0, retain_days: float | None = None) -> None:
        lower_priority(nice)
        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        self._writer = OutputWriter(output, model_name=model, config_hash=config_hash, publish_every_s=publish_every_s,
                                    retain_days=retain_days, owner=None if actor is None else f"sink actor {actor}",
                                    background=True)
        self._buffer: list[WindowResult] = []
        self._errors: list[ErrorRecord] = []
        self._error_batches: list[int] = []
        self._student: dict[str, dict[int, StudentRow]] = {}
        self._oldest: float | None = None
        self._metrics = Metrics()
        self._trim = HeapTrimmer()

    def info(self) -> dict[str, int]:
        """The sink's process id (another one after a restart)."""
        return {"pid": os.getpid()}

    def set_model(self, model: str) -> None:
        """The model name written to rows and file metadata (known once the model actor loaded)."""
        self._writer.model_name = model

    def resume_points(self, stream_ids: list[str]) -> dict[str, int]:
        """Per stream, the window id to start from: after the last committed window (0 if none)."""
        return {sid: self._writer.resume_from(sid) for sid in stream_ids}

    def uncommitted(self, held: dict[str, list[int]]) -> dict[str, list[int]]:
        """Of ``held`` window ids per stream, those not committed."""
        return {sid: [w for w in ids if not self._writer.is_committed(sid, w)] for sid, ids in held.items()}

    def write(self, *results: WindowResult) -> SinkReply:
        """Buffer results (dropping windows already committed); commit if due.

        One argument per result, so that the runner can pass the model actor's returns by
        reference and Ray hands them over resolved.
        """
        skipped: dict[str, list[int]] = {}
        for r in results:
            self._metrics.windows_in.inc(tags={"stage": "sink", "stream": r.stream_id})
            if self._writer.is_committed(r.stream_id, r.window_id):
                skipped.setdefault(r.stream_id, []).append(r.window_id)
            else:
                self._buffer.append(r)
        if self._buffer and self._oldest is None:
            self._oldest = time.monotonic()
        reply = self.tick()
        reply.skipped = skipped
        return reply

    def write_errors(self, records: list[ErrorRecord], batch: int = -1) -> None:
        """Buffer ``errors`` rows (append-only; committed with the next flush); ``batch`` numbers
        them for the `SinkReply` of that flush."""
        self._errors.extend(records)
        self._error_batches.append(batch)
        if self._oldest is None:
            self._oldest = time.monotonic()

    def write_student(self, rows: dict[str, list[StudentRow]]) -> None:
        """Buffer ``student`` rows by stream (committed with or after their window's rows)."""
        for sid, items in rows.items():
            held = self._student.setdefault(sid, {})
            held.update((r.window_id, r) for r in items)
        if self._oldest is None:
            self._oldest = time.monotonic()

    def tick(self) -> SinkReply:
        """Commit if the buffer is full or its oldest row has waited long enough; renew the lease."""
        self._writer.renew()
        self._trim()
        if self._oldest is not None and (
            len(self._buffer) >= FLUSH_WINDOWS or time.monotonic() - self._oldest >= FLUSH_S
        ):
            return self.flush()
        return SinkReply(os.getpid())

    def flush(self) -> SinkReply:
        """Commit everything buffered."""
        reply = SinkReply(os.getpid(), errors=self._error_batches)
        self._error_batches = []
        if not self._buffer and not self._errors and not self._student:
            self._oldest = None
            return reply
        t0 = time.perf_counter()
        rows, self._buffer = self._buffer, []
        errors, self._errors = self._errors, []
        by_stream: dict[str, tuple[list[WindowResult], list[ErrorRecord]]] = {}
        for r in rows:
            by_stream.setdefault(r.stream_id, ([], []))[0].append(r)
        for e in errors:
            by_stream.setdefault(e.stream_id, ([], []))[1].append(e)
        for sid in self._student:
            by_stream.setdefault(sid, ([], []))
        for sid, (results, errs) in by_stream.items():
            ids = self._writer.write(
                sid,
                windows=[r.row for r in results],
                flow=[_flow_row(r) for r in results if r.flow is not None],
                student=self._take_student(sid, {r.window_id for r in results}),
                errors=[ErrorRow(kind=e.kind, message=e.message, window_id=e.window_id, t_wall=e.t_wall) for e in errs],
            )
            if ids:
                reply.windows[sid] = ids
                self._metrics.windows_out.inc(len(ids), tags={"stage": "sink", "stream": sid})
                self._metrics.last_window_time.set(time.time(), tags={"stream": sid})
        self._metrics.latency.observe(time.perf_counter() - t0, tags={"stage": "sink"})
        self._oldest = time.monotonic() if self._student else None  # rows still waiting for their window
        return reply

    def _take_student(self, sid: str, flushing: set[int]) -> list[StudentRow]:
        """The held ``student`` rows of ``sid`` whose window is committed or in this flush."""
        held = self._student.get(sid, {})
        take = [held.pop(w) for w in sorted(held) if w in flushing or self._writer.is_committed(sid, w)]
        if not held:
            self._student.pop(sid, None)
        return take

    def end_streams(self, stream_ids: list[str]) -> SinkReply:
        """Streams that ended: commit their buffered rows, and publish all they committed on the
        writer's maintenance thread (the other streams' commits go on meanwhile)."""
        reply = self.flush()
        for sid in stream_ids:
            self._writer.finish(sid)
        return reply

    def close(self) -> SinkReply:
        """Commit what is left, publish everything committed and release the output folder."""
        reply = self.flush()
        self._writer.close()
        return reply


def _flow_row(r: WindowResult) -> FlowRow:
    assert r.flow is not None and r.flow_t is not None
    return FlowRow(window_id=r.window_id, t=r.flow_t, flow=r.flow, frame=None if r.frame is None else _png(r.frame))


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of an ``H x W x 3`` uint8 frame (for `jobs.inspect`'s pictures)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # fast: a preview, not an archive
    return buf.getvalue()
