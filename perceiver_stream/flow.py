"""Optical flow between two real frames of any size with a Perceiver IO flow model.

Does what DeepMind's optical-flow colab does around the network:

1. normalise RGB to [-1, 1] (``x / 255 * 2 - 1``);
2. cut the frames into tiles of the model's training size (368 x 496 for the published model)
   that overlap by at least ``min_overlap`` pixels;
3. per tile, extract each pixel's 3 x 3 neighbourhood of both frames (zero padded at the tile's
   border), channels ordered (row, column, RGB): ``1 x 2 x 27 x h x w``;
4. blend the tiles' outputs with weights that fall off linearly towards each tile's edges
   (``min(distance to the nearest edge + 1)``), so seams do not show;
5. scale the output to pixels (DeepMind trains with targets divided by ``FLOW_SCALE_FACTOR = 20``).

Tile origins are spread evenly over the frame (the colab's ``range`` steps can run past the
frame's edge for some sizes). Frames smaller than a tile are resized up to the tile, and the flow
is resized back and rescaled to the original pixel grid.

The result is ``H x W x 2`` float32, ``(dx right, dy down)`` in pixels, on the first frame's grid.
`estimate_flows` does the same for a batch of frame pairs, their tiles sharing forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

FLOW_SCALE_FACTOR = 20.0


def normalize_frame(frame: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``H x W x 3`` RGB in [0, 255] (uint8 or float) to a float32 ``3 x H x W`` tensor in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frame) if not isinstance(frame, torch.Tensor) else frame)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"a frame must be H x W x 3 RGB, got shape {tuple(x.shape)}")
    return (x.to(torch.float32) / 255.0 * 2 - 1).permute(2, 0, 1)


def flow_patches(frames: torch.Tensor) -> torch.Tensor:
    """3 x 3 neighbourhoods of normalised frames ``B x T x 3 x H x W`` -> ``B x T x 27 x H x W``.

    Zero padding at the border; the 27 channels are ordered (row, column, colour), as DeepMind's
    ``patches_for_flow``.
    """
    b, t, c, h, w = frames.shape
    cols = F.unfold(frames.reshape(b * t, c, h, w), kernel_size=3, padding=1)  # (c, kh, kw) major
    cols = cols.reshape(b, t, c, 9, h, w).transpose(2, 3)  # (kh, kw) then colour
    return cols.reshape(b, t, 9 * c, h, w)


def tile_origins(size: int, tile: int, min_overlap: int) -> list[int]:
    """Evenly spread origins of tiles of length ``tile`` covering ``size`` with >= ``min_overlap`` overlap."""
    if tile > size:
        raise ValueError(f"tile ({tile}) is larger than the frame ({size})")
    if min_overlap >= tile:
        raise ValueError(f"min_overlap ({min_overlap}) must be smaller than the tile ({tile})")
    n = 1 if size == tile else math.ceil((size - tile) / (tile - min_overlap)) + 1
    return sorted({round(i * (size - tile) / max(n - 1, 1)) for i in range(n)})


def blend_weights(tile: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``h x w`` weights: distance (in pixels, from 1) to the tile's nearest edge."""
    h, w = tile
    y = torch.arange(h, device=device, dtype=torch.float32)
    x = torch.arange(w, device=device, dtype=torch.float32)
    wy = torch.minimum(y + 1, h - y)
    wx = torch.minimum(x + 1, w - x)
    return torch.minimum(wy[:, None], wx[None, :])


def _model_tile_size(model: Callable) -> tuple[int, int]:
    res = getattr(getattr(model, "preprocessor", None), "max_resolution", None)
    if res is None or len(res) != 2:
        raise ValueError("cannot tell the model's training size: pass tile_size=(height, width)")
    return int(res[0]), int(res[1])


