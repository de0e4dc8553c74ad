"""The synthetic rig: exact flow, determinism, timing, labels and what each modality reveals."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from pipeline.sources.synthetic import (
    CLASSES,
    MAX_SPEED,
    MIN_SPEED,
    SyntheticRig,
    class_attributes,
)


def frames(rig: SyntheticRig) -> list:
    return list(rig.video())


def bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample ``img`` (H x W x C float) at real coordinates (x right, y down), edge-clamped."""
    h, w = img.shape[:2]
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(int), w - 2)
    y0 = np.minimum(np.floor(y).astype(int), h - 2)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    return (
        img[y0, x0] * (1 - fx) * (1 - fy)
        + img[y0, x0 + 1] * fx * (1 - fy)
        + img[y0 + 1, x0] * (1 - fx) * fy
        + img[y0 + 1, x0 + 1] * fx * fy
    )


@pytest.fixture(scope="module")
def rig() -> SyntheticRig:
    return SyntheticRig(5, 9.0)


@pytest.fixture(scope="module")
def video(rig) -> list:
    return frames(rig)


def test_counts_and_media_time(rig, video):
    assert len(video) == 9 * 25
    ts = np.array([f.t for f in video])
    np.testing.assert_allclose(ts, np.arange(225) / 25)
    assert all(f.image.shape == (64, 64, 3) and f.image.dtype == np.uint8 for f in video)
    chunks = list(rig.audio())
    starts = np.array([c.t for c in chunks])
    lengths = np.array([len(c.samples) for c in chunks])
    assert lengths.sum() == 9 * 16000
    # contiguous: each chunk starts where the previous one ended
    np.testing.assert_allclose(starts, np.concatenate([[0], np.cumsum(lengths)[:-1]]) / 16000)
    assert all(c.samples.shape[1] == 1 and c.samples.dtype == np.float32 for c in chunks)
    assert all(np.abs(c.samples).max() <= 1.0 for c in chunks)
    scans = list(rig.points())
    assert len(scans) == 90
    np.testing.assert_allclose([s.t for s in scans], np.arange(90) / 10)
    assert all(s.points.ndim == 2 and s.points.shape[1] == 4 and s.points.dtype == np.float32 for s in scans)
    assert all(np.isfinite(s.points).all() for s in scans)
    # the stream ends at `seconds` in every modality
    assert video[-1].t + video[-1].duration == pytest.approx(9.0)
    assert scans[-1].t + scans[-1].duration == pytest.approx(9.0)


def test_deterministic_whatever_the_consumption_order():
    a, b = SyntheticRig(11, 5.0, audio_channels=2), SyntheticRig(11, 5.0, audio_channels=2)
    va = frames(a)
    # interleave b's iterators: the samples must not depend on how they are consumed
    vb, ab, pb = [], [], []
    for f, c, p in itertools.zip_longest(b.video(), b.audio(), b.points()):
        if f is not None:
            vb.append(f)
        if c is not None:
            ab.append(c)
        if p is not None:
            pb.append(p)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(va, vb, strict=True))
    np.testing.assert_array_equal(np.concatenate([c.samples for c in a.audio()]), np.concatenate([c.samples for c in ab]))
    assert all(np.array_equal(x.points, y.points) for x, y in zip(a.points(), pb, strict=True))
    other = frames(SyntheticRig(12, 5.0))
    assert not np.array_equal(va[0].image, other[0].image)


def test_object_speeds_are_in_range():
    for seed in range(20):
        for seg in SyntheticRig(seed, 30).segments:
            speed = np.linalg.norm(seg.vel, axis=1)
            assert ((speed >= MIN_SPEED) & (speed <= MAX_SPEED)).all()


def pairs_within_segments(rig: SyntheticRig, video: list, step: int = 17) -> list[tuple[int, int]]:
    out = []
    for i in range(0, len(video) - 1, step):
        if rig.segment_index(video[i].t) == rig.segment_index(video[i + 1].t):
            out.append((i, i + 1))
    return out


def test_flow_is_exact_on_the_rendered_scene(rig, video):
    """Frame t at x equals the scene at t+1 at x + flow, wherever the same surface is visible."""
    h, w = rig.size
    yy, xx = np.mgrid[0:h, 0:w]
    xs, ys = xx.ravel().astype(float), yy.ravel().astype(float)
    for i, j in pairs_within_segments(rig, video):
        t1, t2 = video[i].t, video[j].t
        flow = rig.flow(t1, t2)
        assert flow.shape == (h, w, 2) and flow.dtype == np.float32
        seg = rig.segments[rig.segment_index(t1)]
        rgb1, surf1 = rig._render(seg, np.array([t1]), xs, ys)
        fx, fy = flow[..., 0].ravel().astype(float), flow[..., 1].ravel().astype(float)
        rgb2, surf2 = rig._render(seg, np.array([t2]), xs + fx, ys + fy)
        same = surf1[0] == surf2[0]
        assert same.mean() > 0.8
        np.testing.assert_allclose(rgb2[0][same], rgb1[0][same], atol=2e-5)
        # the rendered frame is the quantised scene
        np.testing.assert_array_equal(video[i].image.reshape(-1, 3), (rgb1[0] * 255 + 0.5).astype(np.uint8))


