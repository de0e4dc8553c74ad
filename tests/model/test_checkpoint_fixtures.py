"""The shipped checkpoints load from their recorded config.json files and give bit-identical outputs
on the recorded batch (tests/fixtures/record_checkpoints.py wrote both from the code they shipped with;
the recorded config.json files are in the flat "streaming-v1" format the checkpoints shipped in).

Float kernels differ in the last bits between kinds of CPU, so the fixture holds one recording per
kind of CPU, each made by the shipped code; today's outputs must equal this kind's bit for bit, or,
on a kind with no recording, one of them to float noise (1e-4)."""

from __future__ import annotations

import shutil

import pytest
import torch

from fixtures.record_checkpoints import batch_from_dict, cpu_kind, run
from paths import FIXTURES, REPO
from perceiver_stream import load_checkpoint, read_config


def _max_difference(got: list[dict], want: list[dict]) -> float:
    """Largest absolute difference over every output of every batch (inf where a field or shape differs)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.keys() != w.keys():
            return float("inf")
        for field, value in w.items():
            if g[field].dtype != value.dtype or g[field].shape != value.shape:
                return float("inf")
            worst = max(worst, (g[field].double() - value.double()).abs().max().item())
    return worst


@pytest.mark.parametrize("config", ["recorded", "shipped"])
@pytest.mark.parametrize("name", ["default", "student"])
def test_shipped_checkpoint_gives_recorded_outputs_from_recorded_config(name, config, tmp_path):
    doc = torch.load(FIXTURES / "checkpoints.pt", weights_only=True)
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(REPO / "checkpoints" / name / "model.safetensors", folder / "model.safetensors")
    recorded = FIXTURES / f"{name}_config.json"
    shutil.copy(recorded if config == "recorded" else REPO / "checkpoints" / name / "config.json",
                folder / "config.json")
    model, _ = load_checkpoint(folder)
    torch.set_num_threads(2)
    got = run(model, [batch_from_dict(b) for b in doc["batches"]])
    differences = {r["cpu"]: _max_difference(got, r["outputs"][name]) for r in doc["recordings"]}
    if cpu_kind() in differences:
        assert differences[cpu_kind()] == 0.0, (
            f"{name}: the recording of this kind of CPU ({cpu_kind()}) is not matched bit for bit; "
            f"largest difference from each recording: {differences}")
    else:
        # A kind of CPU with no recording of its own: its kernels round differently, so only float
        # noise is allowed (add its recording with the shipped code: record_checkpoints.py --add).
        assert min(differences.values()) < 1e-4, (
            f"{name}: {cpu_kind()} has no recording and differs from every one by more than float "
            f"noise: {differences}")


@pytest.mark.parametrize("name", ["default", "student"])
def test_shipped_config_json_is_the_recorded_one_in_the_current_format(name, tmp_path):
    shutil.copy(FIXTURES / f"{name}_config.json", tmp_path / "config.json")
    assert read_config(REPO / "checkpoints" / name) == read_config(tmp_path)
