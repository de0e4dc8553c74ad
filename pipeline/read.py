"""From a stream's configuration to its windows: the one place sources meet the windower.

`open_stream` serves the Ray source actors (a validated `StreamConfig` plus the whole `Config`);
`read_windows` is the plain-Python API for users without Ray::

    from pipeline import read_windows
    for w in read_windows({"id": "cam0", "video": "clip.mp4", "audio": "same"}, seconds=1.0, hop=0.5):
        ...

Paths in a config are relative to the config file (resolved when it is loaded); paths given to
`read_windows` are used as given (relative to the working directory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from threading import Event
from typing import Any

import numpy as np

from pipeline.config import Config, StreamConfig, parse_config
from pipeline.errors import PipelineError
from pipeline.sidecar import FlowSidecar, sidecar_path
from pipeline.sources.audio import AudioDecoder
from pipeline.sources.live import MediaReader
from pipeline.sources.points import read_point_scans
from pipeline.sources.synthetic import SyntheticRig
from pipeline.sources.video import VideoDecoder, decimate
from pipeline.window import Window
from pipeline.windowing import EPS, windows

OnError = Callable[[PipelineError], None]


def open_stream(
    stream_cfg: StreamConfig,
    cfg: Config,
    *,
    on_error: OnError | None = None,
    start_window: int = 0,
    video_frames: int | None = None,
    points: tuple[int | None, int] | None = None,
    truth: bool = True,
    stop: Event | None = None,
) -> Iterator[Window]:
    """Windows of one configured stream, from window ``start_window`` on (see `windows`).

    Video and ``audio: same`` share one demuxer (and, for a URL, one connection); a separate
    audio file/URL and the point-cloud source are read alongside and aligned in media time.
    ``video_frames``: keep only each window's last that many frames (None: all), for a model
    that reads no more; the synthetic rig then renders only the frames some window keeps.
    ``points``: ``(scans, max_points)`` keeps only the points a model's points adapter reads (see
    `read_points`), for a model that reads no more.
    ``truth=False`` leaves the synthetic rig's `Truth` out (it serves training and evaluation;
    running the model does not read it), and a clip's ``<clip>.flow.npz`` flow (`pipeline.sidecar`). ``stop``: once set, a live source waiting to reconnect
    ends the stream (the run drains).
    """
    sid = stream_cfg.id
    truth_of = None
    readers: list[MediaReader] = []
    if stream_cfg.synthetic is not None:
        syn = stream_cfg.synthetic
        rig = SyntheticRig(
            syn.seed,
            syn.seconds,
            size=tuple(cfg.video.size) if cfg.video.size else (64, 64),
            fps=syn.fps,
            audio_rate=cfg.audio.rate,
            audio_channels=cfg.audio.channels,
            scan_rate=syn.scan_rate,
            segment_seconds=syn.segment_seconds,
            objects=syn.objects,
        )
        sources = rig.sources()
        if cfg.video.fps is not None:
            sources["video"] = decimate(sources["video"], cfg.video.fps)
        elif video_frames is not None:
            keep = _kept_frames(rig.frame_times(), cfg.window.seconds, cfg.window.hop, video_frames)
            sources["video"] = rig.video(render=keep)
        truth_of = rig.truth if truth else None
    else:
        sources = {}
        decoders: list[Any] = []
        # format/options name the stream's own media source: its video, else its audio.
        media = {"on_error": on_error, "settings": cfg.sources, "live": stream_cfg.live, "max_lag_s": cfg.runtime.max_lag_s,
             "stop": stop}
        device = {"format": stream_cfg.format, "options": stream_cfg.options}
        if stream_cfg.video is not None:
            decoders.append(VideoDecoder(size=cfg.video.size, fps=cfg.video.fps))
            if stream_cfg.audio == "same":
                decoders.append(AudioDecoder(rate=cfg.audio.rate, channels=cfg.audio.channels))
            readers.append(MediaReader(stream_cfg.video, decoders, stream_id=sid, **media, **device))
            sources.update(readers[-1].tracks())
        if stream_cfg.audio is not None and stream_cfg.audio != "same":
            decoder = AudioDecoder(rate=cfg.audio.rate, channels=cfg.audio.channels)
            own = device if stream_cfg.video is None else {}
            readers.append(MediaReader(stream_cfg.audio, [decoder], stream_id=sid, **media, **own))
            sources["audio"] = readers[-1].tracks()["audio"]
        if stream_cfg.points is not None:
            sources["points"] = read_point_scans(stream_cfg.points, stream_id=sid, on_error=on_error)
    out = windows(
        sid,
        sources,
        seconds=cfg.window.seconds,
        hop=cfg.window.hop,
        truth=truth_of,
        start_window=start_window,
        on_error=on_error,
    )
    side = sidecar_path(stream_cfg.video) if truth and stream_cfg.video is not None else None
    if side is not None:
        flow = FlowSidecar(side, sid)
        out = (_with_truth(w, flow) for w in out)
    if readers:
        out = _delivered(out, readers)
    if video_frames is not None:
        out = (_last_frames(w, video_frames) for w in out)
    if points is not None:
        out = (read_points(w, *points) for w in out)
    return out


def _with_truth(w: Window, flow: FlowSidecar) -> Window:
    w.truth = flow.truth(w)
    return w


def _delivered(windows_: Iterator[Window], readers: list[MediaReader]) -> Iterator[Window]:
    """``windows_``, telling each reader when a window was delivered (its reconnect count restarts)."""
    for w in windows_:
        for r in readers:
            r.window_done()
        yield w


def _kept_frames(times: np.ndarray, seconds: float, hop: float, k: int) -> np.ndarray:
    """Mask of the frames among the last ``k`` of some window, for frames at ``times`` from
    media time 0 (the rig's modalities all start there, so window ``j`` starts at ``j * hop``).

    Membership follows `pipeline.windowing` exactly: ``start - EPS <= t < end - EPS``.
    """
    keep = np.zeros(len(times), dtype=bool)
    if not len(times):
        return keep
    n_windows = math.floor((float(times[-1]) + EPS) / hop) + 1
    for j in range(n_windows):
        ts = 0.0 + j * hop
        hi = int(np.searchsorted(times, ts + seconds - EPS, side="left"))  # first frame at or after the end
        lo = int(np.searchsorted(times, ts - EPS, side="left"))
        keep[max(lo, hi - k) : hi] = True
    return keep


def _last_frames(w: Window, k: int) -> Window:
    """``w`` with only its last ``k`` frames, copied (so the windower's frame storage is not pinned)."""
    if w.video is None or len(w.video) <= k:
        return w
    w.video = w.video[-k:].copy()
    w.video_t = w.video_t[-k:].copy()
    return w


def read_points(w: Window, scans: int | None, limit: int) -> Window:
    """``w`` with only the points a points adapter with these ``scans`` / ``max_points`` reads:
    those of its last ``scans`` non-empty scans (None = all), then at most ``limit`` of them evenly
    strided (``floor(j * count / limit)``, the adapter's own rule), so the model's output is the same."""
    if w.points is None:
        return w
    nonempty = [i for i, p in enumerate(w.points) if len(p)]
    if scans is not None:
        nonempty = nonempty[-scans:]
    pts = [w.points[i] for i in nonempty]
    counts = np.array([len(p) for p in pts], dtype=np.int64)
    total = int(counts.sum())
    if total > limit:
        idx = np.minimum(np.floor(np.arange(limit) * (total / limit)).astype(np.int64), total - 1)
        cat = np.concatenate(pts)[idx]
        owner = np.repeat(np.arange(len(pts)), counts)[idx]
        pts = [cat[owner == i] for i in range(len(pts))]
    kept = [i for i, p in zip(nonempty, pts) if len(p)]
    w.points = [p for p in pts if len(p)]
    w.points_t = np.asarray(w.points_t)[kept]
    return w


def read_windows(
    spec: dict[str, Any],
    seconds: float = 1.0,
    hop: float = 0.5,
    *,
    video: dict[str, Any] | None = None,
    audio: dict[str, Any] | None = None,
    sources: dict[str, Any] | None = None,
    max_lag_s: float | None = None,
    on_error: OnError | None = None,
) -> Iterator[Window]:
    """`pipeline.Window`s of one stream, without Ray.

    spec: a stream entry as in the config's ``streams`` list, e.g.
        ``{"id": "cam0", "video": "clip.mp4", "audio": "same", "points": "scans/"}`` or
        ``{"id": "sim0", "synthetic": {"seed": 7, "seconds": 30}}``.
    video / audio / sources: the config sections of those names (``{"size": [64, 64]}``, ...);
        what is left out takes the config's defaults.
    max_lag_s: ``runtime.max_lag_s``: a live source further behind than that skips to its live edge.
    on_error: called with each problem that does not end the stream (a reconnect, a skipped
        packet, dropped points); problems that end it are raised after the windows before them.
    Settings are validated like a config file: a bad one raises `pipeline.errors.ConfigError`.
    """
    data = {
        "streams": [dict(spec)],
        "window": {"seconds": seconds, "hop": hop},
        "video": _section(video),
        "audio": _section(audio),
        "sources": _section(sources),
        "runtime": {"max_lag_s": max_lag_s},
    }
    cfg = parse_config(data, base_dir=Path.cwd(), source="read_windows")
    return open_stream(cfg.streams[0], cfg, on_error=on_error)


def _section(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return dict(value)


__all__ = ["open_stream", "read_windows"]
