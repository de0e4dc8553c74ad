"""What a media file says about itself: whether it holds all it declares, when it was recorded."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import av

# Formats whose index states the real duration; elsewhere (MPEG-TS, raw streams) FFmpeg guesses
# it from the bit rate, so a short file is not evidence of truncation.
_INDEXED_FORMATS = {"mov", "mp4", "matroska", "webm", "avi", "wav", "flac", "ogg"}
# How far short of the declared duration a file may end before it counts as truncated.
_TRUNCATION_TOLERANCE_S = 0.5


def truncation(
    container: av.container.InputContainer, decoders: list[Any], ends: dict[str, float], last_end: float | None
) -> str | None:
    """Why a file that was read to its end is truncated, or None: a track (``ends[kind]``, the
    media time each decoder's kind reached; ``last_end`` over all) ends well before the duration
    the file's index declares."""
    if not _INDEXED_FORMATS.intersection(container.format.name.split(",")):
        return None
    declared_ends = []
    for d in decoders:
        s = d.stream
        if s.duration is not None and s.duration > 0:
            declared_ends.append((d.kind, float((s.start_time or 0) * s.time_base + s.duration * s.time_base)))
    if len(declared_ends) < len(decoders):
        # Without per-stream durations only the container's can be used, and only when every
        # track it holds is being decoded (a short audio track is not a truncated video).
        n_av = len(container.streams.video) + len(container.streams.audio)
        if container.duration is None or len(decoders) < n_av:
            return None
        end = (container.start_time or 0) / av.time_base + container.duration / av.time_base
        declared_ends = [("media", end)]
    for kind, declared in declared_ends:
        reached = ends.get(kind, last_end) if kind != "media" else last_end
        reached = reached if reached is not None else 0.0
        if reached < declared - _TRUNCATION_TOLERANCE_S:
            return f"truncated: {kind} ends at {reached:.2f} s but the file declares {declared:.2f} s"
    return None


def recording_start(container: av.container.InputContainer) -> tuple[float, float] | None:
    """A file's ``(creation_time as epoch seconds, media start time)``, or None without the metadata."""
    text = container.metadata.get("creation_time")
    if text is None:
        text = next((s.metadata["creation_time"] for s in container.streams if "creation_time" in s.metadata), None)
    if not text:
        return None
    try:
        created = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    # Media time 0 is the recording's start; a stream clock that starts later (MPEG-TS) is offset.
    # A negative start (an MP4 edit list hiding audio priming) is not.
    start = max(0.0, container.start_time / av.time_base) if container.start_time is not None else 0.0
    return created.timestamp(), start


__all__ = ["recording_start", "truncation"]
