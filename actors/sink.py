"""SinkActor: takes the model's results and commits them as Parquet (`pipeline.parquet`).

Rows are buffered and committed together (atomic part files, then the manifest) when
``FLUSH_WINDOWS`` windows are buffered or the oldest has waited ``FLUSH_S``, and on `close`.
Windows already committed for a stream (a resumed run) are dropped, so ``(stream_id,
window_id)`` stays unique. The buffer is bounded by the flush policy and by the runner's
in-flight bounds (a window counts as in flight until `write` returns).
"""

from __future__ import annotations

import time
from pathlib import Path

from actors.metrics import Metrics
from actors.model import WindowResult
from actors.source import ErrorRecord
from pipeline.config import Config

FLUSH_WINDOWS = 256
FLUSH_S = 2.0


class SinkActor:
    """Writes ``windows``, ``flow`` and ``errors`` rows under ``output`` (see the module docstring)."""

    def __init__(self, output: str, cfg: Config, *, config_hash: str, model: str = "") -> None:
        from pipeline.parquet import OutputWriter

        self._output = Path(output)
        self._cfg = cfg
        self._config_hash = config_hash
        self._writer = OutputWriter(self._output, model=model, config_hash=config_hash)
        self._buffer: list[WindowResult] = []
        self._errors: list[ErrorRecord] = []
        self._oldest: float | None = None
        self._committed: dict[str, set[int]] = {}
        self._written: dict[str, int] = {}
        self._metrics = Metrics()

    def set_model(self, model: str) -> None:
        """The model name written to rows and file metadata (known once the model actor loaded)."""
        self._writer.model = model

    def resume_points(self, stream_ids: list[str]) -> dict[str, int]:
        """Per stream, the window id to start from: after the last committed window (0 if none)."""
        for sid in stream_ids:
            self._committed[sid] = set(self._writer.committed(sid))
        return {sid: self._writer.resume_from(sid) for sid in stream_ids}

    def write(self, results: list[WindowResult]) -> int:
        """Buffer results (dropping windows already committed); commit if due. Returns rows taken."""
        taken = 0
        for r in results:
            self._metrics.windows_in.inc(tags={"stage": "sink", "stream": r.stream_id})
            if r.window_id in self._committed.setdefault(r.stream_id, set()):
                continue
            self._buffer.append(r)
            taken += 1
        if self._buffer and self._oldest is None:
            self._oldest = time.monotonic()
        self.tick()
        return taken

    def write_errors(self, records: list[ErrorRecord]) -> None:
        """Buffer ``errors`` rows (append-only; committed with the next flush)."""
        self._errors.extend(records)
        if self._oldest is None:
            self._oldest = time.monotonic()

    def tick(self) -> None:
        """Commit if the buffer is full or its oldest row has waited long enough."""
        if self._oldest is None:
            return
        if len(self._buffer) >= FLUSH_WINDOWS or time.monotonic() - self._oldest >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Commit everything buffered."""
        if not self._buffer and not self._errors:
            self._oldest = None
            return
        t0 = time.perf_counter()
        rows, self._buffer = self._buffer, []
        errors, self._errors = self._errors, []
        self._writer.write(rows, errors)
        for r in rows:
            self._committed[r.stream_id].add(r.window_id)
            self._written[r.stream_id] = self._written.get(r.stream_id, 0) + 1
            self._metrics.windows_out.inc(tags={"stage": "sink", "stream": r.stream_id})
        self._metrics.latency.observe(time.perf_counter() - t0, tags={"stage": "sink"})
        self._oldest = None

    def close(self) -> dict[str, int]:
        """Commit what is left; windows committed by this actor, per stream."""
        self.flush()
        return dict(self._written)
