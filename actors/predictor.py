"""The model the ModelActor runs: a `StreamingPerceiverIO` loaded from the config's checkpoint,
read once by the driver and shipped to the replicas through Ray's object store (`ShippedModel`),
so a replica on another node needs no copy of the checkpoint's folder; or a published Perceiver IO
(a ``transformers`` ``save_pretrained`` folder, `perceiver_stream.deepmind.published`), which each
replica reads from its path."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perceiver_stream.batch import Batch
from perceiver_stream.checkpoint import load_checkpoint, read_config
from perceiver_stream.deepmind.published import PublishedPerceiver, PublishedSpec
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingConfig, StreamingPerceiverIO
from pipeline.config import Config
from pipeline.errors import CheckpointError
from pipeline.published import check_published, published_model
from pipeline.sources.synthetic import CLASSES

log = logging.getLogger(__name__)


class TorchPredictor:
    """A streaming model in eval mode on one device, with the name written to the outputs."""

    stateful = True

    def __init__(self, model: StreamingPerceiverIO, name: str, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.name = name
        self.device = device
        self.class_names = list(model.config.labels.class_names)
        self.video_frames = model.config.video_frames

    def __call__(self, batch: Batch, state: torch.Tensor | None) -> ModelOutput:
        return self.model(batch, state)


@dataclass
class ShippedModel:
    """A checkpoint as read by the driver: its model config (`StreamingConfig.to_dict`), its weights
    (CPU tensors by name) and the name written to the outputs."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)  # the checkpoint's (training seeds, data settings, ...)


def ship_model(cfg: Config) -> ShippedModel | None:
    """The checkpoint the run's replicas load (``model.student``, else ``model.checkpoint``), read
    here; None without either (each replica builds the same untrained model)."""
    path = cfg.model.student or cfg.model.checkpoint
    if path is None or published_model(cfg) is not None:
        return None
    try:
        model, meta = load_checkpoint(path, device="cpu")
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(exc), source=path) from None
    return ShippedModel(model.config.to_dict(), model.state_dict(), Path(path).name, meta)


def model_config(cfg: Config) -> StreamingConfig | PublishedSpec:
    """The configured model's config (``model.student``, else ``model.checkpoint``), read without
    its weights; an untrained model's without either; a published model's `PublishedSpec`. Either
    says what the model reads of a window (``video_frames``, ``points``)."""
    published = published_model(cfg)
    if published is not None:
        return published
    path = cfg.model.student or cfg.model.checkpoint
    if path is None:
        return StreamingConfig.from_dict({"state": {"carry": cfg.model.state}})
    try:
        config, _ = read_config(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(exc), source=path) from None
    return config


def load_predictor(cfg: Config, device: torch.device,
                   shipped: ShippedModel | None = None) -> TorchPredictor | PublishedPerceiver:
    """A published model's ``save_pretrained`` folder (refused with `ConfigError` when the config
    cannot feed it; its flow tiles go ``model.batch_size`` to a forward), else the ``shipped``
    model if given, else the student checkpoint if ``model.student`` is set, else ``model.checkpoint``.

    Without either, an untrained model with the synthetic rig's classes runs (for wiring checks;
    its outputs mean nothing) and a warning says so.
    """
    if published_model(cfg) is not None:
        check_published(cfg)
        try:
            return PublishedPerceiver(cfg.model.checkpoint, device, max_tiles=cfg.model.batch_size)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # unreadable, or weights of another model
            raise CheckpointError(str(exc), source=cfg.model.checkpoint) from None
    if shipped is not None:
        model = StreamingPerceiverIO(StreamingConfig.from_dict(shipped.config))
        model.load_state_dict(shipped.weights)
        return TorchPredictor(model, shipped.name, device)
    path = cfg.model.student or cfg.model.checkpoint
    if path is None:
        log.warning("model.checkpoint is not set: running an untrained model, its outputs mean nothing")
        torch.manual_seed(0)
        model = StreamingPerceiverIO(StreamingConfig.from_dict(
            {"labels": {"class_names": CLASSES}, "state": {"carry": cfg.model.state}}))
        return TorchPredictor(model, "untrained", device)
    try:
        model, _ = load_checkpoint(path, device=device)
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(exc), source=path) from None
    return TorchPredictor(model, Path(path).name, device)
