"""The synthetic rig's scene: labelled segments of textured objects over a panning background.

The scene is a sequence of *segments* (``segment_seconds`` long; the first is longer by
``segment_phase`` so that with 1.0 s / 0.5 s windows no window is split evenly between two
scenes). Each segment shows ``objects`` textured objects (discs or boxes) translating at
0.5-6 px/frame and bouncing off the image borders, in front of a textured background that the
camera pans across at up to 1.5 px/frame. Textures are analytic functions of the surface's own
coordinates, so the forward flow of every pixel is known exactly: the displacement of the
surface visible there.

Labels. A segment's label is one of eight classes, ``CLASSES``: a combination of three binary
attributes, each seen by exactly two of the three modalities:

============  ==========================  ===========================  ===========================
attribute     video                       audio                        points
============  ==========================  ===========================  ===========================
``hue``       object colour warm / cool   tone band low / high         --
``shape``     silhouette disc / box       --                           sphere / cube surface
``material``  --                          metal partials / wood noise  intensity high / low
============  ==========================  ===========================  ===========================

So no single modality determines the class (each leaves one bit open: at best 1/2 against a
chance of 1/8) while any two together determine it. Speeds, sizes, counts, textures, loudness
(tied to each object's speed) and the background are drawn independently of the label. Each
stream walks through shuffled rounds of all eight classes, so classes are balanced over a stream
and over seeds.

A window gets the label of the segment holding its midpoint ``(t_start + t_end) / 2``. Its truth
flow is the forward flow from its second-to-last to its last frame on the rendered grid (dx right,
dy down, pixels); when those two frames lie in different segments (a scene cut) it has no flow.
Pixel ``(row i, column j)`` has its centre at ``(x=j, y=i)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.window import Truth

HUES = ("warm", "cool")
SHAPES = ("disc", "box")
MATERIALS = ("metal", "wood")
CLASSES: tuple[str, ...] = tuple(f"{h}-{s}-{m}" for h in HUES for s in SHAPES for m in MATERIALS)
"""The rig's published class list; a label is an index into it."""

MIN_SPEED, MAX_SPEED = 0.5, 6.0  # object speed, px/frame
MAX_PAN = 1.5  # background pan speed, px/frame


def class_index(hue: str, shape: str, material: str) -> int:
    """Index into `CLASSES` of an attribute combination."""
    return CLASSES.index(f"{hue}-{shape}-{material}")


def class_attributes(label: int) -> tuple[str, str, str]:
    """``(hue, shape, material)`` of a class index."""
    hue, shape, material = CLASSES[label].split("-")
    return hue, shape, material


@dataclass(frozen=True)
class Segment:
    """Everything random about one segment; all arrays are per object, in depth order (far first)."""

    index: int
    t_start: float
    t_end: float
    label: int
    pos0: np.ndarray  # n x 2 (x, y) px at t_start
    vel: np.ndarray  # n x 2 px/frame
    radius: np.ndarray  # n px (disc radius; box half-side is radius * sqrt(pi) / 2, equal area)
    angle: np.ndarray  # n box rotation
    rgb: np.ndarray  # n x 3 base colour in [0, 1]
    tex_freq: np.ndarray  # n x 2 x 2 two stripe components (fx, fy) cycles/px
    tex_phase: np.ndarray  # n x 2
    tex_amp: np.ndarray  # n x 2
    depth: np.ndarray  # n in (0.3, 1.0), far first
    tone_hz: np.ndarray  # n
    intensity: np.ndarray  # n lidar reflectivity
    pan0: np.ndarray  # 2 camera offset (px) at t_start
    pan_vel: np.ndarray  # 2 px/frame

    @property
    def n(self) -> int:
        return len(self.radius)


