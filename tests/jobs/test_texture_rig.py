"""The real-texture rig: its true flow explains its frames, its splits keep the held-out photographs apart,
and the config keys that read its data files."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import av
import numpy as np
import pytest
import torch
import yaml

from jobs.texture_rig import HELDOUT, PHOTOS, TRAIN_PHOTOS, clip_frames, photo, render_clip, write_rig
from perceiver_stream.photometric import photometric_loss
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.read import read_windows


def test_the_true_flow_explains_the_decoded_frames(tmp_path):
    segments = render_clip(tmp_path / "c.mp4", ["astronaut", "noise"], seed=3, size=32, seconds=1.2, segment=0.6)
    assert [s[:2] for s in segments] == [(0.0, 0.6), (0.6, 1.2)]
    w = list(read_windows({"id": "c", "video": str(tmp_path / "c.mp4")}, video={"size": [32, 32]}))[0]
    a, b = (torch.from_numpy(w.video[i].copy()).permute(2, 0, 1)[None].float() / 255 for i in (-2, -1))
    truth = torch.from_numpy(w.truth.flow)[None]
    assert float(truth.norm(dim=-1).mean()) > 0.4
    with_truth = photometric_loss(a, b, truth)["photo_census"]
    zero = photometric_loss(a, b, torch.zeros_like(truth))["photo_census"]
    assert float(with_truth) < 0.6 * float(zero)


def test_splits_keep_the_held_out_photographs_apart(tmp_path):
    summary = write_rig(tmp_path, train_clips=1, eval_clips=1, size=32, seconds=1.0, progress=False)
    assert set(HELDOUT).isdisjoint(TRAIN_PHOTOS) and set(HELDOUT) | set(TRAIN_PHOTOS) == set(PHOTOS)
    assert summary["eval"]["photos"] == sorted(HELDOUT)
    for split in ("train", "eval"):
        data = yaml.safe_load((tmp_path / split / "data.yaml").read_text())
        (clip,) = data["streams"]
        assert (tmp_path / split / clip["video"]).is_file()
        assert (tmp_path / split / clip["video"]).with_suffix(".flow.npz").is_file()
        assert clip["id"].split("-", 1)[1] in (HELDOUT if split == "eval" else TRAIN_PHOTOS)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"streams": [{"id": "s", "synthetic": {"seed": 1}}],
                                        "train": {"seeds": [], "data": "train/data.yaml"},
                                        "eval": {"data": "eval/clips.yaml"}}))
    cfg = load_config(cfg_path)
    train_clip = yaml.safe_load((tmp_path / "train" / "data.yaml").read_text())["streams"][0]["video"]
    assert cfg.train.data.streams[0].video == str(tmp_path / "train" / train_clip)
    assert cfg.train.data.labels == str(tmp_path / "train" / "labels.csv") and cfg.eval.data.labels is None


@pytest.mark.parametrize(("train", "message"), [
    ({"seeds": []}, "needs at least one seed or train.data"),
    ({"flow_loss": "teacher"}, "flow_teacher"),
    ({"smooth_weight": -1}, "smooth_weight"),
    ({"data": "missing.yaml"}, "data file cannot be read"),
])
def test_train_keys_are_checked(tmp_path, train, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"streams": [{"id": "s", "synthetic": {"seed": 1}}], "train": train}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_photos_are_colour_images_in_unit_range():
    for name in ("chelsea", "grace_hopper", "gravel", "noise"):
        img = photo(name)
        assert img.ndim == 3 and img.shape[2] == 3 and 0 <= img.min() and img.max() <= 1 and np.ptp(img) > 0.3


def test_a_clip_rendered_in_another_process_is_the_one_rendered_here():
    args = (["rocket", "grace_hopper"],)
    kwargs = {"seed": 10_000, "size": 32, "seconds": 0.6}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
        theirs = executor.submit(clip_frames, *args, **kwargs).result()
    frames, flows, segments = clip_frames(*args, **kwargs)
    assert frames.shape == (15, 32, 32, 3) and flows.shape == (14, 32, 32, 2)
    assert np.array_equal(frames, theirs[0]) and np.array_equal(flows, theirs[1]) and segments == theirs[2]


def test_clips_rendered_by_two_processes_are_the_ones_rendered_by_one(tmp_path):
    write_rig(tmp_path / "one", train_clips=2, eval_clips=1, size=32, seconds=0.6, progress=False)
    write_rig(tmp_path / "two", train_clips=2, eval_clips=1, size=32, seconds=0.6, workers=2, progress=False)
    for split in ("train", "eval"):
        for name in ("labels.csv", "data.yaml"):
            assert (tmp_path / "one" / split / name).read_text() == (tmp_path / "two" / split / name).read_text()
        streams = yaml.safe_load((tmp_path / "one" / split / "data.yaml").read_text())["streams"]
        assert len(streams) == (2 if split == "train" else 1)
        for stream in streams:
            a, b = tmp_path / "one" / split / stream["video"], tmp_path / "two" / split / stream["video"]
            fa, fb = np.load(a.with_suffix(".flow.npz")), np.load(b.with_suffix(".flow.npz"))
            assert np.array_equal(fa["flow"], fb["flow"]) and np.array_equal(fa["times"], fb["times"])
            # The video: the H.264 bytes can differ between processes, so the two files decode to the same
            # frames within the codec's error (about 3.5 grey levels at this size), not bit for bit.
            decoded = []
            for clip in (a, b):
                with av.open(str(clip)) as container:
                    decoded.append(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))
            assert decoded[0].shape == decoded[1].shape == (15, 32, 32, 3)
            assert np.abs(decoded[0].astype(int) - decoded[1]).mean() < 4.0
