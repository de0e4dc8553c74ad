"""Perceiver Resampler: shapes, masks for padded frames, time embeddings, self-attending latents."""

from __future__ import annotations

import pytest
import torch

from perceiver_stream.resampler import PerceiverResampler


@pytest.fixture
def res() -> PerceiverResampler:
    torch.manual_seed(0)
    return PerceiverResampler(16, depth=2, num_latents=5, num_heads=4, max_frames=4).eval()


def test_shape_and_fixed_output_size(res):
    for t, s in [(1, 3), (4, 7)]:
        assert res(torch.randn(2, t, s, 16)).shape == (2, 5, 16)


def test_padded_frames_are_ignored(res):
    x = torch.randn(2, 2, 6, 16)
    padded = torch.cat([x, torch.full((2, 2, 6, 16), float("nan"))], dim=1)
    frame_mask = torch.tensor([[True, True, False, False]] * 2)
    torch.testing.assert_close(res(padded, frame_mask), res(x), atol=1e-5, rtol=1e-4)
    token_mask = torch.ones(2, 2, 6, dtype=torch.bool)
    token_mask[:, :, 4:] = False
    torch.testing.assert_close(res(x, token_mask=token_mask), res(x[:, :, :4]), atol=1e-5, rtol=1e-4)


def test_time_embedding_orders_frames_not_tokens(res):
    x = torch.randn(1, 3, 5, 16)
    out = res(x)
    torch.testing.assert_close(res(x[:, :, torch.randperm(5)]), out, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(res(x[:, [2, 0, 1]]), out, atol=1e-4)


def test_no_real_frame_gives_finite_latents(res):
    out = res(torch.randn(1, 2, 3, 16), frame_mask=torch.zeros(1, 2, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_too_many_frames_and_bad_heads():
    with pytest.raises(ValueError, match="max_frames"):
        PerceiverResampler(8, num_heads=2, max_frames=2)(torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match="divisible"):
        PerceiverResampler(10, num_heads=4)


def test_trains():
    torch.manual_seed(1)
    res = PerceiverResampler(8, depth=1, num_latents=2, num_heads=2, max_frames=3)
    x, target = torch.randn(4, 3, 5, 8), torch.randn(4, 2, 8)
    opt = torch.optim.Adam(res.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = (res(x) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
