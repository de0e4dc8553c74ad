"""Modality adapters: token contents, masks, time codes, flow patches, errors."""

from __future__ import annotations

import pytest
import torch

from perceiver_stream.adapters import (
    FlowInputAdapter,
    adapter_spec,
    build_adapter,
    flow_patches,
    gather_last,
    normalise_frames,
    space_to_depth,
    subsample,
    time_channels,
)
from perceiver_stream.adapters.points import EdgeFeatures, last_scans, neighbour_offsets, soft_bins, surface_variation
from perceiver_stream.adapters.video import local_correlation
from perceiver_stream.batch import ModalityBatch
from perceiver_stream.fourier import fourier_channels, time_fourier_features
from perceiver_stream.mel import MelSpectrogram


def video_batch(frames: list[int], hw: int = 8, t0: float = 50.0, seed: int = 0) -> ModalityBatch:
    g = torch.Generator().manual_seed(seed)
    b, t = len(frames), max(frames)
    return ModalityBatch(
        torch.randint(0, 256, (b, t, hw, hw, 3), dtype=torch.uint8, generator=g),
        t0 + torch.arange(t, dtype=torch.float64)[None].repeat(b, 1) * 0.1,
        torch.arange(t)[None] < torch.tensor(frames)[:, None],
        torch.tensor(frames) > 0,
    )


def test_space_to_depth_patch_layout():
    x = torch.arange(2 * 1 * 4 * 6 * 3).reshape(2, 1, 4, 6, 3)
    p = space_to_depth(x, 2)
    assert p.shape == (2, 1, 6, 12)
    # patch (row 1, col 2) = pixels rows 2-3, cols 4-5, channels (dy, dx, c)
    expect = x[0, 0, 2:4, 4:6, :].reshape(-1)
    assert torch.equal(p[0, 0, 1 * 3 + 2], expect)
    with pytest.raises(ValueError, match="divisible"):
        space_to_depth(x, 4)


