"""`run_pipeline.py eval`: a trained checkpoint on held-out synthetic streams, and on a real photo.

`evaluate(checkpoint, seed)` renders one synthetic stream of ``seed`` long enough for ``windows``
windows (at least 200) with the window / video / audio settings stored in the checkpoint, runs
the model over it window by window with its latent state carried (as the pipeline does), and
returns::

    {"seed", "windows", "drop", "label_accuracy", "label_chance", "flow_epe", "flow_epe_zero"}

``label_chance`` is the accuracy of always answering the stream's most frequent label;
``flow_epe`` is the mean end-point error (px of the flow grid) over the windows with truth flow,
``flow_epe_zero`` the same for predicting no motion; both are None when video is dropped.
``drop`` removes a modality (or several, comma-separated) from every window, so the model sees
the others only. With a ``student`` checkpoint the result also holds ``cosine_to_teacher`` (mean
cosine of the student's and the checkpoint's embeddings) and the student's own metrics under
``"student"``. A seed the model (or the student) was trained on is refused.

`photo_flow(checkpoint)` is the real-texture check: a photograph that scikit-image ships, panned
by a known motion, encoded as H.264 with PyAV, read back through `pipeline.read_windows` and run
through the model; it returns the flow EPE against the known motion and against zero flow.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perceiver_stream.checkpoint import load_checkpoint
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingConfig, StreamingPerceiverIO, StreamStates
from perceiver_stream.student import embedding_cosine
from pipeline.collate import collate
from pipeline.errors import CheckpointError, ConfigError
from pipeline.training import video_frames_needed
from pipeline.window import Window

MIN_WINDOWS = 200
MODALITIES = ("video", "audio", "points")


def default_data_settings(config: StreamingConfig) -> dict[str, Any]:
    """Window / video / audio settings for a checkpoint that stores none: the pipeline defaults,
    frames at the flow grid's size, audio at the mel adapter's rate."""
    audio = next((s for s in config.modalities.values() if s["kind"].startswith("audio")), {})
    return {
        "window": {"seconds": 1.0, "hop": 0.5},
        "video": {"size": list(config.flow.size), "fps": None},
        "audio": {"rate": int(audio.get("sample_rate", 16000)), "channels": int(audio.get("channels", 1))},
    }


def _load(path: str | Path, role: str) -> tuple[StreamingPerceiverIO, dict[str, Any]]:
    try:
        return load_checkpoint(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the {role}: {e}", source=str(path)) from None


def heldout_windows(data: dict[str, Any], seed: int, n: int, *, video_frames: int | None) -> list[Window]:
    """The first ``n`` windows of synthetic rig ``seed`` under the ``data`` settings (the last few
    renderings are cached: evaluating several modality drops renders the stream once)."""
    return list(_rendered(json.dumps(data, sort_keys=True), seed, n, video_frames))


@functools.lru_cache(maxsize=2)
def _rendered(data_json: str, seed: int, n: int, video_frames: int | None) -> tuple[Window, ...]:
    from pipeline.training import settings_config, synthetic_stream

    data = json.loads(data_json)
    win = data["window"]
    seconds = (n - 1) * win["hop"] + win["seconds"] + 0.5 * win["hop"]
    cfg = settings_config(data, [{"id": f"eval{seed}", "synthetic": {"seed": seed, "seconds": seconds}}])
    windows = synthetic_stream(cfg, seed, seconds, video_frames=video_frames, stream_id=f"eval{seed}")
    return tuple(windows[:n])


def dropped(drop: str | None) -> tuple[str, ...]:
    """The modalities that ``--drop`` names: one, or several separated by commas (``"video,audio"``
    leaves the points alone). Raises ConfigError for an unknown name or for all of them."""
    names = tuple(n.strip() for n in drop.split(",")) if drop else ()
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ConfigError(f"--drop {drop!r}: {unknown} not a modality; choose from {list(MODALITIES)}")
    if set(names) >= set(MODALITIES):
        raise ConfigError(f"--drop {drop!r}: at least one modality must remain")
    return names


def _without(window: Window, drop: str | None) -> Window:
    for name in dropped(drop):
        if name == "video":
            window = replace(window, video=None, video_t=None)
        elif name == "audio":
            window = replace(window, audio=None, audio_rate=None, audio_t0=None)
        else:
            window = replace(window, points=None, points_t=None)
    return window


@torch.no_grad()
def run_stream(model: StreamingPerceiverIO, windows: list[Window], *, batch_size: int = 1) -> list[ModelOutput]:
    """The model's outputs for consecutive windows of one stream, state carried window to window
    (``batch_size`` > 1 only for models without state: it batches the windows)."""
    step = 1 if model.config.state else batch_size
    states = StreamStates()
    outs = []
    for i in range(0, len(windows), step):
        batch = collate(windows[i : i + step])
        batch, state = states.gather(batch) if model.config.state else (batch, None)
        out = model(batch, state)
        states.update(batch, out.state)
        outs.append(out)
    return outs


def _metrics(outs: list[ModelOutput], windows: list[Window], with_flow: bool) -> dict[str, Any]:
    labels = np.array([w.truth.label for w in windows])
    pred = torch.cat([o.label_logits for o in outs]).argmax(dim=1).numpy()
    epe, zero = [], []
    if with_flow:
        i = 0
        for o in outs:
            for r in range(len(o.flow_valid)):
                truth = windows[i].truth.flow
                i += 1
                if truth is None or o.flow is None or not bool(o.flow_valid[r]):
                    continue
                epe.append(float(np.linalg.norm(o.flow[r].numpy() - truth, axis=-1).mean()))
                zero.append(float(np.linalg.norm(truth, axis=-1).mean()))
    return {
        "label_accuracy": round(float((pred == labels).mean()), 4),
        "label_chance": round(float(np.bincount(labels).max() / len(labels)), 4),
        "flow_epe": round(float(np.mean(epe)), 4) if epe else None,
        "flow_epe_zero": round(float(np.mean(zero)), 4) if zero else None,
    }


def evaluate_model(
    model: StreamingPerceiverIO,
    windows: list[Window],
    *,
    drop: str | None = None,
    student: StreamingPerceiverIO | None = None,
) -> dict[str, Any]:
    """Metrics (see the module docstring) of ``model`` (and ``student``) on one stream's windows."""
    no_video = "video" in dropped(drop)
    windows = [_without(w, drop) for w in windows]
    model.eval()
    outs = run_stream(model, windows)
    result: dict[str, Any] = {"windows": len(windows), "drop": drop}
    result.update(_metrics(outs, windows, with_flow=not no_video))
    if student is not None:
        student.eval()
        s_outs = run_stream(student, windows)
        cos = embedding_cosine(torch.cat([o.embedding for o in s_outs]), torch.cat([o.embedding for o in outs]))
        result["cosine_to_teacher"] = round(float(cos.mean()), 4)
        result["student"] = _metrics(s_outs, windows, with_flow=not no_video)
    return result


