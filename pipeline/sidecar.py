"""Known flow beside a recorded clip: the sidecar file ``<clip>.flow.npz``.

A clip ``scene.mp4`` may come with ``scene.flow.npz`` (the real-texture rig writes one,
`jobs.texture_rig`), holding

* ``times``: ``N`` float64, each frame's media time (s);
* ``flow``: ``N-1 x H x W x 2`` (float16 or float32), the forward flow from frame ``i`` to
  frame ``i + 1`` at the pixels of frame ``i`` (dx right, dy down, px of the clip's own grid).

`FlowSidecar.truth(window)` is the `Truth` that `pipeline.read.open_stream` attaches to each
window of such a clip: the flow of the window's last two frames, on the decoded grid (area-averaged
and scaled when ``video.size`` resizes the clip), label -1. A window whose last two frames are
not consecutive frames of the clip (``video.fps`` decimation) gets no flow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import SourceError
from pipeline.window import Truth, Window


def sidecar_path(video: str) -> Path | None:
    """``<clip>.flow.npz`` beside a local clip, or None (a URL, or no such file)."""
    if "://" in video:
        return None
    path = Path(video).with_suffix(".flow.npz")
    return path if path.is_file() else None


class FlowSidecar:
    """The flow of a clip's sidecar file (see the module docstring)."""

    def __init__(self, path: Path, stream_id: str | None = None) -> None:
        try:
            with np.load(path) as f:
                self.times = np.asarray(f["times"], dtype=np.float64)
                self.flow = np.asarray(f["flow"])
        except (OSError, KeyError, ValueError) as e:
            raise SourceError(f"flow sidecar does not load: {e}", stream_id=stream_id, source=str(path)) from None
        if self.flow.ndim != 4 or self.flow.shape[-1] != 2 or len(self.flow) != len(self.times) - 1:
            raise SourceError(f"flow sidecar holds flow {self.flow.shape} for {len(self.times)} frames; "
                              "expected frames-1 x H x W x 2", stream_id=stream_id, source=str(path))
        step = np.diff(self.times)
        self.tolerance = 0.25 * float(step.min()) if len(step) else 0.0

    def _frame(self, t: float) -> int | None:
        i = int(np.searchsorted(self.times, t))
        near = [j for j in (i - 1, i) if 0 <= j < len(self.times) and abs(self.times[j] - t) <= self.tolerance]
        return near[0] if near else None

    def truth(self, window: Window) -> Truth:
        """The window's `Truth`: its last frame pair's flow on its frames' grid, or flow None."""
        flow = None
        if window.video is not None and len(window.video) >= 2:
            a, b = self._frame(float(window.video_t[-2])), self._frame(float(window.video_t[-1]))
            if a is not None and b == a + 1:
                flow = resize_flow(self.flow[a].astype(np.float32), window.video.shape[1:3])
        return Truth(flow=flow, label=-1, label_name="")


def resize_flow(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``H x W x 2`` flow on a ``size`` grid: block means for whole-number reductions, else the
    nearest source pixel; vectors scaled by the grid's ratio (px of the new grid)."""
    h, w = flow.shape[:2]
    th, tw = int(size[0]), int(size[1])
    if (h, w) == (th, tw):
        return flow
    if h % th == 0 and w % tw == 0:
        out = flow.reshape(th, h // th, tw, w // tw, 2).mean(axis=(1, 3))
    else:
        ys = np.minimum(((np.arange(th) + 0.5) * h / th).astype(int), h - 1)
        xs = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(int), w - 1)
        out = flow[ys][:, xs]
    return (out * np.array([tw / w, th / h], dtype=np.float32)).astype(np.float32)
