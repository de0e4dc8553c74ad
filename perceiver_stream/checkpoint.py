"""Checkpoints of a ``StreamingPerceiverIO``: a folder with ``model.safetensors`` + ``config.json``.

``config.json`` holds ``{"format", "model": StreamingConfig.to_dict(), "metadata": {...}}``; the
metadata is free-form JSON (training seeds, steps, losses...). The class names live in the model
config itself. Loading rebuilds the model from the config and refuses weights that do not fit it,
with a ValueError naming every missing, unexpected or mis-shaped tensor.

Files of the previous format (``perceiver-stream/streaming-v1``: flat model config keys) still load:
`read_config` moves each key to its nested place; an option since removed is accepted only at the
value whose behaviour the model now always has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from perceiver_stream.config import MOVED, REMOVED, StreamingConfig
from perceiver_stream.streaming import StreamingPerceiverIO

FORMAT = "perceiver-stream/streaming-v2"
V1 = "perceiver-stream/streaming-v1"

# Weight names of v1 files -> today's module paths (the first matching entry wins; a name matches
# an entry equal to it or starting with it and a dot).
V1_WEIGHTS: list[tuple[str, str]] = [
    ("latents", "encoder.latents"),
    ("encoder.gate", "modality_gate"),
    ("encoder", "encoder.cross_attends.0"),
    ("tower", "encoder.self_attends"),
    ("label_query", "labels.query"),
    ("label_decoder", "labels.attend"),
    ("label_head", "labels.head"),
    ("label_pools", "labels.pools"),
    ("pool_gates", "labels.pool_gates"),
    ("flow_decoder", "flow.attend.layer"),
    ("flow_head", "flow.attend.proj"),
    ("flow_patch_proj", "flow.patch_proj"),
    ("flow_pos_proj", "flow.pos_proj"),
    ("flow_query_conv", "flow.query_conv"),
]
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(
    path: str | os.PathLike, model: StreamingPerceiverIO, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights and config (plus JSON-serialisable ``metadata``) to folder ``path``.

    Each file is written under a temporary name and renamed, so a reader never sees half a file.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "model": model.config.to_dict(), "metadata": dict(metadata or {})}
    text = json.dumps(doc, indent=2, sort_keys=False)  # fails early on non-JSON metadata
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic_write(folder / CONFIG, lambda p: p.write_text(text))
    return folder


def read_config(path: str | os.PathLike) -> tuple[StreamingConfig, dict[str, Any]]:
    """The model config and metadata stored in checkpoint folder ``path``."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a perceiver-stream checkpoint: no {CONFIG}")
    doc = json.loads(file.read_text())
    if doc.get("format") not in (FORMAT, V1):
        raise ValueError(f"{file}: format {doc.get('format')!r} is not {FORMAT!r} (or {V1!r})")
    try:
        model = doc["model"] if doc["format"] == FORMAT else nested_from_v1(doc["model"])
        config = StreamingConfig.from_dict(model)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: invalid model config: {e}") from e
    return config, doc.get("metadata", {})


def nested_from_v1(flat: dict[str, Any]) -> dict[str, Any]:
    """A ``streaming-v1`` model config (flat keys) in the nested form ``StreamingConfig.from_dict`` reads.

    Raises ValueError where the file sets a removed option (or adapter kind) to anything but the
    behaviour the model now always has.
    """
    flat = dict(flat)
    for key, (fixed, now) in REMOVED.items():
        if key in flat and flat.pop(key) != fixed:
            raise ValueError(f"option {key!r} was removed: {now}, which a v1 config gets with {key}: "
                             f"{json.dumps(fixed)}; this model was made otherwise and cannot be loaded")
    modalities = {}
    for name, spec in dict(flat.pop("modalities", {})).items():
        spec = dict(spec)
        if spec.get("kind") in ("audio_samples", "labels"):
            raise ValueError(f"modalities.{name}: the {spec['kind']!r} adapter kind was removed")
        if spec.get("kind") == "video" and spec.pop("conv_tokens", True) and spec.get("conv", 0):
            raise ValueError(f"modalities.{name}: option 'conv_tokens' was removed: the conv stem's "
                             "channels feed the pooled label read alone (conv_tokens: false)")
        modalities[name] = spec
    nested: dict[str, Any] = {"modalities": modalities} if modalities else {}
    if "flow_modality" in flat and flat["flow_modality"] is None:
        nested["flow"] = None
        flat = {k: v for k, v in flat.items() if not k.startswith("flow_")}
    for key, value in flat.items():
        if key not in MOVED:
            nested[key] = value  # (from_dict names it as unknown)
            continue
        section, option = MOVED[key].split(".")
        nested.setdefault(section, {})[option] = value
    return nested


def weight_name_from_v1(name: str) -> str:
    """Today's name of a ``streaming-v1`` weight (see `V1_WEIGHTS`)."""
    for old, new in V1_WEIGHTS:
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def load_checkpoint(
    path: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> tuple[StreamingPerceiverIO, dict[str, Any]]:
    """The model saved in folder ``path`` (in eval mode, on ``device``) and its metadata.

    Raises ValueError when the weights do not match the config (names every difference).
    """
    config, metadata = read_config(path)
    model = StreamingPerceiverIO(config)
    expected = model.state_dict()
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS}")
    with safe_open(str(file), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        if (f.metadata() or {}).get("format") == V1:
            saved = {weight_name_from_v1(k): v for k, v in saved.items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [
        f"{k}: saved {tuple(saved[k].shape)}, config needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing weights {missing}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected}")
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes))
        raise ValueError(f"checkpoint {path}: weights do not match its config.json: " + ", ".join(parts))
    model.load_state_dict(saved)
    return model.to(device).eval(), metadata
