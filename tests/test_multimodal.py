"""The multimodal preprocessor: common width, learned padding, masks, absent modalities, mask tokens."""

from __future__ import annotations

import pytest
import torch

from perceiver_stream.adapters import build_adapter
from perceiver_stream.batch import Batch, ModalityBatch
from perceiver_stream.multimodal import MultimodalPreprocessor, TokenMLP


def labels_mb(b: int, n: int, present: list[bool]) -> ModalityBatch:
    return ModalityBatch(torch.randint(0, 3, (b, n)), torch.zeros(b, n, dtype=torch.float64),
                         torch.ones(b, n, dtype=torch.bool), torch.tensor(present))


def points_mb(b: int, n: int, present: list[bool]) -> ModalityBatch:
    return ModalityBatch(torch.rand(b, n, 4), torch.zeros(b, n, dtype=torch.float64),
                         torch.ones(b, n, dtype=torch.bool), torch.tensor(present))


def batch(mods: dict[str, ModalityBatch], b: int = 2) -> Batch:
    z = torch.zeros(b, dtype=torch.float64)
    return Batch([f"s{i}" for i in range(b)], torch.arange(b), z, z + 1, torch.ones(b, dtype=torch.bool), mods)


def tags_and_lidar() -> dict:
    """A labels adapter and a points adapter (small)."""
    return {
        "tags": build_adapter({"kind": "labels", "num_classes": 3, "time_bands": 2}),
        "lidar": build_adapter({"kind": "points", "pos_bands": 2, "time_bands": 2}),
    }


@pytest.fixture
def pre() -> MultimodalPreprocessor:
    torch.manual_seed(0)
    adapters = tags_and_lidar()
    return MultimodalPreprocessor(adapters, min_padding=3)


def test_common_width_and_learned_padding(pre):
    widths = {k: a.out_channels for k, a in pre.adapters.items()}
    assert pre.width == max(widths.values()) + 3
    out = pre(batch({"tags": labels_mb(2, 4, [True, True]), "lidar": points_mb(2, 5, [True, True])}))
    assert out.tokens.shape == (2, 9, pre.width)
    assert out.modality.tolist() == [0] * 4 + [1] * 5
    # each modality's tokens end with its own learned padding vector
    torch.testing.assert_close(out.tokens[0, 0, widths["tags"]:], pre.padding["tags"])
    torch.testing.assert_close(out.tokens[1, 6, widths["lidar"]:], pre.padding["lidar"])
    assert out.mask.all()
    # gradients reach the padding vectors (they are learned)
    out.tokens.sum().backward()
    assert pre.padding["tags"].grad is not None and pre.padding["tags"].grad.abs().sum() > 0


def test_absent_rows_are_masked_and_zeroed(pre):
    lidar = points_mb(2, 5, [True, False])
    lidar.values[1] = float("nan")
    out = pre(batch({"tags": labels_mb(2, 4, [True, True]), "lidar": lidar}))
    assert out.mask[1, 4:].sum() == 0 and out.mask[0].all()
    assert torch.all(out.tokens[1, 4:] == 0) and torch.isfinite(out.tokens).all()


def test_missing_or_nowhere_present_modality_adds_no_tokens(pre):
    only_tags = pre(batch({"tags": labels_mb(2, 4, [True, True])}))
    nowhere = pre(batch({"tags": labels_mb(2, 4, [True, True]), "lidar": points_mb(2, 5, [False, False])}))
    assert only_tags.tokens.shape[1] == nowhere.tokens.shape[1] == 4
    # a modality without an adapter is ignored
    extra = pre(batch({"tags": labels_mb(2, 4, [True, True]), "radar": points_mb(2, 3, [True, True])}))
    assert extra.tokens.shape[1] == 4
    empty = pre(batch({}))
    assert empty.tokens.shape == (2, 0, pre.width) and empty.mask.shape == (2, 0)


def test_mask_tokens_only_in_training():
    torch.manual_seed(1)
    adapters = {"lidar": build_adapter({"kind": "points", "pos_bands": 2, "time_bands": 2})}
    pre = MultimodalPreprocessor(adapters, mask_probs={"lidar": 0.5})
    b = batch({"lidar": points_mb(2, 400, [True, True])})
    pre.eval()
    clean = pre(b).tokens
    pre.train()
    masked = pre(b).tokens
    hit = (masked == pre.mask_tokens["lidar"]).all(dim=-1)
    assert 0.35 < hit.float().mean() < 0.65
    torch.testing.assert_close(masked[~hit], clean[~hit])
    pre.eval()
    torch.testing.assert_close(pre(b).tokens, clean)
    with pytest.raises(ValueError, match="without an adapter"):
        MultimodalPreprocessor(adapters, mask_probs={"video": 0.1})


