"""What the model actor hands the sink for one window (torch-free, so the sink never imports torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.parquet import WindowRow


@dataclass
class WindowResult:
    """The model's outputs for one window: its ``windows`` row, and what the sink needs for ``flow``."""

    stream_id: str
    row: WindowRow
    flow: np.ndarray | None = None  # H x W x 2 float32, None without two frames
    flow_t: float | None = None  # time of the later frame
    frame: np.ndarray | None = None  # the earlier of the two flow frames, H x W x 3 uint8
    latency_s: float = 0.0  # seconds from arrival at the model to the result

    @property
    def window_id(self) -> int:
        return self.row.window_id
