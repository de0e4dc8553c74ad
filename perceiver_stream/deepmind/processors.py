"""Input preprocessors and output postprocessors of DeepMind's Perceiver IO models.

Each preprocessor returns :class:`~perceiver_stream.perceiver.Tokens`: features with Fourier codes of
their grid positions concatenated (DeepMind's ``concat_pos``), flattened to ``B x N x C``.
Channel orders (space-to-depth, patch layout, padding) are DeepMind's, so published weights apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from perceiver_stream.fourier import fourier_channels, grid_fourier_features
from perceiver_stream.perceiver import Tokens


def space_to_depth(frames: torch.Tensor, temporal_block: int = 1, spatial_block: int = 1) -> torch.Tensor:
    """Channels-first frames to channels-last blocks.

    ``B x C x H x W -> B x H/s x W/s x (s*s*C)`` or ``B x T x C x H x W -> B x T/t x H/s x W/s x (t*s*s*C)``,
    block channels ordered (time, row, column, channel) as DeepMind's ``space_to_depth``.
    """
    s, t = spatial_block, temporal_block
    if frames.ndim == 4:
        b, c, h, w = frames.shape
        x = frames.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, h // s, w // s, s * s * c)
    if frames.ndim == 5:
        b, n, c, h, w = frames.shape
        x = frames.reshape(b, n // t, t, c, h // s, s, w // s, s).permute(0, 1, 4, 6, 2, 5, 7, 3)
        return x.reshape(b, n // t, h // s, w // s, t * s * s * c)
    raise ValueError(f"frames must be B x C x H x W or B x T x C x H x W, got shape {tuple(frames.shape)}")


def _with_grid_positions(
    features: torch.Tensor, num_bands: int, max_resolution: Sequence[int], concat_pos: bool, sine_only: bool
) -> Tokens:
    """Flatten channels-last ``B x *grid x C`` features and append Fourier codes of the grid."""
    b, grid, c = features.shape[0], tuple(features.shape[1:-1]), features.shape[-1]
    flat = features.reshape(b, -1, c)
    pos = grid_fourier_features(
        grid, num_bands, max_resolution, concat_pos=concat_pos, sine_only=sine_only, device=flat.device
    ).to(flat.dtype)
    tokens = torch.cat([flat, pos[None].expand(b, -1, -1)], dim=-1)
    return Tokens(tokens, grid=grid, without_pos=flat)


class ImagePreprocessor(nn.Module):
    """Images (``B x C x H x W``) or videos (``B x T x C x H x W``) to tokens with position codes.

    ``prep_type``: ``"pixels"`` (strided pixels), ``"conv1x1"`` (a 1x1 convolution with stride
    ``spatial_downsample``), ``"conv"`` (DeepMind's stem: 7x7 stride-2 convolution, batch norm, ReLU,
    3x3 stride-2 max pool) or ``"patches"`` (space-to-depth blocks, then optionally a linear layer,
    ``conv_after_patching``, as the flow model does).

    Positions are Fourier codes of the token grid, or (``position_encoding="trainable"``)
    ``num_positions`` learned vectors of ``pos_channels``, optionally projected to ``project_pos_dim``.
    """

    def __init__(
        self,
        prep_type: str = "patches",
        *,
        in_channels: int = 3,
        out_channels: int = 64,
        spatial_downsample: int = 4,
        temporal_downsample: int = 1,
        conv_after_patching: bool = False,
        conv_after_patching_in_channels: int = 54,
        num_bands: int = 64,
        max_resolution: Sequence[int] = (224, 224),
        concat_pos: bool = True,
        sine_only: bool = False,
        position_encoding: str = "fourier",
        num_positions: int | None = None,
        pos_channels: int = 256,
        project_pos_dim: int | None = None,
    ) -> None:
        super().__init__()
        if prep_type not in ("pixels", "conv1x1", "conv", "patches"):
            raise ValueError(f"prep_type must be 'pixels', 'conv1x1', 'conv' or 'patches', not {prep_type!r}")
        if position_encoding not in ("fourier", "trainable"):
            raise ValueError(f"position_encoding must be 'fourier' or 'trainable', not {position_encoding!r}")
        if position_encoding == "trainable" and not num_positions:
            raise ValueError("trainable positions need num_positions (the number of tokens)")
        self.position_encoding = position_encoding
        learned = position_encoding == "trainable"
        self.positions = nn.Parameter(torch.randn(num_positions, pos_channels) * 0.02) if learned else None
        self.pos_proj = nn.Linear(pos_channels, project_pos_dim) if learned and project_pos_dim else None
        self.stem = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2),
            )
            if prep_type == "conv"
            else None
        )
        self.prep_type = prep_type
        self.in_channels = in_channels
        self.spatial_downsample = spatial_downsample
        self.temporal_downsample = temporal_downsample
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution)
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        self.conv = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=spatial_downsample)
            if prep_type == "conv1x1"
            else None
        )
        self.patch_proj = (
            nn.Linear(conv_after_patching_in_channels, out_channels)
            if prep_type == "patches" and conv_after_patching
            else None
        )
        if prep_type in ("conv1x1", "conv") or self.patch_proj is not None:
            self.feature_channels = out_channels
        elif prep_type == "pixels":
            self.feature_channels = in_channels
        else:
            temporal = len(self.max_resolution) > 2
            self.feature_channels = in_channels * spatial_downsample**2 * (temporal_downsample if temporal else 1)

    @property
    def num_channels(self) -> int:
        if self.positions is not None:
            pos = self.pos_proj.out_features if self.pos_proj is not None else self.positions.shape[1]
        else:
            dims = len(self.max_resolution)
            pos = fourier_channels(dims, self.num_bands, concat_pos=self.concat_pos, sine_only=self.sine_only)
        return self.feature_channels + pos

    def _learned_positions(self, x: torch.Tensor) -> Tokens:
        b, grid, c = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
        flat = x.reshape(b, -1, c)
        if flat.shape[1] != self.positions.shape[0]:
            raise ValueError(
                f"the image gives {flat.shape[1]} tokens but the model has {self.positions.shape[0]} "
                "learned positions; "
                "resize the image to the model's training size"
            )
        pos = self.pos_proj(self.positions) if self.pos_proj is not None else self.positions
        tokens = torch.cat([flat, pos.to(flat.dtype)[None].expand(b, -1, -1)], dim=-1)
        return Tokens(tokens, grid=grid, without_pos=flat)

    def forward(self, x: torch.Tensor) -> Tokens:
        s = self.spatial_downsample
        if self.prep_type == "patches":
            x = space_to_depth(x, self.temporal_downsample, s)
            if x.ndim == 5 and x.shape[1] == 1:
                x = x[:, 0]
            if self.patch_proj is not None:
                x = self.patch_proj(x)
        else:
            if self.prep_type in ("conv1x1", "conv"):
                if x.ndim != 4:
                    raise ValueError(f"{self.prep_type} preprocessing takes B x C x H x W images")
                x = self.conv(x) if self.conv is not None else self.stem(x)
            elif x.ndim == 4:
                x = x[:, :, ::s, ::s]
            else:
                x = x[:, :: self.temporal_downsample, :, ::s, ::s]
            x = x.movedim(-3, -1)  # channels last
        if self.positions is not None:
            return self._learned_positions(x)
        return _with_grid_positions(x, self.num_bands, self.max_resolution, self.concat_pos, self.sine_only)


class AudioPatchPreprocessor(nn.Module):
    """Raw audio ``B x S (x 1)`` cut into patches of ``samples_per_patch`` with Fourier positions."""

    def __init__(
        self,
        samples_per_patch: int,
        num_bands: int,
        max_resolution: Sequence[int],
        *,
        concat_pos: bool = True,
        sine_only: bool = False,
    ) -> None:
        super().__init__()
        self.samples_per_patch = samples_per_patch
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution)
        self.concat_pos = concat_pos
        self.sine_only = sine_only

    @property
    def num_channels(self) -> int:
        pos = fourier_channels(1, self.num_bands, concat_pos=self.concat_pos, sine_only=self.sine_only)
        return self.samples_per_patch + pos

    def forward(self, x: torch.Tensor) -> Tokens:
        patches = x.reshape(x.shape[0], -1, self.samples_per_patch)
        return _with_grid_positions(patches, self.num_bands, self.max_resolution, self.concat_pos, self.sine_only)


class OneHotPreprocessor(nn.Module):
    """A ``B x K`` vector (class scores) as a single token."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> Tokens:
        return Tokens(x[:, None, :], without_pos=x[:, None, :])


