"""Whether a config's windows can feed the published model its ``model.checkpoint`` names.

`published_model(cfg)` is the `PublishedSpec` of a ``transformers`` ``save_pretrained`` folder in
``model.checkpoint`` (None for a perceiver-stream checkpoint, or when ``model.student`` runs
instead); `check_published(cfg)` refuses, before anything starts, a config whose window, video or
audio settings cannot give that model what it reads, with one line naming every key at fault.
"""

from __future__ import annotations

import math

from perceiver_stream.deepmind.published import PublishedSpec, published_spec
from pipeline.config import Config
from pipeline.errors import ConfigError


def published_model(cfg: Config) -> PublishedSpec | None:
    """The published model the run would run, or None (see the module docstring)."""
    if cfg.model.student is not None or cfg.model.checkpoint is None:
        return None
    try:
        return published_spec(cfg.model.checkpoint)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.checkpoint: {exc}") from None


def _frames_per_window(cfg: Config) -> int | None:
    """Frames every window holds at least, when ``video.fps`` fixes the rate (None: the sources' own)."""
    if cfg.video.fps is None:
        return None
    return math.floor(cfg.window.seconds * cfg.video.fps + 1e-9)


def _problems(cfg: Config, spec: PublishedSpec) -> list[str]:
    problems = []
    for i, s in enumerate(cfg.streams):
        if s.synthetic is None and s.video is None:
            problems.append(f"streams.{i}.video is not set (stream {s.id!r}); the model reads frames")
        if spec.task == "multimodal" and s.synthetic is None and s.audio is None:
            problems.append(f"streams.{i}.audio is not set (stream {s.id!r}); the model reads audio")
    if spec.frame_size is not None and tuple(cfg.video.size or ()) != spec.frame_size:
        given = "null (the sources' own size)" if cfg.video.size is None else list(cfg.video.size)
        problems.append(f"video.size is {given}; the model needs {list(spec.frame_size)}")
    frames = _frames_per_window(cfg)
    if frames is not None and frames < spec.video_frames:
        problems.append(f"window.seconds {cfg.window.seconds} at video.fps {cfg.video.fps} gives {frames} frame(s) "
                        f"per window; the model needs {spec.video_frames}")
    if spec.task == "multimodal":
        spf = spec.audio_samples_per_frame
        if cfg.video.fps is None:
            problems.append(f"video.fps is null; the model needs a fixed frame rate, its audio being {spf} samples "
                            "per frame (the published model: video.fps 25, audio.rate 48000)")
        elif cfg.audio.rate != spf * cfg.video.fps:
            problems.append(f"audio.rate is {cfg.audio.rate}; the model needs {spf * cfg.video.fps:g} "
                            f"({spf} samples per frame at video.fps {cfg.video.fps:g})")
        if cfg.audio.channels != 1:
            problems.append(f"audio.channels is {cfg.audio.channels}; the model reads mono (1)")
    if cfg.distill.enabled:
        problems.append("distill.enabled is true; a student is distilled from a perceiver-stream checkpoint only")
    return problems


def check_published(cfg: Config) -> None:
    """Raise `ConfigError` if ``model.checkpoint`` is a published model this config cannot feed."""
    spec = published_model(cfg)
    if spec is None:
        return
    problems = _problems(cfg, spec)
    if problems:
        raise ConfigError(f"model.checkpoint {cfg.model.checkpoint} is a published {spec.architecture}, which this "
                          f"config cannot feed: {'; '.join(problems)}")
