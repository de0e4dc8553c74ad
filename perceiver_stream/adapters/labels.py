"""Label adapter: class indices as one-hot tokens (Perceiver IO's label modality), with time codes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from perceiver_stream.adapters.base import Adapter, time_channels, time_features
from perceiver_stream.batch import ModalityBatch


@dataclass(frozen=True)
class LabelAdapterConfig:
    """One token per label: ``values`` are ``B x N`` int64 class indices in ``[0, num_classes)``."""

    kind: str = "labels"
    num_classes: int = 2
    time_bands: int = 8
    time_period: float = 2.0**17
    time_max_freq: float = 16.0

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.time_bands < 1:
            raise ValueError("labels adapter: num_classes and time_bands must be at least 1")


class LabelAdapter(Adapter):
    """Labels ``B x N`` int -> ``B x N x (num_classes + time)`` one-hot tokens."""

    def __init__(self, config: LabelAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.out_channels = config.num_classes + time_channels(config.time_bands)

    def forward(self, m: ModalityBatch, t_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and their mask; out-of-range indices in real rows raise ValueError."""
        cfg = self.config
        labels = m.values.long()
        real = m.mask & m.present[:, None]
        if bool(((labels < 0) | (labels >= cfg.num_classes))[real].any()):
            raise ValueError(f"labels adapter: class index outside [0, {cfg.num_classes})")
        onehot = F.one_hot(labels.clamp(0, cfg.num_classes - 1), cfg.num_classes).float()
        tcode = time_features(m.times, t_ref, bands=cfg.time_bands, period=cfg.time_period, max_freq=cfg.time_max_freq)
        return torch.cat([onehot, tcode], dim=-1), m.mask
