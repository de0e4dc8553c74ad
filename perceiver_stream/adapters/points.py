"""Point-cloud adapter: one token per point, Fourier features of xyz + its own features, no grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perceiver_stream.adapters.base import Adapter, time_channels, time_features
from perceiver_stream.batch import ModalityBatch
from perceiver_stream.fourier import fourier_channels, fourier_features


def subsample(values: torch.Tensor, mask: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``limit`` of each row's valid elements (axis 1), evenly strided, in order.

    Returns ``(B x min(N, limit) x ..., mask)``. Deterministic: the same window gives the same points.
    """
    b, n = mask.shape
    if n <= limit:
        return values, mask
    count = mask.sum(dim=1, keepdim=True)  # B x 1
    j = torch.arange(limit, device=mask.device)[None]  # 1 x limit
    stride = torch.clamp(count.double() / limit, min=1.0)
    idx = torch.floor(j * stride).long().clamp(max=n - 1)
    keep = j < count
    flat = values.reshape(b, n, -1)
    picked = torch.gather(flat, 1, idx[..., None].expand(-1, -1, flat.shape[-1]))
    return picked.reshape(b, limit, *values.shape[2:]), keep & torch.gather(mask, 1, idx)


@dataclass(frozen=True)
class PointsAdapterConfig:
    """Point tokens.

    extent:          coordinate units mapped to 1.0 before the Fourier features (xyz / extent); the
                     default suits the synthetic rig (image-relative units), use e.g. 50 for metres.
    pos_bands:       Fourier bands per axis; frequencies ``linspace(1, max_resolution/2, pos_bands)``.
    feature_channels: per-point features after x, y, z (intensity, ...) used as they are.
    max_points:      at most this many points per window (evenly strided over the real ones).
    """

    kind: str = "points"
    extent: float = 1.0
    pos_bands: int = 8
    max_resolution: int = 64
    feature_channels: int = 1
    max_points: int = 1024
    time_bands: int = 8
    time_period: float = 2.0**17
    time_max_freq: float = 16.0

    def __post_init__(self) -> None:
        if self.extent <= 0:
            raise ValueError("points adapter: extent must be positive")
        if min(self.pos_bands, self.max_resolution, self.max_points, self.time_bands) < 1 or self.feature_channels < 0:
            raise ValueError("points adapter: sizes must be at least 1 (feature_channels at least 0)")


class PointsAdapter(Adapter):
    """Points ``B x P x C`` (x, y, z, features...) -> ``B x P' x out_channels`` tokens:
    ``[Fourier(xyz / extent), features, time code of the point's scan]``."""

    def __init__(self, config: PointsAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.out_channels = (
            fourier_channels(3, config.pos_bands) + config.feature_channels + time_channels(config.time_bands)
        )

    def forward(self, m: ModalityBatch, t_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and their mask."""
        cfg = self.config
        need = 3 + cfg.feature_channels
        if m.values.shape[-1] < need:
            raise ValueError(f"points adapter expects x, y, z + {cfg.feature_channels} feature(s) per point, "
                             f"got {m.values.shape[-1]} channels")
        values, mask = subsample(m.values[..., :need].float(), m.mask, cfg.max_points)
        times, _ = subsample(m.times, m.mask, cfg.max_points)
        pos = fourier_features(values[..., :3] / cfg.extent, cfg.pos_bands, (cfg.max_resolution,) * 3)
        tcode = time_features(times, t_ref, bands=cfg.time_bands, period=cfg.time_period, max_freq=cfg.time_max_freq)
        return torch.cat([pos, values[..., 3:], tcode], dim=-1), mask
