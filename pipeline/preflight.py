"""Checks of a run's config that need no Ray: the paths it names exist.

`check_paths` runs before Ray starts and before anything is written, so a missing checkpoint or
video file costs one line (exit 2), not a cluster start and an empty output folder.
URLs are not checked (a camera may come up later), nor are the sources of a stream pinned to
another node (``streams[].node``): they are that node's paths, checked there when it opens them.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.errors import ConfigError

CHECKPOINT_FILE = "config.json"  # every checkpoint folder has one (ours and transformers' saves)


def check_paths(cfg: Config) -> None:
    """`ConfigError` naming the first key whose file, folder or checkpoint is missing."""
    for key in ("checkpoint", "student"):
        path = getattr(cfg.model, key)
        if path is None or "://" in path:
            continue
        if not Path(path).exists():
            raise ConfigError(f"model.{key}: {path} does not exist")
        if not (Path(path) / CHECKPOINT_FILE).is_file():
            raise ConfigError(f"model.{key}: {path} is not a checkpoint folder (no {CHECKPOINT_FILE})")
    for i, stream in enumerate(cfg.streams):
        if stream.node is not None:
            continue
        for key in ("video", "audio", "points"):
            path = getattr(stream, key)
            if path is not None and path != "same" and "://" not in path and not Path(path).exists():
                raise ConfigError(f"streams.{i}.{key} (stream {stream.id!r}): {path} does not exist")
