"""The multimodal preprocessor: own channels per modality, learned vectors, norms, masks, absent modalities."""

from __future__ import annotations

import pytest
import torch

from perceiver_stream.adapters import build_adapter
from perceiver_stream.batch import Batch, ModalityBatch
from perceiver_stream.multimodal import MultimodalPreprocessor


def points_mb(b: int, n: int, present: list[bool], seed: int = 0) -> ModalityBatch:
    g = torch.Generator().manual_seed(seed)
    return ModalityBatch(torch.rand(b, n, 4, generator=g), torch.zeros(b, n, dtype=torch.float64),
                         torch.ones(b, n, dtype=torch.bool), torch.tensor(present))


def batch(mods: dict[str, ModalityBatch], b: int = 2) -> Batch:
    z = torch.zeros(b, dtype=torch.float64)
    return Batch([f"s{i}" for i in range(b)], torch.arange(b), z, z + 1, torch.ones(b, dtype=torch.bool), mods)


def sonar_and_lidar() -> dict:
    """Two small point adapters of different widths."""
    return {
        "sonar": build_adapter({"kind": "points", "pos_bands": 1, "feature_channels": 0, "time_bands": 1}),
        "lidar": build_adapter({"kind": "points", "pos_bands": 2, "time_bands": 2}),
    }


@pytest.fixture
def pre() -> MultimodalPreprocessor:
    torch.manual_seed(0)
    return MultimodalPreprocessor(sonar_and_lidar(), min_padding=3)


def test_width_and_learned_vectors(pre):
    cs, cl = (a.out_channels for a in pre.adapters.values())
    assert cs != cl and pre.width == cs + cl + 3 and pre.offsets == {"sonar": 0, "lidar": cs}
    out = pre(batch({"sonar": points_mb(2, 4, [True, True]), "lidar": points_mb(2, 5, [True, True], seed=1)}))
    assert out.tokens.shape == (2, 9, pre.width) and out.sizes == {"sonar": 4, "lidar": 5}
    # outside its own slice, each modality's tokens hold its learned vector alone
    torch.testing.assert_close(out.tokens[0, 0, cs:], pre.padding["sonar"][cs:])
    torch.testing.assert_close(out.tokens[1, 6, :cs], pre.padding["lidar"][:cs])
    torch.testing.assert_close(out.tokens[1, 6, cs + cl:], pre.padding["lidar"][cs + cl:])
    assert out.mask.all()
    # gradients reach the vectors (they are learned)
    out.tokens.sum().backward()
    assert pre.padding["sonar"].grad is not None and pre.padding["sonar"].grad.abs().sum() > 0


def test_absent_rows_are_masked_and_zeroed(pre):
    lidar = points_mb(2, 5, [True, False])
    lidar.values[1] = float("nan")
    out = pre(batch({"sonar": points_mb(2, 4, [True, True]), "lidar": lidar}))
    assert out.mask[1, 4:].sum() == 0 and out.mask[0].all()
    assert torch.all(out.tokens[1, 4:] == 0) and torch.isfinite(out.tokens).all()


def test_missing_or_nowhere_present_modality_adds_no_tokens(pre):
    only_sonar = pre(batch({"sonar": points_mb(2, 4, [True, True])}))
    nowhere = pre(batch({"sonar": points_mb(2, 4, [True, True]), "lidar": points_mb(2, 5, [False, False])}))
    assert only_sonar.tokens.shape[1] == nowhere.tokens.shape[1] == 4
    assert nowhere.sizes == {"sonar": 4}
    # a modality without an adapter is ignored
    extra = pre(batch({"sonar": points_mb(2, 4, [True, True]), "radar": points_mb(2, 3, [True, True])}))
    assert extra.tokens.shape[1] == 4
    empty = pre(batch({}))
    assert empty.tokens.shape == (2, 0, pre.width) and empty.mask.shape == (2, 0) and empty.sizes == {}


def test_modality_norms_put_each_modality_on_its_own_scale(pre):
    lidar = points_mb(2, 5, [True, False])
    lidar.values[1] = float("nan")
    b = batch({"sonar": points_mb(2, 4, [True, True]), "lidar": lidar})
    out = pre(b)
    cs, cl = pre.offsets["lidar"], pre.adapters["lidar"].out_channels
    lid = out.tokens[0, 4:, cs:cs + cl] - pre.padding["lidar"][cs:cs + cl]
    # each real token over its own adapter's channels: mean 0, variance 1 (the norm's initial affine)
    torch.testing.assert_close(lid.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(lid.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    # scaling the adapter's output changes nothing after the norm
    x, _ = pre.adapters["lidar"](b.modalities["lidar"], b.t_end)
    torch.testing.assert_close(pre.norms["lidar"](10 * x[0]), lid, atol=1e-4, rtol=1e-4)
    assert torch.all(out.tokens[1, 4:] == 0) and torch.isfinite(out.tokens).all()


def test_own_channels_give_each_modality_a_slice_of_the_token(pre):
    cs, cl = pre.adapters["sonar"].out_channels, pre.adapters["lidar"].out_channels
    lidar = points_mb(2, 5, [True, False])
    lidar.values[1] = float("nan")
    b = batch({"sonar": points_mb(2, 4, [True, True]), "lidar": lidar})
    out = pre(b)
    x, _ = pre.adapters["lidar"](b.modalities["lidar"], b.t_end)
    # a lidar token: its normalised features in the lidar slice, zero elsewhere, plus the lidar vector everywhere
    expect = torch.cat([torch.zeros(5, cs), pre.norms["lidar"](x[0]), torch.zeros(5, 3)], dim=-1) + pre.padding["lidar"]
    torch.testing.assert_close(out.tokens[0, 4:], expect)
    # so a key/value weight that reads the lidar slice learns nothing from the sonar's features
    grads = []
    for seed in (0, 1):
        w = torch.zeros(pre.width, requires_grad=True)
        (pre(batch({"sonar": points_mb(2, 4, [True, True], seed=seed)})).tokens @ w).sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0][cs:cs + cl], grads[1][cs:cs + cl])
    assert not torch.allclose(grads[0][:cs], grads[1][:cs])
    assert torch.all(out.tokens[1, 4:] == 0) and torch.isfinite(out.tokens).all()
