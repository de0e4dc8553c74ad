"""The real-texture check: a scikit-image photo panned by a known motion, through H.264 and the reader."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")

from jobs.photo import panned_photo_clip, photo_flow  # noqa: E402
from paths import REPO  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.read import read_windows  # noqa: E402


def test_clip_moves_by_the_flow_it_reports(tmp_path):
    clip = tmp_path / "photo.mp4"
    flow = panned_photo_clip(clip, image="camera", size=(64, 64), seconds=2.0)
    assert flow.shape == (50, 2) and np.all(flow[0] == 0)
    assert set(np.abs(flow[1:]).ravel().tolist()) <= {0.0, 1.0} and np.all(np.abs(flow[1:]).sum(1) > 0)
    windows = list(read_windows({"id": "p", "video": str(clip)}, 1.0, 0.5, video={"size": [64, 64]}))
    frames = np.concatenate([w.video[:25] for w in windows[::2]]).astype(np.float32)
    assert frames.shape == (50, 64, 64, 3)
    better = 0
    for i in range(1, 50):
        dx, dy = (int(v) for v in flow[i])
        moved = np.roll(frames[i - 1], shift=(dy, dx), axis=(0, 1))[4:-4, 4:-4]
        err_true = np.abs(moved - frames[i][4:-4, 4:-4]).mean()
        err_zero = np.abs(frames[i - 1][4:-4, 4:-4] - frames[i][4:-4, 4:-4]).mean()
        better += err_true < 0.5 * err_zero
    assert better >= 45  # a frame pair where the content did not move as reported would fail this


def test_photo_flow_reports_epe_against_motion_and_zero(tiny_checkpoint):
    out = photo_flow(tiny_checkpoint, image="camera", seconds=2.0)
    assert out["windows"] == 3 and out["image"] == "camera"
    assert out["flow_epe"] > 0 and out["flow_epe_zero"] == pytest.approx(np.mean([1.0, 1.0, 1.0]), abs=0.5)


@pytest.mark.slow
def test_shipped_checkpoint_halves_zero_flow_error_on_a_real_photo():
    ckpt = load_config(REPO / "configs" / "default.yaml").model.checkpoint
    assert ckpt is not None, "configs/default.yaml must name the shipped checkpoint"
    for image in ("astronaut", "chelsea"):
        out = photo_flow(ckpt, image=image)
        assert out["flow_epe"] <= 0.5 * out["flow_epe_zero"], out
