"""Reading one media container, file or live source: open/read timeouts, stalls, reconnects, lag.

`MediaReader` demuxes a container once and feeds its packets to one decoder per modality
(`VideoDecoder`, `AudioDecoder`), so ``audio: same`` costs one demuxer and, for a live URL, one
connection. `MediaReader.tracks` hands out one iterator per modality for the windower. ``format``
and ``options`` go to FFmpeg's ``av.open`` (an input format such as ``v4l2``, demuxer/protocol
options such as ``rtsp_transport: tcp``).

Files: a missing, empty or non-media file raises at open; a packet the decoder rejects is reported
(`DecodeError` through ``on_error``) and skipped; a container that ends well before the duration
its index declares (MP4, Matroska, AVI, WAV, FLAC, Ogg) raises `DecodeError` after the frames it
did hold (`pipeline.sources.files`). A file's samples carry ``t_wall`` = its ``creation_time`` metadata plus the sample's end
in media time since the file's start (None without that metadata).

Live sources (a URL, a capture device, ``live: true``; see `pipeline.sources.policy`): packets are
read on a thread (`pipeline.sources.pump.PacketPump`) and each sample carries ``t_wall``, the
wall-clock time its packet arrived. Opening must finish within ``open_timeout_s``; a read that
delivers nothing for ``read_timeout_s`` is a stall (FFmpeg's interrupt callback, through PyAV's
``timeout=(open, read)``); a stall, a dropped connection, corrupt data or, for an endless source,
the end of data closes the connection and reopens it after `policy.backoff_s` (doubling from
``reconnect_backoff_s`` up to ``max_backoff_s``), up to ``reconnect_tries`` attempts (None: for
ever). The first open is retried the same way (its failure is reported at once, so a camera that
is down at start shows). The attempt count starts again only once a window was delivered
(`window_done`), so a source that connects and drops again at once still runs out of tries. Each
reconnect is reported as `SourceReconnected`, and the iterators yield a `SourceBreak` so the next
window has ``gap=True``. Media time continues: if the new connection's clock restarts behind
where the old one stopped, its times are shifted to resume there. A finite source (an HTTP body)
that ends, cleanly or, without a Content-Length, with FFmpeg's I/O error, ends the stream.

``max_lag_s``: when decoding falls further behind what has arrived than that, the reader skips
to the live edge: it reports `LagSkipped` naming the seconds skipped and yields a `SourceBreak`
(the next window has ``gap=True``). Files are never skipped.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import av

from pipeline.errors import (
    DecodeError,
    LagSkipped,
    MissingStreamError,
    PipelineError,
    SourceError,
    SourceNotFound,
    SourceOpenError,
    SourceReconnected,
    SourceTimeout,
)
from pipeline.sources.policy import SourceSettings, backoff_s, is_endless, is_live
from pipeline.sources.files import recording_start, truncation
from pipeline.sources.pump import PacketPump
from pipeline.sources.tee import Tee, kind_of

# Rejected packets in a row, with no frame in between, after which a file counts as corrupt.
_MAX_BAD_PACKETS = 50
# Records that start this far before the resume point of a reconnect repeat what was delivered.
_EPS = 1e-6


@dataclass(frozen=True)
class SourceBreak:
    """A discontinuity in a source (a reconnect, a skip) after media time ``t``: the next window has gap=True."""

    t: float


class Decoder(Protocol):
    """What `MediaReader` needs from a per-modality decoder (`VideoDecoder`, `AudioDecoder`)."""

    kind: str
    offset: float

    def open(self, container: av.container.InputContainer) -> av.stream.Stream: ...

    def decode(self, packet: av.Packet | None) -> list[Any]: ...

    def flush(self) -> list[Any]: ...


class _Dropped(Exception):
    """A live connection stalled, dropped or sent garbage (internal: triggers a reconnect), or a
    finite source ended in a way FFmpeg reports as an error (``ended``)."""

    def __init__(self, cause: str, stalled: bool, *, ended: bool = False) -> None:
        super().__init__(cause)
        self.stalled = stalled
        self.ended = ended


class MediaReader:
    """Reads one container (file or live source) and decodes its video and/or audio stream.

    Iterating yields records of every decoder (`VideoFrame`, `AudioChunk`) in demux order and a
    `SourceBreak` after each reconnect or skip; `tracks` splits that into one iterator per
    modality. ``live`` is the stream's ``live`` key (None: guessed, see `pipeline.sources.policy`).
    Once ``stop`` is set (the run drains), a source waiting to reconnect ends instead.
    Errors are `pipeline` errors naming ``stream_id`` and the source.
    """

    def __init__(
        self,
        source: str,
        decoders: list[Decoder],
        *,
        stream_id: str,
        settings: object | None = None,
        on_error: Callable[[PipelineError], None] | None = None,
        format: str | None = None,
        options: dict[str, Any] | None = None,
        live: bool | None = None,
        max_lag_s: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.source = str(source)
        self.decoders = list(decoders)
        self.stream_id = stream_id
        self.settings = SourceSettings.of(settings)
        self.on_error = on_error
        self.format = format
        self.options = {str(k): str(v) for k, v in (options or {}).items()}
        self.live = is_live(self.source, format, live)
        self.endless = self.live and is_endless(self.source, format, live)
        self.max_lag_s = max_lag_s if self.live else None  # files are never skipped
        self.stop = stop
        self._failures = 0  # reconnect attempts since a window was last delivered
        self._last_end: float | None = None  # over all modalities, for resuming after a break
        self._ends: dict[str, float] = {}  # per modality, for the truncation check
        self._recorded: tuple[float, float] | None = None  # a file's (creation epoch s, media start s)
        self._last_wall: float | None = None  # arrival of the latest packet of a live source

    # -- errors -------------------------------------------------------------------------------

    def _error(self, cls: type[PipelineError], message: str) -> PipelineError:
        return cls(message, stream_id=self.stream_id, source=self.source)

    def _report(self, error: PipelineError) -> None:
        if self.on_error is not None:
            self.on_error(error)

    def window_done(self) -> None:
        """A window of this source was delivered: reconnect attempts count from zero again."""
        self._failures = 0

    # -- opening ------------------------------------------------------------------------------

    def _open(self) -> av.container.InputContainer:
        s = self.settings
        if not self.live:
            path = Path(self.source.removeprefix("file://"))
            if not path.exists():
                raise self._error(SourceNotFound, "no such file")
            if path.is_dir():
                raise self._error(SourceOpenError, "is a folder, not a media file")
            if path.stat().st_size == 0:
                raise self._error(SourceOpenError, "the file is empty (0 bytes)")
        kwargs: dict[str, Any] = {"format": self.format, "options": self.options}
        if self.live:
            kwargs["timeout"] = (s.open_timeout_s, s.read_timeout_s)
        try:
            container = av.open(self.source, **kwargs)
        except av.error.ExitError:
            raise self._error(SourceTimeout, f"did not open within open_timeout_s={s.open_timeout_s}") from None
        except FileNotFoundError as e:
            cls = SourceOpenError if self.live else SourceNotFound
            raise self._error(cls, f"not found ({_reason(e)})") from None
        except av.error.InvalidDataError as e:
            raise self._error(SourceOpenError, f"not a readable media container ({_reason(e)})") from None
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise self._error(SourceOpenError, f"could not be opened ({_reason(e)})") from None
        try:
            for d in self.decoders:
                d.open(container)
        except MissingStreamError as e:
            container.close()
            raise self._error(MissingStreamError, e.cause) from None
        if not self.live:
            self._recorded = recording_start(container)
        return container

    def _connect(self, cause: str | None, stalled: bool = False) -> av.container.InputContainer | None:
        """Open the source; a live one is retried with backoff (``cause``: why it is reconnected,
        None for the first open, which is tried at once). None: ``stop`` was set while waiting."""
        if not self.live:
            return self._open()
        s = self.settings
        retry = cause is not None
        last: SourceError | None = None
        while True:
            if retry:
                self._failures += 1
                if s.gave_up(self._failures):
                    gave_up = f"gave up after reconnect_tries={s.reconnect_tries} attempts"
                    if cause is None:  # never opened
                        raise self._error(type(last), f"{last.cause}; {gave_up}")
                    tail = f" (last: {last.cause})" if last is not None else ""
                    raise self._error(SourceTimeout if stalled else SourceError, f"{cause}; {gave_up}{tail}")
                if self._wait(backoff_s(self._failures, s.reconnect_backoff_s, s.max_backoff_s)):
                    return None
            retry = True
            try:
                container = self._open()
            except MissingStreamError:
                raise
            except SourceError as e:
                if cause is None and last is None and not s.gave_up(1):
                    self._report(e)  # down at start: say so now, not only when it comes up
                last = e
                stalled = isinstance(e, SourceTimeout)
                continue
            if self._failures:
                why = cause if cause is not None else f"down at start ({last.cause})"
                self._report(self._error(SourceReconnected, f"{why}; reconnected (attempt {self._failures})"))
            return container

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; True when ``stop`` is set (before or meanwhile)."""
        if self.stop is None:
            time.sleep(seconds)
            return False
        return self.stop.wait(seconds)

    # -- reading ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        container = self._connect(None)
        resume_t: float | None = None
        while container is not None:
            pump = self._pump(container)
            try:
                for record in self._decode(container, pump, resume_t):
                    yield record
                if not self.live:
                    self._check_complete(container)
                return
            except _Dropped as drop:
                for d in self.decoders:
                    for record in d.flush():
                        yield self._stamp(record, self._last_wall)
                if drop.ended:
                    return
                cause, stalled = str(drop), drop.stalled
            finally:
                if pump is not None:
                    pump.close()
                else:
                    container.close()
            container = self._connect(cause, stalled)
            resume_t = self._last_end
            if container is not None and resume_t is not None:
                yield SourceBreak(resume_t)

    def _pump(self, container: av.container.InputContainer) -> PacketPump | None:
        if not self.live:
            return None
        video = next((d.stream.index for d in self.decoders if d.kind == "video"), None)
        return PacketPump(container, [d.stream for d in self.decoders], video_index=video, max_lag_s=self.max_lag_s)

    def _stamp(self, record: Any, wall: float | None) -> Any:
        end = record.t + record.duration
        kind = kind_of(record)
        self._ends[kind] = max(end, self._ends.get(kind, end))
        if self._last_end is None or end > self._last_end:
            self._last_end = end
        if self._recorded is not None:
            record.t_wall = self._recorded[0] + end - self._recorded[1]
        else:
            record.t_wall = wall
        return record

    def _packets(
        self, container: av.container.InputContainer, pump: PacketPump | None
    ) -> Iterator[tuple[av.Packet, float | None, float]]:
        """``(packet, arrival wall time or None, media seconds skipped before it)`` of one connection."""
        if pump is None:
            for packet in container.demux([d.stream for d in self.decoders]):
                yield packet, None, 0.0
            return
        while True:
            try:
                arrived, skipped = pump.take()
            except StopIteration:
                return
            yield arrived.packet, arrived.wall, skipped

    def _decode(
        self, container: av.container.InputContainer, pump: PacketPump | None, resume_t: float | None
    ) -> Iterator[Any]:
        """Records of one connection; after a reconnect, times resume at ``resume_t``."""
        by_stream = {d.stream.index: d for d in self.decoders}
        rebase = resume_t is not None
        bad_run = 0
        packets = self._packets(container, pump)
        while True:
            try:
                packet, wall, skipped = next(packets)
            except StopIteration:
                if self.endless:
                    raise _Dropped("the source ended (an endless source: reconnecting)", False) from None
                return
            except av.error.ExitError:
                if self.live:
                    raise _Dropped(f"stalled: no data for read_timeout_s={self.settings.read_timeout_s}", True)
                raise self._error(DecodeError, "reading was interrupted") from None
            except (av.error.FFmpegError, OSError) as e:
                if self.live and not self.endless and container.size <= 0 and getattr(e, "errno", None) == errno.EIO:
                    # A body of unknown length: FFmpeg cannot tell its end from a drop; a finite source ends.
                    raise _Dropped("ended", False, ended=True) from None
                if self.live:
                    raise _Dropped(f"connection dropped ({_reason(e)})", False) from None
                raise self._error(DecodeError, f"corrupt container ({_reason(e)})") from None
            if skipped > 0:
                self._report(LagSkipped(
                    f"fell more than runtime.max_lag_s={self.max_lag_s} s behind the live edge; skipped {skipped:.1f} s",
                    seconds=skipped, stream_id=self.stream_id, source=self.source,
                ))
                if self._last_end is not None:
                    yield SourceBreak(self._last_end)
            self._last_wall = wall
            decoder = by_stream[packet.stream.index]
            if rebase and packet.pts is not None:
                # Keep media time running across the break: a clock that restarted is shifted on.
                raw = float(packet.pts * packet.time_base)
                for d in self.decoders:
                    if raw + d.offset < resume_t:
                        d.offset = resume_t - raw
                rebase = False
            try:
                records = decoder.decode(packet)
            except av.error.FFmpegError as e:
                if self.live:
                    raise _Dropped(f"corrupt data ({_reason(e)})", False) from None
                bad_run += 1
                self._report(self._error(DecodeError, f"skipped a {decoder.kind} packet the decoder rejected ({_reason(e)})"))
                if bad_run >= _MAX_BAD_PACKETS:
                    raise self._error(DecodeError, f"corrupt: {bad_run} {decoder.kind} packets in a row could not be decoded") from None
                continue
            if records:
                bad_run = 0
            for record in records:
                if resume_t is not None and record.t < resume_t - _EPS:
                    continue
                yield self._stamp(record, wall)

    def _check_complete(self, container: av.container.InputContainer) -> None:
        """Raise `DecodeError` when a file ended well before the duration its index declares."""
        short = truncation(container, self.decoders, self._ends, self._last_end)
        if short is not None:
            raise self._error(DecodeError, short)

    def tracks(self) -> dict[str, Iterator[Any]]:
        """One iterator per decoder kind, fed by a single pass over the container.

        Records of the other kinds wait in a queue until their iterator asks; a `SourceBreak`
        goes to every iterator; an error is raised by each iterator once its queue is drained.
        """
        return Tee(iter(self), [d.kind for d in self.decoders], SourceBreak).iterators()


def _reason(e: BaseException) -> str:
    """FFmpeg's own words for an error, without PyAV's errno prefix and file name."""
    text = getattr(e, "strerror", None) or str(e)
    return str(text)


__all__ = ["MediaReader", "SourceBreak"]
