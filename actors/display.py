"""The live progress display and the final summary of a run (rich, on the terminal); what they
print of errors is redacted (`pipeline.redact`)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from actors.streams import RunningPipeline, RunSummary
from pipeline.redact import redact_text


class ProgressDisplay:
    """A live table: windows per stream, windows/s, queue depth; refreshed a few times a second.

    Use as a context manager and pass `update` as the run's ``on_progress`` callback.
    """

    def __init__(self, console: Console | None = None, refresh_s: float = 0.25) -> None:
        self._console = console or Console(stderr=True)
        self._live = Live(Table(), console=self._console, auto_refresh=False, transient=False)
        self._refresh_s = refresh_s
        self._last = 0.0

    def __enter__(self) -> "ProgressDisplay":
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(*exc)

    def update(self, pipeline: RunningPipeline) -> None:
        """Redraw from the pipeline's counters (at most every ``refresh_s``)."""
        now = time.monotonic()
        if now - self._last < self._refresh_s:
            return
        self._last = now
        self._live.update(self._table(pipeline), refresh=True)

    @staticmethod
    def _table(p: RunningPipeline) -> Table:
        elapsed = time.monotonic() - p.started
        title = (
            f"{p.windows} windows  {p.windows_per_s:.1f}/s  in flight {p.in_flight}  at sink {p.at_sink}  "
            f"model queue {p.model_queue}  restarts {p.restarts}  {elapsed:.0f} s"
            + ("  [yellow]draining[/]" if p.stopping else "")
        )
        t = Table(title=title, title_justify="left")
        t.add_column("stream")
        t.add_column("windows", justify="right")
        t.add_column("in flight", justify="right")
        t.add_column("state")
        for s in p.streams.values():
            t.add_row(s.stream_id, str(s.windows), str(s.in_flight), s.state)
        return t


def print_summary(summary: RunSummary, output: str, console: Console | None = None) -> None:
    """The final summary: per stream windows, state and error; totals and where outputs went."""
    console = console or Console()
    t = Table(title=f"perceiver-stream run: {redact_text(output)}", title_justify="left")
    t.add_column("stream")
    t.add_column("from window", justify="right")
    t.add_column("windows", justify="right")
    t.add_column("committed", justify="right")
    t.add_column("state")
    t.add_column("error", overflow="fold")
    for s in summary.streams.values():
        t.add_row(
            s.stream_id,
            str(s.start_window),
            str(s.windows),
            str(summary.committed.get(s.stream_id, "")),
            s.state,
            redact_text(s.error or ""),
        )
    console.print(t)
    rate = summary.windows / max(summary.wall_s, 1e-9)
    line = f"{summary.windows} windows in {summary.wall_s:.1f} s ({rate:.1f}/s), restarts {summary.restarts}"
    if summary.stopped:
        line += ", stopped by a signal (drained)"
    if summary.fatal:
        line += f", run failed: {redact_text(summary.fatal)}"
    console.print(line)
    d = summary.distill
    if d is not None:
        if "error" in d:
            console.print(f"distillation failed: {redact_text(d['error'])}")
        else:
            console.print(
                f"student: {d['steps']} steps over {d['windows']} windows ({d['dropped_windows']} dropped while busy), "
                f"cosine to the teacher {d['cosine_to_teacher']}, saved to {d['checkpoint']}"
            )
