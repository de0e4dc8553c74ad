"""Published models in the pipeline: the config refusal before start (exit 2, keys named), the model
actor's loader, and a run on Ray whose flow rows equal transformers' tiled flow on the same frames."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pytest
import torch
import yaml

import run_pipeline
from actors.plan import shipped_inputs
from actors.predictor import load_predictor
from actors.runner import run
from clips import write_clip
from pipeline.config import parse_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.published import check_published
from pipeline.read import read_windows
from tiny_published import reference_flow, save_classifier, save_flow, save_multimodal

CPU = torch.device("cpu")


def config(checkpoint, *, streams=None, **sections) -> dict:
    return {
        "streams": streams or [{"id": "cam", "video": "clip.mp4", "audio": "same"}],
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 4, "max_wait_ms": 20},
        **sections,
    }


def refusal(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        check_published(parse_config(data))
    return str(err.value)


def test_configs_that_cannot_feed_the_model_are_refused_naming_the_keys(tmp_path):
    flow, mm, cls = tmp_path / "flow", tmp_path / "mm", tmp_path / "cls"
    save_flow(flow), save_multimodal(mm), save_classifier(cls, "learned")

    check_published(parse_config(config(flow, window={"seconds": 0.2, "hop": 0.2}, video={"fps": 10})))
    msg = refusal(config(flow, window={"seconds": 0.1, "hop": 0.1}, video={"fps": 10},
                         streams=[{"id": "cam", "video": "c.mp4"}, {"id": "mic", "audio": "a.wav"}]))
    assert "PerceiverForOpticalFlow" in msg and "window.seconds 0.1 at video.fps 10.0 gives 1 frame(s)" in msg
    assert "needs 2" in msg and "streams.1.video" in msg and "streams.0" not in msg

    good = dict(video={"size": [8, 8], "fps": 10}, audio={"rate": 1600, "channels": 1})
    check_published(parse_config(config(mm, **good)))
    msg = refusal(config(mm, video={"size": [16, 16]}, audio={"channels": 2}))
    assert "video.size is [16, 16]; the model needs [8, 8]" in msg and "video.fps is null" in msg
    assert "audio.channels is 2" in msg
    msg = refusal(config(mm, video={"size": [8, 8], "fps": 10}, audio={"rate": 16000},
                         streams=[{"id": "cam", "video": "c.mp4"}]))
    assert "audio.rate is 16000; the model needs 1600 (160 samples per frame at video.fps 10)" in msg
    assert "streams.0.audio is not set" in msg
    assert "distill.enabled" in refusal(config(mm, **good, distill={"enabled": True}))

    assert "video.size is null" in refusal(config(cls))
    check_published(parse_config(config(cls, video={"size": [8, 8]})))
    check_published(parse_config(config(cls, model={"checkpoint": str(cls), "student": str(flow)})))


def test_the_command_line_refuses_before_starting_anything(tmp_path, capsys):
    save_multimodal(tmp_path / "mm")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "mm", video={"size": [8, 8], "fps": 25})))
    capsys.readouterr()  # save_pretrained's progress bar
    assert run_pipeline.main(["run", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "audio.rate is 16000; the model needs 4000" in err
    assert not (tmp_path / "out").exists()


def test_the_model_actor_loads_a_published_folder_and_ships_what_it_reads(tmp_path):
    save_flow(tmp_path / "flow")
    cfg = parse_config(config(tmp_path / "flow"))
    pred = load_predictor(cfg, CPU)
    assert pred.name == "flow" and not pred.stateful and pred.max_tiles == 4
    assert shipped_inputs(cfg) == (2, None)
    save_classifier(tmp_path / "cls", "fourier")
    shutil.copy(tmp_path / "flow" / "config.json", tmp_path / "cls" / "config.json")  # weights of another model
    with pytest.raises(CheckpointError, match="cls"):
        load_predictor(parse_config(config(tmp_path / "cls")), CPU)


def test_a_run_writes_the_flow_of_transformers_tiled_flow(ray_session, tmp_path):
    hf = save_flow(tmp_path / "flow")
    clip = write_clip(tmp_path / "clip.mp4", seconds=2.0, size=(32, 40), fps=10)
    stream = {"id": "cam", "video": str(clip)}
    cfg = parse_config(config(tmp_path / "flow", streams=[stream], video={"size": [20, 24]}))
    summary = run(cfg, tmp_path / "out")
    assert summary.exit_code == 0

    windows = pl.from_arrow(ds.dataset(tmp_path / "out" / "windows", partitioning="hive").to_table())
    assert windows["state_reset"].all() and set(windows["model"]) == {"flow"}  # stateless: nothing carried
    assert all(labels == [] for labels in windows["labels"].to_list())
    flow = pl.from_arrow(ds.dataset(tmp_path / "out" / "flow", partitioning="hive").to_table()).sort("window_id")
    expected = list(read_windows(stream, 1.0, 0.5, video={"size": [20, 24]}))
    assert flow["window_id"].to_list() == [w.window_id for w in expected] and len(expected) == 3
    pred = load_predictor(cfg, CPU)
    for row, w in zip(flow.iter_rows(named=True), expected):
        assert (row["height"], row["width"]) == (20, 24)
        ref = reference_flow(hf, w, pred.min_overlap).numpy()
        assert np.abs(np.asarray(row["flow"]).reshape(20, 24, 2) - ref).max() <= 1e-4
