"""StreamingPerceiverIO's label decoder: read before the tower, per-modality groups, the pooled read
and the private stem channels that feed it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from perceiver_stream.adapters.video import normalise_frames
from perceiver_stream.batch import Batch
from perceiver_stream.streaming import StreamingPerceiverIO
from perceiver_stream.train import losses
from tiny import make_batch


@torch.no_grad()
def test_labels_read_the_latents_before_the_tower(tiny_config):
    torch.manual_seed(0)
    m = StreamingPerceiverIO(tiny_config).eval()
    batch = make_batch(b=2)
    before = m(batch)
    for p in m.encoder.self_attends.parameters():
        p.add_(0.5 * torch.randn_like(p))
    after = m(batch)
    torch.testing.assert_close(after.label_logits, before.label_logits)  # the tower is not on their path
    torch.testing.assert_close(m.labels.head(m.latent_label_read(batch)), after.label_logits)  # (nor on this one)
    assert not torch.allclose(after.embedding, before.embedding)  # flow, embedding, state still read z
    assert not torch.allclose(after.flow, before.flow)


def absent_in_row_1(batch: Batch, name: str) -> Batch:
    """``batch`` (3 rows) with modality ``name`` absent from its second row."""
    m = batch.modalities[name]
    return replace(batch, modalities={**batch.modalities, name: replace(m, present=torch.tensor([True, False, True]))})


def test_label_groups_read_each_modality_s_latents_and_are_supervised_where_present(tiny_config):
    torch.manual_seed(0)
    m = StreamingPerceiverIO(tiny_config.merged({"encoder": {"modality_latents": {"points": 2, "audio": 3}}})).eval()
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
    assert StreamingPerceiverIO(tiny_config)(batch).group_logits.shape == (3, 1, 3)


@torch.no_grad()
def test_label_pool_reads_the_max_of_a_modality_s_tokens_and_leaves_no_trace_where_absent(tiny_config):
    torch.manual_seed(0)
    video_spec = {"kind": "video", "patch": 4, "frames": 2, "conv": 6, "pos_bands": 4, "time_bands": 4}
    mods = {**tiny_config.modalities, "video": video_spec}
    m = StreamingPerceiverIO(tiny_config.merged({"modalities": mods, "encoder": {"modality_latents": {"points": 2}},
                                          "labels": {"pool": ["video"]}})).eval()
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
        tiny_config.merged({"labels": {"pool": ["lidar"]}})
    with pytest.raises(ValueError, match="poolable"):
        StreamingPerceiverIO(tiny_config.merged({"labels": {"pool": ["points"]}}))


@torch.no_grad()
def test_private_stem_channels_feed_the_pooled_read_alone(tiny_config):
    torch.manual_seed(0)
    plain = {"kind": "video", "patch": 4, "frames": 2, "pos_bands": 4, "time_bands": 4}
    base = StreamingPerceiverIO(tiny_config.merged({"modalities": {"video": plain}})).eval()
    private = {**plain, "conv": 6}
    m = StreamingPerceiverIO(tiny_config.merged({"modalities": {"video": private}, "labels": {"pool": ["video"]}})).eval()
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
        StreamingPerceiverIO(tiny_config.merged({"modalities": {"video": private}}))


@torch.no_grad()
def test_labels_from_flow_read_the_pooled_predicted_flow(tiny_config):
    torch.manual_seed(0)
    base = StreamingPerceiverIO(tiny_config).eval()
    m = StreamingPerceiverIO(tiny_config.merged({"labels": {"from_flow": True}})).eval()
    assert base.labels.flow_read is None and m.labels.flow_read.in_features == 2 * 4 * 4
    m.load_state_dict(base.state_dict(), strict=False)  # every weight but flow_read the same
    batch = make_batch(b=2)
    out, plain = m(batch), base(batch)
    torch.testing.assert_close(out.flow, plain.flow)
    feats = torch.nn.functional.adaptive_avg_pool2d(out.flow.permute(0, 3, 1, 2), 4).flatten(1)
    read = m.latent_label_read(batch) + m.labels.flow_read(feats)
    torch.testing.assert_close(out.label_logits, m.labels.head(read))
    torch.testing.assert_close(out.group_logits, plain.group_logits)  # the groups' own reads ignore the flow
    # a row without flow reads none: its labels are the plain model's
    no_flow = m.labels.flow_features(out.flow, torch.tensor([True, False]))
    assert no_flow[1].abs().sum() == 0 and no_flow[0].abs().sum() > 0
    with pytest.raises(ValueError, match="from_flow needs a flow decoder"):
        tiny_config.merged({"flow": None, "labels": {"from_flow": True}})
