"""Which modality reaches what in StreamingPerceiverIO: modalities' own latents, absent modalities
leaving no trace, the learned gates, modality dropout, windows without any modality."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from perceiver_stream.checkpoint import load_checkpoint, save_checkpoint
from perceiver_stream.multimodal import drop_modalities
from perceiver_stream.streaming import StreamingPerceiverIO
from tiny import HW, assert_outputs_close, make_batch, row


@pytest.fixture(scope="module")
def corr_model(tiny_config) -> StreamingPerceiverIO:
    """The tiny model with a flow correlation volume."""
    torch.manual_seed(0)
    return StreamingPerceiverIO(tiny_config.merged({"flow": {"corr_radius": 2}})).eval()


@pytest.fixture(scope="module")
def local_model(tiny_config) -> StreamingPerceiverIO:
    """The tiny model with point edge features over the last scans and convolutional flow queries."""
    torch.manual_seed(0)
    points = {"local_k": 4, "local_channels": 8, "scans": 2, "global_pool": True}
    cfg = tiny_config.merged({"flow": {"query_hidden": 8}, "encoder": {"modality_latents": {"points": 2, "audio": 1}},
                              "modalities": {"points": points}})
    return StreamingPerceiverIO(cfg).eval()


@torch.no_grad()
def test_local_features_model_shapes_and_checkpoint_round_trip(local_model, tmp_path):
    batch = make_batch(b=3, frames=[4, 1, 2])
    out = local_model(batch)
    assert out.flow.shape == (3, HW, HW, 2) and out.flow_valid.tolist() == [True, False, True]
    assert torch.isfinite(out.flow).all() and torch.isfinite(out.embedding).all()
    save_checkpoint(tmp_path / "ck", local_model, {"note": "stem"})
    again, meta = load_checkpoint(tmp_path / "ck")
    assert again.config.modalities["points"] == local_model.config.modalities["points"]
    assert again.config.flow.query_hidden == 8 and meta["note"] == "stem"
    assert_outputs_close(again.eval()(batch), out, atol=0)


@torch.no_grad()
def test_modality_latents_attend_to_their_own_modality_alone(tiny_config):
    torch.manual_seed(0)
    m = StreamingPerceiverIO(tiny_config.merged({"encoder": {"modality_latents": {"points": 3, "audio": 0}}})).eval()
    assert m.encoder.latents.shape == (8 + 3, 32) and m.config.total_latents == 11
    assert m.latent_modality.tolist() == [-1] * 8 + [2] * 3
    batch = make_batch(b=2)
    encoded, z = m.encode(batch)
    assert encoded.shape == z.shape == (2, 11, 32)
    video = batch.modalities["video"]
    other_video = replace(batch, modalities={**batch.modalities, "video": replace(video, values=255 - video.values)})
    encoded2, _ = m.encode(other_video)
    torch.testing.assert_close(encoded2[:, 8:], encoded[:, 8:])  # the points' own latents never see video
    assert not torch.allclose(encoded2[:, :8], encoded[:, :8])  # the shared ones do
    pts = batch.modalities["points"]
    other_points = replace(batch, modalities={**batch.modalities, "points": replace(pts, values=-pts.values)})
    assert not torch.allclose(m.encode(other_points)[0][:, 8:], encoded[:, 8:])
    with pytest.raises(ValueError, match="modality_latents"):
        tiny_config.merged({"encoder": {"modality_latents": {"lidar": 2}}})


@torch.no_grad()
@pytest.mark.parametrize("which", ["tiny_model", "corr_model", "local_model"],
                         ids=["model", "corr_model", "local_model"])  # (the ids the tests had)
@pytest.mark.parametrize("modality", ["audio", "points", "video"])
def test_absent_modality_leaves_no_trace(request, which, modality):
    model = request.getfixturevalue(which)
    batch = make_batch(b=3, frames=[4, 3, 2])
    m = batch.modalities[modality]
    absent_m = replace(m, present=torch.tensor([True, False, True]))
    absent = replace(batch, modalities={**batch.modalities, modality: absent_m})
    garbage_values = m.values.clone()
    if garbage_values.dtype == torch.uint8:
        garbage_values[1] = 255 - garbage_values[1]
    else:
        garbage_values[1] = float("nan")
    garbage_times = m.times.clone()
    garbage_times[1] = 1e12
    garbage = replace(absent, modalities={**absent.modalities, modality: replace(
        absent.modalities[modality], values=garbage_values, times=garbage_times)})
    a, g = model(absent), model(garbage)
    assert_outputs_close(a, g, atol=0)
    # Absent in row 1 = the modality missing from that window altogether.
    without = {k: v for k, v in batch.modalities.items() if k != modality}
    one = row(batch, 1)
    alone = model(replace(one, modalities={k: v for k, v in one.modalities.items() if k != modality}))
    torch.testing.assert_close(a.embedding[1:2], alone.embedding, atol=1e-5, rtol=1e-4)
    # A modality absent everywhere contributes no tokens at all.
    nowhere_m = replace(m, present=torch.zeros(3, dtype=torch.bool))
    nowhere = replace(batch, modalities={**batch.modalities, modality: nowhere_m})
    torch.testing.assert_close(model(nowhere).embedding, model(replace(batch, modalities=without)).embedding)


@torch.no_grad()
def test_modality_gates(tiny_config):
    torch.manual_seed(2)
    m = StreamingPerceiverIO(tiny_config).eval()
    gates = m.modality_gates()
    assert list(gates) == ["video", "audio", "points"]
    assert all(torch.allclose(g, torch.tensor(0.5)) for g in gates.values())
    batch = make_batch(b=2)
    before = m(batch).embedding
    m.modality_gate.data[2] = -8.0  # points nearly shut out
    shut = m(batch).embedding
    assert not torch.allclose(before, shut, atol=1e-4)
    assert m.modality_gates()["points"].max() < 1e-3
    # Shutting a modality's gate approaches dropping it.
    no_points = replace(batch, modalities={k: v for k, v in batch.modalities.items() if k != "points"})
    dropped = m(no_points).embedding
    assert (shut - dropped).abs().max() < (before - dropped).abs().max()


def test_drop_modalities_never_drops_everything():
    batch = make_batch(b=64, targets=False)
    g = torch.Generator().manual_seed(0)
    out = drop_modalities(batch, 0.9, g)
    present = torch.stack([m.present for m in out.modalities.values()], dim=1)
    assert present.any(dim=1).all()
    assert (present.sum(dim=1) < 3).float().mean() > 0.5
    assert drop_modalities(batch, 0.0) is batch
    # Rows that had only one modality keep it.
    only_audio = replace(batch, modalities={k: replace(m, present=torch.full((64,), k == "audio"))
                                            for k, m in batch.modalities.items()})
    kept = drop_modalities(only_audio, 0.9, g)
    assert kept.modalities["audio"].present.all()
    with pytest.raises(ValueError):
        drop_modalities(batch, 1.0)
    # Fixed draws drop the same modalities every time: below p dropped, the largest kept if all are.
    draws = torch.tensor([[0.1, 0.8, 0.9], [0.1, 0.2, 0.3], [0.95, 0.1, 0.6]]).repeat(22, 1)[:64]
    for seed in (1, 2):
        out = drop_modalities(make_batch(b=64, seed=seed, targets=False), 0.5, draws=draws)
        present = torch.stack([m.present for m in out.modalities.values()], dim=1)
        assert present[:3].tolist() == [[False, True, True], [False, False, True], [True, False, True]]
    with pytest.raises(ValueError, match="rows x modalities"):
        drop_modalities(batch, 0.5, draws=draws[:, :2])


@torch.no_grad()
def test_window_without_any_modality(tiny_model):
    batch = make_batch(b=2)
    none_present = replace(batch, modalities={k: replace(m, present=torch.tensor([True, False]))
                                              for k, m in batch.modalities.items()})
    out = tiny_model(none_present)
    assert torch.isfinite(out.embedding).all() and out.flow_valid.tolist() == [True, False]
    empty = tiny_model(replace(batch, modalities={}))
    torch.testing.assert_close(empty.embedding[1], out.embedding[1])
    assert empty.flow is None