def test_backward_warp_of_the_next_frame_matches_this_frame(rig, video):
    """Independent check on the uint8 frames: warping frame t+1 back by the truth flow gives
    frame t (up to interpolation) on pixels visible in both, far better than assuming no motion."""
    h, w = rig.size
    yy, xx = np.mgrid[0:h, 0:w]
    checked = 0
    for i, j in pairs_within_segments(rig, video, step=23):
        flow = rig.flow(video[i].t, video[j].t)
        f1 = video[i].image.astype(float)
        f2 = video[j].image.astype(float)
        tx, ty = xx + flow[..., 0], yy + flow[..., 1]
        warped = bilinear(f2, tx, ty)
        # non-occluded: the flow at the target (sampled from the frame-t+1 side) agrees with ours,
        # the target lies inside the image, and the neighbourhood's flow is uniform (no edge)
        seg = rig.segments[rig.segment_index(video[i].t)]
        _, surf2 = rig._render(seg, np.array([video[j].t]), tx.ravel(), ty.ravel())
        _, surf1 = rig._render(seg, np.array([video[i].t]), xx.ravel().astype(float), yy.ravel().astype(float))
        ok = (surf1 == surf2)[0].reshape(h, w)
        ok &= (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
        edge = np.zeros((h, w), bool)
        f = flow.reshape(h, w, 2)
        edge[1:-1, 1:-1] = (
            (np.abs(f[1:-1, 1:-1] - f[:-2, 1:-1]).sum(-1) > 0)
            | (np.abs(f[1:-1, 1:-1] - f[2:, 1:-1]).sum(-1) > 0)
            | (np.abs(f[1:-1, 1:-1] - f[1:-1, :-2]).sum(-1) > 0)
            | (np.abs(f[1:-1, 1:-1] - f[1:-1, 2:]).sum(-1) > 0)
        )
        ok &= ~edge
        err = np.abs(warped - f1)[ok].mean()
        zero = np.abs(f2 - f1)[ok].mean()
        assert err < 6.0, err
        assert err < 0.35 * zero, (err, zero)
        checked += 1
    assert checked >= 5


def test_a_single_objects_displacement_found_by_search():
    """Find the object's displacement by brute-force matching of its pixels, compare to the truth."""
    rig = SyntheticRig(21, 4.0, objects=1)
    video = frames(rig)
    h, w = rig.size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in (3, 40, 77):
        t1, t2 = video[i].t, video[i + 1].t
        seg = rig.segments[rig.segment_index(t1)]
        _, surf = rig._render(seg, np.array([t1]), xx.ravel().astype(float), yy.ravel().astype(float))
        mask = surf[0].reshape(h, w) == 0
        # interior pixels only, so that sampling never reaches the background
        inner = mask.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            inner &= np.roll(mask, (dy, dx), axis=(0, 1))
        assert inner.sum() > 20
        f1 = video[i].image.astype(float)[inner]
        f2 = video[i + 1].image.astype(float)
        best, best_err = None, np.inf
        for dx in np.arange(-7, 7.01, 0.25):
            for dy in np.arange(-7, 7.01, 0.25):
                tx, ty = xx[inner] + dx, yy[inner] + dy
                if tx.min() < 0 or ty.min() < 0 or tx.max() > w - 1 or ty.max() > h - 1:
                    continue
                e = np.abs(bilinear(f2, tx, ty) - f1).mean()
                if e < best_err:
                    best, best_err = (dx, dy), e
        truth = rig.flow(t1, t2)[inner].mean(axis=0)
        assert np.ptp(rig.flow(t1, t2)[inner], axis=0).max() == 0  # one rigid translation
        assert best is not None
        np.testing.assert_allclose(best, truth, atol=0.3)


def test_truth_per_window(rig, video):
    ts = np.array([f.t for f in video])
    sel = ts[(ts >= 1.0) & (ts < 2.0)]
    tr = rig.truth(1.0, 2.0, sel)
    np.testing.assert_array_equal(tr.flow, rig.flow(sel[-2], sel[-1]))
    assert tr.label == rig.label_at(1.5) and tr.label_name == CLASSES[tr.label]
    assert rig.truth(1.0, 2.0, sel[:1]).flow is None
    assert rig.truth(1.0, 2.0, None).flow is None
    # across the scene cut at 4.25 s there is no flow; the label follows the window's midpoint
    cut = rig.segments[1].t_start
    assert cut == pytest.approx(4.25)
    before, after = ts[ts < cut][-1], ts[ts >= cut][0]
    assert rig.truth(3.5, 4.5, np.array([before - 0.04, before, after])).flow is None
    assert rig.truth(3.5, 4.5, None).label == rig.segments[0].label
    assert rig.truth(4.0, 5.0, None).label == rig.segments[1].label
    assert rig.segments[0].label != rig.segments[1].label


def test_classes_are_balanced_within_and_across_streams():
    assert len(CLASSES) >= 8 and len(set(CLASSES)) == len(CLASSES)
    # a 32.25 s stream has eight scenes: every class once
    assert sorted(s.label for s in SyntheticRig(3, 32.25).segments) == list(range(8))
    counts = Counter()
    for seed in range(400):
        counts.update(s.label for s in SyntheticRig(seed, 8.25).segments[:2])
    assert set(counts) == set(range(8))
    expected = 800 / 8
    assert max(abs(c - expected) for c in counts.values()) < 0.3 * expected


def test_each_modality_reveals_its_two_attributes():
    """Audio band follows hue, audio tonality follows material, lidar intensity follows material,
    lidar geometry follows shape, colour follows hue: the label needs two modalities."""
    yy, xx = np.mgrid[0:64, 0:64]
    xs, ys = xx.ravel().astype(float), yy.ravel().astype(float)
    rows = []
    for seed in range(6):
        rig = SyntheticRig(seed, 16.25, segment_phase=0.25)
        audio = np.concatenate([c.samples[:, 0] for c in rig.audio()])
        scans = list(rig.points())
        video = frames(rig)
        for seg in rig.segments:
            hue, shape, material = class_attributes(seg.label)
            a = audio[int(seg.t_start * 16000) + 800 : int(seg.t_end * 16000) - 800]
            spec = np.abs(np.fft.rfft(a)) ** 2
            freqs = np.fft.rfftfreq(len(a), 1 / 16000)
            centroid = (spec * freqs).sum() / spec.sum()
            flatness = np.exp(np.mean(np.log(spec[1:] + 1e-12))) / np.mean(spec[1:])
            sc = [s.points for s in scans if seg.t_start <= s.t < seg.t_end]
            inten = np.median(np.concatenate([p[:-16, 3] for p in sc]))
            f = video[int(np.ceil(seg.t_start * 25)) + 5]
            _, surface = rig._render(seg, np.array([f.t]), xs, ys)
            obj = f.image.reshape(-1, 3).astype(float)[surface[0] >= 0]
            redness = (obj[:, 0] - obj[:, 2]).mean() if len(obj) else np.nan
            rows.append((hue, shape, material, centroid, flatness, inten, redness))
    warm = [r for r in rows if r[0] == "warm"]
    cool = [r for r in rows if r[0] == "cool"]
    assert max(r[3] for r in warm) < min(r[3] for r in cool)  # audio band by hue
    metal = [r for r in rows if r[2] == "metal"]
    wood = [r for r in rows if r[2] == "wood"]
    assert min(r[5] for r in metal) > max(r[5] for r in wood)  # lidar intensity by material
    assert np.median([r[4] for r in metal]) < np.median([r[4] for r in wood])  # tonal vs noisy
    red = [r[6] for r in warm if not np.isnan(r[6])]
    blue = [r[6] for r in cool if not np.isnan(r[6])]
    assert min(red) > max(blue)  # object colour by hue


def test_lidar_geometry_follows_shape():
    for seed, label_shape in itertools.product(range(3), ("disc", "box")):
        rig = SyntheticRig(seed, 32.25, objects=1)
        seg = next(s for s in rig.segments if class_attributes(s.label)[1] == label_shape)
        k = int(np.ceil(seg.t_start * 10)) + 1
        scan = rig.scan(k)
        pos = rig._positions(seg, np.array([scan.t]))[0, 0] / 64
        local = scan.points[:-16, :3] - np.array([pos[0], pos[1], seg.depth[0]])
        r = seg.radius[0] / 64
        radial = np.linalg.norm(local, axis=1)
        # points on a sphere all lie at one radius; on a cube they spread from the half side to its corners
        spread = np.ptp(radial) / r
        if label_shape == "disc":
            assert spread < 0.2
        else:
            assert spread > 0.3



def test_cached_grid_rendering_matches_rendering_at_arbitrary_points():
    """The pixel grid uses cached per-pixel phases; any other point set computes them afresh.
    Both must agree exactly, also after switching segments back and forth."""
    rig = SyntheticRig(8, 9.0, objects=4)
    xs, ys = rig._grid()
    for k in (0, 1, 0, 2):
        seg = rig.segments[k]
        t = np.array([seg.t_start + 0.2, seg.t_start + 0.24])
        cached, surf_cached = rig._render(seg, t, xs, ys)
        fresh, surf_fresh = rig._render(seg, t, xs.copy(), ys.copy())
        np.testing.assert_array_equal(surf_cached, surf_fresh)
        np.testing.assert_allclose(cached, fresh, rtol=0, atol=1e-12)
        assert (surf_cached >= 0).any()
