"""Modality adapters: raw window arrays + media-time coordinates -> tokens on the model's device.

An adapter is chosen by a JSON-friendly spec ``{"kind": ..., **options}``; ``build_adapter`` and
``adapter_spec`` turn specs into modules and complete specs (every default filled in), so a
model config saved as JSON rebuilds the same adapters.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from perceiver_stream.adapters.audio import LogMelAdapter, LogMelConfig
from perceiver_stream.adapters.base import Adapter, gather_last, time_channels, time_features
from perceiver_stream.adapters.points import PointsAdapter, PointsAdapterConfig, subsample
from perceiver_stream.adapters.video import (
    FlowInputAdapter,
    VideoAdapter,
    VideoAdapterConfig,
    flow_patches,
    normalise_frames,
    space_to_depth,
)

ADAPTERS: dict[str, tuple[type, type[Adapter]]] = {
    "video": (VideoAdapterConfig, VideoAdapter),
    "audio_mel": (LogMelConfig, LogMelAdapter),
    "points": (PointsAdapterConfig, PointsAdapter),
}


def adapter_config(spec: dict[str, Any]) -> Any:
    """The validated config dataclass for ``spec``; unknown kinds or options raise ValueError."""
    kind = spec.get("kind")
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter kind {kind!r}; known kinds: {sorted(ADAPTERS)}")
    cls = ADAPTERS[kind][0]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{kind} adapter has no option(s) {unknown}; options: {sorted(known - {'kind'})}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return cls(**values)


def adapter_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` validated and completed with every default (what a checkpoint stores)."""
    return asdict(adapter_config(spec))


def build_adapter(spec: dict[str, Any]) -> Adapter:
    """The adapter module for ``spec`` (see ``ADAPTERS`` for the kinds)."""
    config = adapter_config(spec)
    return ADAPTERS[config.kind][1](config)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "FlowInputAdapter",
    "LogMelAdapter",
    "LogMelConfig",
    "PointsAdapter",
    "PointsAdapterConfig",
    "VideoAdapter",
    "VideoAdapterConfig",
    "adapter_config",
    "adapter_spec",
    "build_adapter",
    "flow_patches",
    "gather_last",
    "normalise_frames",
    "space_to_depth",
    "subsample",
    "time_channels",
    "time_features",
]
