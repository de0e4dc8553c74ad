"""The unit of data: one stream's samples in one media-time window (see DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Truth:
    """Ground truth from the synthetic rig.

    flow: ``H x W x 2`` float32 forward flow of the window's last two frames on the decoded
          grid (dx right, dy down, pixels), or None when the window has fewer than two frames.
    label: int index into the rig's published class list; label_name its name.
    """

    flow: np.ndarray | None
    label: int
    label_name: str


@dataclass
class Window:
    """Samples of one stream in ``[t_start, t_end)`` media time; absent modalities are None."""

    stream_id: str
    window_id: int
    t_start: float
    t_end: float
    gap: bool = False
    video: np.ndarray | None = None  # frames x H x W x 3 uint8
    video_t: np.ndarray | None = None  # frames float64 seconds
    audio: np.ndarray | None = None  # samples x channels float32
    audio_rate: int | None = None
    audio_t0: float | None = None
    points: list[np.ndarray] | None = None  # list of N_i x C float32 (x, y, z, features...)
    points_t: np.ndarray | None = None  # scans float64 seconds
    truth: Truth | None = None
    # Wall clock (epoch seconds, UTC) of the window's last sample: when it reached its source for a
    # live source, its recording time for a file with creation_time metadata; None when unknown.
    t_wall: float | None = None

    @property
    def has_video(self) -> bool:
        return self.video is not None and len(self.video) > 0

    @property
    def has_audio(self) -> bool:
        return self.audio is not None and len(self.audio) > 0

    @property
    def has_points(self) -> bool:
        return self.points is not None and len(self.points) > 0
