"""Log-mel spectrograms on ``torch.stft``, following torchaudio's ``MelSpectrogram`` conventions.

torchaudio is not a dependency (see DESIGN.md), so this reproduces what
``torchaudio.transforms.MelSpectrogram(sample_rate, n_fft, hop_length=..., n_mels=..., f_min, f_max)``
computes with its defaults: a periodic Hann window of ``n_fft`` samples, ``center=True`` with reflect
padding, power 2, a triangular filter bank on the HTK mel scale with ``norm=None`` (torchaudio's
``melscale_fbanks(..., norm=None, mel_scale="htk")``). The log is taken with a floor.
"""

from __future__ import annotations

import torch
from torch import nn


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    """Inverse of ``hz_to_mel``."""
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filter_bank(
    n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Triangular HTK-mel filters without normalisation: ``n_freqs x n_mels``.

    ``n_freqs`` bins evenly spaced on ``[0, sample_rate // 2]`` (``n_fft // 2 + 1`` for a one-sided
    STFT); ``n_mels + 2`` points evenly spaced in mel between ``f_min`` and ``f_max`` give the
    filters' edges and peaks. Computed in float64, then cast.
    """
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    m = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
        float(hz_to_mel(torch.tensor(f_max, dtype=torch.float64))),
        n_mels + 2,
        dtype=torch.float64,
    )
    edges = mel_to_hz(m)  # n_mels + 2
    width = edges[1:] - edges[:-1]  # n_mels + 1
    ramps = edges[None, :] - freqs[:, None]  # n_freqs x (n_mels + 2)
    rising = -ramps[:, :-2] / width[:-1]
    falling = ramps[:, 2:] / width[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(dtype)


class MelSpectrogram(nn.Module):
    """``B x S`` waveform -> ``B x frames x n_mels`` log-mel (natural log of power, floored).

    ``frames = S // hop_length + 1`` (centred frames); frame ``i`` is centred on sample
    ``i * hop_length``. Window and filter bank are non-persistent buffers: they follow the module
    to its device but are not saved in checkpoints (the config rebuilds them).
    """

    def __init__(
        self,
        sample_rate: int,
        *,
        n_fft: int = 400,
        hop_length: int | None = None,
        n_mels: int = 40,
        f_min: float = 0.0,
        f_max: float | None = None,
        floor: float = 1e-10,
        log: bool = True,
    ) -> None:
        super().__init__()
        self.sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length or n_fft // 2)
        self.floor = float(floor)
        self.log = log
        f_max = float(sample_rate) / 2 if f_max is None else float(f_max)
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True), persistent=False)
        self.register_buffer(
            "fbank", mel_filter_bank(self.n_fft // 2 + 1, f_min, f_max, n_mels, self.sample_rate), persistent=False
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Mel power (or its log) of each row of ``wave`` (``B x S`` float)."""
        if wave.shape[-1] <= self.n_fft // 2:
            raise ValueError(
                f"audio of {wave.shape[-1]} samples is too short for reflect padding with n_fft={self.n_fft}"
                f" (need more than {self.n_fft // 2})"
            )
        # STFT in float32 even under autocast: power spectra overflow bf16's precision badly.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(
                wave.float(),
                self.n_fft,
                hop_length=self.hop_length,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )  # B x F x frames
            power = spec.real.square() + spec.imag.square()
            mel = torch.matmul(power.transpose(-1, -2), self.fbank)  # B x frames x n_mels
            return torch.log(torch.clamp(mel, min=self.floor)) if self.log else mel

    def num_frames(self, num_samples: int) -> int:
        """Frames ``forward`` returns for ``num_samples`` samples."""
        return num_samples // self.hop_length + 1
