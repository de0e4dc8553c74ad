"""Video through PyAV on clips the tests write: timestamps, frames per window, resize,
decimation, MPEG-TS cut short, every bad-input case, config paths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clips import corrupt, cut_short, frame_index, write_clip
from pipeline import read_windows
from pipeline.config import load_config
from pipeline.errors import DecodeError, MissingStreamError, SourceNotFound, SourceOpenError
from pipeline.read import open_stream


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": write_clip(d / "a.mp4", seconds=3, video_codec="mpeg4", audio_codec="aac", faststart=True),
        "mkv": write_clip(d / "b.mkv", seconds=3, video_codec="libx264", audio_codec="pcm_s16le"),
        "ts": write_clip(d / "c.ts", seconds=4, video_codec="libx264", audio_codec="aac", container_format="mpegts"),
        "silent": write_clip(d / "d.mp4", seconds=2, audio_codec=None),
        "dir": d,
    }


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_frames_and_timestamps(clips, kind):
    ws = list(read_windows({"id": "cam0", "video": str(clips[kind])}, seconds=1.0, hop=0.5))
    assert [w.window_id for w in ws] == list(range(5))  # 3 s at 1.0 / 0.5
    for w in ws:
        assert w.video.shape == (25, 48, 64, 3) and w.video.dtype == np.uint8
        first = math.ceil(w.t_start * 25 - 1e-6)
        assert np.allclose(w.video_t, (first + np.arange(25)) / 25)
        assert [frame_index(im) for im in w.video] == list(range(first, first + 25))
        assert w.audio is None and w.points is None and not w.gap


def test_resize_and_decimation_at_decode_time(clips):
    ws = list(read_windows({"id": "cam0", "video": str(clips["mp4"])}, video={"size": [24, 32], "fps": 10}))
    assert len(ws) == 5
    for w in ws:
        assert w.video.shape[1:] == (24, 32, 3)
        slots = np.floor(w.video_t * 10 + 1e-6)
        assert len(w.video) == 10 and len(set(slots)) == len(slots)  # one frame per 0.1 s slot
        assert [frame_index(im) for im in w.video] == [round(t * 25) for t in w.video_t]


def test_deterministic(clips):
    spec = {"id": "cam0", "video": str(clips["mkv"]), "audio": "same"}
    a, b = list(read_windows(spec)), list(read_windows(spec))
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert x.video.tobytes() == y.video.tobytes() and x.audio.tobytes() == y.audio.tobytes()
        assert x.video_t.tobytes() == y.video_t.tobytes() and x.audio_t0 == y.audio_t0


def test_mpegts_cut_short_gives_the_windows_it_holds(clips, tmp_path):
    full = list(read_windows({"id": "ts", "video": str(clips["ts"]), "audio": "same"}))
    cut = cut_short(clips["ts"], tmp_path / "cut.ts", 0.5)
    part = list(read_windows({"id": "ts", "video": str(cut), "audio": "same"}))
    assert 1 <= len(part) < len(full) == 7
    for a, b in zip(full, part):
        assert a.window_id == b.window_id and np.array_equal(a.video_t, b.video_t)
        assert [frame_index(im) for im in b.video] == [round((t - b.video_t[0]) * 25) + frame_index(b.video[0])
                                                       for t in b.video_t]
    assert part[0].video_t[0] == pytest.approx(full[0].video_t[0])


def test_truncated_mp4_raises_after_its_windows(clips, tmp_path):
    cut = cut_short(clips["mp4"], tmp_path / "cut.mp4", 0.5)
    got = []
    with pytest.raises(DecodeError, match="truncated") as e:
        for w in read_windows({"id": "cam0", "video": str(cut)}):
            got.append(w)
    assert got and got[-1].t_end <= 2.0
    assert "cam0" in str(e.value) and str(cut) in str(e.value)


def test_mp4_without_its_index_cannot_be_opened(clips, tmp_path):
    src = write_clip(tmp_path / "tail.mp4", seconds=2)  # index (moov) at the end
    cut = cut_short(src, tmp_path / "tail_cut.mp4", 0.6)
    with pytest.raises(SourceOpenError, match="not a readable media container"):
        list(read_windows({"id": "cam0", "video": str(cut)}))


def test_corrupt_packets_are_reported_and_skipped(clips, tmp_path):
    bad = corrupt(clips["mp4"], tmp_path / "bad.mp4", start=0.4, length=3000)
    errors = []
    try:
        ws = list(read_windows({"id": "cam0", "video": str(bad)}, on_error=errors.append))
    except DecodeError as e:  # a corruption that ends the stream is raised instead
        errors.append(e)
        ws = []
    assert errors and all(isinstance(e, DecodeError) and e.stream_id == "cam0" for e in errors)
    assert all(str(bad) in str(e) for e in errors)
    assert all(np.all(np.diff(w.video_t) > 0) for w in ws)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda d: d / "missing.mp4", SourceNotFound, "no such file"),
        (lambda d: _write(d / "zero.mp4", b""), SourceOpenError, "empty"),
        (lambda d: _write(d / "notes.mp4", b"not a video\n" * 50), SourceOpenError, "not a readable media container"),
        (lambda d: d, SourceOpenError, "folder"),
    ],
)
def test_bad_files(tmp_path, make, error, words):
    path = make(tmp_path)
    with pytest.raises(error, match=words) as e:
        list(read_windows({"id": "cam9", "video": str(path)}))
    assert "cam9" in str(e.value) and str(path) in str(e.value)


def test_audio_same_on_a_silent_video(clips):
    with pytest.raises(MissingStreamError, match="no audio stream") as e:
        list(read_windows({"id": "cam0", "video": str(clips["silent"]), "audio": "same"}))
    assert e.value.source == str(clips["silent"])


def test_read_windows_paths_are_relative_to_the_working_directory(clips, monkeypatch):
    monkeypatch.chdir(clips["dir"])
    assert len(list(read_windows({"id": "cam0", "video": clips["mkv"].name}))) == 5


def test_open_stream_paths_are_relative_to_the_config_file(clips, tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "cam.mkv").write_bytes(clips["mkv"].read_bytes())
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("streams:\n  - {id: cam0, video: media/cam.mkv, audio: same}\nvideo: {size: [16, 16]}\n")
    cfg = load_config(cfg_file)
    ws = list(open_stream(cfg.streams[0], cfg, start_window=2))
    assert [w.window_id for w in ws] == [2, 3, 4] and ws[0].gap and not ws[1].gap
    assert ws[0].video.shape == (25, 16, 16, 3) and ws[0].audio.shape == (16000, 1)


def test_synthetic_stream_through_read_windows():
    ws = list(read_windows({"id": "sim0", "synthetic": {"seed": 3, "seconds": 3}}, video={"size": [32, 32], "fps": 10}))
    assert len(ws) == 5
    for w in ws:
        assert w.video.shape == (10, 32, 32, 3) and w.has_audio and w.has_points and w.truth is not None
        assert w.truth.flow is None or w.truth.flow.shape == (32, 32, 2)