@torch.no_grad()
def estimate_flow(
    model: Callable[..., torch.Tensor],
    frame1: np.ndarray | torch.Tensor,
    frame2: np.ndarray | torch.Tensor,
    *,
    tile_size: Sequence[int] | None = None,
    min_overlap: int = 20,
    flow_scale: float = FLOW_SCALE_FACTOR,
    query_chunk: int | None = 16384,
    tiles_per_batch: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Forward flow from ``frame1`` to ``frame2`` (``H x W x 3`` RGB, any size): ``H x W x 2`` pixels.

    ``model`` maps ``B x 2 x 27 x h x w`` patches to ``B x h x w x 2`` (a flow
    :class:`~perceiver_stream.perceiver.PerceiverIO`; it is called with ``query_chunk``).
    ``tile_size`` defaults to the model's training size; ``device`` to the model's.
    """
    a, b = normalize_frame(frame1), normalize_frame(frame2)  # checks each frame's layout
    if a.shape != b.shape:
        raise ValueError(f"frames differ in size: {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    f1, f2 = (torch.as_tensor(np.asarray(f) if not isinstance(f, torch.Tensor) else f) for f in (frame1, frame2))
    flow = estimate_flows(
        model, f1[None], f2[None], tile_size=tile_size, min_overlap=min_overlap, flow_scale=flow_scale,
        query_chunk=query_chunk, tiles_per_batch=tiles_per_batch, device=device,
    )
    return flow[0].cpu()


@torch.no_grad()
def estimate_flows(
    model: Callable[..., torch.Tensor],
    frames1: torch.Tensor,
    frames2: torch.Tensor,
    *,
    tile_size: Sequence[int] | None = None,
    min_overlap: int = 20,
    flow_scale: float = FLOW_SCALE_FACTOR,
    query_chunk: int | None = 16384,
    tiles_per_batch: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`estimate_flow` for ``B`` frame pairs at once (``B x H x W x 3`` RGB each): ``B x H x W x 2``
    float32 on ``device``.

    The tiles of every pair go through ``model`` together, ``tiles_per_batch`` at a time, in the
    order (pair, tile row, tile column): a model that records something per tile can map it back.
    """
    th, tw = tuple(tile_size) if tile_size is not None else _model_tile_size(model)
    if device is None:
        params = getattr(model, "parameters", None)
        first = next(params(), None) if callable(params) else None
        device = first.device if first is not None else "cpu"
    if frames1.shape != frames2.shape or frames1.ndim != 4 or frames1.shape[-1] != 3:
        raise ValueError(f"frames must be two B x H x W x 3 RGB arrays of one shape, got "
                         f"{tuple(frames1.shape)} and {tuple(frames2.shape)}")
    pairs = torch.stack([frames1, frames2], dim=1).to(device)  # B x 2 x H x W x 3
    frames = (pairs.to(torch.float32) / 255.0 * 2 - 1).permute(0, 1, 4, 2, 3)  # B x 2 x 3 x H x W
    n, (h, w) = frames.shape[0], frames.shape[-2:]
    # Frames smaller than a tile are resized up; the flow is mapped back at the end.
    sh, sw = max(h, th), max(w, tw)
    if (sh, sw) != (h, w):
        frames = F.interpolate(frames.flatten(0, 1), size=(sh, sw), mode="bilinear", align_corners=False)
        frames = frames.unflatten(0, (n, 2))

    origins = [(y, x) for y in tile_origins(sh, th, min_overlap) for x in tile_origins(sw, tw, min_overlap)]
    tiles_at = [(i, y, x) for i in range(n) for y, x in origins]
    weights = blend_weights((th, tw), device=device)[..., None]
    total = torch.zeros(n, sh, sw, 2, device=device)
    count = torch.zeros(n, sh, sw, 1, device=device)
    for k in range(0, len(tiles_at), tiles_per_batch):
        batch = tiles_at[k : k + tiles_per_batch]
        tiles = torch.stack([frames[i, ..., y : y + th, x : x + tw] for i, y, x in batch])
        out = model(flow_patches(tiles), query_chunk=query_chunk).float()
        for (i, y, x), piece in zip(batch, out):
            total[i, y : y + th, x : x + tw] += piece * weights
            count[i, y : y + th, x : x + tw] += weights
    flow = total / count * flow_scale

    if (sh, sw) != (h, w):
        flow = F.interpolate(flow.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        flow = flow.permute(0, 2, 3, 1) * torch.tensor([w / sw, h / sh], device=flow.device)
    return flow
