"""What every modality adapter shares: the interface and the media-time code of its tokens."""

from __future__ import annotations

import torch
from torch import nn

from perceiver_stream.batch import ModalityBatch
from perceiver_stream.fourier import time_fourier_features


def time_channels(time_bands: int) -> int:
    """Channels ``time_features`` adds: sin/cos per band plus the time relative to the window end."""
    return 2 * time_bands + 1


def time_features(
    times: torch.Tensor, t_ref: torch.Tensor, *, bands: int, period: float, max_freq: float
) -> torch.Tensor:
    """Media-time code of each element: ``B x N`` seconds -> ``B x N x time_channels(bands)`` float32.

    The absolute sliding-window code (same code for the same instant in every window, exact for
    streams that run for days) is followed by one channel ``t - t_ref`` (seconds before the window's
    end): absolute codes alone do not tell a set-based encoder which frame is the latest.
    """
    codes = time_fourier_features(times, bands, period=period, max_freq=max_freq)
    rel = (times.to(torch.float64) - t_ref.to(device=times.device, dtype=torch.float64)[:, None]).float()
    return torch.cat([codes, rel[..., None]], dim=-1)


class Adapter(nn.Module):
    """Turns one modality of a batch into tokens on the model's device.

    ``forward(m, t_ref)`` returns ``(tokens B x N x (out_channels + private_channels) float32,
    mask B x N bool)``; ``mask`` is True where the token is real. Rows where ``m.present`` is
    False may hold anything: the multimodal preprocessor masks them out.
    """

    out_channels: int
    pool_channels: tuple[int, int] | None = None
    """The slice of ``forward``'s channels that describe what is at a token's place, without its
    position or time code: what a max-pool over the tokens may read (None = not poolable)."""
    private_channels: int = 0
    """Channels ``forward`` appends after the ``out_channels`` token channels for pooled reads
    alone (the ``pool_channels`` are then these): the multimodal preprocessor cuts them off the tokens."""

    def forward(self, m: ModalityBatch, t_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        raise NotImplementedError

    def pool_parameters(self) -> list[nn.Parameter]:
        """The layers' parameters that make the ``pool_channels`` (none where those are raw input)."""
        return []


def gather_last(values: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``n`` valid elements along axis 1 of each row (padding sits at the end).

    Returns ``(B x n x ..., B x n bool)``; rows with fewer than ``n`` valid elements are
    right-aligned (their real elements last) and the missing slots are marked False.
    """
    count = mask.sum(dim=1)  # B
    same = int(count[0]) if count.numel() and bool((count == count[0]).all()) else -1
    if same >= n:  # the usual batch: every row as long, so a slice (a gather of frames costs ~0.2 ms)
        return values[:, same - n : same], torch.ones(values.shape[0], n, dtype=torch.bool, device=mask.device)
    idx = count[:, None] - n + torch.arange(n, device=mask.device)  # B x n
    valid = idx >= 0
    idx = idx.clamp(min=0)
    flat = values.reshape(values.shape[0], values.shape[1], -1)
    picked = torch.gather(flat, 1, idx[..., None].expand(-1, -1, flat.shape[-1]))
    return picked.reshape(values.shape[0], n, *values.shape[2:]), valid
