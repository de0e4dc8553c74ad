"""The real-texture check of a checkpoint's flow: a photograph panned by a known motion.

`panned_photo_clip` writes a scikit-image photo seen through a panning camera as H.264 (PyAV);
`photo_flow(checkpoint)` reads it back through `pipeline.read_windows`, runs the model over it and
returns the flow EPE against the known motion and against zero flow. scikit-image is a test extra
(``pip install .[test]``), so only this module needs it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from skimage import data as skdata

from jobs.datasets import default_data_settings
from jobs.evaluate import load_model, run_stream
from pipeline.errors import ConfigError
from pipeline.read import read_windows



def panned_photo_clip(
    path: str | Path,
    *,
    image: str = "astronaut",
    size: tuple[int, int] = (64, 64),
    scale: int = 3,
    seconds: float = 4.0,
    fps: int = 25,
    seed: int = 0,
) -> np.ndarray:
    """Write an H.264 clip of a scikit-image photo seen through a camera that pans, and return the
    true flow of every frame from the one before on the ``size`` grid (``frames x 2``, dx, dy px;
    row 0 is zero).

    The camera crops ``size * scale`` pixels of the photo and moves by whole photo pixels each
    frame (``scale`` px = 1 px of the grid), changing direction every second among the eight
    compass steps, turning back at the photo's edges.
    """
    photo = getattr(skdata, image)()
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    photo = np.ascontiguousarray(photo[..., :3])
    ch, cw = size[0] * scale, size[1] * scale
    if photo.shape[0] <= ch or photo.shape[1] <= cw:
        raise ConfigError(f"photo {image!r} ({photo.shape[1]}x{photo.shape[0]}) is too small for a {cw}x{ch} crop")
    rng = np.random.default_rng(seed)
    steps = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
    n = int(seconds * fps)
    pos = np.array([(photo.shape[1] - cw) // 2, (photo.shape[0] - ch) // 2])
    limit = np.array([photo.shape[1] - cw, photo.shape[0] - ch])
    offsets = [pos.copy()]
    step = np.array(steps[rng.integers(len(steps))]) * scale
    for i in range(1, n):
        if i % fps == 0:
            step = np.array(steps[rng.integers(len(steps))]) * scale
        nxt = pos + step
        bounce = (nxt < 0) | (nxt > limit)
        step = np.where(bounce, -step, step)
        pos = pos + step
        offsets.append(pos.copy())
    offsets = np.array(offsets)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = cw, ch, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for x, y in offsets:
            frame = av.VideoFrame.from_ndarray(photo[y : y + ch, x : x + cw], format="rgb24").reformat(format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    flow = np.zeros((n, 2), dtype=np.float32)
    flow[1:] = -np.diff(offsets, axis=0) / scale  # the content moves against the camera
    return flow


@torch.no_grad()
def photo_flow(checkpoint: str | Path, *, image: str = "astronaut", seconds: float = 8.0) -> dict[str, Any]:
    """``{"image", "checkpoint", "windows", "flow_epe", "flow_epe_zero"}`` of ``checkpoint`` on a
    ``seconds`` long clip of ``image``: EPE (px of the flow grid) over every window with two frames."""
    model, meta = load_model(checkpoint, "checkpoint")
    data = meta.get("data") or default_data_settings(model.config)
    size = tuple(model.config.flow.size)
    fps = 25
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / f"{image}.mp4"
        truth = panned_photo_clip(clip, image=image, size=size, seconds=seconds, fps=fps)
        windows = list(read_windows({"id": "photo", "video": str(clip)}, **data["window"],
                                    video={"size": list(size)}))
    outs = run_stream(model, windows)
    epe, zero = [], []
    for w, o in zip(windows, outs):
        if o.flow is None or not bool(o.flow_valid[0]):
            continue
        d = truth[int(round(w.video_t[-1] * fps))]
        epe.append(float(np.linalg.norm(o.flow[0].numpy() - d, axis=-1).mean()))
        zero.append(float(np.linalg.norm(d)))
    return {
        "image": image,
        "checkpoint": str(checkpoint),
        "windows": len(epe),
        "flow_epe": round(float(np.mean(epe)), 4),
        "flow_epe_zero": round(float(np.mean(zero)), 4),
    }
