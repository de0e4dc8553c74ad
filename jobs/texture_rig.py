"""The real-texture rig: H.264 clips of photographs in motion, with their true flow and labels.

As FlyingChairs was made: a background photograph moved by an affine camera motion, with 1-3
foreground crops of other photographs (ellipses) moving by affine motions of their own over it.
Frames are rendered at twice the clip's size and block-averaged (anti-aliasing), encoded to H.264
(PyAV), and the true forward flow of every frame pair goes to ``<clip>.flow.npz`` beside the clip
(`pipeline.sidecar`), which `pipeline.read_windows` attaches as ``Window.truth``.

Motion (px of the clip's grid per frame; one draw per ``segment`` seconds, so a clip changes
motion every segment):

* background: the camera pans in one of four directions (the segment's label: ``pan-left``, ``pan-right``,
  ``pan-up``, ``pan-down``) at a speed uniform in [0.5, 2], plus a sideways drift uniform in
  +-0.3, a rotation uniform in +-0.3 degrees and a zoom uniform in +-0.3 % a frame;
* each foreground crop (a fifth to two fifths of the frame across): a translation uniform in the
  disc of radius 2, a rotation uniform in +-2 degrees and a zoom uniform in +-1 % a frame.

Photographs come from packages (scikit-image's data, matplotlib's sample data) and one procedural
texture; ``HELDOUT`` are never drawn for training clips, only for evaluation clips.
"""

from __future__ import annotations

import csv
import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import matplotlib.cbook
import numpy as np
import yaml
from scipy import ndimage
from skimage import data as skdata
from skimage import io as skio
from skimage.transform import resize
from tqdm import tqdm

from pipeline.errors import ConfigError

