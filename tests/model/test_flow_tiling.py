"""Optical flow on real frames: patch layout, tiling, blending and scaling against known fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from perceiver_stream.deepmind import OpticalFlowConfig
from perceiver_stream.flow import blend_weights, estimate_flow, flow_patches, normalize_frame, tile_origins

TILE = (20, 24)


class CentrePixelFlow(nn.Module):
    """A 'model' whose flow is a fixed function of each pixel's own colour in both frames.

    Its field over a whole frame is known, so a tiled estimate must reproduce it exactly wherever
    tiles are placed and however they are blended. It also checks it only ever sees tile-sized inputs.
    """

    def __init__(self, tile=TILE):
        super().__init__()
        self.tile = tile
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    @staticmethod
    def field(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """``3 x H x W`` normalised frames -> ``H x W x 2``."""
        return torch.stack([3 * f1[0] - f2[1], 0.5 * f1[2] * f2[0] + 1], dim=-1)

    def forward(self, patches: torch.Tensor, query_chunk=None) -> torch.Tensor:
        assert patches.shape[1:] == (2, 27, *self.tile)
        centre = patches[:, :, 12:15]  # channels of (row 1, column 1)
        return torch.stack([self.field(p[0], p[1]) for p in centre])


def _frames(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_patches_are_three_by_three_neighbourhoods_row_column_colour():
    f = torch.randn(1, 2, 3, 5, 6)
    p = flow_patches(f)
    padded = torch.nn.functional.pad(f, (1, 1, 1, 1))
    for kh in range(3):
        for kw in range(3):
            for c in range(3):
                assert torch.equal(p[:, :, kh * 9 + kw * 3 + c], padded[:, :, c, kh : kh + 5, kw : kw + 6])


def test_normalisation_maps_0_255_to_minus_one_one():
    f = normalize_frame(np.array([[[0, 255, 51]]], dtype=np.uint8))
    assert f.shape == (3, 1, 1)
    assert torch.allclose(f.flatten(), torch.tensor([-1.0, 1.0, -0.6]))


@pytest.mark.parametrize(
    "size,tile,overlap", [(368, 368, 20), (400, 368, 20), (700, 368, 20), (1080, 496, 20), (47, 20, 5)]
)
def test_tiles_cover_the_frame_with_enough_overlap(size, tile, overlap):
    starts = tile_origins(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == size - tile
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_blend_weights_fall_off_towards_edges():
    w = blend_weights((5, 7))
    assert w.min() == 1 and w[2, 3] == 3 and torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))


@pytest.mark.parametrize("shape", [(20, 24), (47, 61), (33, 100)])
def test_tiling_and_blending_reproduce_a_known_field(shape):
    f1, f2 = _frames(*shape)
    model = CentrePixelFlow()
    flow = estimate_flow(model, f1, f2, tile_size=TILE, min_overlap=5, flow_scale=1.0, tiles_per_batch=3)
    expected = CentrePixelFlow.field(normalize_frame(f1), normalize_frame(f2))
    assert flow.shape == (*shape, 2) and flow.dtype == torch.float32
    assert torch.allclose(flow, expected, atol=1e-5)
    # Output scaling: DeepMind's factor by default.
    scaled = estimate_flow(model, f1, f2, tile_size=TILE, min_overlap=5)
    assert torch.allclose(scaled, 20 * expected, atol=2e-4)


class ConstantFlow(CentrePixelFlow):
    def forward(self, patches, query_chunk=None):
        assert patches.shape[-2:] == self.tile
        out = torch.empty(patches.shape[0], *self.tile, 2)
        out[..., 0], out[..., 1] = 0.25, -0.5
        return out


def test_small_frames_are_resized_up_and_flow_mapped_back_to_their_pixels():
    f1, f2 = _frames(10, 8)  # smaller than the 20 x 24 tile in both directions
    flow = estimate_flow(ConstantFlow(), f1, f2, tile_size=TILE, min_overlap=5, flow_scale=1.0)
    assert flow.shape == (10, 8, 2)
    # A displacement of 0.25 tile pixels is 0.25 * 8/24 frame pixels across, -0.5 * 10/20 down.
    assert torch.allclose(flow[..., 0], torch.full((10, 8), 0.25 * 8 / 24), atol=1e-6)
    assert torch.allclose(flow[..., 1], torch.full((10, 8), -0.5 * 10 / 20), atol=1e-6)


def test_real_flow_model_runs_on_odd_sized_frames():
    torch.manual_seed(0)
    cfg = OpticalFlowConfig(
        num_latents=8,
        d_latents=16,
        num_self_attends_per_block=1,
        num_self_attention_heads=2,
        train_size=(12, 16),
        num_bands=4,
    )
    model = cfg.build().eval()
    f1, f2 = _frames(25, 30)
    flow = estimate_flow(model, f1, f2, min_overlap=4, query_chunk=50)  # tile size read from the model
    assert flow.shape == (25, 30, 2) and torch.isfinite(flow).all()
    with pytest.raises(ValueError, match="differ"):
        estimate_flow(model, f1, f2[:-1], min_overlap=4)
    with pytest.raises(ValueError, match="tile_size"):
        estimate_flow(ConstantFlow(), f1, f2)
