"""The media-time windower on hand-made samples: counts, membership, gaps, resume, failures."""

from __future__ import annotations

import copy
import itertools
import math
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.windowing as windowing
from perceiver_stream.adapters import build_adapter
from pipeline.collate import collate
from pipeline.errors import DecodeError, SourceError
from pipeline.read import read_points, read_windows
from pipeline.sources.base import AudioChunk, PointScan, VideoFrame
from pipeline.sources.live import SourceBreak
from pipeline.window import Truth
from pipeline.windowing import windows


def video(n: int, fps: float = 25.0, t0: float = 0.0, size=(2, 3), skip=()) -> list[VideoFrame]:
    """Frames whose pixels all equal their index (mod 256)."""
    return [
        VideoFrame(t=t0 + i / fps, duration=1 / fps, image=np.full((*size, 3), i % 256, np.uint8))
        for i in range(n)
        if i not in skip
    ]


def audio(seconds: float, rate: int = 1000, block: int = 100, t0: float = 0.0) -> list[AudioChunk]:
    """Chunks whose sample values are their global sample index."""
    total = int(round(seconds * rate))
    return [
        AudioChunk(t=t0 + s / rate, rate=rate, samples=np.arange(s, min(s + block, total), dtype=np.float32)[:, None])
        for s in range(0, total, block)
    ]


def points(seconds: float, rate: float = 10.0) -> list[PointScan]:
    return [
        PointScan(t=k / rate, duration=1 / rate, points=np.full((4, 4), k, np.float32))
        for k in range(int(round(seconds * rate)))
    ]


def test_thirty_seconds_give_59_windows_with_exact_frames():
    ws = list(windows("s", {"video": iter(video(750))}, seconds=1.0, hop=0.5))
    assert [w.window_id for w in ws] == list(range(59))
    for w in ws:
        assert w.t_start == pytest.approx(0.5 * w.window_id) and w.t_end == pytest.approx(w.t_start + 1.0)
        first = math.ceil(w.t_start * 25 - 1e-6)
        assert list(w.video[:, 0, 0, 0]) == [(first + j) % 256 for j in range(25)]
        assert np.allclose(w.video_t, (first + np.arange(25)) / 25)
        assert not w.gap and w.audio is None and w.points is None


def test_modalities_are_aligned_in_each_window():
    ws = list(
        windows(
            "s",
            {"video": iter(video(75)), "audio": iter(audio(3.0)), "points": iter(points(3.0))},
            seconds=1.0,
            hop=0.5,
        )
    )
    assert len(ws) == 5
    for w in ws:
        assert w.audio_rate == 1000 and w.audio_t0 == pytest.approx(w.t_start)
        start = round(w.t_start * 1000)
        assert np.array_equal(w.audio[:, 0], np.arange(start, start + 1000, dtype=np.float32))
        assert np.all((w.video_t >= w.t_start - 1e-9) & (w.video_t < w.t_end - 1e-9))
        assert np.allclose(w.points_t, np.arange(round(w.t_start * 10), round(w.t_start * 10) + 10) / 10)
        assert [p[0, 0] for p in w.points] == list(np.round(w.points_t * 10))


def test_absent_modality_is_none_not_zeros():
    # Audio only covers the first second; the video runs for three.
    ws = list(windows("s", {"video": iter(video(75)), "audio": iter(audio(1.0))}, seconds=1.0, hop=0.5))
    assert [w.has_audio for w in ws] == [True, True, False, False, False]
    assert all(w.audio is None for w in ws[2:])
    assert len(ws[1].audio) == 500 and ws[1].audio_t0 == pytest.approx(0.5)


def test_window_with_no_data_is_skipped_and_next_has_gap():
    # Frames missing from 1.0 s to 3.0 s: windows 2 and 3 ([1,2), [1.5,2.5)) hold nothing... and
    # [2, 3) neither; window 1 ([0.5,1.5)) and 5 ([2.5,3.5)) hold frames.
    ws = list(windows("s", {"video": iter(video(100, skip=range(25, 75)))}, seconds=1.0, hop=0.5))
    assert [w.window_id for w in ws] == [0, 1, 5, 6]
    assert [w.gap for w in ws] == [False, False, True, False]


def test_only_complete_windows():
    # 2.2 s of video: windows ending at 1.0, 1.5, 2.0 fit; [1.5, 2.5) does not.
    ws = list(windows("s", {"video": iter(video(55))}, seconds=1.0, hop=0.5))
    assert [w.t_end for w in ws] == pytest.approx([1.0, 1.5, 2.0])