COLOUR = ("astronaut", "coffee", "rocket", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina")
GREY = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock")
PHOTOS = (*COLOUR, *GREY, "grace_hopper", "noise")
HELDOUT = ("chelsea", "rocket", "grace_hopper", "gravel")
TRAIN_PHOTOS = tuple(p for p in PHOTOS if p not in HELDOUT)
CLASSES = ("pan-left", "pan-right", "pan-up", "pan-down")
_DIRECTIONS = np.array([(-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)])
SUPERSAMPLE = 2


def photo(name: str, seed: int = 0) -> np.ndarray:
    """Photograph ``name`` of ``PHOTOS`` as ``H x W x 3`` float32 in [0, 1] (grey ones tinted;
    ``noise`` is a procedural multi-octave colour noise drawn from ``seed``)."""
    if name == "noise":
        rng = np.random.default_rng([seed, 7])
        img = sum(ndimage.zoom(rng.random((4 * 2**k, 4 * 2**k, 3)), (256 / (4 * 2**k), 256 / (4 * 2**k), 1),
                               order=1) / 2**k for k in range(5))
        img = (img - img.min()) / (img.max() - img.min())
        return img.astype(np.float32)
    if name == "grace_hopper":
        img = skio.imread(Path(matplotlib.cbook._get_data_path("sample_data")) / "grace_hopper.jpg")
    elif name in PHOTOS:
        img = getattr(skdata, name)()
    else:
        raise ConfigError(f"photo {name!r}: choose from {list(PHOTOS)}")
    img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        tint = np.array([1.0, 0.85, 0.7], dtype=np.float32) if name in GREY[::2] else np.array([0.7, 0.9, 1.0])
        img = img[..., None] * tint.astype(np.float32)
    return np.ascontiguousarray(img[..., :3])


def _shrunk(img: np.ndarray, short: int) -> np.ndarray:
    factor = short / min(img.shape[:2])
    if factor >= 1:
        return img
    shape = (round(img.shape[0] * factor), round(img.shape[1] * factor), 3)
    return resize(img, shape, anti_aliasing=True).astype(np.float32)


def _affine(scale: float, angle: float, shift: np.ndarray) -> np.ndarray:
    """3 x 3 matrix of ``x -> scale * R(angle) x + shift``."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]], [0, 0, 1]])


def _about(m: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``m`` applied about point ``centre`` instead of the origin."""
    return _affine(1, 0, centre) @ m @ _affine(1, 0, -centre)


@dataclass
class Layer:
    """A texture placed in the frame: ``maps[t]`` takes texture (x, y) to frame (x, y) at frame
    ``t`` (render grid); ``radius`` (texture px) makes it an ellipse crop about ``texture_centre``,
    None the background."""

    texture: np.ndarray
    maps: list[np.ndarray]
    radius: tuple[float, float] | None = None
    texture_centre: np.ndarray | None = None


def _motion(rng: np.random.Generator, *, speed: tuple[float, float], spin: float, zoom: float,
            direction: np.ndarray | None) -> tuple[np.ndarray, float, float]:
    if direction is None:
        r, a = 2.0 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        shift = np.array([r * np.cos(a), r * np.sin(a)])
    else:
        side = np.array([-direction[1], direction[0]])
        shift = direction * rng.uniform(*speed) + side * rng.uniform(-0.3, 0.3)
    return shift, np.deg2rad(rng.uniform(-spin, spin)), 1 + rng.uniform(-zoom, zoom) / 100


def clip_frames(
    photos: list[str], *, seed: int, size: int = 64, seconds: float = 8.0, fps: int = 25, segment: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, str]]]:
    """A clip's frames ``n x size x size x 3`` uint8 with background ``photos[0]`` and foreground
    crops of the others, its true flows ``n-1 x size x size x 2`` (px) and each segment's
    ``(t_start, t_end, label)``; a function of its arguments alone."""
    rng = np.random.default_rng([seed, 11])
    big = size * SUPERSAMPLE
    n = int(round(seconds * fps))
    per = max(1, int(round(segment * fps)))
    centre = np.array([big / 2, big / 2])
    # Photos shrunk (anti-aliased) to 1.5 frames on their shorter side: the frame then samples them
    # near their own resolution, without aliasing.
    textures = [_shrunk(photo(p, seed), int(1.5 * big)) for p in photos]
    bg = textures[0]
    fit = 0.8 * min(bg.shape[:2]) / big  # the first view spans 80 % of the photo's shorter side
    start = _affine(1 / fit, rng.uniform(-0.2, 0.2), np.zeros(2))
    start = _affine(1, 0, centre) @ start @ _affine(1, 0, -np.array(bg.shape[1::-1]) / 2)
    layers = [Layer(bg, [start])]
    for tex in textures[1:]:
        r = size * SUPERSAMPLE * rng.uniform(0.1, 0.2)
        ry = r * rng.uniform(0.6, 1.0)
        scale = rng.uniform(0.8, 1.2)
        place = _affine(scale, rng.uniform(-np.pi, np.pi), rng.uniform(0.25, 0.75, 2) * big)
        tex_centre = np.array(tex.shape[1::-1]) / 2 + rng.uniform(-0.2, 0.2, 2) * np.array(tex.shape[1::-1])
        layers.append(Layer(tex, [place @ _affine(1, 0, -tex_centre)], (r / scale, ry / scale), tex_centre))
    segments = []
    for t in range(1, n):
        if (t - 1) % per == 0:
            k = int(rng.integers(len(CLASSES)))
            segments.append(((t - 1) / fps, min(n, t - 1 + per) / fps, CLASSES[k]))
            # The camera pans one way, so the background moves the other.
            steps = [_motion(rng, speed=(0.5, 2.0), spin=0.3, zoom=0.3, direction=-_DIRECTIONS[k])]
            steps += [_motion(rng, speed=(0, 0), spin=2.0, zoom=1.0, direction=None) for _ in layers[1:]]
        for layer, (shift, angle, scale) in zip(layers, steps):
            prev = layer.maps[-1]
            pivot = centre if layer.radius is None else (prev @ np.r_[layer.texture_centre, 1])[:2]
            move = _affine(1, 0, shift * SUPERSAMPLE) @ _about(_affine(scale, angle, np.zeros(2)), pivot)
            if layer.radius is not None:  # crops that drift off the frame turn back towards its middle
                if np.linalg.norm(pivot - centre) > 0.45 * big and np.dot(shift, centre - pivot) < 0:
                    move = _affine(1, 0, -2 * shift * SUPERSAMPLE) @ move
            layer.maps.append(move @ prev)
    frames, flows = _render(layers, big, n)
    return frames, flows, segments


def render_clip(
    path: str | Path, photos: list[str], *, seed: int, size: int = 64, seconds: float = 8.0, fps: int = 25,
    segment: float = 2.0,
) -> list[tuple[float, float, str]]:
    """Write `clip_frames` as clip ``path`` (H.264) and its ``.flow.npz`` sidecar; returns each
    segment's ``(t_start, t_end, label)``."""
    frames, flows, segments = clip_frames(photos, seed=seed, size=size, seconds=seconds, fps=fps, segment=segment)
    _encode(path, frames, fps)
    times = np.arange(len(frames), dtype=np.float64) / fps
    np.savez_compressed(Path(path).with_suffix(".flow.npz"), times=times, flow=flows.astype(np.float16))
    return segments


