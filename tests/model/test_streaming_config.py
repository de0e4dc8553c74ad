"""StreamingConfig and checkpoints: validation, the flat and v1 layouts, save and load, mismatches."""

from __future__ import annotations

import json

import pytest
import torch

from perceiver_stream.checkpoint import load_checkpoint, read_config, save_checkpoint
from perceiver_stream.config import StreamingConfig
from perceiver_stream.streaming import StreamingPerceiverIO
from tiny import assert_outputs_close, make_batch


def test_default_config_is_small():
    m = StreamingPerceiverIO(StreamingConfig.from_dict({"labels": {"class_names": list("abcdefgh")}}))
    assert sum(p.numel() for p in m.parameters()) < 1_000_000


def test_config_validation_and_round_trip(tiny_config):
    cfg = tiny_config
    again = StreamingConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.modalities["video"]["time_period"] == 2.0**17  # defaults filled in
    with pytest.raises(ValueError, match="no option"):
        StreamingConfig.from_dict({**cfg.to_dict(), "latnets": 3})
    with pytest.raises(ValueError, match=r"encoder has no option\(s\) \['latnets'\]"):
        tiny_config.merged({"encoder": {"latnets": 3}})
    with pytest.raises(ValueError, match="unknown adapter kind"):
        tiny_config.merged({"modalities": {"video": {"kind": "camera"}}})
    with pytest.raises(ValueError, match="flow.modality"):
        tiny_config.merged({"flow": {"modality": "audio"}})
    with pytest.raises(ValueError, match="divisible"):
        tiny_config.merged({"encoder": {"latent_channels": 30, "self_heads": 4}})
    with pytest.raises(ValueError, match="labels.heads"):
        tiny_config.merged({"labels": {"heads": 3}})
    heads = StreamingPerceiverIO(tiny_config.merged({"labels": {"heads": 4}})).labels.attend.attn.num_heads
    assert heads == 4
    student = cfg.merged({"encoder": {"num_latents": 4, "num_blocks": 1}})
    assert student.encoder.num_latents == 4 and student.encoder.num_blocks == 1
    assert student.encoder.latent_channels == 32 and student.labels == cfg.labels
    # no flow decoder
    assert StreamingConfig.from_dict({**cfg.to_dict(), "flow": None}).flow is None
    assert StreamingConfig.from_dict(json.loads(json.dumps({**cfg.to_dict(), "flow": None}))).video_frames == 2


def test_config_refuses_the_flat_layout_naming_the_new_place():
    with pytest.raises(ValueError, match="'flow_channels' is now 'flow.channels'"):
        StreamingConfig.from_dict({"flow_channels": 16})
    with pytest.raises(ValueError, match="'num_latents' is now 'encoder.num_latents'"):
        StreamingConfig.from_dict({"num_latents": 16})
    with pytest.raises(ValueError, match="'state' is now 'state.carry'"):
        StreamingConfig.from_dict({"state": False})
    with pytest.raises(ValueError, match="'mask_probs' was removed"):
        StreamingConfig.from_dict({"mask_probs": {}})
    with pytest.raises(ValueError, match="unknown adapter kind 'labels'"):
        StreamingConfig.from_dict({"modalities": {"tags": {"kind": "labels"}}})


def test_v1_checkpoint_config_is_read_in_the_nested_form(tmp_path):
    v1 = {"modalities": {"video": {"kind": "video", "conv": 4, "conv_tokens": False}}, "num_latents": 9,
          "modality_latents": {"video": 2}, "state": False, "flow_size": [32, 32], "flow_corr_stride": 1,
          "label_heads": 2, "label_pool": ["video"], "class_names": ["x", "y"], "mask_probs": {},
          "token_mlps": {}, "label_groups": True, "labels_from_encoder": True, "own_channels": True,
          "modality_norms": True}
    folder = tmp_path / "ck"
    folder.mkdir()

    def read(model: dict) -> StreamingConfig:
        (folder / "config.json").write_text(json.dumps({"format": "perceiver-stream/streaming-v1", "model": model}))
        return read_config(folder)[0]

    cfg = read(v1)
    assert (cfg.encoder.num_latents, cfg.encoder.modality_latents, cfg.state.carry) == (9, {"video": 2}, False)
    assert cfg.flow.size == (32, 32) and cfg.labels.heads == 2 and cfg.labels.pool == ("video",)
    assert cfg.labels.class_names == ("x", "y") and cfg.modalities["video"]["conv"] == 4
    assert read({**v1, "flow_modality": None, "flow_channels": 8}).flow is None
    # a removed option at any other value than the behaviour the model now has is refused
    for key, value in [("mask_probs", {"video": 0.1}), ("label_groups", False), ("own_channels", False),
                       ("flow_corr_stride", 2), ("token_mlps", {"video": 8})]:
        with pytest.raises(ValueError, match=f"option '{key}' was removed"):
            read({**v1, key: value})
    with pytest.raises(ValueError, match="conv_tokens"):
        read({**v1, "modalities": {"video": {"kind": "video", "conv": 4}}})  # (v1's default: in the tokens)
    with pytest.raises(ValueError, match="'audio_samples' adapter kind was removed"):
        read({**v1, "modalities": {"mic": {"kind": "audio_samples"}}})


@torch.no_grad()
def test_checkpoint_round_trip_and_mismatch(tiny_model, tmp_path):
    save_checkpoint(tmp_path / "ck", tiny_model, {"seeds": [1, 2, 3]})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta == {"seeds": [1, 2, 3]}
    assert loaded.config.labels.class_names == ("a", "b", "c")
    batch = make_batch(b=2)
    assert_outputs_close(loaded(batch), tiny_model(batch), atol=0)
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    doc["model"]["encoder"]["num_latents"] = 9
    (tmp_path / "ck" / "config.json").write_text(json.dumps(doc))
    assert read_config(tmp_path / "ck")[0].encoder.num_latents == 9
    with pytest.raises(ValueError, match=r"latents: saved \(8, 32\), config needs \(9, 32\)"):
        load_checkpoint(tmp_path / "ck")
    doc["model"]["encoder"]["num_latents"] = 8
    doc["model"]["labels"]["class_names"] = []
    (tmp_path / "ck" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"unexpected weights.*labels\.head"):
        load_checkpoint(tmp_path / "ck")