def test_token_mlp_transforms_each_token_on_its_own():
    torch.manual_seed(3)
    adapters = tags_and_lidar()
    plain = MultimodalPreprocessor(adapters, min_padding=3)
    pre = MultimodalPreprocessor(adapters, min_padding=3, token_mlps={"lidar": 16})
    pre.padding.load_state_dict(plain.padding.state_dict())
    assert pre.width == plain.width and list(pre.token_mlps) == ["lidar"]
    lidar = points_mb(2, 5, [True, False])
    lidar.values[1] = float("nan")
    b = batch({"tags": labels_mb(2, 4, [True, True]), "lidar": lidar})
    out, ref = pre(b), plain(b)
    assert out.tokens.shape == ref.tokens.shape == (2, 9, pre.width)
    # tags have no MLP: unchanged; lidar tokens are the MLP of the adapter's tokens, padding after them
    torch.testing.assert_close(out.tokens[:, :4], ref.tokens[:, :4])
    c = adapters["lidar"].out_channels
    mlp = pre.token_mlps["lidar"]
    torch.testing.assert_close(out.tokens[0, 4:, :c], mlp(ref.tokens[0, 4:, :c]))
    assert not torch.allclose(out.tokens[0, 4:, :c], ref.tokens[0, 4:, :c])
    # one token's output does not depend on the others (per-point, PointNet style)
    torch.testing.assert_close(mlp(ref.tokens[0, 4:5, :c]), out.tokens[0, 4:5, :c])
    # an absent row stays masked, zeroed and finite even with NaN values
    assert torch.all(out.tokens[1, 4:] == 0) and torch.isfinite(out.tokens).all()
    with pytest.raises(ValueError, match="without an adapter"):
        MultimodalPreprocessor(adapters, token_mlps={"video": 8})
    with pytest.raises(ValueError, match="at least 1"):
        TokenMLP(4, 0)


def test_modality_norms_put_each_modality_on_its_own_scale():
    torch.manual_seed(4)
    adapters = tags_and_lidar()
    plain = MultimodalPreprocessor(adapters, min_padding=3)
    pre = MultimodalPreprocessor(adapters, min_padding=3, norms=True)
    pre.padding.load_state_dict(plain.padding.state_dict())
    lidar = points_mb(2, 5, [True, False])
    lidar.values[1] = float("nan")
    b = batch({"tags": labels_mb(2, 4, [True, True]), "lidar": lidar})
    out, ref = pre(b), plain(b)
    c = adapters["lidar"].out_channels
    lid = out.tokens[0, 4:, :c]
    # each real token over its own adapter's channels: mean 0, variance 1 (the norm's initial affine)
    torch.testing.assert_close(lid.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(lid.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    torch.testing.assert_close(lid, pre.norms["lidar"](ref.tokens[0, 4:, :c]))
    # scaling the adapter's output changes nothing after the norm; the padding is left as it is
    x, _ = adapters["lidar"](b.modalities["lidar"], b.t_end)
    torch.testing.assert_close(pre.norms["lidar"](10 * x[0]), lid, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.tokens[0, 4:, c:], ref.tokens[0, 4:, c:])
    assert torch.all(out.tokens[1, 4:] == 0) and torch.isfinite(out.tokens).all()


def test_own_channels_give_each_modality_a_slice_of_the_token():
    torch.manual_seed(5)
    adapters = tags_and_lidar()
    pre = MultimodalPreprocessor(adapters, min_padding=3, own_channels=True)
    ct, cl = adapters["tags"].out_channels, adapters["lidar"].out_channels
    assert pre.width == ct + cl + 3 and pre.offsets == {"tags": 0, "lidar": ct}
    lidar = points_mb(2, 5, [True, False])
    lidar.values[1] = float("nan")
    b = batch({"tags": labels_mb(2, 4, [True, True]), "lidar": lidar})
    out = pre(b)
    x, _ = adapters["lidar"](b.modalities["lidar"], b.t_end)
    # a lidar token: its features in the lidar slice, zero elsewhere, plus the lidar vector everywhere
    expect = torch.cat([torch.zeros(5, ct), x[0], torch.zeros(5, 3)], dim=-1) + pre.padding["lidar"]
    torch.testing.assert_close(out.tokens[0, 4:], expect)
    # so a key/value weight that reads the lidar slice learns nothing from the tags' features
    grads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        w = torch.zeros(pre.width, requires_grad=True)
        (pre(batch({"tags": labels_mb(2, 4, [True, True])})).tokens @ w).sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0][ct:ct + cl], grads[1][ct:ct + cl])
    assert not torch.allclose(grads[0][:ct], grads[1][:ct])
    assert torch.all(out.tokens[1, 4:] == 0) and torch.isfinite(out.tokens).all()