def _render(layers: list[Layer], big: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``n x size x size x 3`` uint8 and flows ``n-1 x size x size x 2`` (clip px)."""
    ys, xs = np.mgrid[0:big, 0:big].astype(np.float64) + 0.5
    pix = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    size = big // SUPERSAMPLE
    frames = np.empty((n, size, size, 3), np.uint8)
    flows = np.empty((n - 1, size, size, 2), np.float32)
    for t in range(n):
        img = np.zeros((big * big, 3))
        flow = np.zeros((big * big, 2))
        for layer in layers:
            q = np.linalg.inv(layer.maps[t]) @ pix  # texture coordinates of each pixel
            if layer.radius is None:
                cover = np.ones(big * big, dtype=bool)
            else:
                d = (q[:2] - layer.texture_centre[:, None]) / np.array(layer.radius)[:, None]
                cover = (d**2).sum(axis=0) <= 1.0
            coords = [q[1] - 0.5, q[0] - 0.5]
            for c in range(3):
                img[cover, c] = ndimage.map_coordinates(layer.texture[..., c], [x[cover] for x in coords],
                                                        order=1, mode="mirror")
            if t + 1 < n:
                nxt = layer.maps[t + 1] @ q
                flow[cover] = (nxt[:2] - pix[:2]).T[cover]
        frames[t] = np.clip(_blocks(img.reshape(big, big, 3)) * 255 + 0.5, 0, 255).astype(np.uint8)
        if t + 1 < n:
            flows[t] = _blocks(flow.reshape(big, big, 2)) / SUPERSAMPLE
    return frames, flows


def _blocks(a: np.ndarray) -> np.ndarray:
    h, w, c = a.shape
    return a.reshape(h // SUPERSAMPLE, SUPERSAMPLE, w // SUPERSAMPLE, SUPERSAMPLE, c).mean(axis=(1, 3))


def _encode(path: str | Path, frames: np.ndarray, fps: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for f in frames:
            # Converted here: the encoder's own conversion (PyAV 18) gave different bytes from call
            # to call in one process. The bytes can still differ between processes (frames do not).
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")))
        container.mux(stream.encode())


def _render_job(job: tuple[str, str, Path, list[str], int], *, size: int, seconds: float) -> list[tuple[float, float, str]]:
    _, _, clip, photos, seed = job
    return render_clip(clip, photos, seed=seed, size=size, seconds=seconds)


def write_rig(out: str | Path, *, train_clips: int = 48, eval_clips: int = 16, size: int = 64,
              seconds: float = 8.0, seed: int = 0, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Render the rig under ``out``: ``train/`` clips from ``TRAIN_PHOTOS`` and ``eval/`` clips
    from ``HELDOUT``, each folder with ``labels.csv``, ``data.yaml`` (a ``train.data`` / ``eval.data``
    mapping) and ``clips.yaml`` (the same without labels). ``workers`` processes render clips side
    by side; each clip is seeded by its index, so its frames, flow and labels do not depend on them
    (the H.264 bytes may differ). Returns a
    JSON-ready summary."""
    out = Path(out)
    summary: dict[str, Any] = {"out": str(out)}
    jobs: list[tuple[str, str, Path, list[str], int]] = []  # split, stream id, clip, photos, seed
    for split, count, pool, base in (("train", train_clips, TRAIN_PHOTOS, 0), ("eval", eval_clips, HELDOUT, 10_000)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, base + i])
            chosen = [str(p) for p in rng.choice(pool, size=1 + int(rng.integers(1, 4)), replace=len(pool) < 4)]
            sid = f"{split}{i:03d}-{chosen[0]}"
            jobs.append((split, sid, out / split / f"{sid}.mp4", chosen, seed * 100_000 + base + i))
    render = functools.partial(_render_job, size=size, seconds=seconds)
    # Spawned, not forked: a fork of a process that has run OpenMP threads (torch) can hang. An
    # executor starts processes only when given work, so one worker renders in this process.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as executor:
        results = (executor.map if workers > 1 else map)(render, jobs)
        segments = list(tqdm(results, total=len(jobs), desc="rendering clips", unit="clip", disable=not progress))
    for split, count, pool, _ in (("train", train_clips, TRAIN_PHOTOS, 0), ("eval", eval_clips, HELDOUT, 10_000)):
        folder = out / split
        mine = [(job, segs) for job, segs in zip(jobs, segments) if job[0] == split]
        rows = [(sid, round(t0, 4), round(t1, 4), label) for (_, sid, _, _, _), segs in mine for t0, t1, label in segs]
        streams = [{"id": sid, "video": clip.name} for (_, sid, clip, _, _), _ in mine]
        with open(folder / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["stream_id", "t_start", "t_end", "label"])
            w.writerows(rows)
        (folder / "data.yaml").write_text(yaml.safe_dump({"streams": streams, "labels": "labels.csv"}))
        (folder / "clips.yaml").write_text(yaml.safe_dump({"streams": streams}))  # for runs that read no labels
        summary[split] = {"clips": count, "photos": sorted(pool), "data": str(folder / "data.yaml")}
    return summary
