"""Video adapters: space-to-depth patch tokens for the encoder, 3x3 two-frame patches for flow."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_stream.adapters.base import Adapter, gather_last, time_channels, time_features
from perceiver_stream.batch import ModalityBatch
from perceiver_stream.fourier import fourier_channels, grid_fourier_features


def normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``... x H x W x 3`` -> float32 in [-1, 1] (any float input is taken as 0..255 too)."""
    return frames.float() * (2.0 / 255.0) - 1.0


def space_to_depth(frames: torch.Tensor, patch: int) -> torch.Tensor:
    """``B x T x H x W x C`` -> ``B x T x (H/p * W/p) x (p*p*C)``, patches in row-major order.

    Channels of a patch are ordered ``(dy, dx, c)``, as DeepMind's ``space_to_depth``.
    """
    b, t, h, w, c = frames.shape
    if h % patch or w % patch:
        raise ValueError(f"frame size {h}x{w} is not divisible by the patch size {patch}")
    x = frames.reshape(b, t, h // patch, patch, w // patch, patch, c)
    x = x.permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, (h // patch) * (w // patch), patch * patch * c)


@dataclass(frozen=True)
class VideoAdapterConfig:
    """Space-to-depth video tokens.

    patch:       side of the square patches (frames must be divisible by it).
    frames:      use only each window's last ``frames`` frames (None = all of them).
    stack:       consecutive frames stacked on the channels of one token (a token then sees the
                 same place in ``stack`` frames: motion is local to it). Groups are aligned to the
                 window's last frame; a group with a missing frame is masked out.
    conv:        with c > 0, a small convolutional stem over each group's last frame (a 3x3 conv,
                 then per halving of the patch size a 2x2 max-pool and a 3x3 conv; GELU after each)
                 gives ``c`` channels per patch, after the token channels as ``private_channels``:
                 they feed a pooled label read (``labels.pool``) alone, never the encoder. The patch
                 size must then be a power of two.
    pos_bands:   Fourier bands of the (y, x) patch position (DeepMind form, max resolution = grid).
    time_*:      the media-time code (see ``fourier.time_fourier_features``).
    """

    kind: str = "video"
    patch: int = 4
    frames: int | None = 2
    stack: int = 1
    conv: int = 0
    pos_bands: int = 8
    time_bands: int = 8
    time_period: float = 2.0**17
    time_max_freq: float = 16.0

    def __post_init__(self) -> None:
        if min(self.patch, self.stack, self.pos_bands, self.time_bands) < 1:
            raise ValueError("video adapter: patch, stack, pos_bands and time_bands must be at least 1")
        if self.conv < 0:
            raise ValueError("video adapter: conv must be >= 0 (0 = no convolutional stem)")
        if self.conv and self.patch & (self.patch - 1):
            raise ValueError(f"video adapter: the conv stem needs a power-of-two patch size, got {self.patch}")
        if self.frames is not None and (self.frames < 1 or self.frames % self.stack):
            raise ValueError("video adapter: frames must be a positive multiple of stack (or null for all frames)")


class VideoAdapter(Adapter):
    """Video ``B x T x H x W x 3`` uint8 -> one token per patch of each used frame (group).

    Token channels: ``[pixels (stack*p*p*3, oldest frame first), Fourier(y, x), time code of the
    group's last frame]``, then the conv stem's ``conv`` private channels (if any).
    """

    def __init__(self, config: VideoAdapterConfig) -> None:
        super().__init__()
        self.config = config
        c, p = config.conv, config.patch
        self.stem = None
        if c:
            layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.GELU()]
            for _ in range(p.bit_length() - 1):
                layers += [nn.MaxPool2d(2), nn.Conv2d(c, c, 3, padding=1), nn.GELU()]
            self.stem = nn.Sequential(*layers)
        pixels = config.stack * p * p * 3
        codes = fourier_channels(2, config.pos_bands) + time_channels(config.time_bands)
        self.out_channels = pixels + codes
        self.private_channels = c
        # Pooled reads take the stem's features alone: a max over pixels and position codes can
        # name a training scene instead of a shape.
        self.pool_channels = (self.out_channels, self.out_channels + c) if c else (0, pixels)

    def pool_parameters(self) -> list[nn.Parameter]:
        """The conv stem's parameters (the pooled channels are the stem's, with one)."""
        return [] if self.stem is None else list(self.stem.parameters())

    def forward(self, m: ModalityBatch, t_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``B x (T' * patches) x (out_channels + private_channels)`` and their mask."""
        cfg = self.config
        values, times, mask = m.values, m.times, m.mask
        k = cfg.stack
        keep = cfg.frames if cfg.frames is not None else (None if k == 1 else -(-values.shape[1] // k) * k)
        if keep is not None:
            values, kept = gather_last(values, mask, keep)
            times, _ = gather_last(times, mask, keep)
            mask = kept
        if k > 1:
            mask = mask.view(mask.shape[0], -1, k).all(dim=2)
            times = times.view(times.shape[0], -1, k)[:, :, -1]
        b, t, h, w, _ = values.shape
        frames = normalise_frames(values)
        pix = space_to_depth(frames, cfg.patch)  # B x T x P x C
        n = pix.shape[2]
        if k > 1:
            t = t // k
            pix = pix.view(b, t, k, n, -1).transpose(2, 3).reshape(b, t, n, -1)
        stem = []
        if self.stem is not None:
            last = frames.view(b, t, k, h, w, 3)[:, :, -1].reshape(b * t, h, w, 3).permute(0, 3, 1, 2)
            # (channels-last: a quarter faster on CPU than the NCHW copy the strided view would get)
            feats = self.stem(last.contiguous(memory_format=torch.channels_last))
            feats = feats.flatten(2).transpose(1, 2)  # (B*T) x P x conv, row-major as pix
            stem = [feats.reshape(b, t, n, -1)]
        pos = grid_fourier_features((h // cfg.patch, w // cfg.patch), cfg.pos_bands, device=pix.device)
        tcode = time_features(
            times, t_ref, bands=cfg.time_bands, period=cfg.time_period, max_freq=cfg.time_max_freq
        )  # B x T x Ct
        tokens = torch.cat(
            [pix, pos.expand(b, t, n, pos.shape[-1]), tcode[:, :, None, :].expand(b, t, n, tcode.shape[-1]), *stem],
            dim=-1,
        )
        return tokens.reshape(b, t * n, -1), mask[:, :, None].expand(b, t, n).reshape(b, t * n)


def flow_patches(frame1: torch.Tensor, frame2: torch.Tensor) -> torch.Tensor:
    """3x3 neighbourhoods of two frames: ``B x H x W x 3`` each -> ``B x H x W x 54`` float32.

    Each pixel gets its 3x3 neighbourhood (zero-padded at the border) in both normalised frames,
    channels ordered ``(frame, c, dy, dx)``: the input-derived queries of the flow decoder.
    """
    x = torch.stack([normalise_frames(frame1), normalise_frames(frame2)], dim=1)  # B x 2 x H x W x 3
    b, _, h, w, c = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h, w)
    patches = F.unfold(x, kernel_size=3, padding=1)  # B x (2*3*9) x HW
    return patches.transpose(1, 2).reshape(b, h, w, 2 * c * 9)


def local_correlation(frame1: torch.Tensor, frame2: torch.Tensor, radius: int) -> torch.Tensor:
    """Local correlation volume of two frames: ``B x H x W x 3`` each -> ``B x H x W x (2r+1)^2``.

    Channel ``(dy + r) * (2r + 1) + (dx + r)`` is the normalised cross-correlation over a 3x3 window
    (zero padded) of frame 1 at ``p`` and frame 2 at ``p + (dy, dx)`` (zero outside the frame), on
    the grey level (mean of the channels) minus its 3x3 local mean. Motion up to ``r`` pixels then
    shows as a peak (1 for an exact match) in the pixel's own query, which 3x3 patches alone cannot
    show. One grey channel and box sums by shifted adds keep this cheap at radius 6-7.
    """
    def centred(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalise_frames(frame).mean(-1)[:, None]  # B x 1 x H x W
        x = x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        inv_norm = F.avg_pool2d(x.pow(2), 3, stride=1, padding=1).add(1e-4).rsqrt()
        return x[:, 0], inv_norm[:, 0]

    (f1, inv1), (f2, inv2) = centred(frame1), centred(frame2)
    f2, inv2 = F.pad(f2, (radius,) * 4), F.pad(inv2, (radius,) * 4)
    b, h, w = f1.shape
    size = 2 * radius + 1
    # Products written inside a one-pixel zero border: the 3x3 box sum is then four shifted adds.
    corr = f1.new_zeros(b, size * size, h + 2, w + 2)
    for dy in range(size):
        for dx in range(size):
            torch.mul(f1, f2[:, dy:dy + h, dx:dx + w], out=corr[:, dy * size + dx, 1:-1, 1:-1])
    rows = corr[:, :, :, :-2] + corr[:, :, :, 1:-1]
    rows += corr[:, :, :, 2:]
    box = rows[:, :, :-2] + rows[:, :, 1:-1]
    box += rows[:, :, 2:]
    box.mul_(inv1[:, None] / 9.0)
    for dy in range(size):
        for dx in range(size):
            box[:, dy * size + dx].mul_(inv2[:, dy:dy + h, dx:dx + w])
    return box.permute(0, 2, 3, 1)


class FlowInputAdapter(Adapter):
    """The optical-flow input: 3x3 patches of each window's last two frames on the flow grid.

    ``forward`` returns ``(B x H x W x C, B bool valid)``: 54 patch channels, then with
    ``corr_radius`` r > 0 the ``(2r+1)^2`` channels of `local_correlation`; ``valid`` is False where
    the window has fewer than two frames (or no video). Frames of another size are resized
    (bilinear, antialiased) to ``size`` first, so flow is in pixels of the ``size`` grid.
    """

    def __init__(self, size: tuple[int, int], corr_radius: int = 0) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.corr_radius = int(corr_radius)
        self.out_channels = 54 + ((2 * self.corr_radius + 1) ** 2 if self.corr_radius else 0)

    def last_frames(self, m: ModalityBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's last two frames on the flow grid, ``B x 2 x H x W x 3`` (uint8, or float
        0..255 when resized), and whether the row has two frames."""
        frames, fmask = gather_last(m.values, m.mask, 2)  # B x 2 x H x W x 3
        valid = fmask.all(dim=1) & m.present
        if tuple(frames.shape[2:4]) != self.size:
            x = frames.flatten(0, 1).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
            frames = x.permute(0, 2, 3, 1).reshape(frames.shape[0], 2, *self.size, 3)
        return frames, valid

    def forward(self, m: ModalityBatch, t_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches of the last two frames of each row and whether the row has two frames."""
        frames, valid = self.last_frames(m)
        feats = flow_patches(frames[:, 0], frames[:, 1])
        if self.corr_radius:
            feats = torch.cat([feats, local_correlation(frames[:, 0], frames[:, 1], self.corr_radius)], dim=-1)
        return feats, valid

    def project(self, frames: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """``proj(features of frames)`` without building the features: ``B x 2 x H x W x 3`` -> ``B x H x W x out``.

        The 54 patch channels of ``proj`` are one 3x3 convolution over the 6-channel frame pair
        (weight columns in ``flow_patches``' ``(frame, c, dy, dx)`` order); equal to
        ``proj(forward(m)[0])`` up to float rounding, at a fraction of the cost (no im2col array).
        """
        b, _, h, w, c = frames.shape
        x = normalise_frames(frames).permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h, w)
        weight = proj.weight
        kernel = weight[:, : 2 * c * 9].reshape(weight.shape[0], 2 * c, 3, 3)
        out = F.conv2d(x.contiguous(memory_format=torch.channels_last), kernel, proj.bias, padding=1)
        out = out.permute(0, 2, 3, 1)  # B x H x W x out (contiguous: channels-last)
        if self.corr_radius:
            corr = local_correlation(frames[:, 0], frames[:, 1], self.corr_radius)
            out = out + corr @ weight[:, 2 * c * 9:].t()
        return out
