"""Datasets from recorded files: the rig's flow sidecars, label tables, the window cache, training
from a checkpoint on files (init, freeze, photometric flow) and evaluation that refuses trained files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs.evaluate import evaluate, evaluate_files
from jobs.files_dataset import file_streams
from jobs.finetune import class_names, initial_model
from jobs.texture_rig import CLASSES, render_clip
from jobs.train import train_job
from perceiver_stream.checkpoint import load_checkpoint
from pipeline.config import DataConfig, load_config
from pipeline.errors import ConfigError
from pipeline.read import read_windows
from run_pipeline import main

SETTINGS = {"window": {"seconds": 1.0, "hop": 0.5}, "video": {"size": [16, 16], "fps": None},
            "audio": {"rate": 16000, "channels": 1}}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Three 2 s rig clips (32 x 32) with sidecars; label tables of the segments of c0 and c1
    (``labels.csv``) and of c2 (``eval.csv``)."""
    folder = tmp_path_factory.mktemp("rig")
    rows = []
    for i, photos in enumerate([["astronaut", "coffee"], ["noise", "camera"], ["chelsea", "rocket"]]):
        for t0, t1, label in render_clip(folder / f"c{i}.mp4", photos, seed=i, size=32, seconds=2.0, segment=1.0):
            rows.append([f"c{i}", t0, t1, label])
    for name, part in (("labels.csv", rows[:4]), ("eval.csv", rows[4:])):
        with open(folder / name, "w", newline="") as f:
            csv.writer(f).writerows([["stream_id", "t_start", "t_end", "label"], *part])
    return folder


def _data(folder: Path, ids: list[int], labels: str | None = "labels.csv") -> DataConfig:
    streams = [{"id": f"c{i}", "video": str(folder / f"c{i}.mp4")} for i in ids]
    return DataConfig.model_validate({"streams": streams, "labels": str(folder / labels) if labels else None})


def test_read_windows_attaches_the_sidecar_flow_on_the_decoded_grid(clips):
    full = list(read_windows({"id": "c", "video": str(clips / "c0.mp4")}, video={"size": [32, 32]}))
    half = list(read_windows({"id": "c", "video": str(clips / "c0.mp4")}, video={"size": [16, 16]}))
    flow, small = full[1].truth.flow, half[1].truth.flow
    assert flow.shape == (32, 32, 2) and small.shape == (16, 16, 2)
    assert full[1].truth.label == -1
    np.testing.assert_allclose(small, flow.reshape(16, 2, 16, 2, 2).mean(axis=(1, 3)) / 2, atol=1e-3)
    assert np.abs(flow).mean() > 0.2  # the rig moves


def test_windows_take_the_label_covering_most_of_them_and_are_cached(clips, tmp_path):
    first = file_streams(_data(clips, [0, 1]), SETTINGS, tmp_path, video_frames=2, progress=False)
    assert first.decoded == 2 and first.class_names == tuple(sorted(set(first.class_names)))
    assert set(first.class_names) <= set(CLASSES)
    w = first.streams[0][0]  # [0, 1): the first segment's label
    rows = list(csv.DictReader(open(clips / "labels.csv")))
    assert first.class_names[w.truth.label] == rows[0]["label"]
    assert w.video.shape == (2, 16, 16, 3) and w.truth.flow.shape == (16, 16, 2)
    again = file_streams(_data(clips, [0, 1]), SETTINGS, tmp_path, video_frames=2, progress=False)
    assert again.decoded == 0
    np.testing.assert_array_equal(again.streams[1][2].video, first.streams[1][2].video)
    other = file_streams(_data(clips, [0], None), {**SETTINGS, "window": {"seconds": 1.0, "hop": 1.0}}, tmp_path,
                         video_frames=2, progress=False)
    assert other.decoded == 1  # other settings, another entry


def test_a_window_without_a_majority_label_has_none(clips, tmp_path):
    (clips / "part.csv").write_text("stream_id,t_start,t_end,label\nc0,0.0,0.4,pan-up\n")
    data = file_streams(_data(clips, [0], "part.csv"), SETTINGS, tmp_path, video_frames=2, progress=False)
    assert [w.truth.label for w in data.streams[0][:2]] == [-1, -1]


