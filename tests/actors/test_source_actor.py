"""The source actor without the whole pipeline: its events, pacing and the frames it ships."""

from __future__ import annotations

import time

import numpy as np
import pytest

from actor_inputs import make_cfg, window
from actors.plan import shipped_frames
from actors.source import StreamSource
from pipeline.config import parse_config
from pipeline.errors import DecodeError, SourceReconnected
from pipeline.read import open_stream
from pipeline.window import Window


def fake_open(n: int, fail: bool = False):
    def open_stream(stream_cfg, cfg, *, on_error=None, start_window=0, **shipped):
        for k in range(start_window, start_window + n):
            if k == start_window + 1 and on_error is not None:
                on_error(SourceReconnected("link dropped", stream_id=stream_cfg.id, source="rtsp://x"))
            yield window(stream_cfg.id, k, gap=k == start_window and start_window > 0)
        if fail:
            raise DecodeError("truncated packet", stream_id=stream_cfg.id, source="clip.mp4")

    return open_stream


def test_source_events_windows_errors_and_failure():
    cfg = make_cfg(1)
    src = StreamSource(cfg.streams[0], cfg, start_window=3, open_stream=fake_open(3, fail=True))
    events = [src.next() for _ in range(5)]
    assert [e.window_id for e, _ in events[:3]] == [3, 4, 5]
    assert [w.window_id for _, w in events[:3]] == [3, 4, 5]
    assert [len(e.errors) for e, _ in events[:3]] == [0, 1, 0]
    assert events[1][0].errors[0].kind == "SourceReconnected"
    end, win = events[3]
    assert end.done and win is None and end.failure is not None
    assert end.failure.kind == "DecodeError" and "truncated packet" in end.failure.message
    assert end.failure.window_id == 6
    assert events[4][0].done and events[4][0].failure is None  # the failure is reported once


def test_source_max_windows_and_realtime_pacing():
    cfg = make_cfg(1)
    src = StreamSource(cfg.streams[0], cfg, max_windows=2, open_stream=fake_open(10))
    assert [src.next()[0].window_id for _ in range(3)] == [0, 1, None]
    src = StreamSource(cfg.streams[0], cfg, realtime=True, open_stream=fake_open(3))
    t0 = time.monotonic()
    ids = [src.next()[0].window_id for _ in range(3)]
    assert ids == [0, 1, 2]
    assert time.monotonic() - t0 >= 0.9  # window ends are 0.5 s apart in media time


def _drain(src: StreamSource) -> list[Window]:
    out = []
    while True:
        ev, win = src.next()
        if win is None:
            return out
        out.append(win)


@pytest.mark.parametrize("segment_seconds", [4.0, 0.7])  # 0.7: scene cuts inside most windows
def test_source_ships_only_the_frames_the_model_reads(segment_seconds):
    cfg = parse_config(
        {"streams": [{"id": "s", "synthetic": {"seed": 5, "seconds": 4, "segment_seconds": segment_seconds}}]}
    )
    full = list(open_stream(cfg.streams[0], cfg))
    every = _drain(StreamSource(cfg.streams[0], cfg))
    last = _drain(StreamSource(cfg.streams[0], cfg, start_window=1, video_frames=3))
    assert len(full) == len(every) == 7 and [w.window_id for w in last] == [w.window_id for w in full[1:]]
    assert all(len(w.video) == 25 for w in every)  # a model reading every frame gets every frame
    assert all(w.truth is None for w in every + last)  # ground truth is not shipped to the model
    for a, b in zip(full[1:], last):
        assert b.video.shape == (3, 64, 64, 3) and np.array_equal(a.video[-3:], b.video)  # bit for bit
        assert np.array_equal(a.video_t[-3:], b.video_t) and np.array_equal(a.audio, b.audio)
        assert all(np.array_equal(p, q) for p, q in zip(a.points, b.points))


def test_shipped_frames_keep_two_for_flow_and_all_for_a_model_reading_all():
    assert shipped_frames(None) is None
    assert shipped_frames(1) == 2 and shipped_frames(2) == 2 and shipped_frames(6) == 6


def test_source_open_failure_is_an_event_not_an_exception():
    cfg = make_cfg(1)

    def broken(stream_cfg, cfg, **kw):
        raise DecodeError("not media", stream_id=stream_cfg.id, source="x.mp4")

    ev, win = StreamSource(cfg.streams[0], cfg, open_stream=broken).next()
    assert ev.done and win is None and ev.failure.kind == "DecodeError" and ev.failure.window_id is None