def test_gather_last_right_aligns():
    v = torch.arange(12).reshape(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got, valid = gather_last(v, mask, 2)
    assert got[0].tolist() == [2, 3] and valid[0].tolist() == [True, True]
    assert got[1, 1].item() == 6 and valid[1].tolist() == [False, True]


def test_video_adapter_tokens_use_last_frames():
    spec = {"kind": "video", "patch": 4, "frames": 2, "pos_bands": 3, "time_bands": 4}
    a = build_adapter(spec)
    m = video_batch([5, 1])
    t_ref = torch.tensor([51.0, 51.0], dtype=torch.float64)
    tokens, mask = a(m, t_ref)
    n = 4  # (8/4)^2 patches per frame
    assert tokens.shape == (2, 2 * n, a.out_channels)
    assert a.out_channels == 48 + fourier_channels(2, 3) + time_channels(4)
    assert mask[0].all() and mask[1].tolist() == [False] * n + [True] * n
    # row 0 uses frames 3 and 4: the first token of the last frame holds frame 4's top-left patch
    expect = normalise_frames(m.values[0, 4, :4, :4]).reshape(-1)
    torch.testing.assert_close(tokens[0, n, :48], expect)
    # its time code is frame 4's absolute code, then its time relative to the window end
    code = time_fourier_features(m.times[0, 4:5], 4)[0]
    torch.testing.assert_close(tokens[0, n, -9:-1], code)
    assert tokens[0, n, -1].item() == pytest.approx(50.4 - 51.0)


def test_time_codes_are_absolute():
    """The same instant gets the same absolute code in two different windows."""
    a = build_adapter({"kind": "video", "patch": 4, "frames": None, "time_bands": 6})
    m = video_batch([3])
    tok1, _ = a(m, torch.tensor([51.0], dtype=torch.float64))
    tok2, _ = a(m, torch.tensor([51.5], dtype=torch.float64))
    torch.testing.assert_close(tok1[..., :-1], tok2[..., :-1])
    assert not torch.allclose(tok1[..., -1], tok2[..., -1])


def test_flow_patches_centre_and_border():
    g = torch.Generator().manual_seed(1)
    f1 = torch.randint(0, 256, (1, 5, 6, 3), dtype=torch.uint8, generator=g)
    f2 = torch.randint(0, 256, (1, 5, 6, 3), dtype=torch.uint8, generator=g)
    p = flow_patches(f1, f2)
    assert p.shape == (1, 5, 6, 54)
    p = p.reshape(1, 5, 6, 2, 3, 3, 3)  # frame, c, dy, dx
    torch.testing.assert_close(p[0, 2, 3, 0, :, 1, 1], normalise_frames(f1[0, 2, 3]))
    torch.testing.assert_close(p[0, 2, 3, 1, :, 0, 2], normalise_frames(f2[0, 1, 4]))
    assert torch.all(p[0, 0, 0, :, :, 0, :] == 0)  # zero padding above the top row


def test_flow_input_adapter_validity_and_resize():
    m = video_batch([3, 1, 2], hw=8)
    m.present[2] = False
    patches, valid = FlowInputAdapter((8, 8))(m)
    assert valid.tolist() == [True, False, False]
    expect = flow_patches(m.values[0:1, 1], m.values[0:1, 2])
    torch.testing.assert_close(patches[0:1], expect)
    small, _ = FlowInputAdapter((4, 4))(m)
    assert small.shape == (3, 4, 4, 54)


def audio_batch(n: int, valid: list[int], rate: int = 8000, channels: int = 1, seed: int = 0) -> ModalityBatch:
    g = torch.Generator().manual_seed(seed)
    b = len(valid)
    return ModalityBatch(
        0.5 * torch.randn(b, n, channels, generator=g),
        10.0 + torch.arange(n, dtype=torch.float64)[None].repeat(b, 1) / rate,
        torch.arange(n)[None] < torch.tensor(valid)[:, None],
        torch.ones(b, dtype=torch.bool),
        rate=float(rate),
    )


def test_log_mel_tokens_and_padding():
    spec = {"kind": "audio_mel", "sample_rate": 8000, "n_fft": 128, "hop_length": 64, "n_mels": 12,
            "frames_per_token": 2, "time_bands": 3, "log_scale": 1.0}
    a = build_adapter(spec)
    m = audio_batch(1000, [1000, 600])
    t_ref = torch.tensor([11.0, 11.0], dtype=torch.float64)
    tokens, mask = a(m, t_ref)
    frames = 1000 // 64 + 1
    assert tokens.shape == (2, (frames + 1) // 2, a.out_channels)
    ref = MelSpectrogram(8000, n_fft=128, hop_length=64, n_mels=12, floor=1e-6)(m.values[0:1, :, 0])[0]
    torch.testing.assert_close(tokens[0, 1, :24], ref[2:4].reshape(-1))
    # frame i is real when its centre sample i*64 is: row 1 has frames 0..9 -> tokens 0..4
    assert mask[1].tolist() == [True] * 5 + [False] * (tokens.shape[1] - 5)
    garbage = m.values.clone()
    garbage[1, 600:] = 1e6
    tok_g, _ = a(ModalityBatch(garbage, m.times, m.mask, m.present, m.rate), t_ref)
    torch.testing.assert_close(tok_g[1], tokens[1])


def test_points_adapter_and_subsample():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(2, 50, 5, generator=g)
    mask = torch.arange(50)[None] < torch.tensor([[50], [7]])
    m = ModalityBatch(values, torch.full((2, 50), 3.0, dtype=torch.float64), mask, torch.ones(2, dtype=torch.bool))
    a = build_adapter({"kind": "points", "pos_bands": 4, "max_resolution": 16, "feature_channels": 1,
                       "max_points": 10, "time_bands": 2})
    tokens, tmask = a(m, torch.tensor([3.5, 3.5], dtype=torch.float64))
    assert tokens.shape == (2, 10, fourier_channels(3, 4) + 1 + time_channels(2))
    assert tmask[0].all() and tmask[1].sum() == 7
    # row 0 keeps every 5th point; x,y,z come first in the Fourier block, intensity after it
    torch.testing.assert_close(tokens[0, 2, :3], values[0, 10, :3])
    torch.testing.assert_close(tokens[0, 2, fourier_channels(3, 4)], values[0, 10, 3])
    sub, smask = subsample(values, mask, 10)
    assert torch.equal(sub[1, :7], values[1, :7]) and smask[1].sum() == 7
    with pytest.raises(ValueError, match="x, y, z"):
        build_adapter({"kind": "points", "feature_channels": 3})(m, torch.zeros(2))


def test_specs_are_validated_and_completed():
    full = adapter_spec({"kind": "points"})
    assert full["max_points"] == 1024 and full["kind"] == "points"
    with pytest.raises(ValueError, match="no option"):
        build_adapter({"kind": "video", "patches": 3})
    with pytest.raises(ValueError, match="unknown adapter kind"):
        build_adapter({"kind": "radar"})
    with pytest.raises(ValueError, match=r"no option\(s\) \['conv_tokens'\]"):
        build_adapter({"kind": "video", "conv": 4, "conv_tokens": True})
    with pytest.raises(ValueError, match="positive multiple"):
        build_adapter({"kind": "video", "frames": 0})
    with pytest.raises(ValueError, match="at least 1"):
        build_adapter({"kind": "video", "patch": 0})


def test_video_stack_puts_consecutive_frames_in_one_token():
    a = build_adapter({"kind": "video", "patch": 4, "frames": 4, "stack": 2, "pos_bands": 2, "time_bands": 2})
    m = video_batch([3, 5])
    tokens, mask = a(m, torch.tensor([51.0, 51.0], dtype=torch.float64))
    n = 4
    assert tokens.shape == (2, 2 * n, a.out_channels) and a.out_channels == 96 + fourier_channels(2, 2) + 5
    # row 0 (frames 0..2): groups (missing, 0) masked, (1, 2) real; row 1 (0..4): groups (1, 2), (3, 4)
    assert mask[0].tolist() == [False] * n + [True] * n and mask[1].all()
    expect = torch.cat([normalise_frames(m.values[0, 1, :4, :4]).reshape(-1),
                        normalise_frames(m.values[0, 2, :4, :4]).reshape(-1)])
    torch.testing.assert_close(tokens[0, n, :96], expect)
    assert tokens[1, 0, -1].item() == pytest.approx(50.2 - 51.0)  # group time = its last frame's
    with pytest.raises(ValueError, match="multiple of stack"):
        build_adapter({"kind": "video", "frames": 3, "stack": 2})


def test_video_conv_stem_adds_features_that_see_beyond_one_patch():
    torch.manual_seed(0)
    a = build_adapter({"kind": "video", "patch": 4, "frames": 4, "stack": 2, "conv": 6, "pos_bands": 2,
                       "time_bands": 2})
    m = video_batch([4, 4], hw=16)
    t_ref = torch.tensor([51.0, 51.0], dtype=torch.float64)
    tokens, mask = a(m, t_ref)
    n, c = 16, a.out_channels
    assert c == 96 + fourier_channels(2, 2) + 5 and a.private_channels == 6 and a.pool_channels == (c, c + 6)
    assert tokens.shape == (2, 2 * n, c + 6) and mask.all()
    plain = build_adapter({"kind": "video", "patch": 4, "frames": 4, "stack": 2, "pos_bands": 2, "time_bands": 2})
    ref, _ = plain(m, t_ref)
    torch.testing.assert_close(tokens[..., :c], ref)  # the token channels, then the stem's private ones
    # A pixel change inside token (0, 3) reaches other tokens only through the stem, whose receptive
    # field is 18 px: tokens (0, 1) and (0, 2) see it, token (0, 0) does not.
    changed = m.values.clone()
    changed[0, 3, 0, 12] = 255 - changed[0, 3, 0, 12]  # row 0, column 12: inside token (0, 3)
    moved, _ = a(ModalityBatch(changed, m.times, m.mask, m.present), t_ref)
    diff = (moved - tokens)[0, n:, c:].abs().sum(-1).view(4, 4)
    assert diff[0, 0] == 0 and diff[0, 1] > 0 and diff[0, 2] > 0
    with pytest.raises(ValueError, match="conv"):
        build_adapter({"kind": "video", "conv": -1})
    with pytest.raises(ValueError, match="power-of-two"):
        build_adapter({"kind": "video", "patch": 6, "conv": 8})


def test_local_correlation_peaks_at_the_shift():
    g = torch.Generator().manual_seed(0)
    f1 = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=g)
    f2 = torch.roll(f1, shifts=(2, -3), dims=(1, 2))  # content moves 2 down, 3 left
    corr = local_correlation(f1, f2, 4)
    assert corr.shape == (2, 32, 32, 81)
    peak = corr[:, 6:26, 6:26].argmax(-1)
    assert bool((peak == (2 + 4) * 9 + (-3 + 4)).all())


def test_flow_queries_carry_the_correlation_when_asked():
    frames = torch.randint(0, 256, (1, 3, 16, 16, 3), dtype=torch.uint8)
    m = ModalityBatch(frames, torch.arange(3.0, dtype=torch.float64)[None], torch.ones(1, 3, dtype=torch.bool),
                      torch.ones(1, dtype=torch.bool))
    plain, valid = FlowInputAdapter((16, 16))(m)
    with_corr, _ = FlowInputAdapter((16, 16), corr_radius=2)(m)
    assert plain.shape[-1] == 54 and with_corr.shape[-1] == 54 + 25 and bool(valid.all())
    torch.testing.assert_close(with_corr[..., :54], plain)


@pytest.mark.parametrize("radius", [0, 2])
@pytest.mark.parametrize("hw", [8, 6])
def test_flow_projection_by_convolution_equals_linear_of_patches(radius, hw):
    torch.manual_seed(4)
    m = video_batch([3, 2, 4], hw=8)
    adapter = FlowInputAdapter((hw, hw), corr_radius=radius)
    proj = torch.nn.Linear(adapter.out_channels, 10)
    feats, valid = adapter(m)
    frames, valid2 = adapter.last_frames(m)
    assert torch.equal(valid, valid2)
    out = adapter.project(frames, proj)
    assert out.shape == (3, hw, hw, 10)
    torch.testing.assert_close(out, proj(feats), atol=1e-5, rtol=1e-5)


def test_points_neighbour_offsets_tell_flat_from_curved_and_ignore_padding():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(1, 120, 2, generator=g) * 0.2
    flat = torch.cat([xy, torch.full((1, 120, 1), 0.5)], dim=-1)
    centre = xy - 0.1
    cap = torch.cat([xy, 0.5 - (0.04 - centre.pow(2).sum(-1, keepdim=True)).sqrt()], dim=-1)  # sphere r=0.2
    mask = torch.ones(1, 120, dtype=torch.bool)
    off, valid = neighbour_offsets(flat, mask, 6)
    assert off.shape == (1, 120, 6, 3) and bool(valid.all())
    assert off[..., 2].abs().max() < 1e-5  # a plane: no offset along its normal
    torch.testing.assert_close(off.norm(dim=-1).mean(-1), torch.ones(1, 120), atol=1e-3, rtol=0)  # unit mean length
    inner = centre.norm(dim=-1) < 0.06
    assert neighbour_offsets(cap, mask, 6)[0][..., 2][inner].mean() > 0.01  # a bowl in z: neighbours rise
    # padded points neither count as neighbours nor get offsets or features
    padded = torch.cat([cap, torch.full((1, 5, 3), 9.0)], dim=1)
    pmask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], dim=1)
    off_p, valid_p = neighbour_offsets(padded, pmask, 6)
    torch.testing.assert_close(off_p[:, :120], neighbour_offsets(cap, mask, 6)[0])
    assert not bool(valid_p[:, 120:].any()) and torch.all(off_p[:, 120:] == 0)
    edge = EdgeFeatures(6, 16)
    feats = edge(padded, pmask)
    assert feats.shape == (1, 125, 16) and torch.all(feats[:, 120:] == 0)
    torch.testing.assert_close(feats[:, :120], edge(cap, mask))
    # size-free: the same cloud at half the scale gives the same features
    torch.testing.assert_close(edge(cap * 0.5, mask), edge(cap, mask), atol=1e-4, rtol=1e-4)
    adapter = build_adapter({"kind": "points", "local_k": 6, "local_channels": 16})
    plain = build_adapter({"kind": "points"})
    assert adapter.out_channels == plain.out_channels + 16
    m = ModalityBatch(values=torch.cat([torch.nan_to_num(padded, nan=0.0), torch.ones(1, 125, 1)], -1),
                      times=torch.zeros(1, 125, dtype=torch.float64), mask=pmask, present=torch.ones(1, dtype=torch.bool))
    tokens, tmask = adapter(m, torch.zeros(1, dtype=torch.float64))
    assert tokens.shape == (1, 125, adapter.out_channels) and bool(torch.isfinite(tokens).all())
    assert torch.equal(tmask, pmask)
    # global_pool: every real point also carries the window's maximum of each local feature
    pooled = build_adapter({"kind": "points", "local_k": 6, "local_channels": 16, "global_pool": True})
    pooled.local.load_state_dict(adapter.local.state_dict())
    assert pooled.out_channels == adapter.out_channels + 16
    ptok, _ = pooled(m, torch.zeros(1, dtype=torch.float64))
    local = ptok[0, :120, -32:-16]
    torch.testing.assert_close(ptok[0, :120, -16:], local.amax(0).expand(120, 16))
    with pytest.raises(ValueError, match="global_pool"):
        build_adapter({"kind": "points", "global_pool": True})


