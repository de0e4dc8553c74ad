"""Published Perceiver IO models (transformers save_pretrained folders) on the pipeline's windows:
detection from config.json, and each task's outputs against transformers' own forward pass on the
same decoded frames (and audio), to 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clips import write_clip
from perceiver_stream.deepmind.published import PublishedPerceiver, published_spec
from pipeline.collate import collate
from pipeline.read import read_windows
from pipeline.window import Window
from tiny_published import (
    CLASSIFIERS,
    FLOW_TILE,
    MM,
    reference_flow,
    reference_logits,
    reference_multimodal,
    save_classifier,
    save_flow,
    save_multimodal,
    tr,
)

TOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """1.5 s at 10 fps with a sine track: two windows of 1 s, hop 0.5."""
    return write_clip(tmp_path_factory.mktemp("clip") / "c.mp4", seconds=1.5, size=(32, 40), fps=10)


def _windows(clip, **settings):
    return list(read_windows({"id": "c", "video": str(clip), "audio": "same"}, 1.0, 0.5, **settings))


def test_flow_tiles_of_all_windows_match_transformers_tiled_flow(clip, tmp_path):
    hf = save_flow(tmp_path)
    pred = PublishedPerceiver(tmp_path, CPU, max_tiles=3)  # 2 x 2 tiles per window, 3 per forward
    assert pred.video_frames == 2 and pred.class_names == [] and not pred.stateful
    windows = _windows(clip, video={"size": [20, 24]})
    one_frame = Window("c", 9, 4.5, 5.5, video=windows[0].video[-1:], video_t=windows[0].video_t[-1:])
    forwards, tiles = [], pred._flow_tiles
    pred._flow_tiles = lambda patches, query_chunk=None: forwards.append(len(patches)) or tiles(patches, query_chunk)
    with torch.inference_mode():
        out = pred(collate([*windows, one_frame], video_frames=2))
    assert forwards == [3, 3, 2]  # the 2 x 4 tiles of both windows share forward passes
    assert out.flow.shape == (3, 20, 24, 2) and out.flow_valid.tolist() == [True, True, False]
    assert out.label_logits.shape == (3, 0) and out.embedding.shape == (3, 32)
    for i, w in enumerate(windows):
        ref = reference_flow(hf, w, pred.min_overlap)
        assert ref.abs().max() > 1.0  # pixels: the comparison means something
        assert (out.flow[i] - ref).abs().max().item() <= TOL
    assert FLOW_TILE == pred.spec.tile_size


def test_multimodal_label_matches_transformers_on_the_window_frames_and_audio(clip, tmp_path):
    hf = save_multimodal(tmp_path)
    pred = PublishedPerceiver(tmp_path, CPU)
    assert pred.video_frames == MM["num_frames"] and len(pred.class_names) == 7
    windows = _windows(clip, video={"size": [8, 8], "fps": 10}, audio={"rate": 1600})
    with torch.inference_mode():
        out = pred(collate(windows, video_frames=pred.video_frames))
    assert out.flow is None and not out.flow_valid.any()
    for i, w in enumerate(windows):
        ref = reference_multimodal(hf, w)
        assert ref.abs().max() > 0.1
        assert (out.label_logits[i] - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", sorted(CLASSIFIERS))
def test_classifier_labels_match_transformers_on_the_last_frame(clip, tmp_path, kind):
    hf = save_classifier(tmp_path, kind)
    pred = PublishedPerceiver(tmp_path, CPU)
    assert pred.class_names == ["class0", "class1", "class2", "class3"] and pred.video_frames == 1
    windows = _windows(clip, video={"size": [8, 8]})
    with torch.inference_mode():
        out = pred(collate(windows, video_frames=1))
    for i, w in enumerate(windows):
        ref = reference_logits(hf, w)
        assert ref.abs().max() > 0.1
        assert (out.label_logits[i] - ref).abs().max().item() <= TOL
        assert out.label_logits[i].argmax() == ref.argmax()


def test_spec_is_read_from_config_json_and_other_folders_are_not_published(tmp_path, tiny_checkpoint):
    save_flow(tmp_path / "flow")
    spec = published_spec(tmp_path / "flow")
    assert (spec.task, spec.video_frames, spec.tile_size, spec.frame_size) == ("flow", 2, FLOW_TILE, None)
    save_multimodal(tmp_path / "mm")
    spec = published_spec(tmp_path / "mm")
    assert (spec.task, spec.frame_size, spec.audio_samples) == ("multimodal", (8, 8), 320)
    assert published_spec(tiny_checkpoint) is None  # a perceiver-stream checkpoint
    assert published_spec(tmp_path / "nothing") is None
    tr.PerceiverForMaskedLM(tr.PerceiverConfig(num_latents=4, d_latents=8, num_self_attends_per_block=1,
                                               num_self_attention_heads=1, num_cross_attention_heads=1,
                                               d_model=8, vocab_size=12)).save_pretrained(tmp_path / "mlm")
    with pytest.raises(ValueError, match="PerceiverForMaskedLM.*PerceiverForOpticalFlow"):
        published_spec(tmp_path / "mlm")