class MultimodalPreprocessor(nn.Module):
    """Named groups, each preprocessed, padded to a common width with a learned vector, concatenated.

    The common width is the widest group's plus ``min_padding_size``; groups are concatenated in
    sorted name order. ``mask_probs[name]`` replaces a group's tokens by a learned mask token: with
    probability >= 1 always (DeepMind's autoencoder hides the labels this way at inference too),
    with 0 < p < 1 at random, in training only.
    """

    def __init__(
        self,
        groups: Mapping[str, nn.Module],
        *,
        min_padding_size: int = 2,
        mask_probs: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.groups = nn.ModuleDict(dict(groups))
        self.num_channels = max(g.num_channels for g in groups.values()) + min_padding_size
        self.mask_probs = dict(mask_probs or {})
        unknown = set(self.mask_probs) - set(groups)
        if unknown:
            raise ValueError(f"mask_probs names unknown groups {sorted(unknown)}; groups are {sorted(groups)}")
        self.padding = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(1, self.num_channels - g.num_channels) * 0.02)
                for name, g in groups.items()
            }
        )
        self.mask = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(1, self.num_channels) * 0.02) for name in self.mask_probs}
        )

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Tokens:
        missing = sorted(set(self.groups) - set(inputs))
        if missing:
            raise ValueError(f"inputs lack the groups {missing}; this model takes {sorted(self.groups)}")
        parts, sizes, without_pos = [], {}, {}
        for name in sorted(self.groups):
            t = self.groups[name](inputs[name])
            b, n, _ = t.tokens.shape
            x = torch.cat([t.tokens, self.padding[name].to(t.tokens.dtype).expand(b, n, -1)], dim=-1)
            p = self.mask_probs.get(name, 0.0)
            if p >= 1.0:
                x = self.mask[name].to(x.dtype).expand(b, n, -1)
            elif p > 0.0 and self.training:
                hide = torch.rand(b, n, 1, device=x.device) < p
                x = torch.where(hide, self.mask[name].to(x.dtype), x)
            parts.append(x)
            sizes[name] = n
            without_pos[name] = t.without_pos
        return Tokens(torch.cat(parts, dim=1), sizes=sizes, without_pos=without_pos)


class ProjectionHead(nn.Module):
    """Linear projection of decoder outputs: ``B x n x out``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class AudioPatchHead(ProjectionHead):
    """Decoder outputs to audio samples: each output is one patch, flattened to ``B x (n * samples_per_patch)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).reshape(x.shape[0], -1)


class ClassHead(ProjectionHead):
    """The first decoder output to class logits: ``B x num_classes``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)[:, 0]


class GroupHeads(nn.Module):
    """Applies one head per named output group: ``{name: head(outputs[name])}``."""

    def __init__(self, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: head(outputs[name]) for name, head in self.heads.items()}