def test_points_curvature_channels_are_a_histogram_that_tells_a_sphere_from_a_cube():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(1, 400, 3, generator=g)
    sphere = d / d.norm(dim=-1, keepdim=True)
    # a cube's surface: one coordinate pushed to a face
    cube = torch.rand(1, 400, 3, generator=g) * 2 - 1
    axis = torch.randint(0, 3, (1, 400, 1), generator=g)
    cube.scatter_(2, axis, torch.sign(torch.gather(d, 2, axis)))
    mask = torch.ones(1, 400, dtype=torch.bool)
    sv_sphere, sv_cube = surface_variation(sphere, mask, 8), surface_variation(cube, mask, 8)
    assert bool((sv_sphere >= 0).all()) and bool((sv_sphere <= 1 / 3 + 1e-6).all())
    # a face is flat: most of a cube's points have (near) zero variation, a sphere's have none
    assert float((sv_cube < 1e-4).float().mean()) > 0.4 and float((sv_sphere < 1e-4).float().mean()) < 0.05
    # scale-free, and padding neither counts as a neighbour nor gets a value
    torch.testing.assert_close(surface_variation(sphere * 0.01, mask, 8), sv_sphere, atol=1e-4, rtol=1e-3)
    padded = torch.cat([sphere, torch.zeros(1, 5, 3)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], 1)
    sv_p = surface_variation(padded, pmask, 8)
    torch.testing.assert_close(sv_p[:, :400], sv_sphere)
    assert torch.all(sv_p[:, 400:] == 0)
    # soft bins: weights sum to 1, interpolate between neighbouring centres, clamp at the ends
    w = soft_bins(torch.tensor([-1.0, 0.0, 0.25, 2.0]), 5, 0.0, 1.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    torch.testing.assert_close(w[2], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    assert w[0, 0] == 1 and w[3, 4] == 1
    # the adapter's channels: 6 bins after the time code, zeros on padding, different means
    adapter = build_adapter({"kind": "points", "curvature_k": 8, "curvature_bins": 6})
    assert adapter.out_channels == build_adapter({"kind": "points"}).out_channels + 6
    values = torch.cat([torch.cat([padded, torch.cat([cube, torch.zeros(1, 5, 3)], 1)]), torch.ones(2, 405, 1)], -1)
    m = ModalityBatch(values=values, times=torch.zeros(2, 405, dtype=torch.float64), mask=pmask.repeat(2, 1),
                      present=torch.ones(2, dtype=torch.bool))
    tokens, _ = adapter(m, torch.zeros(2, dtype=torch.float64))
    hist = tokens[:, :400, -6:].mean(1)
    torch.testing.assert_close(hist.sum(-1), torch.ones(2))
    assert torch.all(tokens[:, 400:, -6:] == 0)
    assert float((hist[0] - hist[1]).abs().sum()) > 0.5
    with pytest.raises(ValueError, match="curvature_k"):
        build_adapter({"kind": "points", "curvature_k": -1})


def test_points_last_scans_keeps_the_latest_scans_of_each_row():
    # row 0: scans at t=0 (2 points), 1 (3 points), 2 (1 point); row 1: one scan at t=5 (2 points), padding
    times = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 0, 0, 0, 0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    values = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1)
    v, t, k = last_scans(values, times, mask, 2)
    assert v.shape == (2, 4, 1)
    assert v[0, :, 0].tolist() == [2, 3, 4, 5] and k[0].all()
    assert t[0].tolist() == [1, 1, 1, 2]
    assert v[1, :2, 0].tolist() == [6, 7] and k[1].tolist() == [True, True, False, False]
    adapter = build_adapter({"kind": "points", "scans": 1, "time_bands": 2})
    m = ModalityBatch(values=torch.cat([values.expand(2, 6, 3), torch.ones(2, 6, 1)], -1), times=times, mask=mask,
                      present=torch.ones(2, dtype=torch.bool))
    tokens, tmask = adapter(m, torch.tensor([2.0, 5.0], dtype=torch.float64))
    assert tmask.tolist() == [[True, False], [True, True]]
    assert tokens[0, 0, -1] == 0.0  # time before the window end: the point is from the last scan
    with pytest.raises(ValueError, match="scans"):
        build_adapter({"kind": "points", "scans": 0})
