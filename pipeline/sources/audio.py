"""Audio through PyAV: decode, resample to the configured rate and channels, keep media time.

`AudioDecoder` turns the packets of one container's audio stream into `AudioChunk`s of float32
``samples x channels`` at ``rate`` (FFmpeg's swresample through `av.AudioResampler`). A chunk's
``t`` is its first sample's media time. The container is read by
`pipeline.sources.live.MediaReader`; `audio_chunks` wraps it for an audio-only source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import av
import numpy as np

from pipeline.errors import MissingStreamError, PipelineError
from pipeline.sources.base import AudioChunk
from pipeline.sources.live import MediaReader

# A resampled frame whose stamp is this close to where the previous chunk ended continues it
# exactly; a larger jump is a real discontinuity in the source and is kept.
_CONTINUITY_S = 2e-3
_LAYOUTS = {1: "mono", 2: "stereo"}


class AudioDecoder:
    """Decodes the first audio stream of a container into `AudioChunk`s at ``rate`` / ``channels``."""

    kind = "audio"

    def __init__(self, *, rate: int = 16000, channels: int = 1) -> None:
        if rate <= 0 or channels <= 0:
            raise ValueError(f"audio rate and channels must be positive, got {rate!r}, {channels!r}")
        self.rate = int(rate)
        self.channels = int(channels)
        self.offset = 0.0  # added to every time; set by the reader after a reconnect
        self.stream: av.audio.stream.AudioStream | None = None
        self._resampler: av.AudioResampler | None = None
        self._next_t: float | None = None

    def open(self, container: av.container.InputContainer) -> av.stream.Stream:
        """Select the container's first audio stream and make a fresh resampler for it."""
        if not container.streams.audio:
            raise MissingStreamError("the container has no audio stream")
        self.stream = container.streams.audio[0]
        layout = _LAYOUTS.get(self.channels, f"{self.channels}c")
        # Packed float: to_ndarray gives (1, samples*channels), one reshape from samples x channels.
        self._resampler = av.AudioResampler(format="flt", layout=layout, rate=self.rate)
        return self.stream

    def decode(self, packet: av.Packet | None) -> list[AudioChunk]:
        """Chunks from one packet (None flushes the decoder and the resampler)."""
        assert self.stream is not None and self._resampler is not None, "open() first"
        chunks: list[AudioChunk] = []
        for frame in self.stream.codec_context.decode(packet):
            if frame.time_base is None:  # frames flushed without a packet carry no time base
                frame.time_base = self.stream.time_base
            chunks.extend(self._convert(o) for o in self._resampler.resample(frame))
        if packet is None or packet.size == 0:
            chunks.extend(self._convert(o) for o in self._resampler.resample(None))
        return [c for c in chunks if len(c.samples)]

    def flush(self) -> list[AudioChunk]:
        """The samples the decoder and the resampler still hold."""
        try:
            return self.decode(None)
        except (av.error.EOFError, av.error.InvalidDataError):
            return []

    def _convert(self, frame: av.AudioFrame) -> AudioChunk:
        samples = frame.to_ndarray().reshape(-1, self.channels).astype(np.float32, copy=False)
        if frame.pts is not None:
            t = float(frame.pts * frame.time_base) + self.offset
            # Resampler stamps are rounded to whole output samples; keep the running clock
            # unless the source really jumped, so consecutive chunks tile exactly.
            if self._next_t is not None and abs(t - self._next_t) < _CONTINUITY_S:
                t = self._next_t
        else:
            t = self._next_t if self._next_t is not None else self.offset
        self._next_t = t + len(samples) / self.rate
        return AudioChunk(t=t, rate=self.rate, samples=samples)


def audio_chunks(
    source: str,
    *,
    stream_id: str,
    rate: int = 16000,
    channels: int = 1,
    settings: object | None = None,
    on_error: Callable[[PipelineError], None] | None = None,
) -> Iterator:
    """`AudioChunk`s of a file or URL's audio track (and `SourceBreak` markers after reconnects).

    ``settings`` is the config's ``sources`` section (timeouts, reconnects) or None for defaults.
    """
    reader = MediaReader(
        source, [AudioDecoder(rate=rate, channels=channels)], stream_id=stream_id, settings=settings,
        on_error=on_error,
    )
    return reader.tracks()["audio"]


__all__ = ["AudioDecoder", "audio_chunks"]
