"""The shipped checkpoints load from their recorded config.json files and give bit-identical outputs
on the recorded batch (tests/fixtures/record_checkpoints.py wrote both from the code they shipped with;
the recorded config.json files are in the flat "streaming-v1" format the checkpoints shipped in)."""

from __future__ import annotations

import shutil

import pytest
import torch

from paths import FIXTURES, REPO
from perceiver_stream import Batch, ModalityBatch, load_checkpoint, read_config



def _batch(d: dict) -> Batch:
    mods = {k: ModalityBatch(m["values"], m["times"], m["mask"], m["present"], m["rate"])
            for k, m in d["modalities"].items()}
    return Batch(d["stream_ids"], d["window_ids"], d["t_start"], d["t_end"], d["reset"], mods)


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
    state = None
    with torch.no_grad():
        for raw, expected in zip(doc["batches"], doc["outputs"][name]):
            out = model(_batch(raw), state)
            state = out.state
            for field, want in expected.items():
                got = getattr(out, field)
                assert got is not None, field
                assert got.dtype == want.dtype and got.shape == want.shape, field
                assert torch.equal(got, want), f"{name}: {field} differs by {(got.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("name", ["default", "student"])
def test_shipped_config_json_is_the_recorded_one_in_the_current_format(name, tmp_path):
    shutil.copy(FIXTURES / f"{name}_config.json", tmp_path / "config.json")
    assert read_config(REPO / "checkpoints" / name) == read_config(tmp_path)
