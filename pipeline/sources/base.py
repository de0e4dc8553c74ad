"""What every modality source yields: samples stamped with media time.

A source is an iterator of one of these records, in non-decreasing ``t``. The windower merges
the sources of one stream and cuts them into `Window`s; it never looks at where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class VideoFrame:
    """One decoded frame: ``H x W x 3`` uint8 RGB at media time ``t`` lasting ``duration`` s."""

    t: float
    duration: float
    image: np.ndarray
    t_wall: float | None = None  # epoch s when it reached its source (see `pipeline.window.Window.t_wall`)


@dataclass
class AudioChunk:
    """Consecutive samples (``n x channels`` float32) whose first sample is at media time ``t``."""

    t: float
    rate: int
    samples: np.ndarray
    t_wall: float | None = None  # epoch s when its last sample reached its source

    @property
    def duration(self) -> float:
        return len(self.samples) / self.rate


@dataclass
class PointScan:
    """One point-cloud scan (``N x C`` float32, x, y, z first) at media time ``t``."""

    t: float
    duration: float
    points: np.ndarray