class Scene:
    """A seeded scene: its segments, where each object is at any media time, and its ground truth.

    ``size`` is the image ``(H, W)`` in pixels and ``fps`` the frame rate that speeds (px/frame)
    refer to; the same arguments give the same scene, bit for bit. The base of
    `pipeline.sources.synthetic.SyntheticRig`, which checks the arguments.
    """

    def __init__(
        self,
        seed: int,
        seconds: float,
        *,
        size: tuple[int, int] = (64, 64),
        fps: float = 25.0,
        segment_seconds: float = 4.0,
        segment_phase: float = 0.25,
        objects: int = 3,
    ) -> None:
        self.seed = int(seed)
        self.seconds = float(seconds)
        self.size = (int(size[0]), int(size[1]))
        self.fps = float(fps)
        self.segment_seconds = float(segment_seconds)
        self.segment_phase = float(segment_phase) % self.segment_seconds
        self.objects = int(objects)
        rng = np.random.default_rng([self.seed, 0])
        self._background = self._draw_background(rng)
        self.segments = self._draw_segments(rng)
        yy, xx = np.mgrid[0 : self.size[0], 0 : self.size[1]]
        self._xs, self._ys = xx.ravel().astype(np.float64), yy.ravel().astype(np.float64)

    # ---- segments and labels -----------------------------------------------------------------

    def segment_index(self, t: float) -> int:
        """The segment holding media time ``t`` (times past the end belong to the last one)."""
        return min(self._raw_segment(t), len(self.segments) - 1)

    def _raw_segment(self, t: float) -> int:
        if t < self.segment_phase:
            return 0
        return max(math.floor((t - self.segment_phase) / self.segment_seconds), 0)

    def label_at(self, t: float) -> int:
        """The scene label at media time ``t``."""
        return self.segments[self.segment_index(t)].label

    def _draw_background(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        k = 6
        freq = rng.uniform(0.02, 0.2, size=k) * rng.choice([-1, 1], size=k)
        theta = rng.uniform(0, np.pi, size=k)
        return {
            "mean": rng.uniform(0.35, 0.6) + rng.uniform(-0.05, 0.05, size=3),
            "freq": np.stack([freq * np.cos(theta), freq * np.sin(theta)], axis=1),  # k x 2
            "phase": rng.uniform(0, 2 * np.pi, size=k),
            # mostly grey texture with a faint tint per component
            "amp": rng.uniform(0.04, 0.1, size=(k, 1)) * (1 + rng.uniform(-0.3, 0.3, size=(k, 3))),
        }

    def _draw_segments(self, rng: np.random.Generator) -> list[Segment]:
        n_seg = self._raw_segment(self.seconds - 1e-9) + 1
        order: list[int] = []
        while len(order) < n_seg:
            block = list(rng.permutation(len(CLASSES)))
            if order and block[0] == order[-1]:
                block[0], block[-1] = block[-1], block[0]
            order.extend(int(c) for c in block)
        h, w = self.size
        side = min(h, w)
        segments = []
        pan = np.zeros(2)
        for k in range(n_seg):
            t0 = 0.0 if k == 0 else k * self.segment_seconds + self.segment_phase
            t1 = min((k + 1) * self.segment_seconds + self.segment_phase, self.seconds)
            label = order[k]
            hue, _, material = class_attributes(label)
            n = int(rng.integers(math.ceil(self.objects / 2), self.objects + 1))
            speed = rng.uniform(MIN_SPEED, MAX_SPEED, size=n)
            direction = rng.uniform(0, 2 * np.pi, size=n)
            pan_speed = rng.uniform(0, MAX_PAN)
            pan_dir = rng.uniform(0, 2 * np.pi)
            hue_deg = rng.uniform(0, 55, size=n) if hue == "warm" else rng.uniform(185, 250, size=n)
            depth = np.sort(rng.uniform(0.3, 1.0, size=n))[::-1].copy()
            tex_f = rng.uniform(0.08, 0.3, size=(n, 2))
            tex_t = rng.uniform(0, np.pi, size=(n, 2))
            segments.append(
                Segment(
                    index=k,
                    t_start=t0,
                    t_end=t1,
                    label=label,
                    pos0=np.stack([rng.uniform(0, w - 1, size=n), rng.uniform(0, h - 1, size=n)], axis=1),
                    vel=np.stack([np.cos(direction), np.sin(direction)], axis=1) * speed[:, None],
                    radius=rng.uniform(0.08, 0.17, size=n) * side,
                    angle=rng.uniform(0, np.pi / 2, size=n),
                    rgb=_hsv_to_rgb(hue_deg, rng.uniform(0.6, 0.9, size=n), rng.uniform(0.65, 0.95, size=n)),
                    tex_freq=np.stack([tex_f * np.cos(tex_t), tex_f * np.sin(tex_t)], axis=2),
                    tex_phase=rng.uniform(0, 2 * np.pi, size=(n, 2)),
                    tex_amp=rng.uniform(0.1, 0.25, size=(n, 2)),
                    depth=depth,
                    tone_hz=rng.uniform(150, 400, size=n) if hue == "warm" else rng.uniform(900, 2000, size=n),
                    intensity=(0.75 if material == "metal" else 0.3) + rng.uniform(-0.08, 0.08, size=n),
                    pan0=pan.copy(),
                    pan_vel=np.array([np.cos(pan_dir), np.sin(pan_dir)]) * pan_speed,
                )
            )
            pan = pan + segments[-1].pan_vel * (t1 - t0) * self.fps
        return segments

    # ---- where things are --------------------------------------------------------------------

    def _positions(self, seg: Segment, t: np.ndarray) -> np.ndarray:
        """Object centres (``len(t) x n x 2``, px) at times ``t``: straight lines folded at the borders."""
        h, w = self.size
        frames = (np.asarray(t, dtype=np.float64) - seg.t_start) * self.fps
        raw = seg.pos0[None] + seg.vel[None] * frames[:, None, None]
        span = np.array([w - 1, h - 1], dtype=np.float64)
        q = np.mod(raw, 2 * span)
        return np.where(q <= span, q, 2 * span - q)

    def _pan(self, seg: Segment, t: np.ndarray) -> np.ndarray:
        """Camera offset (``len(t) x 2``, px): pixel (x, y) shows background point (x, y) + offset."""
        frames = (np.asarray(t, dtype=np.float64) - seg.t_start) * self.fps
        return seg.pan0[None] + seg.pan_vel[None] * frames[:, None]

    def _inside(self, seg: Segment, j: int, ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
        """Whether object ``j`` covers the points at offsets ``ux, uy`` from its centre."""
        r = seg.radius[j]
        if class_attributes(seg.label)[1] == "disc":
            return ux * ux + uy * uy <= r * r
        c, s = np.cos(seg.angle[j]), np.sin(seg.angle[j])
        half = r * math.sqrt(math.pi) / 2
        return (np.abs(c * ux + s * uy) <= half) & (np.abs(-s * ux + c * uy) <= half)

    def _surface(self, seg: Segment, t: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Visible surface (``F x N``: -1 background, else object index) at times ``t`` and points ``x, y``."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        x = np.asarray(x, dtype=np.float64)[None, :]
        y = np.asarray(y, dtype=np.float64)[None, :]
        pos = self._positions(seg, t)
        surface = np.full((len(t), x.shape[1]), -1, dtype=np.int64)
        for j in range(seg.n):  # far to near: nearer objects overwrite
            surface[self._inside(seg, j, x - pos[:, j, :1], y - pos[:, j, 1:])] = j
        return surface

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel centres ``x, y`` (row-major), the same arrays on every call (renderers cache by identity)."""
        return self._xs, self._ys

    # ---- ground truth ------------------------------------------------------------------------

    def flow(self, t1: float, t2: float) -> np.ndarray | None:
        """Exact forward flow (``H x W x 2`` float32, dx, dy px) from the frame at ``t1`` to the one
        at ``t2`` on frame ``t1``'s grid, or None across a scene cut."""
        k = self.segment_index(t1)
        if self.segment_index(t2) != k:
            return None
        seg = self.segments[k]
        xs, ys = self._grid()
        surface = self._surface(seg, np.array([t1]), xs, ys)
        pos = self._positions(seg, np.array([t1, t2]))
        moves = np.concatenate([pos[1] - pos[0], -(self._pan(seg, np.array([t2])) - self._pan(seg, np.array([t1])))])
        # surface -1 (background) picks the last row: the background moves against the pan
        flow = moves[surface[0]]
        return flow.reshape(*self.size, 2).astype(np.float32)

    def truth(self, t_start: float, t_end: float, video_t: np.ndarray | None) -> Truth:
        """A window's truth: flow of its last two frames (None with fewer than two or across a
        cut) and the label of the segment holding the window's midpoint."""
        flow = None
        if video_t is not None and len(video_t) >= 2:
            flow = self.flow(float(video_t[-2]), float(video_t[-1]))
        label = self.label_at(0.5 * (t_start + t_end))
        return Truth(flow=flow, label=label, label_name=CLASSES[label])


def _hsv_to_rgb(h_deg: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``n x 3`` RGB in [0, 1] from hue (degrees), saturation and value."""
    h = (np.asarray(h_deg) % 360) / 60.0
    c = v * s
    x = c * (1 - np.abs(np.mod(h, 2) - 1))
    z = np.zeros_like(c)
    sector = np.floor(h).astype(int) % 6
    table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    rgb = np.stack([np.choose(sector, [t[i] for t in table]) for i in range(3)], axis=1)
    return rgb + (v - c)[:, None]
