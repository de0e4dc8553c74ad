"""Refinement of a flow estimate by warping, as RAFT's update steps do, with a small CNN.

`FlowRefiner` improves the flow decoder's estimate step by step: frame 2 is warped back by the
current flow, so what is left is a small residual motion, and a convolutional net reads the
warped pair's local correlation (`local_correlation`, radius `RADIUS`), the current flow and both
frames, and adds its correction. The warp and the net read the flow detached (as in RAFT), so no gradient flows
through the sampling positions; the corrections add up, so the first estimate learns from the
refined flow's error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_stream.adapters.video import local_correlation, normalise_frames

# Residual motion left after warping is mostly under a pixel; 2 px covers the first step's misses.
RADIUS = 2
# Flow enters the net divided by this, so its channels are of the order of the frames' ([-1, 1]).
FLOW_NORM = 2.0


def warp(frames: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``frames`` (``B x H x W x C``, any float scale) sampled at ``p + flow(p)`` (``B x H x W x 2`` px,
    dx right, dy down), bilinearly, the border repeated outside the frame: ``B x H x W x C``."""
    _, h, w, _ = frames.shape
    ys = torch.arange(h, dtype=flow.dtype, device=flow.device)
    xs = torch.arange(w, dtype=flow.dtype, device=flow.device)
    gx = (xs[None, None, :] + flow[..., 0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (ys[None, :, None] + flow[..., 1]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(frames.permute(0, 3, 1, 2).to(flow.dtype), grid, mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out.permute(0, 2, 3, 1)


class FlowRefiner(nn.Module):
    """``iterations`` residual updates of a flow ``B x H x W x 2`` (px) between two frames.

    Each step's input per pixel: the `RADIUS` correlation volume of frame 1 and the warped frame 2
    (25 channels), the flow / `FLOW_NORM`, frame 1 and warped frame 2 minus frame 1 (normalised):
    ``(2 RADIUS + 1)^2 + 8`` channels. The net (shared by the steps) is ``layers`` 3x3
    convolutions of ``channels`` (GELU; every other inner one dilated by 2 for a wider view), the
    last one to 2 channels and zero-initialised, so an untrained refiner returns the flow unchanged.
    """

    def __init__(self, iterations: int, channels: int, layers: int = 4) -> None:
        super().__init__()
        self.iterations = iterations
        cin = (2 * RADIUS + 1) ** 2 + 8
        convs: list[nn.Module] = [nn.Conv2d(cin, channels, 3, padding=1), nn.GELU()]
        for i in range(layers - 2):
            d = 2 if i % 2 else 1
            convs += [nn.Conv2d(channels, channels, 3, padding=d, dilation=d), nn.GELU()]
        last = nn.Conv2d(channels, 2, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*convs, last)

    def forward(self, frames: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """``frames``: ``B x 2 x H x W x 3`` (0..255, uint8 or float) on the flow's grid; ``flow``:
        ``B x H x W x 2`` px. Returns the refined flow, same shape and dtype as ``flow``."""
        f1 = frames[:, 0].to(flow.dtype)
        n1 = normalise_frames(f1)
        for _ in range(self.iterations):
            fixed = flow.detach()
            w2 = warp(frames[:, 1], fixed)
            x = torch.cat([local_correlation(f1, w2, RADIUS), fixed / FLOW_NORM, n1, normalise_frames(w2) - n1], dim=-1)
            delta = self.net(x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
            flow = flow + delta.permute(0, 2, 3, 1).to(flow.dtype)
        return flow
