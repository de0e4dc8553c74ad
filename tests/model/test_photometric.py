"""`perceiver_stream.photometric`: the census / smoothness / occlusion terms and the flow terms of training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from perceiver_stream.photometric import PhotometricFlowLoss, TeacherFlowLoss, occlusion_mask, photometric_loss, warp
from perceiver_stream.streaming import StreamingPerceiverIO
from perceiver_stream.train import SupervisedObjective
from tiny import make_batch


def _texture(seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")


def _flow(dx: float, dy: float = 0.0, size: int = 32) -> torch.Tensor:
    f = torch.zeros(1, size, size, 2)
    f[..., 0], f[..., 1] = dx, dy
    return f


def test_identical_frames_with_zero_flow_cost_nothing():
    img = _texture()
    parts = photometric_loss(img, img, _flow(0), _flow(0))
    assert float(parts["photo_census"]) == 0.0 and float(parts["photo_smooth"]) == 0.0
    assert float(parts["photo_occluded"]) == 0.0


def test_the_true_shift_costs_less_than_zero_flow():
    img = _texture(1)
    moved = img.roll(shifts=2, dims=3)  # the content moves 2 px right: forward flow dx = +2
    true = photometric_loss(img, moved, _flow(2), _flow(-2))["photo_census"]
    zero = photometric_loss(img, moved, _flow(0), _flow(0))["photo_census"]
    wrong = photometric_loss(img, moved, _flow(-2), _flow(2))["photo_census"]
    assert float(true) < 0.2 * float(zero) and float(zero) < float(wrong)


def test_warp_samples_along_the_flow_and_flags_points_outside():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    out, inside = warp(img, _flow(1, 0, size=4))
    assert torch.equal(out[0, 0, :, :3], img[0, 0, :, 1:])
    assert inside[0, 0, :, :3].all() and not inside[0, 0, :, 3].any()


def test_occlusion_mask_keeps_consistent_pixels_and_drops_inconsistent_ones():
    fwd = _flow(2)
    assert occlusion_mask(fwd, _flow(-2)).all()
    back = _flow(-2)
    back[:, :, 16:] = 2.0  # the right half's backward flow does not undo the forward flow
    mask = occlusion_mask(fwd, back)[0, 0]
    assert mask[:, :10].all() and not mask[:, 20:].any()


def test_photometric_flow_term_trains_the_flow_without_truth(tiny_config):
    torch.manual_seed(0)
    model = StreamingPerceiverIO(tiny_config)
    objective = SupervisedObjective(model, flow_term=PhotometricFlowLoss(model), carry_state=False)
    loss, parts = objective(0, make_batch())
    assert {"flow_loss", "photo_census", "photo_smooth", "photo_occluded", "flow_epe"} <= set(parts)
    assert not parts["flow_epe"].requires_grad  # the truth is reported, not trained on
    loss.backward()
    assert model.flow.attend.proj.weight.grad.abs().sum() > 0


def test_teacher_flow_term_is_zero_against_itself(tiny_model):
    batch = make_batch(targets=False)
    parts = TeacherFlowLoss(tiny_model)(batch, tiny_model(batch))
    assert float(parts["flow_loss"].detach()) < 1e-5
