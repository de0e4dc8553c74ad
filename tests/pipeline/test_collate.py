"""collate: padding, masks, presence, media times, reset and targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceiver_stream.batch import Batch
from pipeline import Truth, Window
from pipeline.collate import collate
from pipeline.sources.synthetic import SyntheticRig
from pipeline.windowing import windows as cut_windows


def make_window(wid: int, *, frames: int = 0, samples: int = 0, scans: tuple[int, ...] = (), gap: bool = False,
                truth: Truth | None = None, size: tuple[int, int] = (8, 6), rate: int = 100) -> Window:
    rng = np.random.default_rng(wid)
    t0 = 0.5 * wid
    w = Window(stream_id=f"s{wid % 2}", window_id=wid, t_start=t0, t_end=t0 + 1.0, gap=gap, truth=truth)
    if frames:
        w.video = rng.integers(0, 256, size=(frames, *size, 3), dtype=np.uint8)
        w.video_t = t0 + np.arange(frames) / 25.0
    if samples:
        w.audio = rng.normal(size=(samples, 2)).astype(np.float32)
        w.audio_rate = rate
        w.audio_t0 = t0 + 0.003
    if scans:
        w.points = [rng.normal(size=(n, 4)).astype(np.float32) for n in scans]
        w.points_t = t0 + 0.1 * np.arange(len(scans))
    return w


def test_padding_masks_presence_and_times():
    ws = [
        make_window(0, frames=3, samples=50, scans=(4, 2), gap=True),
        make_window(1, frames=5, scans=(3,)),
        make_window(2, samples=80),
    ]
    b = collate(ws)
    assert isinstance(b, Batch) and len(b) == 3
    assert b.stream_ids == ["s0", "s1", "s0"]
    assert b.window_ids.tolist() == [0, 1, 2] and b.window_ids.dtype == torch.int64
    assert b.t_start.dtype == torch.float64 and b.t_end.tolist() == [1.0, 1.5, 2.0]
    assert b.reset.tolist() == [True, False, False]

    v = b.modalities["video"]
    assert v.values.shape == (3, 5, 8, 6, 3) and v.values.dtype == torch.uint8
    assert v.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [False] * 5]
    assert v.present.tolist() == [True, True, False]
    np.testing.assert_array_equal(v.values[0, :3].numpy(), ws[0].video)
    assert (v.values[0, 3:] == 0).all() and (v.values[2] == 0).all()
    assert v.times.dtype == torch.float64
    np.testing.assert_array_equal(v.times[1].numpy(), ws[1].video_t)

    a = b.modalities["audio"]
    assert a.values.shape == (3, 80, 2) and a.rate == 100.0
    assert a.present.tolist() == [True, False, True]
    assert a.mask.sum(1).tolist() == [50, 0, 80]
    np.testing.assert_array_equal(a.values[2].numpy(), ws[2].audio)
    np.testing.assert_allclose(a.times[0, :50].numpy(), ws[0].audio_t0 + np.arange(50) / 100, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.times[2].numpy(), ws[2].audio_t0 + np.arange(80) / 100, rtol=0, atol=1e-12)
    assert a.times.dtype == torch.float64

    p = b.modalities["points"]
    assert p.values.shape == (3, 6, 4) and p.present.tolist() == [True, True, False]
    assert p.mask.sum(1).tolist() == [6, 3, 0]
    np.testing.assert_array_equal(p.values[0].numpy(), np.concatenate(ws[0].points))
    np.testing.assert_allclose(p.times[0].numpy(), [0.0] * 4 + [0.1] * 2)
    np.testing.assert_allclose(p.times[1, :3].numpy(), [0.5] * 3)
    assert b.targets is None


def test_absent_modality_is_left_out_and_last_frames_kept():
    ws = [make_window(0, frames=6), make_window(1, frames=2)]
    b = collate(ws, video_frames=3)
    assert set(b.modalities) == {"video"}
    v = b.modalities["video"]
    assert v.values.shape[1] == 3
    np.testing.assert_array_equal(v.values[0].numpy(), ws[0].video[-3:])
    np.testing.assert_array_equal(v.times[0].numpy(), ws[0].video_t[-3:])
    assert v.mask.tolist() == [[True] * 3, [True, True, False]]


def test_targets_from_truth():
    flow = np.random.default_rng(0).normal(size=(8, 6, 2)).astype(np.float32)
    ws = [
        make_window(0, frames=3, truth=Truth(flow=flow, label=5, label_name="x")),
        make_window(1, frames=1, truth=Truth(flow=None, label=2, label_name="y")),
        make_window(2, frames=2),
    ]
    t = collate(ws).targets
    assert t is not None
    assert t.flow.shape == (3, 8, 6, 2) and t.flow.dtype == torch.float32
    np.testing.assert_array_equal(t.flow[0].numpy(), flow)
    assert (t.flow[1:] == 0).all()
    assert t.flow_valid.tolist() == [True, False, False]
    assert t.label.tolist() == [5, 2, -1] and t.label.dtype == torch.int64
    # no flow anywhere: an all-invalid grid of the frame size
    t2 = collate([make_window(0, frames=1, truth=Truth(flow=None, label=1, label_name="z"))]).targets
    assert t2.flow.shape == (1, 8, 6, 2) and t2.flow_valid.tolist() == [False]


def test_incompatible_windows_are_refused():
    with pytest.raises(ValueError, match="frame size"):
        collate([make_window(0, frames=1), make_window(1, frames=1, size=(4, 4))])
    with pytest.raises(ValueError, match="audio rate"):
        collate([make_window(0, samples=5), make_window(1, samples=5, rate=200)])
    with pytest.raises(ValueError, match="at least one window"):
        collate([])


def test_synthetic_windows_collate_to_their_truth():
    rig = SyntheticRig(4, 3.0)
    ws = list(cut_windows("sim", rig.sources(), seconds=1.0, hop=0.5, truth=rig.truth))
    assert len(ws) == 5
    b = collate(ws)
    assert set(b.modalities) == {"video", "audio", "points"}
    assert b.modalities["video"].values.shape == (5, 25, 64, 64, 3)
    assert b.modalities["audio"].values.shape == (5, 16000, 1)
    assert b.modalities["points"].present.all()
    for i, w in enumerate(ws):
        np.testing.assert_array_equal(b.targets.flow[i].numpy(), w.truth.flow)
        assert b.targets.label[i] == rig.label_at((w.t_start + w.t_end) / 2)
        # audio sample times on the window's own grid
        assert b.modalities["audio"].times[i, 0].item() == pytest.approx(w.t_start, abs=1e-9)
    assert b.targets.flow_valid.all()
    # only= collates the named modalities alone, with the same values and targets
    video = collate(ws, only=["video"])
    assert set(video.modalities) == {"video"}
    assert torch.equal(video.modalities["video"].values, b.modalities["video"].values)
    assert torch.equal(video.targets.label, b.targets.label)
    assert set(collate(ws, only=["audio", "points"]).modalities) == {"audio", "points"}
