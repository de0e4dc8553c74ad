"""Small media clips written in-process with PyAV, for the source and windowing tests.

Every frame carries its index: the first quarter of frame ``i`` is a flat grey coding ``i % 16``,
the second quarter one coding ``i // 16 % 16`` (levels 14 apart), the right half a fixed gradient,
so a test can tell which frame it got even after lossy coding and a resize (``frame_index``). Audio is a sine whose frequency is known, at a known amplitude.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_AMPLITUDE = 0.5


def _level(digit: int) -> int:
    return 16 + 14 * digit


def frame_image(i: int, height: int, width: int) -> np.ndarray:
    """The ``height x width x 3`` uint8 RGB picture of frame ``i`` (``i`` < 256)."""
    img = np.empty((height, width, 3), np.uint8)
    q = width // 4
    img[:, :q] = _level(i % 16)
    img[:, q : 2 * q] = _level(i // 16 % 16)
    ramp = np.linspace(0, 255, width - 2 * q, dtype=np.float32)
    img[:, 2 * q :] = ramp.astype(np.uint8)[None, :, None]
    return img


def frame_index(image: np.ndarray) -> int:
    """The index coded in a decoded (possibly resized) ``frame_image``."""
    w = image.shape[1]
    q = w // 4
    # Read the middle of each quarter: edges blur under coding and resizing.
    lo = float(image[:, q // 4 : 3 * q // 4].mean())
    hi = float(image[:, q + q // 4 : q + 3 * q // 4].mean())
    return int(round((hi - 16) / 14)) * 16 + int(round((lo - 16) / 14))


def write_clip(
    path: str | Path,
    *,
    seconds: float = 2.0,
    fps: int = 25,
    size: tuple[int, int] = (48, 64),
    video_codec: str | None = "mpeg4",
    audio_codec: str | None = "aac",
    audio_rate: int = 48000,
    audio_channels: int = 1,
    audio_freq: float = 440.0,
    audio_seconds: float | None = None,
    container_format: str | None = None,
    faststart: bool = False,
    gop: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a clip with an optional video track (``size`` = [H, W]) and an optional audio track.

    ``audio_seconds`` makes the audio track longer or shorter than the video; ``container_format``
    forces the muxer (e.g. ``"mpegts"``); ``faststart`` puts an MP4's index before its data;
    ``gop`` sets the keyframe interval (frames); ``metadata`` the container's tags (``creation_time``).
    """
    path = Path(path)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=container_format, options=options) as out:
        out.metadata.update(metadata or {})
        vs = as_ = None
        if video_codec:
            vs = out.add_stream(video_codec, rate=fps)
            vs.height, vs.width = size
            vs.pix_fmt = "yuv420p"
            if gop is not None:
                vs.codec_context.gop_size = gop
            # Near-lossless so the frame index survives the codec.
            vs.options = {"qscale": "2"} if video_codec == "mpeg4" else {"crf": "10", "preset": "ultrafast"}
        if audio_codec:
            as_ = out.add_stream(audio_codec, rate=audio_rate)
            as_.layout = "mono" if audio_channels == 1 else "stereo"
        n_frames = int(round(seconds * fps)) if vs else 0
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, *size), format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vs.encode(frame):
                out.mux(packet)
        if vs:
            for packet in vs.encode(None):
                out.mux(packet)
        if as_:
            total = int(round((audio_seconds if audio_seconds is not None else seconds) * audio_rate))
            block = 1024
            fmt = "fltp" if audio_codec == "aac" else "s16"
            for start in range(0, total, block):
                n = min(block, total - start)
                t = (start + np.arange(n)) / audio_rate
                wave = (AUDIO_AMPLITUDE * np.sin(2 * np.pi * audio_freq * t)).astype(np.float32)
                chans = np.repeat(wave[None, :], audio_channels, axis=0)
                if fmt == "s16":
                    data = (chans.T.reshape(1, -1) * 32767).astype(np.int16)
                else:
                    data = chans
                frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=as_.layout.name)
                frame.sample_rate = audio_rate
                frame.pts = start
                frame.time_base = Fraction(1, audio_rate)
                for packet in as_.encode(frame):
                    out.mux(packet)
            for packet in as_.encode(None):
                out.mux(packet)
    return path


def cut_short(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (a file cut off mid-stream)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def corrupt(src: str | Path, dst: str | Path, *, start: float, length: int, seed: int = 0) -> Path:
    """Copy ``src`` to ``dst`` with ``length`` random bytes written at ``start`` (fraction of size)."""
    data = bytearray(Path(src).read_bytes())
    at = int(len(data) * start)
    data[at : at + length] = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)