def _refuse_trained_seed(seed: int, meta: dict[str, Any], path: str | Path) -> None:
    for key in ("train_seeds", "distill_seeds"):
        if seed in meta.get(key, []):
            raise ConfigError(f"seed {seed} was used to train checkpoint {path} ({key}); pick a held-out seed",
                              source=str(path))


def evaluate(
    checkpoint: str | Path,
    seed: int,
    *,
    drop: str | None = None,
    student: str | Path | None = None,
    windows: int = MIN_WINDOWS,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (and ``student``) on ``windows`` windows of synthetic rig ``seed``.

    Raises ConfigError for a seed used in training, fewer than 200 windows or an unknown
    modality; CheckpointError for a checkpoint that does not load.
    """
    if windows < MIN_WINDOWS:
        raise ConfigError(f"--windows {windows}: evaluation needs at least {MIN_WINDOWS} windows")
    dropped(drop)
    model, meta = _load(checkpoint, "checkpoint")
    _refuse_trained_seed(seed, meta, checkpoint)
    s_model = None
    frames = video_frames_needed(model.config)
    if student is not None:
        s_model, s_meta = _load(student, "student")
        _refuse_trained_seed(seed, s_meta, student)
        frames = None if frames is None or video_frames_needed(s_model.config) is None else max(frames, video_frames_needed(s_model.config))
    data = meta.get("data") or default_data_settings(model.config)
    result = {"seed": seed, "checkpoint": str(checkpoint)}
    if student is not None:
        result["student_checkpoint"] = str(student)
    result.update(evaluate_model(model, heldout_windows(data, seed, windows, video_frames=frames),
                                 drop=drop, student=s_model))
    return result


# ---- the real-texture check -------------------------------------------------------------------


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
    import av
    from skimage import data as skdata

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
            frame = av.VideoFrame.from_ndarray(photo[y : y + ch, x : x + cw], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    flow = np.zeros((n, 2), dtype=np.float32)
    flow[1:] = -np.diff(offsets, axis=0) / scale  # the content moves against the camera
    return flow


@torch.no_grad()
def photo_flow(checkpoint: str | Path, *, image: str = "astronaut", seconds: float = 8.0) -> dict[str, Any]:
    """The real-texture check (see the module docstring): ``{"image", "windows", "flow_epe",
    "flow_epe_zero"}`` over every window with two frames, on the checkpoint's flow grid."""
    from pipeline.read import read_windows

    model, meta = _load(checkpoint, "checkpoint")
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
