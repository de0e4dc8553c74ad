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
    local_k:         with k > 0, 3 more channels: the point minus the centroid of its k nearest
                     neighbours (in x, y), over their mean distance; flat surfaces give ~0, curved
                     ones not (a per-point shape cue a linear encoder cannot build). 0 = off.
    """

    kind: str = "points"
    extent: float = 1.0
    pos_bands: int = 8
    max_resolution: int = 64
    feature_channels: int = 1
    max_points: int = 1024
    local_k: int = 0
    time_bands: int = 8
    time_period: float = 2.0**17
    time_max_freq: float = 16.0

    def __post_init__(self) -> None:
        if self.extent <= 0:
            raise ValueError("points adapter: extent must be positive")
        if min(self.pos_bands, self.max_resolution, self.max_points, self.time_bands) < 1 or min(
                self.feature_channels, self.local_k) < 0:
            raise ValueError("points adapter: sizes must be at least 1 (feature_channels, local_k at least 0)")


def local_offsets(xyz: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Each point minus the centroid of its ``k`` nearest valid neighbours in (x, y), divided by
    their mean (x, y) distance: ``B x P x 3`` -> ``B x P x 3`` (zeros where a row has < 2 points)."""
    b, p, _ = xyz.shape
    k = min(k, p - 1)
    if k < 1:
        return torch.zeros_like(xyz)
    d = torch.cdist(xyz[..., :2], xyz[..., :2])  # B x P x P
    eye = torch.eye(p, dtype=torch.bool, device=xyz.device)
    d = d.masked_fill(~mask[:, None, :] | eye, float("inf"))
    dist, idx = d.topk(k, dim=-1, largest=False)  # B x P x k
    real = torch.isfinite(dist)
    nbr = torch.gather(xyz[:, None].expand(b, p, p, 3), 2, idx[..., None].expand(b, p, k, 3))
    count = real.sum(-1, keepdim=True).clamp(min=1)
    centroid = (nbr * real[..., None]).sum(2) / count
    scale = torch.where(real, dist, 0.0).sum(-1, keepdim=True) / count
    out = (xyz - centroid) / (scale + 1e-6)
    return torch.where((real.any(-1) & mask)[..., None], out, 0.0)


class PointsAdapter(Adapter):
    """Points ``B x P x C`` (x, y, z, features...) -> ``B x P' x out_channels`` tokens:
    ``[Fourier(xyz / extent), features, time code of the point's scan]``, then with ``local_k`` the
    3 channels of `local_offsets`."""

    def __init__(self, config: PointsAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.out_channels = (
            fourier_channels(3, config.pos_bands) + config.feature_channels + time_channels(config.time_bands)
            + (3 if config.local_k else 0)
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
        parts = [pos, values[..., 3:], tcode]
        if cfg.local_k:
            parts.append(local_offsets(values[..., :3], mask, cfg.local_k))
        return torch.cat(parts, dim=-1), mask
