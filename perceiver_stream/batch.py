"""The tensors a model sees: one padded batch of windows from many streams.

`pipeline.collate(list[Window]) -> Batch` is the only producer; the model actor, training and
eval all go through it, so a model sees the same tensors whichever path fed it.

Modalities are keyed by name (``"video"``, ``"audio"``, ``"points"`` today); the core model
never looks at the names, it looks up the adapter registered under each key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class ModalityBatch:
    """One modality of a batch, padded along axis 1.

    values:  ``B x N x ...`` raw samples (video ``B x T x H x W x 3`` uint8, audio ``B x S x C``
             float32, points ``B x P x C`` float32 with x, y, z first).
    times:   ``B x N`` float64 absolute media time of each element along axis 1 (seconds).
    mask:    ``B x N`` bool, True where the element is real (not padding).
    present: ``B`` bool, False where the window has no data in this modality; such rows must
             contribute nothing to the model's output.
    rate:    samples per second along axis 1 where it is uniform (audio), else None.
    """

    values: torch.Tensor
    times: torch.Tensor
    mask: torch.Tensor
    present: torch.Tensor
    rate: float | None = None

    def to(self, device: torch.device | str) -> "ModalityBatch":
        """Move every tensor to ``device`` (non-blocking where it can be)."""
        return replace(
            self,
            values=self.values.to(device, non_blocking=True),
            times=self.times.to(device, non_blocking=True),
            mask=self.mask.to(device, non_blocking=True),
            present=self.present.to(device, non_blocking=True),
        )


@dataclass
class Targets:
    """Supervision from the synthetic rig, where the windows carry it.

    flow:       ``B x H x W x 2`` float32 forward flow of the window's last two frames (dx, dy px).
    flow_valid: ``B`` bool, False where the window has no truth flow.
    label:      ``B`` int64 class index, -1 where unknown.
    """

    flow: torch.Tensor
    flow_valid: torch.Tensor
    label: torch.Tensor

    def to(self, device: torch.device | str) -> "Targets":
        """Move every tensor to ``device``."""
        return Targets(self.flow.to(device), self.flow_valid.to(device), self.label.to(device))


@dataclass
class Batch:
    """A batch of windows: identity, per-modality tensors and (optionally) targets.

    ``reset`` is True where the stream's latent state must not be carried into this window
    (first window, a gap, a restart).
    """

    stream_ids: list[str]
    window_ids: torch.Tensor  # B int64
    t_start: torch.Tensor  # B float64
    t_end: torch.Tensor  # B float64
    reset: torch.Tensor  # B bool
    modalities: dict[str, ModalityBatch] = field(default_factory=dict)
    targets: Targets | None = None

    def __len__(self) -> int:
        return len(self.stream_ids)

    def to(self, device: torch.device | str) -> "Batch":
        """Move the model inputs (and targets) to ``device``; identity stays on the CPU."""
        return replace(
            self,
            modalities={k: m.to(device) for k, m in self.modalities.items()},
            targets=None if self.targets is None else self.targets.to(device),
        )
