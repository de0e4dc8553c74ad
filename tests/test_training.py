"""`pipeline.training.train_job`: the smoke config's loss falls, resume continues, mismatches are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perceiver_stream.checkpoint import load_checkpoint, read_config
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.sources.synthetic import CLASSES
from pipeline.training import lane_plan, train_job

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(CONFIGS / "train_smoke.yaml", [f"output.dir={tmp_path / 'out'}",
                                                       f"train.checkpoint={tmp_path / 'final'}", *overrides])


def test_smoke_config_trains_and_its_loss_falls(tmp_path):
    summary = train_job(_cfg(tmp_path), progress=False)
    assert summary["last_loss"]["loss"] < summary["first_loss"]["loss"]
    assert summary["last_loss"]["label_ce"] < summary["first_loss"]["label_ce"]
    model, meta = load_checkpoint(tmp_path / "final")
    assert meta["train_seeds"] == [0, 1, 2, 3] and meta["step"] == summary["steps"]
    assert list(model.config.class_names) == list(CLASSES) == meta["class_names"]
    assert meta["data"]["video"]["size"] == [32, 32]
    evals = summary["eval"]["900"]
    assert set(evals) == {"all", "drop_video", "drop_audio", "drop_points"}
    assert evals["drop_video"]["flow_epe"] is None and evals["all"]["flow_epe"] > 0
    assert all(e["windows"] == 200 for e in evals.values())
    json.dumps(summary)  # printed as JSON by the CLI


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    short = ["train.final_eval=false", "train.seconds=4", "train.seeds=[0, 1]", "train.checkpoint_every=3"]
    first = train_job(_cfg(tmp_path, *short, "train.steps=3"), progress=False)
    assert first["resumed_from"] == 0
    saved, meta = read_config(tmp_path / "out" / "_checkpoints" / "train" / "step-0000003")
    assert meta["step"] == 3
    second = train_job(_cfg(tmp_path, *short, "train.steps=5"), progress=False)
    assert second["resumed_from"] == 3 and second["steps"] == 5
    _, final_meta = load_checkpoint(tmp_path / "final")
    assert final_meta["step"] == 5
    kept = sorted(p.name for p in (tmp_path / "out" / "_checkpoints" / "train").iterdir())
    assert kept == ["step-0000003", "step-0000005"]
    fresh = train_job(_cfg(tmp_path, *short, "train.steps=5"), resume=False, progress=False)
    assert fresh["resumed_from"] == 0


def test_resume_refuses_a_checkpoint_of_another_model_or_data(tmp_path):
    short = ["train.final_eval=false", "train.seconds=4", "train.seeds=[0, 1]", "train.steps=2"]
    train_job(_cfg(tmp_path, *short), progress=False)
    with pytest.raises(ConfigError, match="num_latents"):
        train_job(_cfg(tmp_path, *short, "train.steps=4", "train.model.num_latents=8"), progress=False)
    with pytest.raises(ConfigError, match="train_seeds"):
        train_job(_cfg(tmp_path, *short, "train.steps=4", "train.seeds=[0, 5]"), progress=False)


def test_held_out_streams_must_not_be_training_seeds(tmp_path):
    with pytest.raises(ConfigError, match=r"\[900\]"):
        train_job(_cfg(tmp_path, "train.seeds=[0, 900]"), progress=False)


def test_lanes_carry_each_stream_window_by_window_and_cover_every_window():
    plan = lane_plan([3, 2, 4], batch_size=2, seed=0)
    epoch, seen = [], []
    while len(seen) < 9:  # one epoch: every window once
        epoch.append(next(plan))
        seen = sorted(pair for batch in epoch for pair in batch)
    assert all(len(batch) <= 2 for batch in epoch)
    assert seen == sorted((s, t) for s, n in enumerate([3, 2, 4]) for t in range(n))
    for batch, following in zip(epoch, epoch[1:]):
        for s, t in following:
            if t > 0:
                assert (s, t - 1) in batch
