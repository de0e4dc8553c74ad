"""Log-mel features against independent references: librosa's HTK filter bank and a numpy STFT."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from perceiver_stream.mel import MelSpectrogram, hz_to_mel, mel_filter_bank, mel_to_hz


@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmin", "fmax"),
    [(16000, 400, 40, 0.0, 8000.0), (22050, 512, 64, 30.0, 9000.0), (8000, 256, 23, 0.0, 4000.0)],
)
def test_filter_bank_matches_librosa_htk(sr, n_fft, n_mels, fmin, fmax):
    ours = mel_filter_bank(n_fft // 2 + 1, fmin, fmax, n_mels, sr, dtype=torch.float64).numpy()
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=True, norm=None,
                              dtype=np.float64)
    assert ours.shape == (n_fft // 2 + 1, n_mels)
    np.testing.assert_allclose(ours, ref.T, atol=1e-6)


def test_mel_scale_round_trip():
    f = torch.tensor([0.0, 440.0, 1000.0, 7999.0], dtype=torch.float64)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)).numpy(), f.numpy(), atol=1e-9)
    np.testing.assert_allclose(hz_to_mel(f).numpy(), librosa.hz_to_mel(f.numpy(), htk=True), rtol=1e-10)


def reference_log_mel(x: np.ndarray, sr: int, n_fft: int, hop: int, n_mels: int, floor: float) -> np.ndarray:
    """numpy: reflect-pad by n_fft/2, periodic Hann, |rfft|^2, librosa HTK filters, log with a floor."""
    padded = np.pad(x, n_fft // 2, mode="reflect")
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    frames = np.stack([padded[i:i + n_fft] for i in range(0, len(padded) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=True, norm=None, dtype=np.float64)
    return np.log(np.maximum(power @ fb.T, floor))


@pytest.mark.parametrize(("n", "hop"), [(4000, 160), (4321, 100)])
def test_log_mel_matches_numpy_reference(n, hop):
    rng = np.random.default_rng(0)
    sr = 16000
    t = np.arange(n) / sr
    x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(n)
    mel = MelSpectrogram(sr, n_fft=400, hop_length=hop, n_mels=40, floor=1e-10)
    ours = mel(torch.from_numpy(x.astype(np.float32))[None])[0].double().numpy()
    ref = reference_log_mel(x, sr, 400, hop, 40, 1e-10)
    assert ours.shape == ref.shape == (mel.num_frames(n), 40)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_floor_and_power_output():
    mel = MelSpectrogram(8000, n_fft=128, hop_length=64, n_mels=10, floor=1e-4)
    silent = mel(torch.zeros(1, 1000))
    assert torch.allclose(silent, torch.full_like(silent, float(np.log(1e-4))))
    power = MelSpectrogram(8000, n_fft=128, n_mels=10, log=False)(torch.randn(2, 1000))
    assert power.shape == (2, 1000 // 64 + 1, 10) and (power >= 0).all()


def test_too_short_or_bad_band_raises():
    with pytest.raises(ValueError, match="too short"):
        MelSpectrogram(16000, n_fft=400)(torch.zeros(1, 100))
    with pytest.raises(ValueError, match="f_max"):
        MelSpectrogram(16000, f_max=9000.0)