@pytest.mark.parametrize(("row", "message"), [
    ("c9,0,1,pan-up", "row 2 (c9, 0.0, 1.0, pan-up): unknown stream 'c9'"),
    ("c0,1.0,1.0,pan-up", "row 2 (c0, 1.0, 1.0, pan-up): t_end must be after t_start"),
    ("c0,0.5,1.5,pan-down", "row 2 ('pan-down' from 0.5 s) overlaps row 1 ('pan-up' until 1.0 s)"),
])
def test_bad_label_rows_are_errors_naming_the_row(clips, tmp_path, row, message):
    (clips / "bad.csv").write_text(f"stream_id,t_start,t_end,label\nc0,0.0,1.0,pan-up\n{row}\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        file_streams(_data(clips, [0], "bad.csv"), SETTINGS, tmp_path, video_frames=2, progress=False)


def _finetune_config(clips: Path, tmp_path: Path, init: Path, *extra: str):
    (clips / "train.yaml").write_text(yaml.safe_dump(
        {"streams": [{"id": "c0", "video": "c0.mp4"}, {"id": "c1", "video": "c1.mp4"}], "labels": "labels.csv"}))
    cfg = {"streams": [{"id": "unused", "synthetic": {"seed": 900, "seconds": 2}}],
           "video": {"size": [16, 16]},
           "train": {"seeds": [], "data": str(clips / "train.yaml"), "init": str(init), "steps": 3,
                     "batch_size": 2, "threads": 1, "final_eval": False, "checkpoint": str(tmp_path / "final")},
           "eval": {"data": {"streams": [{"id": "c2", "video": str(clips / "c2.mp4")}],
                             "labels": str(clips / "eval.csv")}},
           "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, list(extra)), path


def test_finetune_from_a_checkpoint_on_files_with_photometric_flow(clips, tmp_path, tiny_checkpoint):
    cfg, _ = _finetune_config(clips, tmp_path, tiny_checkpoint, "train.flow_loss=photometric",
                              "train.freeze=[encoder]")
    base, _ = load_checkpoint(tiny_checkpoint)
    summary = train_job(cfg, progress=False)
    model, meta = load_checkpoint(tmp_path / "final")
    assert list(model.config.labels.class_names) == meta["class_names"]
    assert set(meta["class_names"]) <= set(CLASSES) and len(meta["train_files"]) == 4  # 2 clips + 2 sidecars
    assert summary["new_weights"] == 2  # labels.head weight and bias
    assert "photo_census" in summary["last_loss"]
    for name, p in model.state_dict().items():
        if name.startswith("encoder."):
            torch.testing.assert_close(p, base.state_dict()[name])
    changed = [n for n, p in model.state_dict().items() if n.startswith("flow.")
               and not torch.equal(p, base.state_dict()[n])]
    assert changed  # the flow decoder was trained, without truth
    (clips / "eval.csv").write_text(f"stream_id,t_start,t_end,label\nc2,0.0,2.0,{meta['class_names'][0]}\n")
    result = evaluate_files(tmp_path / "final", cfg.eval.data, tmp_path / "out", progress=False)
    assert result["windows"] == 3 and result["labelled"] == 3 and result["photometric"] > 0 and result["flow_epe_zero"] > 0
    with pytest.raises(ConfigError, match="were used to train"):
        evaluate_files(tmp_path / "final", cfg.train.data, tmp_path / "out", progress=False)


def test_finetune_model_overrides_add_a_flow_read_and_keep_every_other_weight(clips, tmp_path, tiny_checkpoint):
    cfg, _ = _finetune_config(clips, tmp_path, tiny_checkpoint, "train.model={labels: {from_flow: true}}")
    base, _ = load_checkpoint(tiny_checkpoint)
    classes = class_names(cfg)
    model, fresh = initial_model(cfg, classes)
    assert model.config.labels.from_flow and model.config.labels.class_names == classes
    assert sorted(fresh) == ["labels.flow_read.bias", "labels.flow_read.weight", "labels.head.bias", "labels.head.weight"]
    old = base.state_dict()
    for name, p in model.state_dict().items():
        if name not in fresh:
            torch.testing.assert_close(p, old[name])
    with pytest.raises(ConfigError, match="train.model: model config: labels.from_flow needs a flow decoder"):
        initial_model(load_config(tmp_path / "finetune.yaml", ["train.model={flow: null, labels: {from_flow: true}}"]),
                      classes)


def test_finetune_adds_a_refiner_trains_it_alone_and_inherits_the_init_checkpoints_seeds(clips, tmp_path, tiny_checkpoint):
    cfg, _ = _finetune_config(
        clips, tmp_path, tiny_checkpoint, "train.model={flow: {refine: 1, refine_channels: 4}}",
        "train.freeze=[preprocess, encoder, modality_gate, state_norm, state_proj, state_gate, final_norm, labels, "
        "flow.patch_proj, flow.pos_proj, flow.attend]", "train.label_weight=0", "train.lr=0.01")
    base, _ = load_checkpoint(tiny_checkpoint)
    summary = train_job(cfg, progress=False)
    model, meta = load_checkpoint(tmp_path / "final")
    # new: the refiner's weights and a label head for the clips' classes (kept fixed here)
    assert model.config.flow.refine == 1 and summary["new_weights"] == len(list(model.flow.refine.parameters())) + 2
    old = base.state_dict()
    changed = {n for n, p in model.state_dict().items() if n in old and not torch.equal(p, old[n])}
    assert not changed - {"labels.head.weight", "labels.head.bias"}
    grown = [n for n, p in model.state_dict().items() if n.startswith("flow.refine.net.6.") and p.abs().sum() > 0]
    assert grown  # the zero-initialised last layer was trained
    # the init checkpoint was trained on seeds 0 and 1: so is this one, for evaluation's refusal
    assert meta["train_seeds"] == [0, 1]
    with pytest.raises(ConfigError, match="seed 1 was used to train"):
        evaluate(tmp_path / "final", 1)


def test_cli_exits_2_on_a_bad_freeze_name_or_label_row(clips, tmp_path, tiny_checkpoint, capsys):
    _, path = _finetune_config(clips, tmp_path, tiny_checkpoint)
    assert main(["train", "--config", str(path), "--set", "train.freeze=[nothing]"]) == 2
    assert "train.freeze: 'nothing' names no parameters" in capsys.readouterr().err
    (clips / "bad2.csv").write_text("stream_id,t_start,t_end,label\nc0,2.0,1.0,pan-up\n")
    assert main(["train", "--config", str(path), "--set", f"train.data={clips / 'bad.yaml'}"]) == 2
    (clips / "bad.yaml").write_text(yaml.safe_dump({"streams": [{"id": "c0", "video": "c0.mp4"}],
                                                    "labels": "bad2.csv"}))
    assert main(["train", "--config", str(path), "--set", f"train.data={clips / 'bad.yaml'}"]) == 2
    assert "row 1 (c0, 2.0, 1.0, pan-up): t_end must be after t_start" in capsys.readouterr().err
