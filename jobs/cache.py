"""The decoded-window cache of the offline jobs: recorded streams decoded once, then read back.

Each stream's windows (after `jobs.datasets.compact`) are pickled to
``<output>/_cache/windows/<key>.pkl``, ``key`` a digest of the stream's files' contents (`file_digest`),
the window / video / audio settings and the frames kept, so a second epoch, a resumed run or
another config over the same files decodes nothing, and a changed file or setting never reads a
stale entry. Entries are written atomically (a partial file is renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import StreamConfig
from pipeline.sidecar import sidecar_path
from pipeline.window import Window

CACHE = Path("_cache") / "windows"
FORMAT = 1  # bump when what a cached entry holds changes


def stream_files(spec: StreamConfig) -> list[Path]:
    """The local files a recorded stream reads: its video, separate audio, point scans (a file or
    every file of a folder) and the video's flow sidecar. URLs are not files and are left out."""
    paths = [spec.video, None if spec.audio == "same" else spec.audio, spec.points]
    files: list[Path] = []
    for p in paths:
        if p is None or "://" in p:
            continue
        path = Path(p)
        files.extend(sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path])
    side = sidecar_path(spec.video) if spec.video is not None else None
    return files + ([side] if side is not None else [])


def file_digest(path: Path) -> str:
    """SHA-256 of a file's contents (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stream_digests(spec: StreamConfig) -> dict[str, str]:
    """``{file path: content digest}`` of a stream's files (`stream_files`)."""
    return {str(f): file_digest(f) for f in stream_files(spec)}


def cache_key(spec: StreamConfig, digests: dict[str, str], settings: dict[str, Any], video_frames: int | None) -> str:
    """The entry name of a stream: its files' contents (not their paths or stream id), which
    modalities it reads from them, and the data settings."""
    roles = {"video": spec.video is not None, "audio": spec.audio == "same" or spec.audio is not None and "file",
             "points": spec.points is not None}
    blob = json.dumps({"files": sorted(digests.values()), "roles": roles, "settings": settings,
                       "frames": video_frames, "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached(folder: Path, key: str, decode: Callable[[], list[Window]]) -> tuple[list[Window], bool]:
    """The windows of entry ``key`` under ``folder``, decoded (``decode()``) and stored if absent;
    also whether they came from the cache."""
    path = folder / f"{key}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f), True
    windows = decode()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        pickle.dump(windows, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return windows, False
