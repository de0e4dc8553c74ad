"""Point-cloud adapter: one token per point, Fourier features of xyz + its own features, no grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

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


def last_scans(values: torch.Tensor, times: torch.Tensor, mask: torch.Tensor, n: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row's points of its last ``n`` scans (a scan = a run of equal times; points are in
    time order with padding at the end), moved to the front: ``(values, times, mask)``, trimmed to
    the longest row."""
    same = torch.zeros_like(mask)
    same[:, 1:] = times[:, 1:] == times[:, :-1]
    scan = torch.cumsum(mask & ~same, dim=1)  # 1-based scan number of each point
    keep = mask & (scan > scan.amax(dim=1, keepdim=True) - n)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
    width = max(int(keep.sum(dim=1).max()), 1)
    order = order[:, :width]
    picked = torch.gather(values, 1, order[..., None].expand(-1, -1, values.shape[-1]))
    return picked, torch.gather(times, 1, order), torch.gather(keep, 1, order)


@dataclass(frozen=True)
class PointsAdapterConfig:
    """Point tokens.

    extent:          coordinate units mapped to 1.0 before the Fourier features (xyz / extent); the
                     default suits the synthetic rig (image-relative units), use e.g. 50 for metres.
    pos_bands:       Fourier bands per axis; frequencies ``linspace(1, max_resolution/2, pos_bands)``.
    feature_channels: per-point features after x, y, z (intensity, ...) used as they are.
    scans:           use only each window's last ``scans`` scans (None = all of them): a surface is
                     seen densely in one scan, while a moving object smears over many.
    max_points:      at most this many points per window (evenly strided over the real ones).
    local_k:         with k > 0, ``local_channels`` more channels: `EdgeFeatures` of the k nearest
                     neighbours, a learned local-shape cue (flat face, edge, curved surface). 0 = off.
    local_channels:  width of those features.
    global_pool:     also append to every point the maximum of each local feature over the window's
                     points (PointNet's global feature): what one object's surface looks like reaches
                     every token.
    curvature_k:     with k > 0, ``curvature_bins`` more channels: the point's surface variation over
                     its k nearest neighbours (`surface_variation`) as a soft one-hot over log-spaced
                     bins from 1e-3 to 1/3, so that the encoder's attention-weighted mean of tokens
                     is a histogram of the window's curvature (a flat face and a sphere differ
                     there). 0 = off.
    curvature_bins:  bins of that histogram.
    """

    kind: str = "points"
    extent: float = 1.0
    pos_bands: int = 8
    max_resolution: int = 64
    feature_channels: int = 1
    scans: int | None = None
    max_points: int = 1024
    local_k: int = 0
    local_channels: int = 32
    global_pool: bool = False
    curvature_k: int = 0
    curvature_bins: int = 8
    time_bands: int = 8
    time_period: float = 2.0**17
    time_max_freq: float = 16.0

    def __post_init__(self) -> None:
        if self.extent <= 0:
            raise ValueError("points adapter: extent must be positive")
        if min(self.pos_bands, self.max_resolution, self.max_points, self.time_bands, self.local_channels,
               self.curvature_bins) < 1 or min(self.feature_channels, self.local_k, self.curvature_k) < 0:
            raise ValueError("points adapter: sizes must be at least 1 (feature_channels, local_k, curvature_k at least 0)")
        if self.scans is not None and self.scans < 1:
            raise ValueError("points adapter: scans must be at least 1 (or null for all scans)")
        if self.global_pool and not self.local_k:
            raise ValueError("points adapter: global_pool needs local features (local_k > 0)")