def test_t0_is_earliest_first_sample_across_modalities():
    ws = list(windows("s", {"video": iter(video(50, t0=0.3)), "audio": iter(audio(2.3))}, seconds=1.0, hop=0.5))
    assert ws[0].t_start == 0.0 and ws[0].video_t[0] == pytest.approx(0.3)


def test_start_window_resumes_numbering_with_gap():
    full = list(windows("s", {"video": iter(video(100)), "audio": iter(audio(4.0))}, seconds=1.0, hop=0.5))
    resumed = list(
        windows("s", {"video": iter(video(100)), "audio": iter(audio(4.0))}, seconds=1.0, hop=0.5, start_window=3)
    )
    assert [w.window_id for w in resumed] == [w.window_id for w in full[3:]]
    assert [w.gap for w in resumed] == [True] + [False] * (len(resumed) - 1)
    for a, b in zip(full[3:], resumed):
        assert np.array_equal(a.video, b.video) and np.array_equal(a.audio, b.audio) and a.t_start == b.t_start


def test_deterministic_bit_for_bit():
    def run():
        return list(
            windows("s", {"video": iter(video(60)), "audio": iter(audio(2.4)), "points": iter(points(2.4))},
                    seconds=0.7, hop=0.3)
        )

    a, b = run(), run()
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x.window_id, x.t_start, x.t_end, x.gap, x.audio_t0) == (y.window_id, y.t_start, y.t_end, y.gap, y.audio_t0)
        assert x.video.tobytes() == y.video.tobytes() and x.audio.tobytes() == y.audio.tobytes()
        assert x.video_t.tobytes() == y.video_t.tobytes()


def test_streaming_pulls_only_what_the_next_window_needs():
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield VideoFrame(t=i / 25, duration=0.04, image=np.zeros((2, 2, 3), np.uint8))

    ws = list(itertools.islice(windows("s", {"video": endless()}, seconds=1.0, hop=0.5), 4))
    assert [w.window_id for w in ws] == [0, 1, 2, 3]
    # Window 3 ends at 2.5 s: frame #63 (2.52 s) proves it complete, nothing beyond is read.
    assert len(pulled) == 64


def test_failure_flushes_complete_windows_then_raises():
    def broken():
        yield from video(55)  # up to 2.2 s
        raise SourceError("decoder died", stream_id="s", source="cam.mp4")

    got = []
    with pytest.raises(SourceError, match="decoder died"):
        for w in windows("s", {"video": broken(), "audio": iter(audio(10.0))}, seconds=1.0, hop=0.5):
            got.append(w)
    assert [w.t_end for w in got] == pytest.approx([1.0, 1.5, 2.0])
    assert all(len(w.audio) == 1000 for w in got)


def test_source_break_sets_gap_on_the_next_window():
    frames = video(100)
    items = frames[:40] + [SourceBreak(t=1.6)] + frames[40:]
    ws = list(windows("s", {"video": iter(items)}, seconds=1.0, hop=0.5))
    assert [w.window_id for w in ws] == list(range(7))
    assert [w.gap for w in ws] == [False, False, True, False, False, False, False]


def test_late_samples_are_reported_and_dropped():
    frames = video(75)
    late = VideoFrame(t=0.2, duration=0.04, image=np.zeros((2, 3, 3), np.uint8))
    errors = []
    ws = list(windows("s", {"video": iter(frames[:60] + [late] + frames[60:])}, seconds=1.0, hop=0.5,
                      on_error=errors.append))
    assert len(ws) == 5 and all(not np.any(w.video_t == 0.2) or w.window_id == 0 for w in ws)
    assert len(errors) == 1 and isinstance(errors[0], DecodeError) and errors[0].window_id is not None
    assert "stream 's'" in str(errors[0])


def test_truth_is_called_per_window():
    calls = []

    def truth(ts, te, video_t):
        calls.append((ts, te, None if video_t is None else len(video_t)))
        return Truth(flow=None, label=int(ts * 2), label_name="x")

    ws = list(windows("s", {"video": iter(video(50))}, seconds=1.0, hop=0.5, truth=truth))
    assert [w.truth.label for w in ws] == [0, 1, 2]
    assert calls == [(0.0, 1.0, 25), (0.5, 1.5, 25), (1.0, 2.0, 25)]


