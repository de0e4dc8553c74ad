"""Parity with transformers' Perceiver models (small random configs) and offline checkpoint loading."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from perceiver_stream.convert import from_transformers, load_pretrained
from perceiver_stream.deepmind import OpticalFlowConfig

tr = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(num_latents=16, d_latents=32, num_self_attends_per_block=2, num_self_attention_heads=4)


def _flow():
    cfg = tr.PerceiverConfig(**SMALL, num_blocks=2, num_cross_attention_heads=1, train_size=[12, 16])
    return tr.PerceiverForOpticalFlow(cfg), torch.randn(2, 2, 27, 12, 16), {}


def _classifier():
    cfg = tr.PerceiverConfig(
        **SMALL, num_blocks=2, num_cross_attention_heads=2, qk_channels=32, v_channels=32, num_labels=5,
        self_attention_widening_factor=2, cross_attention_widening_factor=2,
    )
    return tr.PerceiverForImageClassificationFourier(cfg), torch.randn(2, 3, 8, 10), {}


def _multimodal():
    cfg = tr.PerceiverConfig(
        **SMALL, num_cross_attention_heads=1, num_labels=7, num_frames=2, image_size=8, audio_samples_per_frame=32,
        samples_per_patch=4, output_shape=[1, 2, 8, 8], output_num_channels=24, _label_trainable_num_channels=20,
    )
    inputs = dict(image=torch.randn(2, 2, 3, 8, 8), audio=torch.randn(2, 64, 1), label=torch.randn(2, 7))
    points = {"image": torch.arange(10, 40), "audio": torch.tensor([0, 3, 5, 15]), "label": None}
    return tr.PerceiverForMultimodalAutoencoding(cfg), inputs, {"points": points}


def _classifier_learned():
    cfg = tr.PerceiverConfig(**SMALL, num_cross_attention_heads=1, num_labels=4, image_size=6)
    return tr.PerceiverForImageClassificationLearned(cfg), torch.randn(2, 3, 6, 6), {}


def _classifier_conv():
    cfg = tr.PerceiverConfig(**SMALL, num_cross_attention_heads=1, num_labels=3)
    model = tr.PerceiverForImageClassificationConvProcessing(cfg)
    bn = model.perceiver.input_preprocessor.convnet.batchnorm
    bn.running_mean.normal_()  # non-trivial batch-norm statistics
    bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 3, 30, 34), {}


MODELS = {
    "flow": _flow,
    "classifier": _classifier,
    "classifier_learned": _classifier_learned,
    "classifier_conv": _classifier_conv,
    "multimodal": _multimodal,
}


def _theirs(model, inputs, kw, mask=None):
    extra = {"subsampled_output_points": kw["points"]} if "points" in kw else {}
    with torch.no_grad():
        return model(inputs=inputs, attention_mask=mask, **extra).logits


def _assert_close(a, b):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _assert_close(a[k], b[k])
        return
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


@pytest.fixture(params=sorted(MODELS))
def pair(request):
    torch.manual_seed(0)
    model, inputs, kw = MODELS[request.param]()
    return model.eval(), inputs, kw


def test_same_outputs_as_transformers(pair):
    model, inputs, kw = pair
    ours = from_transformers(model)
    with torch.no_grad():
        out = ours(inputs, **kw)
        chunked = ours(inputs, query_chunk=5, **kw)
    _assert_close(_theirs(model, inputs, kw), out)
    _assert_close(out, chunked)


def test_partial_input_mask_matches_transformers():
    torch.manual_seed(1)
    model, inputs, _ = _flow()
    model.eval()
    mask = torch.ones(2, 12 * 16)
    mask[0, 100:] = 0
    with torch.no_grad():
        ours = from_transformers(model)(inputs, mask.bool())
    _assert_close(_theirs(model, inputs, {}, mask), ours)


@pytest.mark.parametrize("safe", [True, False])
def test_load_pretrained_folder_without_transformers(pair, tmp_path, safe, monkeypatch):
    model, inputs, kw = pair
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    if not safe:
        # The published DeepMind checkpoints on the hub are pytorch_model.bin files (older save_pretrained).
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    expected = _theirs(model, inputs, kw)
    # Loading must not need transformers: make importing it fail.
    monkeypatch.setitem(sys.modules, "transformers", None)
    ours = load_pretrained(tmp_path)
    with torch.no_grad():
        _assert_close(expected, ours(inputs, **kw))


def test_unsupported_inputs_give_actionable_errors(tmp_path):
    cfg = tr.PerceiverConfig(**SMALL)
    with pytest.raises(ValueError, match="not supported"):
        from_transformers(tr.PerceiverForMaskedLM(cfg))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["PerceiverForOpticalFlow"]}))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["PerceiverForMaskedLM"]}))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="supported"):
        load_pretrained(tmp_path)


def test_checkpoint_that_does_not_fit_is_rejected(tmp_path):
    torch.manual_seed(2)
    model, _, _ = _flow()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = model.state_dict()
    state.pop("perceiver.embeddings.latents")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(tmp_path)


def test_flow_preset_has_the_published_shape():
    ours = OpticalFlowConfig().build()
    cfg = tr.PerceiverConfig(
        num_latents=2048, d_latents=512, num_self_attends_per_block=24, num_self_attention_heads=16,
        num_cross_attention_heads=1, train_size=[368, 496],
    )
    theirs = tr.PerceiverForOpticalFlow(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert 41.0e6 < count(ours) < 41.1e6
