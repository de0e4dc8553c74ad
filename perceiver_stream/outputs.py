"""What the streaming model returns for a `Batch`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """Per-window outputs of a streaming Perceiver IO.

    embedding:    ``B x D`` float32 pooled-latent embedding.
    label_logits: ``B x K`` float32 class scores (before softmax).
    flow:         ``B x H x W x 2`` float32 forward flow of each window's last two frames in pixels
                  of the decoded grid (dx right, dy down), or None when no window has two frames.
    flow_valid:   ``B`` bool, False where the window had fewer than two frames (no flow row).
    state:        ``B x M x C`` latents that end each window, to seed the stream's next window.
    group_logits: ``B x G x K`` class scores that each latent group's label read alone gives (the
                  shared latents, then each modality's own; training supervises them too), or None
                  without a label decoder.
    group_valid:  ``B x G`` bool, False where a group's modality is absent from the window.
    """

    embedding: torch.Tensor
    label_logits: torch.Tensor
    flow: torch.Tensor | None
    flow_valid: torch.Tensor
    state: torch.Tensor
    group_logits: torch.Tensor | None = None
    group_valid: torch.Tensor | None = None
