"""The flow refiner: warping moves pixels by the flow, an untrained refiner changes nothing, a few
steps of training learn to correct a flow from the warped pair, and the decoder runs it on its grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceiver_stream.flow_refine import FlowRefiner, warp
from perceiver_stream.streaming import StreamingPerceiverIO
from tiny import HW, make_batch


def _texture(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    """``n`` smooth random RGB textures ``size x size`` (0..255 float): blurred noise, so that
    bilinear sampling between pixels is close to the truth."""
    x = torch.tensor(rng.uniform(0, 255, (n, 3, size, size)), dtype=torch.float32)
    x = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    return x.permute(0, 2, 3, 1)


def _pair(rng: np.random.Generator, n: int, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame pairs ``n x 2 x size x size x 3`` where frame 2 is frame 1 moved by a random
    sub-pixel translation, and that flow (frame 1 -> 2) per pixel, ``n x size x size x 2``."""
    big = _texture(rng, n, size + 8)
    shift = torch.tensor(rng.uniform(-1.5, 1.5, (n, 2)), dtype=torch.float32)
    f1 = big[:, 4:-4, 4:-4]
    # frame 2 at p + shift shows what frame 1 shows at p: frame2(q) = frame1(q - shift)
    back = -shift[:, None, None, :].expand(n, size + 8, size + 8, 2)
    f2 = warp(big, back)[:, 4:-4, 4:-4]
    return torch.stack([f1, f2], dim=1), shift[:, None, None, :].expand(n, size, size, 2).clone()


def test_warp_moves_a_frame_by_an_integer_flow_and_keeps_a_zero_flow():
    frames = torch.arange(2 * 5 * 6 * 3, dtype=torch.float32).reshape(2, 5, 6, 3)
    assert torch.allclose(warp(frames, torch.zeros(2, 5, 6, 2)), frames, atol=1e-4)
    right = torch.zeros(2, 5, 6, 2)
    right[..., 0] = 1.0  # sample one pixel to the right
    out = warp(frames, right)
    assert torch.allclose(out[:, :, :-1], frames[:, :, 1:], atol=1e-4)
    assert torch.allclose(out[:, :, -1], frames[:, :, -1], atol=1e-4)  # the border repeats


def test_an_untrained_refiner_returns_the_flow_unchanged():
    rng = np.random.default_rng(0)
    frames, truth = _pair(rng, 2)
    flow = 0.5 * truth
    out = FlowRefiner(iterations=2, channels=8)(frames, flow)
    assert out.shape == flow.shape and torch.equal(out, flow)


def test_training_the_refiner_corrects_a_flow_it_is_given():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    refiner = FlowRefiner(iterations=2, channels=16)
    opt = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    for _ in range(150):
        frames, truth = _pair(rng, 8)
        loss = (refiner(frames, torch.zeros_like(truth)) - truth).norm(dim=-1)[:, 3:-3, 3:-3].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    frames, truth = _pair(np.random.default_rng(99), 16)
    with torch.no_grad():
        refined = refiner(frames, torch.zeros_like(truth))
    before = truth.norm(dim=-1)[:, 3:-3, 3:-3].mean()
    after = (refined - truth).norm(dim=-1)[:, 3:-3, 3:-3].mean()
    assert after < 0.5 * before, (float(before), float(after))


def test_the_decoder_refines_its_flow_and_the_first_estimate_learns_from_the_refined_error(tiny_config):
    torch.manual_seed(0)
    model = StreamingPerceiverIO(tiny_config.merged({"flow": {"refine": 2, "refine_channels": 8}}))
    assert isinstance(model.flow.refine, FlowRefiner) and model.flow.refine.iterations == 2
    batch = make_batch(b=3, frames=[4, 1, 2])
    out = model(batch)
    assert out.flow.shape == (3, HW, HW, 2) and out.flow_valid.tolist() == [True, False, True]
    assert torch.all(out.flow[1] == 0)
    out.flow[out.flow_valid].abs().sum().backward()
    # the zero-initialised last layer gets a gradient, and so does the decoder before the refiner
    assert model.flow.refine.net[-1].weight.grad.abs().sum() > 0
    assert model.flow.patch_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="flow.refine"):
        tiny_config.merged({"flow": {"refine": -1}})
