"""jobs.inspect: the per-stream summary and the pictures it writes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError, SourceOpenError
from jobs.flowviz import color_wheel, flow_to_rgb
from jobs.inspect import summarize, write_pictures
from pipeline.parquet import ErrorRow, FlowRow, OutputWriter, WindowRow


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def output(tmp_path):
    rng = np.random.default_rng(0)
    with OutputWriter(tmp_path, model_name="test", config_hash="h") as w:
        for sid, ids in (("cam0", [0, 1, 2, 4]), ("cam1", [0, 1])):
            rows = [
                WindowRow(i, 0.5 * i, 0.5 * i + 1, True, i % 2 == 0, False, i == 0,
                          [("red", 0.9), ("blue", 0.1)] if i < 2 else [("blue", 0.7)],
                          rng.normal(size=8).astype(np.float32), "test")
                for i in ids
            ]
            flows = [FlowRow(i, 0.5 * i + 0.96, rng.normal(size=(6, 5, 2)).astype(np.float32),
                             _png(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))) for i in ids[:3]]
            w.write(sid, rows, flow=flows)
        w.write_errors("cam2", [SourceOpenError("not media", stream_id="cam2", source="x.mp4")])
    return tmp_path


def test_summary_counts_per_stream(output):
    s = {x.stream_id: x for x in summarize(output)}
    assert set(s) == {"cam0", "cam1", "cam2"}
    c0 = s["cam0"]
    assert (c0.windows, c0.first_window, c0.last_window, c0.missing_ids) == (4, 0, 4, 1)
    assert (c0.with_video, c0.with_audio, c0.with_points, c0.state_resets, c0.flow_rows) == (4, 3, 0, 1, 3)
    assert c0.top_labels == {"red": 2, "blue": 2}
    assert s["cam2"].windows == 0 and s["cam2"].errors == {"SourceOpenError": 1}
    assert "cam0: 4 windows" in c0.line()


def test_pictures_are_written_and_readable(output):
    paths = write_pictures(output)
    names = sorted(p.name for p in paths)
    assert names == ["flow_cam0.png", "flow_cam1.png", "labels_cam0.png", "labels_cam1.png"]
    for p in paths:
        assert p.parent == output / "_inspect"
        img = np.asarray(Image.open(p))
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert img[..., :3].std() > 5  # not a blank canvas


def test_not_an_output_folder(tmp_path):
    with pytest.raises(PipelineError, match="no 'windows' table"):
        summarize(tmp_path)


def test_flow_colours_follow_the_wheel():
    f = np.zeros((1, 4, 2), np.float32)
    f[0, 0] = (2, 0)  # right: red
    f[0, 1] = (-2, 0)  # left: the wheel's opposite side (cyan-blue)
    f[0, 3] = (np.nan, 0)
    rgb = flow_to_rgb(f)
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert rgb[0, 1, 2] == 255 and rgb[0, 1, 0] == 0
    assert tuple(rgb[0, 2]) == (255, 255, 255)  # no motion is white
    assert tuple(rgb[0, 3]) == (0, 0, 0)  # non-finite is black
    assert color_wheel().shape == (55, 3)
    with pytest.raises(ValueError):
        flow_to_rgb(np.zeros((3, 3)))
