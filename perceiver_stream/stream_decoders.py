"""The streaming model's decoders: optical flow of a window's last two frames, and class labels.

Both read the latents ``z`` (``B x M x C``) through the library's cross-attention:

* `FrameFlowDecoder`: one query per pixel of the flow grid, built from the frame pair (3x3 patches,
  an optional correlation volume and convolution) plus a Fourier code of the pixel's position;
  optionally refined by warping (`FlowRefiner`).
* `LabelDecoder`: one learned query per latent group, each reading its group alone; the reads are
  summed with gated max-pooled reads of some modalities' token contents, then mapped to class scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_stream.adapters import FlowInputAdapter, normalise_frames
from perceiver_stream.attention import CrossAttention
from perceiver_stream.batch import ModalityBatch
from perceiver_stream.config import FlowSection
from perceiver_stream.decoders import CrossAttentionDecoder
from perceiver_stream.flow_refine import FlowRefiner
from perceiver_stream.fourier import fourier_channels, grid_fourier_features
from perceiver_stream.perceiver import Tokens


class _Cache:
    """Results of input-independent projections, reused while their parameters are unchanged.

    Used only when autograd is off (inference): the key holds each parameter's storage and version
    counter, so an optimiser step, ``load_state_dict`` or ``.to()`` invalidates it.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, torch.Tensor]] = {}

    def get(self, name: str, params: Sequence[torch.Tensor], device: torch.device,
            compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():
            return compute()
        key = (device.type, torch.is_autocast_enabled(device.type), *((p.data_ptr(), p._version) for p in params))
        hit = self._entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self._entries[name] = (key, value)
        return value


class FrameFlowDecoder(nn.Module):
    """Forward flow of each window's last two frames: ``B x H x W x 2`` px (dx right, dy down).

    A pixel's query is ``patch_proj`` of its 3x3 patches in both frames (and correlation volume),
    plus ``query_conv`` of the frame pair when configured, plus ``pos_proj`` of its Fourier position
    code (computed once); the queries attend to the latents (``attend``: one cross-attention layer
    and a linear map to 2 channels, in chunks of ``config.chunk``), times ``config.scale``; with
    ``config.refine`` > 0, `FlowRefiner` (``refine``) then corrects it on the full grid.
    """

    def __init__(self, config: FlowSection, latent_channels: int) -> None:
        super().__init__()
        self.config = config
        fc, hq = config.channels, config.query_hidden
        self.input = FlowInputAdapter(config.size, config.corr_radius)
        # Linear(concat(patch, pos)) split in two so the position half is computed once.
        self.patch_proj = nn.Linear(self.input.out_channels, fc)
        self.pos_proj = nn.Linear(fourier_channels(2, config.pos_bands), fc, bias=False)
        self.query_conv = nn.Sequential(
            nn.Conv2d(6, hq, 3, padding=1), nn.GELU(), nn.Conv2d(hq, fc, 3, padding=1)
        ) if hq else None
        self.attend = CrossAttentionDecoder(
            fc, latent_channels, 2, qk_channels=fc, v_channels=fc, widening_factor=config.widening,
            use_query_residual=True,
        )
        self.refine = FlowRefiner(config.refine, config.refine_channels) if config.refine else None
        self._cache = _Cache()

    def _positions(self, device: torch.device) -> torch.Tensor:
        """``pos_proj`` of the decoded grid's position codes: ``(H/s * W/s) x channels``."""
        cfg = self.config
        size = (cfg.size[0] // cfg.stride, cfg.size[1] // cfg.stride)
        return self._cache.get(
            "positions", [self.pos_proj.weight], device,
            lambda: self.pos_proj(grid_fourier_features(size, cfg.pos_bands, device=device)),
        )

    def forward(self, m: ModalityBatch | None, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Flow ``B x H x W x 2`` (zeros where invalid; None when no row has two frames) and the
        ``B`` rows that have two frames, from the video modality ``m`` and the latents ``z``."""
        b = z.shape[0]
        if m is None or not bool(m.present.any()):
            return None, torch.zeros(b, dtype=torch.bool, device=z.device)
        frames, valid = self.input.last_frames(m)
        valid, frames = valid.to(z.device), frames.to(z.device)
        # Rows without two frames are left out of the decoder (no gather / scatter when all have them).
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        if rows is not None:
            if rows.numel() == 0:
                return None, valid
            frames, z = frames[rows], z[rows]
        n, s = z.shape[0], self.config.stride
        full = frames
        if s > 1:
            x = F.avg_pool2d(frames.flatten(0, 1).permute(0, 3, 1, 2).float(), s)
            frames = x.permute(0, 2, 3, 1).reshape(n, 2, *x.shape[2:], 3)
        h, w = frames.shape[2:4]
        queries = self.input.project(frames, self.patch_proj)
        if self.query_conv is not None:
            pair = normalise_frames(frames).permute(0, 1, 4, 2, 3).reshape(n, 6, h, w)
            queries = queries + self.query_conv(pair).permute(0, 2, 3, 1)
        queries = queries.reshape(n, h * w, -1) + self._positions(z.device)
        out = self.attend(queries, z, query_chunk=self.config.chunk) * self.config.scale
        out = out.reshape(n, h, w, 2)
        if s > 1:
            out = F.interpolate(out.permute(0, 3, 1, 2), scale_factor=s, mode="bilinear", align_corners=False)
            out = out.permute(0, 2, 3, 1)
        if self.refine is not None:
            out = self.refine(full, out)
        flow = out if rows is None else out.new_zeros(b, *out.shape[1:]).index_copy(0, rows, out)
        return flow, valid


class LabelDecoder(nn.Module):
    """Class scores ``B x K`` from the latents and the pooled token reads.

    ``groups`` are the latent slices ``(start, end)`` that each get a learned query (``query``,
    ``1 x G x C``) attending to that slice alone (``attend``, shared by all groups). ``pool`` maps a
    modality to the width of its adapter's pooled channels: its read is the max over the modality's
    tokens of ``LayerNorm, Linear`` of those channels, times a learned gate (``pool_gates``) that
    starts at zero, so adding a pooled read leaves a model's outputs unchanged until it is trained.
    With ``from_flow``, ``flow_read`` (``Linear``) of the predicted flow average-pooled to a
    ``FLOW_GRID`` x ``FLOW_GRID`` grid (detached; zero in rows without flow) joins the sum.
    The logits are ``head(sum of the group reads + sum of the pooled reads [+ flow read])``.
    """

    FLOW_GRID = 4

    def __init__(self, latent_channels: int, num_classes: int, *, heads: int, groups: Sequence[tuple[int, int]],
                 pool: dict[str, int], from_flow: bool = False) -> None:
        super().__init__()
        c = latent_channels
        self.groups = list(groups)
        self.query = nn.Parameter(0.02 * torch.randn(1, len(self.groups), c))
        self.attend = CrossAttention(c, c, num_heads=heads, widening_factor=1)
        self.head = nn.Linear(c, num_classes)
        self.pools = nn.ModuleDict({k: nn.Sequential(nn.LayerNorm(n), nn.Linear(n, c)) for k, n in pool.items()})
        # (A zero projection instead of a shut gate ties every token in the max: the read did not learn.)
        self.pool_gates = nn.Parameter(torch.zeros(len(pool))) if pool else None
        self.flow_read = nn.Linear(2 * self.FLOW_GRID**2, c) if from_flow else None

    def group_reads(self, z: torch.Tensor) -> torch.Tensor:
        """Each latent group's read ``B x G x C``."""
        read = [self.attend(self.query[:, g : g + 1], z[:, a:b])[:, 0] for g, (a, b) in enumerate(self.groups)]
        return torch.stack(read, dim=1)

    def pooled_reads(self, tokens: Tokens) -> torch.Tensor:
        """Each pooled modality's gated read ``B x P x C`` (zero in rows without its tokens); the
        features are ``tokens.without_pos[name]``, their mask ``tokens.mask`` over that modality."""
        b, c = tokens.mask.shape[0], self.query.shape[-1]
        reads = []
        for k, proj in self.pools.items():
            if k not in tokens.without_pos:  # absent from the whole batch
                reads.append(self.query.new_zeros(b, c))
                continue
            mask = tokens.mask[:, tokens.span(k)]
            x = proj(tokens.without_pos[k])  # B x n x C
            pooled = torch.where(mask[..., None], x, float("-inf")).amax(dim=1)
            reads.append(torch.where(mask.any(dim=1, keepdim=True), pooled, 0.0))
        return torch.stack(reads, dim=1) * self.pool_gates[:, None]

    def flow_features(self, flow: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``B x 2 G^2``: flow ``B x H x W x 2`` (px) average-pooled to ``G x G`` (detached), zero where not ``valid``."""
        pooled = F.adaptive_avg_pool2d(flow.detach().permute(0, 3, 1, 2), self.FLOW_GRID).flatten(1)
        return torch.where(valid[:, None], pooled, 0.0)

    def forward(self, z: torch.Tensor, tokens: Tokens, flow: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits B x K, group_logits B x G x K)``: the labels, and each group's read alone through the
        head; ``flow`` (``B x H x W x 2`` px, ``B`` valid) is read when the decoder has ``flow_read``."""
        reads = self.group_reads(z)
        read = reads.sum(dim=1)
        if self.pools:
            read = read + self.pooled_reads(tokens).sum(dim=1)
        if self.flow_read is not None:
            if flow is None:
                raise ValueError("LabelDecoder with from_flow needs the predicted flow")
            read = read + self.flow_read(self.flow_features(*flow).to(read.dtype))
        return self.head(read), self.head(reads)
