"""Configs and windows for the actor tests."""

from __future__ import annotations

import numpy as np

from pipeline.config import parse_config
from pipeline.window import Window


def make_cfg(n_streams: int = 2, **model):
    return parse_config(
        {
            "streams": [{"id": f"s{i}", "synthetic": {"seed": i, "seconds": 3}} for i in range(n_streams)],
            "model": model,
        }
    )


def window(sid: str, wid: int, *, gap: bool = False, frames: int = 2) -> Window:
    t0 = 0.5 * wid
    video = np.full((frames, 8, 8, 3), wid % 256, np.uint8) if frames else None
    return Window(
        sid, wid, t0, t0 + 1.0, gap=gap, video=video, video_t=t0 + np.arange(frames) * 0.1 if frames else None
    )
