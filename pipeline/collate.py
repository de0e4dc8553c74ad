"""Windows to model tensors: `collate(list[Window]) -> perceiver_stream.Batch`.

The one path from windows to tensors for the model actor, training and eval (DESIGN "Batches").
Each modality is padded along axis 1 (padding at the end) with a mask; a window without the
modality has ``present = False`` and an all-False mask. A modality that no window of the batch
has is left out of ``Batch.modalities``. Times are absolute media time in float64:

- video: each frame's time (``Window.video_t``);
- audio: each sample's time, ``audio_t0 + i / audio_rate``;
- points: the scans of a window are concatenated along axis 1, each point stamped with its scan's time.

``reset`` is ``Window.gap`` (the model actor adds its own reasons: first window, restart).
Targets are built when any window carries `Truth`: windows without truth get label -1, and a
window without truth flow gets zeros with ``flow_valid = False``.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

from perceiver_stream.batch import Batch, ModalityBatch, Targets
from pipeline.window import Window


def collate(
    windows: list[Window], *, video_frames: int | None = None, only: Collection[str] | None = None
) -> Batch:
    """Pad and stack ``windows`` into a `Batch` (see the module docstring).

    video_frames: keep only each window's last ``video_frames`` frames (None = all), so callers
        whose model looks at the last few frames do not move the rest.
    only: collate just these modalities (None = all), for callers that read no others.
    Raises ValueError when windows cannot share a tensor: different frame sizes, audio rates or
    channel counts, or point channel counts.
    """
    if not windows:
        raise ValueError("collate needs at least one window")
    if video_frames is not None and video_frames < 1:
        raise ValueError(f"video_frames must be >= 1 or None, got {video_frames}")
    modalities: dict[str, ModalityBatch] = {}
    wanted = {"video", "audio", "points"} if only is None else set(only)
    if "video" in wanted and any(w.has_video for w in windows):
        modalities["video"] = _video(windows, video_frames)
    if "audio" in wanted and any(w.has_audio for w in windows):
        modalities["audio"] = _audio(windows)
    if "points" in wanted and any(w.has_points for w in windows):
        modalities["points"] = _points(windows)
    return Batch(
        stream_ids=[w.stream_id for w in windows],
        window_ids=torch.tensor([w.window_id for w in windows], dtype=torch.int64),
        t_start=torch.tensor([w.t_start for w in windows], dtype=torch.float64),
        t_end=torch.tensor([w.t_end for w in windows], dtype=torch.float64),
        reset=torch.tensor([bool(w.gap) for w in windows], dtype=torch.bool),
        modalities=modalities,
        targets=_targets(windows),
    )


def _same(values: set, what: str) -> None:
    if len(values) > 1:
        raise ValueError(f"windows in one batch must share {what}, got {sorted(values)}")


def _padded(
    parts: list[np.ndarray | None], tail: tuple[int, ...], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-window ``n_i x *tail`` arrays (None = absent) into ``B x N x *tail`` and a mask."""
    n = max((len(p) for p in parts if p is not None), default=0)
    out = np.zeros((len(parts), n, *tail), dtype=dtype)
    mask = np.zeros((len(parts), n), dtype=bool)
    for i, p in enumerate(parts):
        if p is not None and len(p):
            out[i, : len(p)] = p
            mask[i, : len(p)] = True
    return out, mask


def _modality(values: np.ndarray, times: np.ndarray, mask: np.ndarray, present: list[bool], rate=None) -> ModalityBatch:
    return ModalityBatch(
        values=torch.from_numpy(values),
        times=torch.from_numpy(times),
        mask=torch.from_numpy(mask),
        present=torch.tensor(present, dtype=torch.bool),
        rate=rate,
    )


def _video(windows: list[Window], keep: int | None) -> ModalityBatch:
    shapes = {tuple(w.video.shape[1:]) for w in windows if w.has_video}
    _same(shapes, "a frame size (set video.size)")
    (tail,) = shapes
    frames, times = [], []
    for w in windows:
        if not w.has_video:
            frames.append(None)
            times.append(None)
            continue
        v, t = w.video, np.asarray(w.video_t, dtype=np.float64)
        if keep is not None:
            v, t = v[-keep:], t[-keep:]
        frames.append(v)
        times.append(t)
    values, mask = _padded(frames, tail, np.uint8)
    t, _ = _padded(times, (), np.float64)
    return _modality(values, t, mask, [w.has_video for w in windows])


def _audio(windows: list[Window]) -> ModalityBatch:
    have = [w for w in windows if w.has_audio]
    _same({int(w.audio_rate) for w in have}, "an audio rate")
    _same({w.audio.shape[1] for w in have}, "an audio channel count")
    rate = int(have[0].audio_rate)
    values, mask = _padded([w.audio if w.has_audio else None for w in windows], (have[0].audio.shape[1],), np.float32)
    idx = np.arange(values.shape[1], dtype=np.float64) / rate
    t0 = np.array([w.audio_t0 if w.has_audio else 0.0 for w in windows], dtype=np.float64)
    times = np.where(mask, t0[:, None] + idx[None, :], 0.0)
    return _modality(values, times, mask, [w.has_audio for w in windows], rate=float(rate))


def _points(windows: list[Window]) -> ModalityBatch:
    have = [w for w in windows if w.has_points]
    channels = {s.shape[1] for w in have for s in w.points}
    _same(channels, "a point channel count")
    (c,) = channels
    clouds, times = [], []
    for w in windows:
        if not w.has_points:
            clouds.append(None)
            times.append(None)
            continue
        clouds.append(np.concatenate(w.points, axis=0))
        times.append(np.repeat(np.asarray(w.points_t, dtype=np.float64), [len(s) for s in w.points]))
    values, mask = _padded(clouds, (c,), np.float32)
    t, _ = _padded(times, (), np.float64)
    return _modality(values, t, mask, [w.has_points for w in windows])


def _targets(windows: list[Window]) -> Targets | None:
    if not any(w.truth is not None for w in windows):
        return None
    flows = [w.truth.flow if w.truth is not None else None for w in windows]
    shapes = {f.shape for f in flows if f is not None}
    _same(shapes, "a truth flow size")
    if shapes:
        (shape,) = shapes
    else:
        # no flow anywhere: an empty grid of the frames' size keeps the tensor's layout
        sizes = {tuple(w.video.shape[1:3]) for w in windows if w.has_video}
        shape = (*(sizes.pop() if len(sizes) == 1 else (0, 0)), 2)
    flow = np.zeros((len(windows), *shape), dtype=np.float32)
    valid = np.zeros(len(windows), dtype=bool)
    for i, f in enumerate(flows):
        if f is not None:
            flow[i] = f
            valid[i] = True
    label = [w.truth.label if w.truth is not None else -1 for w in windows]
    return Targets(
        flow=torch.from_numpy(flow),
        flow_valid=torch.from_numpy(valid),
        label=torch.tensor(label, dtype=torch.int64),
    )
