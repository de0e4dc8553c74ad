"""A seeded, deterministic synthetic sensor rig: camera, microphone and lidar with ground truth.

The rig renders a `pipeline.sources.scene.Scene`: every frame exactly, by inverse warping of the
continuous textures; each object sounds a tone (metal partials or band-limited wood noise, louder
when faster); the lidar sees each object's camera-facing half plus a few clutter points.

Point clouds are ``N x 4`` float32 ``(x, y, z, intensity)`` where x, y are the image position
divided by the larger image side (so the cloud's x, y follow the image motion) and z is depth in
the same unit.

Media time starts at 0 for every modality: frame i at ``i / fps``, audio sample n at
``n / audio_rate``, scan k at ``k / scan_rate``; the stream lasts ``seconds``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from pipeline.sources.base import AudioChunk, PointScan, VideoFrame
from pipeline.sources.scene import CLASSES, MAX_SPEED, MIN_SPEED, Scene, Segment, class_attributes, class_index

_AUDIO_CHUNK_S = 0.1
_POINTS_PER_OBJECT = 64
_CLUTTER_POINTS = 16


class SyntheticRig(Scene):
    """A deterministic synthetic rig: `video`, `audio`, `points` iterators and `truth` per window.

    The same arguments give the same samples, bit for bit, however the iterators are consumed.
    """

    def __init__(
        self,
        seed: int,
        seconds: float,
        *,
        size: tuple[int, int] = (64, 64),
        fps: float = 25.0,
        audio_rate: int = 16000,
        audio_channels: int = 1,
        scan_rate: float = 10.0,
        segment_seconds: float = 4.0,
        segment_phase: float = 0.25,
        objects: int = 3,
    ) -> None:
        if seconds <= 0 or fps <= 0 or audio_rate <= 0 or scan_rate <= 0 or segment_seconds <= 0:
            raise ValueError("seconds, fps, audio_rate, scan_rate and segment_seconds must be positive")
        if audio_channels < 1 or objects < 1 or size[0] < 8 or size[1] < 8:
            raise ValueError("need audio_channels >= 1, objects >= 1 and an image of at least 8 x 8")
        super().__init__(
            seed,
            seconds,
            size=size,
            fps=fps,
            segment_seconds=segment_seconds,
            segment_phase=segment_phase,
            objects=objects,
        )
        self.audio_rate = int(audio_rate)
        self.audio_channels = int(audio_channels)
        self.scan_rate = float(scan_rate)
        self.n_frames = int(math.floor(self.seconds * self.fps + 1e-9))
        self.n_samples = int(math.floor(self.seconds * self.audio_rate + 1e-9))
        self.n_scans = int(math.floor(self.seconds * self.scan_rate + 1e-9))
        self._grid_basis = _phase_basis(self._background, self._xs, self._ys)
        self._texture_cache: tuple[int, np.ndarray] = (-1, np.empty(0))
        self._scan_segment = np.array([self.segment_index(k / self.scan_rate) for k in range(self.n_scans)], dtype=np.int64)
        self._scan_cache: tuple[int, list[PointScan]] = (-1, [])

    # ---- video -------------------------------------------------------------------------------

    def _render(self, seg: Segment, t: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Colour (``F x N x 3`` float in [0, 1]) and visible surface (``F x N``: -1 background,
        else object index) of segment ``seg`` at times ``t`` (F) and image points ``x, y`` (N)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        rgb = self._background_rgb(seg, t, x, y)
        surface = self._surface(seg, t, x, y)
        pos = self._positions(seg, t)
        on_grid = x is self._xs and y is self._ys
        for j in range(seg.n):
            # texture only where object j is visible (a small part of the frames)
            fi, pi = np.nonzero(surface == j)
            tex = 1.0
            for m in range(2):
                # separable: phase = 2 pi f.(x, y) + phi - 2 pi f.p(t); the (x, y) part is cached on the grid
                sin_a, cos_a = self._grid_texture(seg)[j, m] if on_grid else _texture_phase(seg, j, m, x, y)
                pb = 2 * np.pi * (pos[:, j] @ seg.tex_freq[j, m])
                sin_b, cos_b = np.sin(pb), np.cos(pb)
                tex = tex + seg.tex_amp[j, m] * (sin_a[pi] * cos_b[fi] - cos_a[pi] * sin_b[fi])
            rgb[fi, pi] = seg.rgb[j] * np.asarray(tex)[:, None]
        return np.clip(rgb, 0.0, 1.0, out=rgb), surface

    def _grid_texture(self, seg: Segment) -> np.ndarray:
        """``n x 2 x 2 x N``: sin and cos of each object texture's per-pixel phase on the grid.

        Kept for the last segment asked for only: rendering goes one segment at a time.
        """
        if self._texture_cache[0] != seg.index:
            phases = [[_texture_phase(seg, j, m, self._xs, self._ys) for m in range(2)] for j in range(seg.n)]
            self._texture_cache = (seg.index, np.array(phases))
        return self._texture_cache[1]

    def _background_rgb(self, seg: Segment, t: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Background colour (``F x N x 3``) at times ``t`` and points ``x, y``, as one matrix product.

        sin(a + b) = sin a cos b + cos a sin b with ``a`` the per-point phase (cached for the
        pixel grid) and ``b`` the per-frame pan phase: ``[sin a, cos a] (N x 2k)`` times
        ``[cos b; sin b] * amp (2k x 3F)``.
        """
        bg = self._background
        basis = self._grid_basis if x is self._xs and y is self._ys else _phase_basis(bg, x, y)
        b = 2 * np.pi * (self._pan(seg, t) @ bg["freq"].T)  # F x k
        weights = np.concatenate([np.cos(b)[:, :, None] * bg["amp"], np.sin(b)[:, :, None] * bg["amp"]], axis=1)
        rgb = basis @ weights.transpose(1, 0, 2).reshape(basis.shape[1], -1)  # N x 3F
        rgb = rgb.reshape(len(x), len(t), 3).transpose(1, 0, 2) + bg["mean"]
        return rgb

    def frame_times(self) -> np.ndarray:
        """Media time of every frame."""
        return np.arange(self.n_frames, dtype=np.float64) / self.fps

    def video(self, render: np.ndarray | None = None) -> Iterator[VideoFrame]:
        """Frames (``H x W x 3`` uint8 RGB), rendered one segment at a time.

        ``render``: a boolean mask over the frames (see `frame_times`); frames outside it are
        yielded black, unrendered, at their times (for a consumer that keeps only some frames
        of each window). A rendered frame is the same, bit for bit, whatever the mask.
        """
        h, w = self.size
        xs, ys = self._grid()
        times = self.frame_times()
        seg_of = np.array([self.segment_index(t) for t in times], dtype=np.int64)
        wanted = np.ones(len(times), dtype=bool) if render is None else np.asarray(render, dtype=bool)
        black = np.zeros((h, w, 3), np.uint8)
        black.flags.writeable = False
        for seg in self.segments:
            idx = np.nonzero(seg_of == seg.index)[0]
            for start in range(0, len(idx), 50):  # bounded memory per block
                block = idx[start : start + 50]
                drawn = block[wanted[block]]
                images = {}
                if len(drawn):
                    rgb, _ = self._render(seg, times[drawn], xs, ys)
                    images = dict(zip(drawn.tolist(), (rgb * 255.0 + 0.5).astype(np.uint8).reshape(len(drawn), h, w, 3)))
                for i in block.tolist():
                    yield VideoFrame(t=float(times[i]), duration=1.0 / self.fps, image=images.get(i, black))

    # ---- audio -------------------------------------------------------------------------------

    def _segment_audio(self, seg: Segment) -> tuple[int, np.ndarray]:
        """First sample index and ``n x channels`` float32 samples of one segment."""
        rate = self.audio_rate
        n0 = math.ceil(seg.t_start * rate - 1e-9)
        n1 = self.n_samples if seg.index == len(self.segments) - 1 else math.ceil(seg.t_end * rate - 1e-9)
        n = max(n1 - n0, 0)
        rng = np.random.default_rng([self.seed, 1, seg.index])
        t = (n0 + np.arange(n)) / rate
        _, _, material = class_attributes(seg.label)
        # panning by image column needs the objects' paths (a large array): only with several channels
        pos = self._positions(seg, t) if self.audio_channels > 1 else None  # n x objects x 2
        speed = np.linalg.norm(seg.vel, axis=1)
        out = np.zeros((n, self.audio_channels))
        for j in range(seg.n):
            f = seg.tone_hz[j]
            if material == "metal":
                sig = np.zeros(n)
                for ratio, weight in ((1.0, 1.0), (2.76, 0.5), (5.40, 0.25)):
                    if ratio * f < 0.45 * rate:
                        sig += weight * np.sin(2 * np.pi * ratio * f * t + rng.uniform(0, 2 * np.pi))
            else:
                spec = np.fft.rfft(rng.standard_normal(n))
                freqs = np.fft.rfftfreq(n, 1.0 / rate)
                sig = np.fft.irfft(spec * np.exp(-0.5 * ((freqs - f) / (0.15 * f)) ** 2), n)
            sig /= max(float(np.sqrt(np.mean(sig * sig))), 1e-12)
            amp = 0.03 + 0.17 * speed[j] / MAX_SPEED  # louder when faster
            if pos is None:
                out[:, 0] += amp * sig
            else:
                out += (amp * sig)[:, None] * self._channel_gains(pos[:, j, 0])
        out += 0.005 * rng.standard_normal(out.shape)
        return n0, np.clip(out, -1.0, 1.0).astype(np.float32)

    def _channel_gains(self, x: np.ndarray) -> np.ndarray:
        """``n x channels`` constant-power panning by image column (two or more channels)."""
        c = self.audio_channels
        where = np.clip(x / (self.size[1] - 1), 0, 1)[:, None] * (c - 1)
        g = np.clip(1 - np.abs(where - np.arange(c)[None]), 0, 1)
        return g / np.sqrt(np.sum(g * g, axis=1, keepdims=True))

    def audio(self) -> Iterator[AudioChunk]:
        """Consecutive audio chunks (0.1 s) covering the whole stream."""
        chunk = max(1, round(_AUDIO_CHUNK_S * self.audio_rate))
        for seg in self.segments:
            n0, samples = self._segment_audio(seg)
            for i in range(0, len(samples), chunk):
                yield AudioChunk(t=(n0 + i) / self.audio_rate, rate=self.audio_rate, samples=samples[i : i + chunk])

    # ---- points ------------------------------------------------------------------------------

    def scan(self, k: int) -> PointScan:
        """Scan ``k`` (at ``k / scan_rate``): each object's camera-facing surface plus clutter."""
        if not 0 <= k < self.n_scans:
            raise IndexError(f"scan {k} is outside the stream's {self.n_scans} scans")
        seg = int(self._scan_segment[k])
        if self._scan_cache[0] != seg:
            self._scan_cache = (seg, self._segment_scans(seg))
        first = int(np.searchsorted(self._scan_segment, seg))
        return self._scan_cache[1][k - first]

    def _segment_scans(self, index: int) -> list[PointScan]:
        """Every scan of segment ``index``, drawn together (one generator per segment): a scan is
        many small steps, so drawing all of a segment's at once is what makes scans cheap."""
        seg = self.segments[index]
        ks = np.nonzero(self._scan_segment == index)[0]
        times = ks / self.scan_rate
        rng = np.random.default_rng([self.seed, 2, index])
        h, w = self.size
        unit = float(max(h, w))
        pos = self._positions(seg, times) / unit  # scans x objects x 2
        s_n, n, m, q = len(ks), seg.n, _POINTS_PER_OBJECT, 4 * _POINTS_PER_OBJECT
        # q candidates per object and scan on the unit sphere or cube; the first m camera-facing ones stay
        d = rng.standard_normal((s_n, n, q, 3))
        if class_attributes(seg.label)[1] == "box":
            # a point on the cube's surface: push one coordinate (chosen at random) to the face
            local = rng.uniform(-1, 1, size=(s_n, n, q, 3))
            axis = rng.integers(0, 3, size=(s_n, n, q))[..., None]
            np.put_along_axis(local, axis, np.sign(np.take_along_axis(d, axis, 3)), 3)
            c, sn = np.cos(seg.angle)[:, None], np.sin(seg.angle)[:, None]
            x, y = local[..., 0].copy(), local[..., 1]
            local[..., 0] = c * x - sn * y
            local[..., 1] = sn * x + c * y
            local *= (seg.radius * math.sqrt(math.pi) / 2 / unit)[:, None, None]
        else:
            local = d * (seg.radius / unit)[:, None, None] / np.sqrt(np.add.reduce(d * d, axis=3))[..., None]
        facing = local[..., 2] <= 0  # the camera-facing half (z towards the sensor is negative)
        facing &= np.cumsum(facing, axis=2) <= m
        counts = facing.sum(axis=2)  # scans x objects
        total = int(counts.sum())
        centre = np.concatenate([pos, np.broadcast_to(seg.depth[None, :, None], (s_n, n, 1))], axis=2)
        xyz = local[facing] + np.repeat(centre.reshape(-1, 3), counts.ravel(), axis=0)
        xyz += rng.normal(0, 0.002, size=(total, 3))
        inten = np.repeat(np.tile(seg.intensity, s_n), counts.ravel()) + rng.normal(0, 0.03, size=total)
        objects = np.concatenate([xyz, np.clip(inten, 0, 1)[:, None]], axis=1)
        lo = np.array([0, 0, 0.2, 0])
        hi = np.array([w / unit, h / unit, 1.2, 1])
        clutter = lo + (hi - lo) * rng.random((s_n, _CLUTTER_POINTS, 4))
        per_scan = np.split(objects, np.cumsum(counts.sum(axis=1))[:-1])
        return [
            PointScan(t=float(t), duration=1.0 / self.scan_rate, points=np.concatenate([obj, cl]).astype(np.float32))
            for t, obj, cl in zip(times, per_scan, clutter)
        ]

    def points(self) -> Iterator[PointScan]:
        """Every scan of the stream, in time order."""
        for k in range(self.n_scans):
            yield self.scan(k)

    def sources(self) -> dict[str, Iterator]:
        """Fresh ``{"video", "audio", "points"}`` iterators, as `pipeline.windowing.windows` takes them."""
        return {"video": self.video(), "audio": self.audio(), "points": self.points()}


def _phase_basis(bg: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[sin a, cos a]`` (``N x 2k``) of the background's per-point phases ``a`` at ``x, y``."""
    a = 2 * np.pi * (x[:, None] * bg["freq"][:, 0] + y[:, None] * bg["freq"][:, 1]) + bg["phase"]
    return np.concatenate([np.sin(a), np.cos(a)], axis=1)


def _texture_phase(seg: Segment, j: int, m: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of the position part of object ``j``'s texture component ``m`` at ``x, y``."""
    f = seg.tex_freq[j, m]
    a = 2 * np.pi * (f[0] * x + f[1] * y) + seg.tex_phase[j, m]
    return np.sin(a), np.cos(a)


# the scene's label helpers are re-exported: callers take the class list from the rig
__all__ = ["CLASSES", "MAX_SPEED", "MIN_SPEED", "SyntheticRig", "class_attributes", "class_index"]
