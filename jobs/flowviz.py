"""Optical flow as colour: the Middlebury colour wheel (Baker et al., 2007).

Hue gives the direction of motion, saturation its magnitude relative to the largest motion
shown; zero flow is white. Used by ``run_pipeline.py inspect`` and handy in notebooks.
"""

from __future__ import annotations

import numpy as np

# Hue segments of the wheel: red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta,
# magenta-red, with as many steps as the original so the colours match published figures.
_SEGMENTS = ((15, (255, 0, 0), (255, 255, 0)), (6, (255, 255, 0), (0, 255, 0)), (4, (0, 255, 0), (0, 255, 255)),
             (11, (0, 255, 255), (0, 0, 255)), (13, (0, 0, 255), (255, 0, 255)), (6, (255, 0, 255), (255, 0, 0)))


def color_wheel() -> np.ndarray:
    """The wheel's ``55 x 3`` colours (float, 0..255), starting at red for motion to the right."""
    rows = []
    for steps, start, end in _SEGMENTS:
        a = np.arange(steps, dtype=np.float64)[:, None] / steps
        rows.append(np.asarray(start, np.float64) * (1 - a) + np.asarray(end, np.float64) * a)
    return np.concatenate(rows)


def flow_to_rgb(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """Colour an ``H x W x 2`` flow field (dx right, dy down) as ``H x W x 3`` uint8.

    ``max_magnitude`` sets full saturation (default: the field's largest finite magnitude);
    non-finite vectors are drawn black.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be H x W x 2, got shape {flow.shape}")
    dx, dy = flow[..., 0], flow[..., 1]
    bad = ~(np.isfinite(dx) & np.isfinite(dy))
    dx, dy = np.where(bad, 0.0, dx), np.where(bad, 0.0, dy)
    mag = np.hypot(dx, dy)
    top = float(mag.max()) if max_magnitude is None else float(max_magnitude)
    rad = mag / top if top > 0 else mag
    wheel = color_wheel()
    n = len(wheel)
    # Angle measured so that motion to the left is hue 0 of the wheel's second half, as in the original.
    pos = (np.arctan2(-dy, -dx) / np.pi + 1) / 2 * (n - 1)
    k0 = np.floor(pos).astype(int)
    k1 = (k0 + 1) % n
    f = (pos - k0)[..., None]
    col = ((1 - f) * wheel[k0] + f * wheel[k1]) / 255.0
    r = np.clip(rad, 0, 1)[..., None]
    col = 1 - r * (1 - col)  # desaturate towards white for small motion
    col = np.where((rad > 1)[..., None], col * 0.75, col)  # beyond the scale: darker
    col[bad] = 0.0
    return np.round(col * 255).astype(np.uint8)
