"""The pipeline's error hierarchy.

Problems that end a stream are raised; problems that do not (a dropped non-finite point, a
reconnect) go to the ``on_error`` callback. Either way they are instances of these classes, and
an ``errors`` output row's ``kind`` is the class name. Every message names the stream, the
source and the cause.
"""

from __future__ import annotations

from pipeline.redact import redact_text, redact_url


class PipelineError(Exception):
    """Base of every error the pipeline raises or reports.

    ``stream_id`` and ``source`` (a path, URL or modality) are kept as attributes so sinks can
    write them as columns; ``window_id`` is set where the problem belongs to one window. The
    message and the source are redacted (`pipeline.redact`): no password of a URL is kept.
    """

    def __init__(
        self,
        message: str,
        *,
        stream_id: str | None = None,
        source: str | None = None,
        window_id: int | None = None,
    ) -> None:
        # Redacted here, so that no message of ours, wherever it goes, carries a URL's password.
        message, source = redact_text(message), redact_url(source)
        self.stream_id = stream_id
        self.source = source
        self.window_id = window_id
        self.cause = message
        where = ", ".join(
            p for p in (f"stream {stream_id!r}" if stream_id else "", f"source {source!r}" if source else "") if p
        )
        super().__init__(f"{where}: {message}" if where else message)

    @property
    def kind(self) -> str:
        """The class name, as written to the ``errors`` table."""
        return type(self).__name__


class ConfigError(PipelineError):
    """The configuration is invalid (names the key and the problem)."""


class SourceError(PipelineError):
    """A source could not be read."""


class SourceNotFound(SourceError):
    """A file or folder named by the config does not exist."""


class SourceOpenError(SourceError):
    """A file or URL exists but could not be opened as media (not media, zero bytes, refused)."""


class DecodeError(SourceError):
    """A container or stream is corrupt or truncated part way through."""


class MissingStreamError(SourceError):
    """A container has no stream of the asked-for kind (e.g. ``audio: same`` on a silent video)."""


class SourceTimeout(SourceError):
    """A live source did not open or deliver data within its timeout."""


class SourceReconnected(SourceError):
    """A live source dropped and was reconnected (reported, not raised)."""


class LagSkipped(SourceError):
    """A live stream fell further behind its live edge than ``runtime.max_lag_s`` and skipped
    ``seconds`` of media to catch up (reported, not raised; the next window has gap=True)."""

    def __init__(self, message: str, *, seconds: float, **kw) -> None:
        super().__init__(message, **kw)
        self.seconds = seconds


class SourceRestarted(SourceError):
    """The process decoding a stream died; the stream was resumed in a new one (reported, not raised)."""


class ActorRestarted(PipelineError):
    """A pipeline actor's process died and Ray restarted it; the run went on (reported, not raised)."""


class SinkRestarted(ActorRestarted):
    """The sink died; the new one recovered from the manifest and redid the rows not committed."""


class ModelRestarted(ActorRestarted):
    """The model replica running a stream died; the stream went on in the restarted replica, or in
    another one when its node left, with its windows resent and its state reset."""


class DistillRestarted(ActorRestarted):
    """The distill actor died; the new one resumed the student from its last checkpoint."""


class PointCloudError(SourceError):
    """A point-cloud file is malformed (bad size, empty scan, unreadable header)."""


class NonFinitePoints(PointCloudError):
    """Non-finite points were dropped from a scan (reported, not raised; carries ``count``)."""

    def __init__(self, message: str, *, count: int, **kw) -> None:
        self.count = count
        super().__init__(message, **kw)


class CheckpointError(PipelineError):
    """A checkpoint is missing, malformed or does not match the config."""


class OutputError(PipelineError):
    """The output folder cannot be written or owned: a full disk, a lost connection, another
    writer holding its lock or lease."""
