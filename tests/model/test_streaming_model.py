"""StreamingPerceiverIO: shapes, streaming state, modality gating, chunking, checkpoints, training."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from perceiver_stream.adapters.video import normalise_frames
from perceiver_stream.batch import Batch, ModalityBatch, Targets
from perceiver_stream.checkpoint import load_checkpoint, read_config, save_checkpoint
from perceiver_stream.multimodal import drop_modalities
from perceiver_stream.config import StreamingConfig, deep_merge
from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates
from perceiver_stream.train import losses, train

RATE = 4000
HW = 16


def small_config(**overrides) -> StreamingConfig:
    """A tiny model over video, audio and points (fast on one CPU thread); ``overrides`` are nested
    sections deep-merged into it (``encoder={"num_latents": 4}``)."""
    base = dict(
        modalities={
            "video": {"kind": "video", "patch": 4, "frames": 2, "pos_bands": 4, "time_bands": 4},
            "audio": {"kind": "audio_mel", "sample_rate": RATE, "n_fft": 128, "hop_length": 64, "n_mels": 16,
                      "time_bands": 4},
            "points": {"kind": "points", "pos_bands": 4, "max_points": 48, "time_bands": 4},
        },
        encoder={"num_latents": 8, "latent_channels": 32, "self_heads": 2},
        flow={"size": (HW, HW), "pos_bands": 4, "channels": 16},
        labels={"class_names": ("a", "b", "c")},
    )
    return StreamingConfig.from_dict(deep_merge(base, overrides))


def make_batch(b: int = 3, seed: int = 0, frames: list[int] | None = None, points: list[int] | None = None,
               targets: bool = True) -> Batch:
    """Random windows of 1 s with per-row frame / point counts (padding at the end of each row)."""
    g = torch.Generator().manual_seed(seed)
    frames = frames or [4] * b
    points = points or [40] * b
    t0 = 1000.0 + torch.arange(b, dtype=torch.float64) * 0.5
    tmax, pmax, s = max(frames), max(points), RATE
    fmask = torch.arange(tmax)[None] < torch.tensor(frames)[:, None]
    pmask = torch.arange(pmax)[None] < torch.tensor(points)[:, None]
    video = ModalityBatch(
        torch.randint(0, 256, (b, tmax, HW, HW, 3), dtype=torch.uint8, generator=g),
        t0[:, None] + torch.arange(tmax, dtype=torch.float64) * 0.25,
        fmask,
        torch.tensor(frames) > 0,
    )
    audio = ModalityBatch(
        0.3 * torch.randn(b, s, 1, generator=g),
        t0[:, None] + torch.arange(s, dtype=torch.float64) / RATE,
        torch.ones(b, s, dtype=torch.bool),
        torch.ones(b, dtype=torch.bool),
        rate=float(RATE),
    )
    pts = ModalityBatch(
        3 * torch.randn(b, pmax, 4, generator=g),
        t0[:, None] + 0.5 + torch.zeros(b, pmax, dtype=torch.float64),
        pmask,
        torch.tensor(points) > 0,
    )
    tg = None
    if targets:
        tg = Targets(torch.randn(b, HW, HW, 2, generator=g), torch.ones(b, dtype=torch.bool),
                     torch.randint(0, 3, (b,), generator=g))
    return Batch([f"s{i}" for i in range(b)], torch.arange(b), t0, t0 + 1.0, torch.ones(b, dtype=torch.bool),
                 {"video": video, "audio": audio, "points": pts}, tg)


def row(batch: Batch, i: int) -> Batch:
    """Window ``i`` of ``batch`` alone, trimmed to its own length (no foreign padding)."""
    mods = {}
    for k, m in batch.modalities.items():
        n = int(m.mask[i].sum()) or 1
        mods[k] = ModalityBatch(m.values[i:i + 1, :n], m.times[i:i + 1, :n], m.mask[i:i + 1, :n],
                                m.present[i:i + 1], m.rate)
    return Batch([batch.stream_ids[i]], batch.window_ids[i:i + 1], batch.t_start[i:i + 1], batch.t_end[i:i + 1],
                 batch.reset[i:i + 1], mods)


def assert_outputs_close(a, b, atol=1e-5) -> None:
    torch.testing.assert_close(a.embedding, b.embedding, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.label_logits, b.label_logits, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.flow, b.flow, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.state, b.state, atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def model() -> StreamingPerceiverIO:
    torch.manual_seed(0)
    return StreamingPerceiverIO(small_config()).eval()


@pytest.fixture(scope="module")
def corr_model() -> StreamingPerceiverIO:
    """The small model with a flow correlation volume."""
    torch.manual_seed(0)
    return StreamingPerceiverIO(small_config(flow={"corr_radius": 2})).eval()


@pytest.fixture(scope="module")
def local_model() -> StreamingPerceiverIO:
    """The small model with point edge features over the last scans and convolutional flow queries."""
    torch.manual_seed(0)
    cfg = small_config(flow={"query_hidden": 8}, encoder={"modality_latents": {"points": 2, "audio": 1}},
                       modalities={"points": {"local_k": 4, "local_channels": 8, "scans": 2, "global_pool": True}})
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
def test_flow_stride_decodes_a_coarser_grid_and_upsamples_it():
    torch.manual_seed(0)
    coarse = StreamingPerceiverIO(small_config(flow={"stride": 2, "query_hidden": 4})).eval()
    batch = make_batch(b=3, frames=[4, 1, 2])
    out = coarse(batch)
    assert out.flow.shape == (3, HW, HW, 2) and out.flow_valid.tolist() == [True, False, True]
    assert torch.all(out.flow[1] == 0)
    # bilinear x2 upsampling: inside, each pixel lies between coarse cells (no blocks of copies)
    f = out.flow[0]
    assert not torch.equal(f[2, 2], f[2, 3])
    # the decoder ran on 8 x 8 queries: a flow equal to its own 2x2 block means, up to upsampling
    pooled = torch.nn.functional.avg_pool2d(f.permute(2, 0, 1)[None], 2)[0]
    up = torch.nn.functional.interpolate(pooled[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    assert (up.permute(1, 2, 0) - f)[2:-2, 2:-2].abs().max() < 0.5 * f.abs().max()
    with pytest.raises(ValueError, match="flow.stride"):
        small_config(flow={"stride": 3})


@torch.no_grad()
def test_labels_read_the_latents_before_the_tower():
    torch.manual_seed(0)
    m = StreamingPerceiverIO(small_config()).eval()
    batch = make_batch(b=2)
    before = m(batch)
    for p in m.encoder.self_attends.parameters():
        p.add_(0.5 * torch.randn_like(p))
    after = m(batch)
    torch.testing.assert_close(after.label_logits, before.label_logits)  # the tower is not on their path
    torch.testing.assert_close(m.labels.head(m.latent_label_read(batch)), after.label_logits)  # (nor on this one)
    assert not torch.allclose(after.embedding, before.embedding)  # flow, embedding, state still read z
    assert not torch.allclose(after.flow, before.flow)


@torch.no_grad()
def test_modality_latents_attend_to_their_own_modality_alone():
    torch.manual_seed(0)
    m = StreamingPerceiverIO(small_config(encoder={"modality_latents": {"points": 3, "audio": 0}})).eval()
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
        small_config(encoder={"modality_latents": {"lidar": 2}})


def absent_in_row_1(batch: Batch, name: str) -> Batch:
    """``batch`` (3 rows) with modality ``name`` absent from its second row."""
    m = batch.modalities[name]
    return replace(batch, modalities={**batch.modalities, name: replace(m, present=torch.tensor([True, False, True]))})


def test_label_groups_read_each_modality_s_latents_and_are_supervised_where_present():
    torch.manual_seed(0)
    m = StreamingPerceiverIO(small_config(encoder={"modality_latents": {"points": 2, "audio": 3}})).eval()
    assert m.labels.groups == [(0, 8), (8, 11), (11, 13)] and m.group_modality == [None, "audio", "points"]
    batch = absent_in_row_1(make_batch(b=3), "points")
    out = m(batch)
    assert out.group_logits.shape == (3, 3, 3)
    assert out.group_valid.tolist() == [[True, True, True], [True, True, False], [True, True, True]]
    # the labels are the head of the groups' summed reads; each group's logits its read alone
    encoded, _ = m.encode(batch)
    terms = m.labels.group_reads(encoded)  # (the encoder's latents, before the tower)
    torch.testing.assert_close(out.label_logits, m.labels.head(terms.sum(1)))
    torch.testing.assert_close(out.group_logits, m.labels.head(terms))
    # a group reads its own latents alone: changing the points' latents moves only the points' read
    z2 = encoded.clone()
    z2[:, 11:] += 1.0
    moved = (m.labels.group_reads(z2) - terms).abs().amax(dim=(0, 2))
    assert moved[:2].tolist() == [0.0, 0.0] and moved[2] > 0
    # the per-group loss counts present groups only: row 1's points scores do not matter
    parts = losses(out, batch.targets)
    assert set(parts) == {"flow_epe", "label_ce", "group_ce"}
    scrambled = out.group_logits.clone()
    scrambled[1, 2] = torch.tensor([50.0, -50.0, 0.0])
    assert losses(replace(out, group_logits=scrambled), batch.targets)["group_ce"] == parts["group_ce"]
    scrambled[0, 2] = torch.tensor([50.0, -50.0, 0.0])
    assert losses(replace(out, group_logits=scrambled), batch.targets)["group_ce"] != parts["group_ce"]
    # without latents of its own, a model has one group: the shared latents
    assert StreamingPerceiverIO(small_config())(batch).group_logits.shape == (3, 1, 3)


@torch.no_grad()
def test_label_pool_reads_the_max_of_a_modality_s_tokens_and_leaves_no_trace_where_absent():
    torch.manual_seed(0)
    video_spec = {"kind": "video", "patch": 4, "frames": 2, "conv": 6, "pos_bands": 4, "time_bands": 4}
    mods = {**small_config().modalities, "video": video_spec}
    m = StreamingPerceiverIO(small_config(modalities=mods, encoder={"modality_latents": {"points": 2}},
                                          labels={"pool": ["video"]})).eval()
    a, z = m.preprocess.adapters["video"].pool_channels
    assert z - a == 6 and a == m.preprocess.adapters["video"].out_channels  # the stem's channels, after the tokens
    batch = absent_in_row_1(make_batch(b=3), "video")
    video = batch.modalities["video"]
    # the pooled read's gate starts shut: the labels are those of the model without it
    assert torch.all(m.labels.pooled_reads(m.preprocess(batch)) == 0)
    torch.testing.assert_close(m(batch).label_logits, m.labels.head(m.labels.group_reads(m.encode(batch)[0]).sum(1)))
    m.labels.pool_gates.fill_(1.0)
    out = m(batch)
    # groups: the shared latents and the points' latents (the pooled read is not a group)
    assert out.group_logits.shape == (3, 2, 3) and out.group_valid.all()
    tok = m.preprocess(batch)
    pooled = m.labels.pooled_reads(tok)
    raw, _ = m.preprocess.adapters["video"](batch.modalities["video"], batch.t_end)
    proj = m.labels.pools["video"](raw[..., a:z])
    torch.testing.assert_close(pooled[0, 0], proj[0].amax(dim=0))  # a max over the row's video tokens
    assert proj[0].argmax(dim=0).unique().numel() > 1  # (different tokens win different channels)
    assert torch.all(pooled[1] == 0)  # no video in row 1: nothing pooled
    terms = m.labels.group_reads(m.encode(batch)[0])
    torch.testing.assert_close(out.label_logits, m.labels.head(terms.sum(1) + pooled.sum(1)))
    torch.testing.assert_close(out.group_logits, m.labels.head(terms))
    # the same from the two reads, without decoding flow
    torch.testing.assert_close(m.labels.head(m.latent_label_read(batch) + m.pooled_label_read(batch)), out.label_logits)
    # a row without video gets the same labels as a batch that never had video
    none = m(replace(batch, modalities={k: v for k, v in batch.modalities.items() if k != "video"}))
    torch.testing.assert_close(out.label_logits[1], none.label_logits[1])
    # a box's corner anywhere moves the pooled read: one token's change reaches it through the max
    changed = video.values.clone()
    changed[0, :, :4, :4] = 255 - changed[0, :, :4, :4]
    moved = m.labels.pooled_reads(m.preprocess(replace(batch, modalities={**batch.modalities, "video": replace(
        batch.modalities["video"], values=changed)})))
    assert not torch.allclose(moved[0], pooled[0]) and torch.equal(moved[2], pooled[2])
    # the stem is trained by the pooled read alone: the flow (through the tokens) gives it no gradient
    with torch.enable_grad():
        m(batch).flow.sum().backward()
        stem = m.preprocess.adapters["video"].stem[0].weight
        assert stem.grad is None or torch.all(stem.grad == 0)
        m(batch).label_logits.sum().backward()
        assert stem.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels.pool"):
        small_config(labels={"pool": ["lidar"]})
    with pytest.raises(ValueError, match="poolable"):
        StreamingPerceiverIO(small_config(labels={"pool": ["points"]}))


@torch.no_grad()
def test_private_stem_channels_feed_the_pooled_read_alone():
    torch.manual_seed(0)
    plain = {"kind": "video", "patch": 4, "frames": 2, "pos_bands": 4, "time_bands": 4}
    base = StreamingPerceiverIO(small_config(modalities={"video": plain})).eval()
    private = {**plain, "conv": 6}
    m = StreamingPerceiverIO(small_config(modalities={"video": private}, labels={"pool": ["video"]})).eval()
    video = m.preprocess.adapters["video"]
    assert (video.out_channels, video.private_channels) == (base.preprocess.adapters["video"].out_channels, 6)
    assert video.pool_channels == (video.out_channels, video.out_channels + 6)
    assert m.preprocess.width == base.preprocess.width
    # a trained model given a private stem: only the stem and the pooled read are new weights...
    missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and {k.split(".")[0] for k in missing} == {"preprocess", "labels"}
    assert {k.split(".")[1] for k in missing if k.startswith("labels")} == {"pools", "pool_gates"}
    assert all(".stem." in k for k in missing if k.startswith("preprocess"))
    batch = make_batch(b=3)
    out, before = m(batch), base(batch)
    # ...its outputs are the model's own until the pooled read is trained; then only the labels move
    for field in ("flow", "embedding", "state", "label_logits"):
        torch.testing.assert_close(getattr(out, field), getattr(before, field))
    m.labels.pool_gates.fill_(1.0)
    out = m(batch)
    tok = m.preprocess(batch)
    torch.testing.assert_close(tok.tokens, base.preprocess(batch).tokens)
    for field in ("flow", "embedding", "state"):
        torch.testing.assert_close(getattr(out, field), getattr(before, field))
    assert not torch.allclose(out.label_logits, before.label_logits)
    stem = video.stem(normalise_frames(batch.modalities["video"].values[:, -1]).permute(0, 3, 1, 2))
    last = stem.flatten(2).transpose(1, 2)  # the last frame's tokens come last
    torch.testing.assert_close(tok.without_pos["video"][:, -last.shape[1]:], last)
    with pytest.raises(ValueError, match="pooled read alone"):
        StreamingPerceiverIO(small_config(modalities={"video": private}))


@torch.no_grad()
def test_shapes_and_flow_validity(model):
    batch = make_batch(b=3, frames=[4, 1, 2])
    out = model(batch)
    assert out.embedding.shape == (3, 32)
    assert out.label_logits.shape == (3, 3)
    assert out.flow.shape == (3, HW, HW, 2)
    assert out.state.shape == (3, 8, 32)
    assert out.flow_valid.tolist() == [True, False, True]
    assert torch.all(out.flow[1] == 0)
    assert torch.isfinite(out.flow).all() and torch.isfinite(out.embedding).all()


@torch.no_grad()
def test_model_without_a_flow_decoder():
    torch.manual_seed(0)
    m = StreamingPerceiverIO(StreamingConfig.from_dict({**small_config().to_dict(), "flow": None})).eval()
    assert m.flow is None and not any(k.startswith("flow") for k in m.state_dict())
    out = m(make_batch(b=2))
    assert out.flow is None and out.flow_valid.tolist() == [False, False] and out.label_logits.shape == (2, 3)


@torch.no_grad()
def test_no_flow_without_two_frames(model):
    out = model(make_batch(b=2, frames=[1, 1]))
    assert out.flow is None and not out.flow_valid.any()


def test_default_config_is_small():
    m = StreamingPerceiverIO(StreamingConfig.from_dict({"labels": {"class_names": list("abcdefgh")}}))
    assert sum(p.numel() for p in m.parameters()) < 1_000_000


@torch.no_grad()
def test_batched_equals_per_window(model):
    batch = make_batch(b=3, frames=[4, 2, 3], points=[40, 12, 25])
    out = model(batch)
    for i in range(3):
        alone = model(row(batch, i))
        torch.testing.assert_close(out.embedding[i:i + 1], alone.embedding, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.flow[i:i + 1], alone.flow, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_state_off_equals_offline():
    torch.manual_seed(1)
    m = StreamingPerceiverIO(small_config(state={"carry": False})).eval()
    batch = replace(make_batch(b=3), reset=torch.zeros(3, dtype=torch.bool))
    state = torch.randn(3, 8, 32)
    assert_outputs_close(m(batch, state), m(batch))


@torch.no_grad()
def test_state_carried_changes_output_and_reset_ignores_it(model):
    batch = make_batch(b=3)
    fresh = model(batch)
    carried = replace(batch, reset=torch.tensor([False, True, False]))
    out = model(carried, fresh.state)
    assert not torch.allclose(out.embedding[0], fresh.embedding[0], atol=1e-4)
    assert not torch.allclose(out.flow[2], fresh.flow[2], atol=1e-5)
    torch.testing.assert_close(out.embedding[1], fresh.embedding[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.flow[1], fresh.flow[1], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_stream_states_reset_on_gap_and_restart(model):
    states = StreamStates()
    b1 = replace(make_batch(b=2), stream_ids=["x", "y"], window_ids=torch.tensor([4, 9]))
    b1, s = states.gather(b1)
    assert s is None and b1.reset.all()
    states.update(b1, model(b1, s).state)
    # x continues (window 5), y skips a window (gap): only x carries state.
    b2 = replace(make_batch(b=2, seed=1), stream_ids=["x", "y"], window_ids=torch.tensor([5, 11]),
                 reset=torch.zeros(2, dtype=torch.bool))
    b2g, s2 = states.gather(b2)
    assert b2g.reset.tolist() == [False, True]
    assert s2 is not None and s2.shape == (2, 8, 32)
    # An explicit reset (gap flag) wins over a held state.
    b3 = replace(b2, reset=torch.tensor([True, False]))
    assert states.gather(b3)[0].reset.tolist() == [True, True]
    with pytest.raises(ValueError, match="more than once"):
        states.gather(replace(b2, stream_ids=["x", "x"]))


@torch.no_grad()
@pytest.mark.parametrize("which", ["model", "corr_model", "local_model"])
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
def test_modality_gates():
    torch.manual_seed(2)
    m = StreamingPerceiverIO(small_config()).eval()
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
def test_chunked_flow_equals_unchunked(model):
    batch = make_batch(b=2)
    chunked = StreamingPerceiverIO(model.config.merged({"flow": {"chunk": 37}})).eval()
    chunked.load_state_dict(model.state_dict())
    whole = StreamingPerceiverIO(model.config.merged({"flow": {"chunk": None}})).eval()
    whole.load_state_dict(model.state_dict())
    torch.testing.assert_close(chunked(batch).flow, whole(batch).flow, atol=1e-6, rtol=1e-5)


def test_cache_follows_weight_updates(model):
    m = StreamingPerceiverIO(model.config).eval()
    m.load_state_dict(model.state_dict())
    batch = make_batch(b=1)
    with torch.no_grad():
        first = m(batch).flow
        m.flow.pos_proj.weight.add_(0.5)
        m.encoder.latents.add_(0.5)
        second = m(batch)
    fresh = StreamingPerceiverIO(model.config).eval()
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert_outputs_close(second, fresh(batch))
    assert not torch.allclose(first, second.flow)


def test_config_validation_and_round_trip():
    cfg = small_config()
    again = StreamingConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.modalities["video"]["time_period"] == 2.0**17  # defaults filled in
    with pytest.raises(ValueError, match="no option"):
        StreamingConfig.from_dict({**cfg.to_dict(), "latnets": 3})
    with pytest.raises(ValueError, match=r"encoder has no option\(s\) \['latnets'\]"):
        small_config(encoder={"latnets": 3})
    with pytest.raises(ValueError, match="unknown adapter kind"):
        small_config(modalities={"video": {"kind": "camera"}})
    with pytest.raises(ValueError, match="flow.modality"):
        small_config(flow={"modality": "audio"})
    with pytest.raises(ValueError, match="divisible"):
        small_config(encoder={"latent_channels": 30, "self_heads": 4})
    with pytest.raises(ValueError, match="labels.heads"):
        small_config(labels={"heads": 3})
    heads = StreamingPerceiverIO(small_config(labels={"heads": 4})).labels.attend.attn.num_heads
    assert heads == 4
    student = cfg.merged({"encoder": {"num_latents": 4, "num_blocks": 1}})
    assert student.encoder.num_latents == 4 and student.encoder.num_blocks == 1
    assert student.encoder.latent_channels == 32 and student.labels == cfg.labels
    # no flow decoder
    assert StreamingConfig.from_dict({**cfg.to_dict(), "flow": None}).flow is None
    assert StreamingConfig.from_dict(json.loads(json.dumps({**cfg.to_dict(), "flow": None}))).video_frames == 2


def test_config_refuses_the_flat_layout_naming_the_new_place():
    with pytest.raises(ValueError, match="'flow_channels' is now 'flow.channels'"):
        StreamingConfig.from_dict({"flow_channels": 16})
    with pytest.raises(ValueError, match="'num_latents' is now 'encoder.num_latents'"):
        StreamingConfig.from_dict({"num_latents": 16})
    with pytest.raises(ValueError, match="'state' is now 'state.carry'"):
        StreamingConfig.from_dict({"state": False})
    with pytest.raises(ValueError, match="'mask_probs' was removed"):
        StreamingConfig.from_dict({"mask_probs": {}})
    with pytest.raises(ValueError, match="unknown adapter kind 'labels'"):
        StreamingConfig.from_dict({"modalities": {"tags": {"kind": "labels"}}})


def test_v1_checkpoint_config_is_read_in_the_nested_form(tmp_path):
    v1 = {"modalities": {"video": {"kind": "video", "conv": 4, "conv_tokens": False}}, "num_latents": 9,
          "modality_latents": {"video": 2}, "state": False, "flow_size": [32, 32], "flow_corr_stride": 1,
          "label_heads": 2, "label_pool": ["video"], "class_names": ["x", "y"], "mask_probs": {},
          "token_mlps": {}, "label_groups": True, "labels_from_encoder": True, "own_channels": True,
          "modality_norms": True}
    folder = tmp_path / "ck"
    folder.mkdir()

    def read(model: dict) -> StreamingConfig:
        (folder / "config.json").write_text(json.dumps({"format": "perceiver-stream/streaming-v1", "model": model}))
        return read_config(folder)[0]

    cfg = read(v1)
    assert (cfg.encoder.num_latents, cfg.encoder.modality_latents, cfg.state.carry) == (9, {"video": 2}, False)
    assert cfg.flow.size == (32, 32) and cfg.labels.heads == 2 and cfg.labels.pool == ("video",)
    assert cfg.labels.class_names == ("x", "y") and cfg.modalities["video"]["conv"] == 4
    assert read({**v1, "flow_modality": None, "flow_channels": 8}).flow is None
    # a removed option at any other value than the behaviour the model now has is refused
    for key, value in [("mask_probs", {"video": 0.1}), ("label_groups", False), ("own_channels", False),
                       ("flow_corr_stride", 2), ("token_mlps", {"video": 8})]:
        with pytest.raises(ValueError, match=f"option '{key}' was removed"):
            read({**v1, key: value})
    with pytest.raises(ValueError, match="conv_tokens"):
        read({**v1, "modalities": {"video": {"kind": "video", "conv": 4}}})  # (v1's default: in the tokens)
    with pytest.raises(ValueError, match="'audio_samples' adapter kind was removed"):
        read({**v1, "modalities": {"mic": {"kind": "audio_samples"}}})


@torch.no_grad()
def test_checkpoint_round_trip_and_mismatch(model, tmp_path):
    save_checkpoint(tmp_path / "ck", model, {"seeds": [1, 2, 3]})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta == {"seeds": [1, 2, 3]}
    assert loaded.config.labels.class_names == ("a", "b", "c")
    batch = make_batch(b=2)
    assert_outputs_close(loaded(batch), model(batch), atol=0)
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    doc["model"]["encoder"]["num_latents"] = 9
    (tmp_path / "ck" / "config.json").write_text(json.dumps(doc))
    assert read_config(tmp_path / "ck")[0].encoder.num_latents == 9
    with pytest.raises(ValueError, match=r"latents: saved \(8, 32\), config needs \(9, 32\)"):
        load_checkpoint(tmp_path / "ck")
    doc["model"]["encoder"]["num_latents"] = 8
    doc["model"]["labels"]["class_names"] = []
    (tmp_path / "ck" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"unexpected weights.*labels\.head"):
        load_checkpoint(tmp_path / "ck")


def test_training_reduces_loss():
    torch.manual_seed(3)
    m = StreamingPerceiverIO(small_config())
    batch = make_batch(b=4, seed=5)
    with torch.no_grad():
        m.eval()
        before = losses(m(batch), batch.targets)
    seen = []
    history = train(m, [batch], steps=40, lr=3e-3, modality_dropout=0.0,
                    callback=lambda step, metrics: seen.append((step, metrics)))
    assert len(history) == 40 and [s for s, _ in seen] == list(range(1, 41))
    assert {"loss", "lr", "flow_epe", "label_ce"} <= set(seen[0][1])
    with torch.no_grad():
        after = losses(m(batch), batch.targets)
    assert after["label_ce"] < 0.5 * before["label_ce"]
    assert after["flow_epe"] < before["flow_epe"]
    assert not m.training


def test_training_with_dropout_and_state_runs():
    torch.manual_seed(4)
    m = StreamingPerceiverIO(small_config())
    b1 = make_batch(b=2, seed=1)
    b2 = replace(make_batch(b=2, seed=2), window_ids=torch.tensor([1, 2]), reset=torch.zeros(2, dtype=torch.bool))
    history = train(m, iter([b1, b2, b1]), steps=10, lr=1e-3, modality_dropout=0.5)
    assert len(history) == 3  # a one-shot iterator ends training early
    assert all(torch.isfinite(torch.tensor(history)))


@torch.no_grad()
def test_window_without_any_modality(model):
    batch = make_batch(b=2)
    none_present = replace(batch, modalities={k: replace(m, present=torch.tensor([True, False]))
                                              for k, m in batch.modalities.items()})
    out = model(none_present)
    assert torch.isfinite(out.embedding).all() and out.flow_valid.tolist() == [True, False]
    empty = model(replace(batch, modalities={}))
    torch.testing.assert_close(empty.embedding[1], out.embedding[1])
    assert empty.flow is None
