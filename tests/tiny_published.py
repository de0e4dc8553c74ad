"""Tiny random-weight `transformers` Perceivers saved with ``save_pretrained``, for the published-model
tests, and what `transformers` itself computes on a window's decoded frames (the reference).

Output layers are scaled up so flow is several pixels and logits a few units: a tolerance of 1e-4
then tells a wrong frame, sample or normalisation from float noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver_stream.deepmind.published import IMAGENET_MEAN, IMAGENET_STD
from perceiver_stream.flow import estimate_flow
from pipeline.window import Window

tr = pytest.importorskip("transformers")

SMALL = dict(num_latents=8, d_latents=32, num_self_attends_per_block=1, num_self_attention_heads=4)
FLOW_TILE = (12, 16)
MM = dict(num_frames=2, image_size=8, audio_samples_per_frame=160)  # audio.rate 1600 at video.fps 10
CLASSIFIERS = {
    "learned": tr.PerceiverForImageClassificationLearned,
    "fourier": tr.PerceiverForImageClassificationFourier,
    "conv": tr.PerceiverForImageClassificationConvProcessing,
}


def save_flow(folder: Path):
    """A flow model with 12 x 16 tiles, saved to ``folder``; returns it (eval mode)."""
    torch.manual_seed(0)
    cfg = tr.PerceiverConfig(**SMALL, num_cross_attention_heads=1, train_size=list(FLOW_TILE))
    model = tr.PerceiverForOpticalFlow(cfg).eval()
    with torch.no_grad():
        model.perceiver.decoder.decoder.final_layer.weight.mul_(300.0)
    model.save_pretrained(folder)
    return model


def save_multimodal(folder: Path):
    """A Kinetics-style autoencoder over 2 frames of 8 x 8 and 320 audio samples, 7 labels."""
    torch.manual_seed(1)
    cfg = tr.PerceiverConfig(
        **SMALL, num_cross_attention_heads=1, num_labels=7, **MM, samples_per_patch=16,
        output_shape=[1, 2, 8, 8], output_num_channels=24, _label_trainable_num_channels=20,
    )
    model = tr.PerceiverForMultimodalAutoencoding(cfg).eval()
    with torch.no_grad():
        model.perceiver.output_postprocessor.modalities["label"].classifier.weight.mul_(300.0)
    model.save_pretrained(folder)
    return model


def save_classifier(folder: Path, kind: str):
    """An ImageNet-style classifier (``kind`` a key of `CLASSIFIERS`) of 8 x 8 images, 4 labels."""
    torch.manual_seed(2)
    cfg = tr.PerceiverConfig(**SMALL, num_cross_attention_heads=1, num_labels=4, image_size=8,
                             id2label={i: f"class{i}" for i in range(4)})
    model = CLASSIFIERS[kind](cfg).eval()
    with torch.no_grad():
        model.perceiver.decoder.decoder.final_layer.weight.mul_(300.0)
    model.save_pretrained(folder)
    return model


def reference_flow(model, w: Window, min_overlap: int) -> torch.Tensor:
    """``transformers``' flow of the window's last two frames, tiled as DeepMind's colab does."""
    with torch.no_grad():
        return estimate_flow(lambda x, query_chunk=None: model(inputs=x).logits, w.video[-2].copy(),
                             w.video[-1].copy(), tile_size=FLOW_TILE, min_overlap=min_overlap)


def reference_multimodal(model, w: Window) -> torch.Tensor:
    """``transformers``' label logits for the window's last frames and the audio from the first of them."""
    f, n = MM["num_frames"], MM["num_frames"] * MM["audio_samples_per_frame"]
    image = torch.from_numpy(w.video[-f:].copy()).permute(0, 3, 1, 2).float()[None] / 255.0
    start = min(int(round((w.video_t[-f] - w.audio_t0) * w.audio_rate)), len(w.audio) - n)
    audio = torch.from_numpy(np.ascontiguousarray(w.audio[start : start + n, :1]))[None]
    # transformers cannot decode every query of this tiny config; a few image and audio ones do not
    # change the label's (each query attends to the latents alone).
    points = {"image": torch.arange(3), "audio": torch.arange(2), "label": None}
    with torch.no_grad():
        out = model(inputs={"image": image, "audio": audio, "label": torch.zeros(1, 7)},
                    subsampled_output_points=points)
    return out.logits["label"][0]


def reference_logits(model, w: Window) -> torch.Tensor:
    """``transformers``' logits for the window's last frame, normalised as its image processor does."""
    x = torch.from_numpy(w.video[-1].copy()).permute(2, 0, 1).float()[None] / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        return model(inputs=x).logits[0]