def neighbour_offsets(xyz: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets from each point to its ``k`` nearest valid neighbours (3-D), over their mean length.

    ``B x P x 3`` -> ``(B x P x k x 3, B x P x k bool valid)``. Dividing by the mean neighbour
    distance makes the pattern independent of the object's size and the scan's density.
    """
    b, p, _ = xyz.shape
    k = max(min(k, p - 1), 0)
    d = torch.cdist(xyz, xyz)  # B x P x P
    eye = torch.eye(p, dtype=torch.bool, device=xyz.device)
    d = d.masked_fill(~mask[:, None, :] | eye, float("inf"))
    dist, idx = d.topk(k, dim=-1, largest=False)  # B x P x k
    valid = torch.isfinite(dist) & mask[..., None]
    nbr = torch.gather(xyz[:, None].expand(b, p, p, 3), 2, idx[..., None].expand(b, p, k, 3))
    scale = torch.where(valid, dist, 0.0).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    off = (nbr - xyz[:, :, None]) / (scale[..., None] + 1e-6)
    return torch.where(valid[..., None], off, 0.0), valid


def surface_variation(xyz: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's surface variation (Pauly et al. 2002) over itself and its ``k`` nearest valid
    neighbours: ``l0 / (l0 + l1 + l2)`` for the eigenvalues ``l0 <= l1 <= l2`` of their covariance.

    ``B x P x 3`` -> ``B x P`` in ``[0, 1/3]``: 0 on a plane, growing with curvature relative to the
    neighbourhood's size (so independent of scale); 0 for padding and points without neighbours.
    """
    off, valid = neighbour_offsets(xyz, mask, k)  # the ratio does not depend on their scale
    pts = torch.cat([torch.zeros_like(off[:, :, :1]), off], dim=2)  # the point itself: offset 0
    ok = torch.cat([mask[..., None], valid], dim=2)[..., None]
    n = ok.sum(2, keepdim=True).clamp(min=1)
    centred = torch.where(ok, pts - pts.sum(2, keepdim=True) / n, 0.0)  # invalid offsets are 0
    cov = centred.transpose(-1, -2) @ centred / n
    # a tiny isotropic term keeps eigvalsh well-conditioned on repeated points
    eig = torch.linalg.eigvalsh(cov.double() + 1e-12 * torch.eye(3, dtype=torch.float64, device=xyz.device))
    var = (eig[..., 0] / eig.sum(-1)).float()
    return torch.where(mask & (n[..., 0, 0] > 2), var, 0.0)


def soft_bins(x: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """``x`` as ``bins`` triangular weights summing to 1: linear interpolation between the two
    nearest bin centres ``linspace(low, high, bins)``, values outside clamped to the end bins
    (``... -> ... x bins``)."""
    pos = ((x - low) / (high - low)).clamp(0, 1) * (bins - 1)
    centres = torch.arange(bins, device=x.device, dtype=x.dtype)
    return (1 - (pos[..., None] - centres).abs()).clamp(min=0)


class EdgeFeatures(nn.Module):
    """A learned local-shape feature per point (EdgeConv, Wang et al. 2019): ``h = max_j MLP(x_j - x_i)``
    over the ``k`` nearest neighbours ``j`` of point ``i``, then ``h + MLP(h)``. A flat face, an edge
    and a curved surface give different neighbour patterns, which Fourier features of absolute
    positions do not expose to the encoder's linear projections."""

    def __init__(self, k: int, channels: int) -> None:
        super().__init__()
        self.k = k
        self.mlp = nn.Sequential(nn.Linear(3, channels), nn.GELU(), nn.Linear(channels, channels))
        # per point, after the max over neighbours: features that compare neighbours (is the whole
        # neighbourhood flat?) need a nonlinearity of the pooled vector
        self.point_mlp = nn.Sequential(nn.GELU(), nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels))

    def forward(self, xyz: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``B x P x 3`` points and ``B x P`` mask -> ``B x P x channels`` (zeros without neighbours)."""
        off, valid = neighbour_offsets(xyz, mask, self.k)
        has = valid.any(-1)[..., None]
        h = torch.where(has, self.mlp(off).masked_fill(~valid[..., None], float("-inf")).amax(dim=2), 0.0)
        return torch.where(has, h + self.point_mlp(h), 0.0)


class PointsAdapter(Adapter):
    """Points ``B x P x C`` (x, y, z, features...) -> ``B x P' x out_channels`` tokens:
    ``[Fourier(xyz / extent), features, time code of the point's scan]``, then with ``curvature_k``
    its binned `surface_variation`, then with ``local_k`` the `EdgeFeatures` of each point (and with
    ``global_pool`` their maxima over the window)."""

    def __init__(self, config: PointsAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.out_channels = (
            fourier_channels(3, config.pos_bands) + config.feature_channels + time_channels(config.time_bands)
            + (config.local_channels * (2 if config.global_pool else 1) if config.local_k else 0)
            + (config.curvature_bins if config.curvature_k else 0)
        )
        self.local = EdgeFeatures(config.local_k, config.local_channels) if config.local_k else None

    def forward(self, m: ModalityBatch, t_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and their mask."""
        cfg = self.config
        need = 3 + cfg.feature_channels
        if m.values.shape[-1] < need:
            raise ValueError(f"points adapter expects x, y, z + {cfg.feature_channels} feature(s) per point, "
                             f"got {m.values.shape[-1]} channels")
        values, times, mask = m.values[..., :need].float(), m.times, m.mask
        if cfg.scans is not None:
            values, times, mask = last_scans(values, times, mask, cfg.scans)
        values, kept = subsample(values, mask, cfg.max_points)
        times, _ = subsample(times, mask, cfg.max_points)
        mask = kept
        pos = fourier_features(values[..., :3] / cfg.extent, cfg.pos_bands, (cfg.max_resolution,) * 3)
        tcode = time_features(times, t_ref, bands=cfg.time_bands, period=cfg.time_period, max_freq=cfg.time_max_freq)
        parts = [pos, values[..., 3:], tcode]
        xyz = torch.where(mask[..., None], values[..., :3], 0.0)  # padding / NaN rows must not reach cdist
        if cfg.curvature_k:
            # log scale: a face's points sit near 1e-3, a sphere's near 1e-2, an edge's near 1e-1
            var = torch.log10(surface_variation(xyz, mask, cfg.curvature_k).clamp(min=1e-3))
            curv = soft_bins(var, cfg.curvature_bins, -3.0, math.log10(1.0 / 3.0))
            parts.append(torch.where(mask[..., None], curv, 0.0))
        if self.local is not None:
            local = self.local(xyz, mask)
            parts.append(local)
            if cfg.global_pool:
                pooled = local.masked_fill(~mask[..., None], float("-inf")).amax(dim=1, keepdim=True)
                pooled = torch.where(mask.any(1)[:, None, None], pooled, 0.0)
                parts.append(pooled.expand_as(local))
        return torch.cat(parts, dim=-1), mask
