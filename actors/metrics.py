"""The pipeline's metrics: `ray.util.metrics` series registered as ``pstream_*``.

Prometheus shows them as ``ray_pstream_*`` (Ray prefixes every application metric), about ten
seconds after they change. Each process that records builds its own `Metrics` (Ray metric objects
belong to the worker that created them); series with the same name and tags from several
processes are summed by Prometheus queries such as ``sum by (stream) (rate(...))``.
"""

from __future__ import annotations

from functools import cached_property

from ray.util import metrics

# Latency buckets (seconds): from a fast model call on a GPU to a slow decode of a long window.
_LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
_BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]

STAGES = ("source", "model", "sink", "distill")


class Metrics:
    """The ``pstream_*`` series; each is created on first use in the recording process."""

    @cached_property
    def windows_in(self) -> metrics.Counter:
        """Windows that entered a stage, by ``stage`` and ``stream``."""
        return metrics.Counter(
            "pstream_windows_in_total", "Windows that entered a stage.", tag_keys=("stage", "stream")
        )

    @cached_property
    def windows_out(self) -> metrics.Counter:
        """Windows that left a stage, by ``stage`` and ``stream``."""
        return metrics.Counter(
            "pstream_windows_out_total", "Windows that left a stage.", tag_keys=("stage", "stream")
        )

    @cached_property
    def latency(self) -> metrics.Histogram:
        """Seconds a stage spent on one window (source: decode; model: batch; sink: write)."""
        return metrics.Histogram(
            "pstream_stage_latency_seconds",
            "Seconds a stage spent on one call (decode one window, run one batch, write rows).",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("stage",),
        )

    @cached_property
    def queue_depth(self) -> metrics.Gauge:
        """Windows waiting at a stage (``model``: queued in the model actor; ``in_flight``: all)."""
        return metrics.Gauge(
            "pstream_queue_depth", "Windows waiting at a stage or in flight in total.", tag_keys=("stage",)
        )

    @cached_property
    def batch_size(self) -> metrics.Histogram:
        """Windows per model batch."""
        return metrics.Histogram(
            "pstream_batch_size", "Windows per model batch.", boundaries=_BATCH_BOUNDARIES, tag_keys=()
        )

    @cached_property
    def missing_modality(self) -> metrics.Counter:
        """Windows that lacked a modality, by ``stream`` and ``modality``."""
        return metrics.Counter(
            "pstream_missing_modality_windows_total",
            "Windows without data in one modality.",
            tag_keys=("stream", "modality"),
        )

    @cached_property
    def errors(self) -> metrics.Counter:
        """Source problems (decode errors, reconnects, dropped points), by ``stream`` and ``kind``."""
        return metrics.Counter(
            "pstream_decode_errors_total",
            "Source problems reported or raised, by the pipeline error class.",
            tag_keys=("stream", "kind"),
        )

    @cached_property
    def restarts(self) -> metrics.Counter:
        """Actor restarts seen by the runner, by ``actor``, its kind (``model``, ``source``, ...):
        the restart code calls ``restarts.inc(tags={"actor": kind})``."""
        return metrics.Counter("pstream_restarts_total", "Actor restarts.", tag_keys=("actor",))

    @cached_property
    def last_window_time(self) -> metrics.Gauge:
        """UNIX time (s, wall clock) at which the sink last committed a new window of ``stream``:
        a stalled stream is one whose value stops moving (``time() - value`` grows)."""
        return metrics.Gauge(
            "pstream_last_window_timestamp_seconds",
            "Wall-clock UNIX time of the stream's last committed window.",
            tag_keys=("stream",),
        )

    @cached_property
    def build_info(self) -> metrics.Gauge:
        """Always 1, tagged with the running versions of perceiver-stream, torch and Ray."""
        return metrics.Gauge(
            "pstream_build_info", "Versions of the running pipeline (value 1).", tag_keys=("version", "torch", "ray")
        )

    @cached_property
    def streams_active(self) -> metrics.Gauge:
        """Streams still delivering windows."""
        return metrics.Gauge("pstream_streams_active", "Streams still delivering windows.", tag_keys=())

    @cached_property
    def distill_dropped(self) -> metrics.Counter:
        """Windows the model actor did not offer the student because it was still busy."""
        return metrics.Counter(
            "pstream_distill_dropped_total",
            "Windows not distilled because the distill actor was busy (drop-with-count backpressure).",
            tag_keys=(),
        )

    @cached_property
    def distill_cosine(self) -> metrics.Gauge:
        """Mean cosine of the student's embeddings to the teacher's over the last step's batch."""
        return metrics.Gauge(
            "pstream_distill_cosine", "Cosine of student to teacher embeddings, last distillation step.", tag_keys=()
        )

    @cached_property
    def skipped_windows(self) -> metrics.Counter:
        """Windows a live stream skipped to catch up with its live edge (``runtime.max_lag_s``), by ``stream``."""
        return metrics.Counter(
            "pstream_skipped_windows_total",
            "Windows a live stream skipped because it fell further behind than runtime.max_lag_s.",
            tag_keys=("stream",),
        )