def test_video_is_read_only_and_survives_slab_recycling(monkeypatch):
    # Tiny slabs force frames to move between slabs and slabs to be recycled.
    monkeypatch.setattr(windowing, "SLAB_BYTES", 1)
    kept = list(windows("s", {"video": iter(video(200, size=(4, 4)))}, seconds=1.0, hop=0.5))
    checked = 0
    for w in windows("s", {"video": iter(video(200, size=(4, 4)))}, seconds=1.0, hop=0.5):
        first = math.ceil(w.t_start * 25 - 1e-6)
        assert list(w.video[:, 0, 0, 0]) == [(first + j) % 256 for j in range(25)]
        checked += 1
    assert checked == len(kept) == 15
    for w in kept:  # held all along: never overwritten by a recycled slab
        first = math.ceil(w.t_start * 25 - 1e-6)
        assert list(w.video[:, 1, 1, 2]) == [(first + j) % 256 for j in range(25)]
    with pytest.raises(ValueError):
        kept[0].video[0, 0, 0, 0] = 1


def test_small_frames_hold_a_bounded_slab():
    # 64x64 frames: a slab is capped at SLAB_FRAMES frames, not SLAB_BYTES (a 32 MiB slab filled
    # page by page over 110 s of media made a stream's memory grow for minutes).
    image = np.zeros((64, 64, 3), np.uint8)
    frames = (VideoFrame(t=i / 25, duration=0.04, image=image) for i in range(2000))
    tracemalloc.start()
    try:
        n = sum(1 for _ in windows("s", {"video": frames}, seconds=1.0, hop=0.5))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 159
    assert peak < (windowing._RETIRED_SLABS + 2) * windowing.SLAB_FRAMES * image.nbytes


def test_bad_arguments():
    with pytest.raises(ValueError):
        windows("s", {"video": iter([])}, seconds=0, hop=0.5)
    with pytest.raises(ValueError):
        windows("s", {"lidar": iter([])}, seconds=1, hop=0.5)
    assert list(windows("s", {"video": iter([])}, seconds=1, hop=0.5)) == []


@settings(max_examples=60, deadline=None)
@given(
    fps=st.sampled_from([5.0, 10.0, 12.5, 25.0, 30.0]),
    n=st.integers(1, 80),
    t0=st.floats(0, 50, allow_nan=False).map(lambda x: round(x, 3)),
    seconds=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    hop_frac=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_window_arithmetic(fps, n, t0, seconds, hop_frac):
    hop = seconds * hop_frac
    frames = [
        VideoFrame(t=t0 + i / fps, duration=1 / fps, image=np.full((1, 1, 3), i % 256, np.uint8)) for i in range(n)
    ]
    ws = list(windows("s", {"video": iter(frames)}, seconds=seconds, hop=hop))
    end = t0 + n / fps
    expected = max(0, math.floor((end - t0 - seconds) / hop + 1e-6) + 1)
    assert len(ws) == expected
    for k, w in enumerate(ws):
        assert w.window_id == k and not w.gap
        inside = [f.t for f in frames if w.t_start - 1e-6 <= f.t < w.t_end - 1e-6]
        assert np.array_equal(w.video_t, inside)
        assert np.array_equal(w.video[:, 0, 0, 0], [round((t - t0) * fps) % 256 for t in inside])


def test_read_points_keeps_what_the_points_adapter_reads():
    """Shipping only the points a model reads changes nothing in its tokens (and so its output)."""
    windows = list(read_windows({"id": "s", "synthetic": {"seed": 4, "seconds": 4}}))[:3]
    # an empty scan in the middle is skipped: the adapter never sees it either
    windows[1].points[-2] = windows[1].points[-2][:0]
    for scans, limit in ((None, 256), (2, 100), (1, 1000), (3, 7)):
        adapter = build_adapter({"kind": "points", "scans": scans, "max_points": limit})
        full = collate(windows)
        copies = [read_points(copy.copy(w), scans, limit) for w in windows]
        small = collate(copies)
        for w in copies:
            assert sum(len(p) for p in w.points) <= limit and len(w.points) == len(w.points_t)
            assert all(len(p) for p in w.points)
        t_ref = full.t_end
        a, ma = adapter(full.modalities["points"], t_ref)
        b, mb = adapter(small.modalities["points"], t_ref)
        n = int(ma.sum(1).max())
        assert torch.equal(ma[:, :n], mb[:, :n]) and torch.equal(a[:, :n][ma[:, :n]], b[:, :n][mb[:, :n]])
