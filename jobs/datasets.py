"""Window lists for the offline jobs: synthetic rig streams under a checkpoint's data settings.

*Data settings* are what shapes the windows a model sees (``{"window", "video", "audio"}``, as in
the pipeline config); training stores them in its checkpoints so that evaluation renders the same.
Windows keep only the trailing frames the model reads (`compact`), copied out of the windower's
slabs, so long window lists stay small in memory.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from typing import Any

from perceiver_stream.config import StreamingConfig
from pipeline.config import Config, StreamConfig, SyntheticConfig
from pipeline.read import open_stream
from pipeline.window import Window


def data_settings(cfg: Config) -> dict[str, Any]:
    """The window / video / audio settings of ``cfg`` (video size defaults to 64 x 64)."""
    return {
        "window": cfg.window.model_dump(mode="json"),
        "video": {"size": list(cfg.video.size or (64, 64)), "fps": cfg.video.fps},
        "audio": cfg.audio.model_dump(mode="json"),
    }


def default_data_settings(config: StreamingConfig) -> dict[str, Any]:
    """Data settings for a checkpoint that stores none: the pipeline defaults, frames at the flow
    grid's size, audio at the mel adapter's rate."""
    audio = next((s for s in config.modalities.values() if s["kind"].startswith("audio")), {})
    return {
        "window": {"seconds": 1.0, "hop": 0.5},
        "video": {"size": list(config.flow.size), "fps": None},
        "audio": {"rate": int(audio.get("sample_rate", 16000)), "channels": int(audio.get("channels", 1))},
    }


def settings_config(data: dict[str, Any], streams: list[dict[str, Any]]) -> Config:
    """A `Config` with ``data``'s window / video / audio settings and ``streams``."""
    return Config.model_validate({"streams": streams, **data})


def compact(window: Window, video_frames: int | None) -> Window:
    """``window`` keeping only its last ``video_frames`` frames (None: all), copied out of the
    windower's slabs."""
    if window.video is None or video_frames is None:
        return window
    return replace(window, video=window.video[-video_frames:].copy(), video_t=window.video_t[-video_frames:].copy())


def synthetic_stream(
    cfg: Config, seed: int, seconds: float, *, video_frames: int | None, stream_id: str | None = None
) -> list[Window]:
    """Every window of the synthetic rig ``seed`` (``seconds`` long) under ``cfg``'s settings."""
    spec = StreamConfig(id=stream_id or f"seed{seed}", synthetic=SyntheticConfig(seed=seed, seconds=seconds))
    return [compact(w, video_frames) for w in open_stream(spec, cfg)]


def heldout_windows(data: dict[str, Any], seed: int, n: int, *, video_frames: int | None) -> list[Window]:
    """The first ``n`` windows of synthetic rig ``seed`` under the ``data`` settings (the last two
    renderings are cached: evaluating several modality drops renders the stream once)."""
    return list(_rendered(json.dumps(data, sort_keys=True), seed, n, video_frames))


@functools.lru_cache(maxsize=2)
def _rendered(data_json: str, seed: int, n: int, video_frames: int | None) -> tuple[Window, ...]:
    data = json.loads(data_json)
    win = data["window"]
    seconds = (n - 1) * win["hop"] + win["seconds"] + 0.5 * win["hop"]
    cfg = settings_config(data, [{"id": f"eval{seed}", "synthetic": {"seed": seed, "seconds": seconds}}])
    windows = synthetic_stream(cfg, seed, seconds, video_frames=video_frames, stream_id=f"eval{seed}")
    return tuple(windows[:n])
