"""Flow losses without ground truth: photometric (as in UFlow / SMURF) and a teacher's flow.

The photometric loss of a window's predicted flow ``F`` (its last frame pair ``I1 -> I2``, at the
model's flow grid: frames are area-resized to it) is

* a census data term: the soft Hamming distance between the 7 x 7 census transforms of ``I1``
  and of ``I2`` warped back by ``F`` (bilinear ``grid_sample``), robust ``(d + 0.01) ** 0.4``
  less its value at 0, averaged over the pixels that are neither occluded nor warped from outside the frame;
* edge-aware first-order smoothness: ``|dF/dx| * exp(-150 |dI1/dx|)`` and likewise in y;
* occlusions by forward-backward consistency: a pixel is occluded where ``|F + B(x + F)|^2 >
  0.01 (|F|^2 + |B(x + F)|^2) + 0.5``, with ``B`` the backward flow (stop-gradient mask).

The backward flow ``B`` is the model's own flow for the reversed pair: a whole forward pass, without
state and without gradient, on each window with its last two frames swapped (`backward_flow`). It
only shapes the stop-gradient mask, so it costs a forward pass but no backward one. (The flow
decoder alone on the swapped pair with the forward pass's latents was tried and is wrong: the
latents encode the forward motion, and its mask kept 0.03 % of the pixels where the true
forward-backward check keeps 99.8 %, on a real-texture clip with the shipped teacher.)
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from perceiver_stream.batch import Batch, ModalityBatch
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingPerceiverIO

Parts = dict[str, torch.Tensor]
CENSUS_PATCH = 7
EDGE_CONSTANT = 150.0


def last_pair(video: ModalityBatch, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's last two real frames as ``B x 3 x H x W`` float in [0, 1] on a ``size`` grid
    (area-resized), and ``B`` bool: the row has two frames."""
    count = video.mask.sum(dim=1)
    valid = video.present & (count >= 2)
    rows = torch.arange(len(count), device=count.device)
    last = (count - 1).clamp(min=0)
    prev = (count - 2).clamp(min=0)

    def frames(i: torch.Tensor) -> torch.Tensor:
        img = video.values[rows, i].permute(0, 3, 1, 2).float() / 255.0
        return img if tuple(img.shape[-2:]) == tuple(size) else F.interpolate(img, size=size, mode="area")

    return frames(prev), frames(last), valid


def warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (``B x C x H x W``) sampled at each pixel plus ``flow`` (``B x H x W x 2``, px),
    bilinearly, and ``B x 1 x H x W`` float: 1 where the sample point lies inside the frame."""
    b, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    x = xs + flow[..., 0]
    y = ys + flow[..., 1]
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).to(image.dtype)[:, None]
    return out, inside


def census(image: torch.Tensor, patch: int = CENSUS_PATCH) -> torch.Tensor:
    """Soft census transform ``B x patch^2 x H x W`` of ``B x 3 x H x W`` images in [0, 1]."""
    gray = (image * torch.tensor([0.299, 0.587, 0.114], device=image.device)[:, None, None]).sum(1, keepdim=True)
    gray = gray * 255.0
    kernel = torch.eye(patch * patch, device=image.device, dtype=image.dtype).reshape(-1, 1, patch, patch)
    diff = F.conv2d(gray, kernel, padding=patch // 2) - gray
    return diff / torch.sqrt(0.81 + diff.square())


def census_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Robust soft Hamming distance ``B x 1 x H x W`` between two census transforms (0 where equal)."""
    sq = (a - b).square()
    return ((sq / (0.1 + sq)).sum(dim=1, keepdim=True) + 0.01) ** 0.4 - 0.01**0.4


