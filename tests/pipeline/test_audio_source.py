"""Audio through PyAV: the same container's track or its own file, resampled, in media time."""

from __future__ import annotations

import numpy as np
import pytest

from clips import AUDIO_AMPLITUDE, write_clip
from pipeline import read_windows
from pipeline.sources.audio import audio_chunks


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    return {
        "aac": write_clip(d / "a.mp4", seconds=3, audio_codec="aac", audio_rate=48000, audio_freq=440),
        "pcm": write_clip(d / "b.mkv", seconds=3, video_codec="libx264", audio_codec="pcm_s16le", audio_rate=22050,
                          audio_freq=1000),
        "wav": write_clip(d / "c.wav", seconds=4, video_codec=None, audio_codec="pcm_s16le", audio_rate=44100,
                          audio_freq=300),
        "stereo": write_clip(d / "d.mkv", seconds=2, video_codec="mpeg4", audio_codec="pcm_s16le", audio_channels=2),
    }


@pytest.mark.parametrize("kind, freq", [("aac", 440), ("pcm", 1000)])
def test_same_track_resampled_and_aligned(clips, kind, freq):
    ws = list(read_windows({"id": "cam0", "video": str(clips[kind]), "audio": "same"}))
    assert len(ws) == 5
    for w in ws:
        assert w.audio.dtype == np.float32 and w.audio.shape == (16000, 1) and w.audio_rate == 16000
        assert w.audio_t0 == pytest.approx(w.t_start, abs=1 / 16000)
        assert abs(peak_hz(w.audio[:, 0], 16000) - freq) < 5
        rms = float(np.sqrt(np.mean(w.audio.astype(np.float64) ** 2)))
        assert rms == pytest.approx(AUDIO_AMPLITUDE / np.sqrt(2), abs=0.05)
        assert w.video is not None and len(w.video) == 25
    # Overlapping windows agree on the samples they share: one continuous resampled signal.
    for a, b in zip(ws, ws[1:]):
        assert np.array_equal(a.audio[8000:], b.audio[:8000])


def test_own_audio_file_longer_than_the_video(clips):
    ws = list(read_windows({"id": "cam0", "video": str(clips["pcm"]), "audio": str(clips["wav"])},
                           audio={"rate": 8000}))
    assert len(ws) == 7  # the 4 s audio file sets the end
    assert [w.has_video for w in ws] == [True] * 6 + [False]  # [2.5, 3.5) still holds frames
    assert all(w.audio.shape == (8000, 1) and abs(peak_hz(w.audio[:, 0], 8000) - 300) < 5 for w in ws)


def test_audio_only_stream_and_channels(clips):
    ws = list(read_windows({"id": "mic", "audio": str(clips["wav"])}, seconds=2.0, hop=1.0))
    assert len(ws) == 3 and all(w.video is None and w.audio.shape == (32000, 1) for w in ws)
    st = list(read_windows({"id": "cam0", "video": str(clips["stereo"]), "audio": "same"}, audio={"channels": 2}))
    assert st and all(w.audio.shape == (16000, 2) for w in st)
    assert np.allclose(st[0].audio[:, 0], st[0].audio[:, 1], atol=1e-3)


def test_chunks_keep_the_first_sample_time(clips):
    chunks = list(audio_chunks(str(clips["wav"]), stream_id="mic", rate=16000))
    assert chunks[0].t == 0.0
    for a, b in zip(chunks, chunks[1:]):
        assert b.t == pytest.approx(a.t + a.duration, abs=1e-9)
    assert sum(len(c.samples) for c in chunks) == pytest.approx(4 * 16000, abs=64)
