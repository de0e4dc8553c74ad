"""Audio adapter: log-mel frames with their media-time code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from perceiver_stream.adapters.base import Adapter, time_channels, time_features
from perceiver_stream.batch import ModalityBatch
from perceiver_stream.mel import MelSpectrogram


def _group(x: torch.Tensor, size: int) -> torch.Tensor:
    """``B x N x ...`` -> ``B x ceil(N/size) x size x ...``, zero-padding the tail."""
    n = x.shape[1]
    pad = (-n) % size
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    return x.reshape(x.shape[0], (n + pad) // size, size, *x.shape[2:])


def _check_rate(m: ModalityBatch, rate: int, kind: str) -> None:
    if m.rate is not None and int(round(m.rate)) != rate:
        raise ValueError(
            f"{kind} adapter expects audio at {rate} Hz but the batch has {m.rate:g} Hz: "
            "resample at decode time (audio.rate) or build the model with this rate"
        )


@dataclass(frozen=True)
class LogMelConfig:
    """Log-mel tokens: ``frames_per_token`` consecutive mel frames (torchaudio conventions, see
    ``perceiver_stream.mel``) form one token; values are ``log(max(mel, floor)) / log_scale``.
    Channels are averaged before the STFT.
    """

    kind: str = "audio_mel"
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    f_min: float = 0.0
    f_max: float | None = None
    floor: float = 1e-6
    log_scale: float = 10.0
    frames_per_token: int = 2
    time_bands: int = 8
    time_period: float = 2.0**17
    time_max_freq: float = 16.0

    def __post_init__(self) -> None:
        if min(self.sample_rate, self.n_fft, self.hop_length, self.n_mels, self.frames_per_token, self.time_bands) < 1:
            raise ValueError("audio_mel adapter: sizes must be at least 1")
        if self.floor <= 0 or self.log_scale <= 0:
            raise ValueError("audio_mel adapter: floor and log_scale must be positive")


class LogMelAdapter(Adapter):
    """Audio ``B x S x C`` -> tokens of ``[frames_per_token * n_mels log-mel, time code]``.

    Frame ``i`` is centred on sample ``i * hop_length`` (its time is that sample's time, and it is
    real when that sample is). Padding samples are zeroed first so they cannot leak into real frames.
    """

    def __init__(self, config: LogMelConfig) -> None:
        super().__init__()
        self.config = config
        self.mel = MelSpectrogram(
            config.sample_rate,
            n_fft=config.n_fft,
            hop_length=config.hop_length,
            n_mels=config.n_mels,
            f_min=config.f_min,
            f_max=config.f_max,
            floor=config.floor,
        )
        self.out_channels = config.frames_per_token * config.n_mels + time_channels(config.time_bands)

    def forward(self, m: ModalityBatch, t_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``B x N x out_channels`` and their mask."""
        cfg = self.config
        _check_rate(m, cfg.sample_rate, cfg.kind)
        wave = torch.where(m.mask, m.values.float().mean(dim=-1), 0.0)
        if wave.shape[1] <= cfg.n_fft // 2:
            # Too short to reflect-pad (a nearly empty window): pad with silence, masked anyway.
            wave = F.pad(wave, (0, cfg.n_fft // 2 + 1 - wave.shape[1]))
        logmel = self.mel(wave) / cfg.log_scale  # B x F x n_mels
        centres = torch.arange(0, logmel.shape[1] * cfg.hop_length, cfg.hop_length, device=wave.device)
        inside = centres < m.mask.shape[1]
        centres = centres.clamp(max=m.mask.shape[1] - 1)
        fmask = m.mask[:, centres] & inside[None]
        ftimes = m.times[:, centres]
        k = cfg.frames_per_token
        feats = _group(logmel, k).flatten(2)
        times, mask = ftimes[:, ::k], fmask[:, ::k]
        tcode = time_features(times, t_ref, bands=cfg.time_bands, period=cfg.time_period, max_freq=cfg.time_max_freq)
        return torch.cat([feats, tcode], dim=-1), mask
