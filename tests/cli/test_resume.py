"""Checks before Ray starts: missing paths and a resume whose window settings differ are refused
with exit 2 and one line, creating or changing nothing; allowed changes are saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import run_pipeline
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.parquet import OutputWriter, WindowRow
from pipeline.preflight import check_paths
from pipeline.resume import CONFIG_FILE, prepare_output


@pytest.fixture
def no_ray(monkeypatch):
    """Fails a test that gets as far as starting Ray."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(run_pipeline, "start_ray", refuse)


def write_config(tmp_path: Path, **changes) -> Path:
    clip = tmp_path / "cam.ts"
    clip.touch()
    data = {
        "streams": [{"id": "sim", "synthetic": {"seed": 1, "seconds": 2}}, {"id": "cam", "video": str(clip)}],
        "window": {"seconds": 1.0, "hop": 0.5},
    }
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"model": {"checkpoint": "missing-ckpt"}}, "model.checkpoint: "),
        ({"model": {"checkpoint": "."}}, "is not a checkpoint folder (no config.json)"),
        ({"streams": [{"id": "cam", "video": "nowhere.mp4", "audio": "same"}]}, "streams.0.video (stream 'cam'): "),
        ({"streams": [{"id": "lidar", "points": "scans/"}]}, "streams.0.points (stream 'lidar'): "),
    ],
)
def test_missing_paths_are_exit_2_before_ray_and_create_no_folder(tmp_path, no_ray, capsys, changes, needle):
    out = tmp_path / "out"
    code = run_pipeline.main(["--config", str(write_config(tmp_path, **changes)), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err
    assert "does not exist" in err or "no config.json" in err
    assert not out.exists()


def test_a_stream_pinned_to_another_node_is_not_checked_here(tmp_path):
    cfg = parse_config({"streams": [{"id": "cam", "video": "/on/the/camera/node.ts", "node": "10.0.0.7"},
                                    {"id": "url", "video": "rtsp://cam1.local/s"}]})
    check_paths(cfg)
    cfg.streams[0].node = None
    with pytest.raises(ConfigError, match="streams.0.video"):
        check_paths(cfg)


def test_a_resume_with_other_window_settings_is_refused_and_changes_nothing(tmp_path, no_ray, capsys):
    out = tmp_path / "out"
    prepare_output(parse_config(yaml.safe_load(write_config(tmp_path).read_text()), base_dir=tmp_path), str(out))
    with OutputWriter(out, model_name="tiny", config_hash="0" * 16) as w:  # a committed window, and the lock file
        w.write("sim", [WindowRow(0, 0.0, 1.0, True, True, True, True, [("a", 1.0)], np.zeros(4, np.float32), "tiny")])
    before = snapshot(out)
    other = tmp_path / "other.ts"
    other.touch()
    cfg = write_config(tmp_path, window={"seconds": 1.0, "hop": 0.25}, video={"size": [32, 32]})
    data = yaml.safe_load(cfg.read_text())
    data["streams"][1]["video"] = str(other)
    cfg.write_text(yaml.safe_dump(data))

    assert run_pipeline.main(["--config", str(cfg), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "window.hop, video.size, streams[cam].video differ" in err
    assert snapshot(out) == before


def test_allowed_changes_are_saved_and_removed_streams_kept(tmp_path):
    out = str(tmp_path / "out")
    base = yaml.safe_load(write_config(tmp_path).read_text())
    prepare_output(parse_config(base, base_dir=tmp_path), out)
    changed = {**base, "model": {"batch_size": 2, "checkpoint": None}, "runtime": {"max_in_flight": 3},
               "sources": {"open_timeout_s": 3},
               "streams": [base["streams"][0], {"id": "new", "synthetic": {"seed": 9}}]}  # cam removed, new added
    prepare_output(parse_config(changed, base_dir=tmp_path), out)
    saved = yaml.safe_load((tmp_path / "out" / CONFIG_FILE).read_text())
    assert [s["id"] for s in saved["streams"]] == ["sim", "new", "cam"]
    assert saved["model"]["batch_size"] == 2 and saved["runtime"]["max_in_flight"] == 3
    back = {**changed, "streams": [*changed["streams"], {"id": "cam", "synthetic": {"seed": 2}}]}
    with pytest.raises(ConfigError, match=r"streams\[cam\]\.video, streams\[cam\]\.synthetic differ"):
        prepare_output(parse_config(back, base_dir=tmp_path), out)
