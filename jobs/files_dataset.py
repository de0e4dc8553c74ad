"""Window lists from recorded files (``train.data`` / ``eval.data``): decoded through the
pipeline's `open_stream`, cached on disk (`jobs.cache`), labelled from a label table (`jobs.labels`).

`file_streams(data, settings, ...)` returns one window list per stream of ``data``, each window's
`Truth` holding its label index into the class names (-1: no label, so no label loss and not
counted in accuracy) and the flow of the clip's sidecar where there is one (`pipeline.sidecar`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jobs.cache import CACHE, cache_key, cached, stream_digests
from jobs.datasets import compact, settings_config
from jobs.labels import LabelTable, read_labels
from pipeline.config import DataConfig
from pipeline.errors import ConfigError
from pipeline.read import open_stream
from pipeline.window import Truth, Window


@dataclass
class FileData:
    """The windows of recorded streams: ``streams[i]`` are stream ``ids[i]``'s; ``digests`` maps each
    file read to its content digest (what a checkpoint records to refuse them in evaluation)."""

    ids: list[str]
    streams: list[list[Window]]
    digests: dict[str, str]
    class_names: tuple[str, ...]
    decoded: int  # streams decoded now (the rest came from the cache)


def class_names(data: DataConfig) -> tuple[str, ...]:
    """The label table's class names (sorted distinct labels); none without a table."""
    return read_labels(data.labels, [s.id for s in data.streams]).class_names if data.labels else ()


def file_streams(
    data: DataConfig, settings: dict[str, Any], output_dir: str | Path, *, video_frames: int | None,
    classes: tuple[str, ...] | None = None, progress: bool = True,
) -> FileData:
    """Every window of each stream of ``data`` under the ``settings`` (window / video / audio),
    labelled by ``data.labels`` with indices into ``classes`` (default: the table's class names; a
    label not among ``classes`` is an error). Decoded windows are cached under ``output_dir``."""
    ids = [s.id for s in data.streams]
    table = read_labels(data.labels, ids) if data.labels else LabelTable([])
    names = table.class_names if classes is None else tuple(classes)
    unknown = sorted(set(table.class_names) - set(names))
    if unknown:
        raise ConfigError(f"labels {unknown} of {data.labels} are not among the model's classes {list(names)}")
    cfg = settings_config(settings, [s.model_dump() for s in data.streams])
    folder = Path(output_dir) / CACHE
    streams, digests, decoded = [], {}, 0
    bar = tqdm(cfg.streams, desc="decoding recorded streams (cached)", unit="stream", disable=not progress)
    for spec in bar:
        files = stream_digests(spec)
        digests.update(files)
        key = cache_key(spec, files, settings, video_frames)
        windows, hit = cached(folder, key, lambda: [compact(w, video_frames) for w in open_stream(spec, cfg)])
        decoded += not hit
        streams.append([_labelled(w, spec.id, table, names) for w in windows])
    return FileData(ids, streams, digests, names, decoded)


def _labelled(w: Window, stream_id: str, table: LabelTable, names: tuple[str, ...]) -> Window:
    label = table.of(stream_id, w.t_start, w.t_end)
    flow = w.truth.flow if w.truth is not None else None
    truth = Truth(flow=flow, label=names.index(label) if label is not None else -1, label_name=label or "")
    return replace(w, stream_id=stream_id, truth=truth)
