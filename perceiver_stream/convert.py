"""Load DeepMind's published Perceiver IO models from ``transformers`` modules or checkpoint folders.

``from_transformers(model)`` takes a live ``transformers`` model; ``load_pretrained(folder)`` reads
what ``save_pretrained`` wrote (``config.json`` plus ``model.safetensors``, sharded safetensors or
``pytorch_model.bin``) without importing ``transformers``. Both return our
:class:`~perceiver_stream.perceiver.PerceiverIO` with the same weights, in eval mode, whose forward on
the same inputs returns the tensors the ``transformers`` model returns as ``.logits``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from perceiver_stream.deepmind.models import PRESETS
from perceiver_stream.perceiver import PerceiverIO

# (pattern on the transformers key, our prefix, kind): kind "cross"/"self" maps the layer's inner
# names too; "plain" keeps the rest of the key as it is.
_PREFIXES: list[tuple[str, str, str]] = [
    (r"perceiver\.embeddings\.latents$", "encoder.latents", "plain"),
    (r"perceiver\.encoder\.cross_attention\.", "encoder.cross_attends.0.", "cross"),
    (r"perceiver\.encoder\.self_attends\.(\d+)\.", r"encoder.self_attends.\1.", "self"),
    (r"perceiver\.decoder\.decoder\.decoding_cross_attention\.", "decoder.attend.layer.", "cross"),
    (r"perceiver\.decoder\.decoder\.final_layer\.", "decoder.attend.proj.", "plain"),
    (
        r"perceiver\.decoder\.decoder\.output_position_encodings\.position_embeddings$",
        "decoder.queries.queries",
        "plain",
    ),
    (
        r"perceiver\.decoder\.modalities\.(\w+)\.decoder\.output_position_encodings\.position_embeddings$",
        r"decoder.queries.providers.\1.queries",
        "plain",
    ),
    (r"perceiver\.decoder\.padding\.(\w+)$", r"decoder.queries.padding.\1", "plain"),
    (r"perceiver\.input_preprocessor\.conv_after_patches\.", "preprocessor.patch_proj.", "plain"),
    (r"perceiver\.input_preprocessor\.convnet_1x1\.", "preprocessor.conv.", "plain"),
    (r"perceiver\.input_preprocessor\.convnet\.conv\.", "preprocessor.stem.0.", "plain"),
    (r"perceiver\.input_preprocessor\.convnet\.batchnorm\.", "preprocessor.stem.1.", "plain"),
    (r"perceiver\.input_preprocessor\.position_embeddings\.position_embeddings$", "preprocessor.positions", "plain"),
    (r"perceiver\.input_preprocessor\.positions_projection\.", "preprocessor.pos_proj.", "plain"),
    (r"perceiver\.input_preprocessor\.(padding|mask)\.(\w+)$", r"preprocessor.\1.\2", "plain"),
    (r"perceiver\.output_postprocessor\.modalities\.(\w+)\.classifier\.", r"postprocessor.heads.\1.proj.", "plain"),
]

_LAYER = {
    "attention.self.query.": "attn.q.",
    "attention.self.key.": "attn.k.",
    "attention.self.value.": "attn.v.",
    "attention.output.dense.": "attn.out.",
    "attention.self.layernorm2.": "kv_norm.",
    "layernorm.": "mlp_norm.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.dense2.": "mlp.fc2.",
}


def _our_key(key: str) -> str:
    for pattern, prefix, kind in _PREFIXES:
        m = re.match(pattern, key)
        if not m:
            continue
        head, rest = m.expand(prefix), key[m.end() :]
        if kind == "plain":
            return head + rest
        if rest.startswith("attention.self.layernorm1."):
            norm = "q_norm." if kind == "cross" else "norm."
            return head + norm + rest[len("attention.self.layernorm1.") :]
        for theirs, ours in _LAYER.items():
            if rest.startswith(theirs):
                return head + ours + rest[len(theirs) :]
        raise KeyError(f"unexpected parameter {key!r} in a Perceiver attention layer")
    raise KeyError(f"no mapping for parameter {key!r}: is this one of {sorted(PRESETS)}?")


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``transformers`` Perceiver state dict to our module names."""
    return {_our_key(k): v for k, v in state.items()}


def build_from_config(config: Mapping[str, Any]) -> PerceiverIO:
    """Our (randomly initialised) model for a ``PerceiverConfig`` dict naming a supported architecture."""
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in PRESETS), None)
    if arch is None:
        raise ValueError(f"config architectures {archs} name none of the supported models {sorted(PRESETS)}")
    return PRESETS[arch].from_dict(dict(config)).build()


def _load_into(model: PerceiverIO, state: Mapping[str, torch.Tensor]) -> PerceiverIO:
    missing, unexpected = model.load_state_dict(convert_state_dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def from_transformers(model: nn.Module) -> PerceiverIO:
    """Our module with the weights of a ``transformers`` Perceiver model (same device and dtype).

    Supported: ``PerceiverForOpticalFlow``, ``PerceiverForMultimodalAutoencoding`` and the three
    ImageNet classifiers (``PerceiverForImageClassificationFourier``, ``...Learned``, ``...ConvProcessing``).
    """
    arch = type(model).__name__
    if arch not in PRESETS:
        raise ValueError(f"{arch} is not supported; supported models are {sorted(PRESETS)}")
    config = {**model.config.to_dict(), "architectures": [arch]}
    ours = _load_into(build_from_config(config), {k: v.detach().cpu() for k, v in model.state_dict().items()})
    p = next(model.parameters())
    return ours.to(device=p.device, dtype=p.dtype)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
        "(expected a folder written by save_pretrained)"
    )


def load_pretrained(folder: str | Path) -> PerceiverIO:
    """Load a ``save_pretrained`` folder of a supported Perceiver model, without ``transformers``."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found (expected a folder written by save_pretrained)")
    config = json.loads(config_path.read_text())
    state = _read_weights(folder)
    return _load_into(build_from_config(config), state)