def occlusion_mask(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """``B x 1 x H x W`` float, 1 where forward-backward consistent (not occluded); flows ``B x H x W x 2``."""
    back, _ = warp(backward.permute(0, 3, 1, 2), forward)
    back = back.permute(0, 2, 3, 1)
    mismatch = (forward + back).square().sum(-1)
    bound = 0.01 * (forward.square().sum(-1) + back.square().sum(-1)) + 0.5
    return (mismatch <= bound).to(forward.dtype)[:, None]


def smoothness(flow: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware first-order smoothness ``B`` of flow ``B x H x W x 2`` on image ``B x 3 x H x W``."""
    f = flow.permute(0, 3, 1, 2)
    wx = torch.exp(-EDGE_CONSTANT * (image[..., :, 1:] - image[..., :, :-1]).abs().mean(1, keepdim=True))
    wy = torch.exp(-EDGE_CONSTANT * (image[..., 1:, :] - image[..., :-1, :]).abs().mean(1, keepdim=True))
    sx = (wx * (f[..., :, 1:] - f[..., :, :-1]).abs()).mean(dim=(1, 2, 3))
    sy = (wy * (f[..., 1:, :] - f[..., :-1, :]).abs()).mean(dim=(1, 2, 3))
    return (sx + sy) / 2


def photometric_loss(
    image1: torch.Tensor, image2: torch.Tensor, flow: torch.Tensor, backward: torch.Tensor | None = None,
    *, smooth_weight: float = 1.0,
) -> Parts:
    """``{"photo_census", "photo_smooth", "photo_occluded"}``, each ``B`` (per row), for forward flow
    ``flow`` from ``image1`` to ``image2`` (see the module docstring); ``backward`` (None: no
    occlusion masking) is the flow from ``image2`` to ``image1``. ``photo`` is their weighted sum."""
    warped, inside = warp(image2, flow)
    mask = inside
    if backward is not None:
        mask = mask * occlusion_mask(flow.detach(), backward.detach())
    pad = CENSUS_PATCH // 2
    border = torch.zeros_like(mask)
    border[..., pad:-pad, pad:-pad] = 1.0
    mask = (mask * border).detach()
    dist = census_distance(census(image1), census(warped))
    data = (dist * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1.0)
    smooth = smoothness(flow, image1)
    occluded = 1.0 - mask.sum(dim=(1, 2, 3)) / border.sum(dim=(1, 2, 3))
    return {"photo": data + smooth_weight * smooth, "photo_census": data, "photo_smooth": smooth,
            "photo_occluded": occluded}


@torch.no_grad()
def backward_flow(model: StreamingPerceiverIO, batch: Batch) -> torch.Tensor:
    """The model's flow ``B x H x W x 2`` for each window's last two frames swapped (no state, no
    gradient; see the module docstring)."""
    video = batch.modalities[model.config.flow.modality]
    count = video.mask.sum(dim=1)
    rows = torch.arange(len(count), device=count.device)
    last, prev = (count - 1).clamp(min=0), (count - 2).clamp(min=0)
    values = video.values.clone()
    values[rows, last], values[rows, prev] = video.values[rows, prev], video.values[rows, last]
    reversed_ = replace(batch, modalities={**batch.modalities, model.config.flow.modality: replace(video, values=values)},
                        targets=None)
    return model(reversed_).flow.float()


class PhotometricFlowLoss:
    """``flow_term`` of `perceiver_stream.train.SupervisedObjective`: the photometric loss of the
    model's flow on each window's last frame pair (``flow_loss``, and its parts), mean over the
    rows with two frames."""

    def __init__(self, model: StreamingPerceiverIO, *, smooth_weight: float = 1.0) -> None:
        self.model, self.smooth_weight = model, smooth_weight

    def __call__(self, batch: Batch, output: ModelOutput) -> Parts:
        video = batch.modalities.get(self.model.config.flow.modality)
        if output.flow is None or video is None:
            return {}
        image1, image2, valid = last_pair(video, tuple(output.flow.shape[1:3]))
        valid = valid & output.flow_valid
        if not bool(valid.any()):
            return {}
        back = backward_flow(self.model, batch)
        parts = photometric_loss(image1[valid], image2[valid], output.flow[valid], back[valid],
                                 smooth_weight=self.smooth_weight)
        parts["flow_loss"] = parts.pop("photo")
        return {k: v.mean() for k, v in parts.items()}


class TeacherFlowLoss:
    """``flow_term`` distilling a teacher's flow: ``flow_loss``, the end-point error to ``teacher``'s flow (run on
    the same batch without state, no gradient), resized to the student's grid if they differ."""

    def __init__(self, teacher: StreamingPerceiverIO) -> None:
        self.teacher = teacher.eval()

    def __call__(self, batch: Batch, output: ModelOutput) -> Parts:
        if output.flow is None:
            return {}
        with torch.no_grad():
            t = self.teacher(batch.to(next(self.teacher.parameters()).device))
        if t.flow is None:
            return {}
        target = t.flow.to(output.flow.device)
        if target.shape[1:3] != output.flow.shape[1:3]:
            h, w = output.flow.shape[1:3]
            scale = torch.tensor([w / target.shape[2], h / target.shape[1]], device=target.device)
            target = F.interpolate(target.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                   align_corners=False).permute(0, 2, 3, 1) * scale
        valid = output.flow_valid & t.flow_valid.to(output.flow_valid.device)
        if not bool(valid.any()):
            return {}
        diff = output.flow[valid] - target[valid]
        epe = torch.sqrt(diff.square().sum(-1) + 1e-12).mean()
        return {"flow_loss": epe}
