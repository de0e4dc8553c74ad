"""Look at a run's outputs: a summary per stream, and pictures under ``<output>/_inspect/``.

Reads only the committed Parquet (any Arrow reader would see the same rows) and writes:

* ``flow_<stream>.png``: a few windows' flow fields as colour-wheel images, each beside the
  frame it was computed on when the ``flow`` table carries it (column ``frame``), with the
  colour wheel's key;
* ``labels_<stream>.png``: the top label of every window along media time, with its score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from PIL import Image

from jobs.flowviz import flow_to_rgb
from pipeline.errors import PipelineError
from pipeline.reader import open_dataset


@dataclass
class StreamSummary:
    """What one stream has in the output folder."""

    stream_id: str
    windows: int
    first_window: int | None
    last_window: int | None
    missing_ids: int
    with_video: int
    with_audio: int
    with_points: int
    state_resets: int
    flow_rows: int
    errors: dict[str, int] = field(default_factory=dict)
    top_labels: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """One human-readable line."""
        span = "-" if self.first_window is None else f"{self.first_window}..{self.last_window}"
        labels = ", ".join(f"{k} {v}" for k, v in list(self.top_labels.items())[:3]) or "-"
        errs = ", ".join(f"{k} {v}" for k, v in self.errors.items()) or "none"
        return (
            f"{self.stream_id}: {self.windows} windows (ids {span}, {self.missing_ids} missing), "
            f"video {self.with_video} / audio {self.with_audio} / points {self.with_points}, "
            f"{self.state_resets} state resets, {self.flow_rows} flow rows; top labels: {labels}; errors: {errs}"
        )


def _table(root: Path, name: str) -> pa.Table | None:
    """Every committed row of table ``name``, published or not (`pipeline.reader`); None if none."""
    table = open_dataset(root, name).to_table()
    return table if table.num_rows else None


def _rows_by_stream(table: pa.Table | None, columns: list[str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    if table is None:
        return groups
    for row in table.select(["stream_id", *columns]).to_pylist():
        groups.setdefault(row["stream_id"], []).append(row)
    return groups


def summarize(output_dir: str | Path) -> list[StreamSummary]:
    """Summarise every stream found in ``output_dir`` (raises PipelineError if it holds no outputs)."""
    root = Path(output_dir)
    windows = _table(root, "windows")
    if windows is None:
        raise PipelineError(f"no 'windows' table under {root} (is this a perceiver-stream output folder?)")
    wins = _rows_by_stream(windows, ["window_id", "has_video", "has_audio", "has_points", "state_reset", "labels"])
    flows = _rows_by_stream(_table(root, "flow"), ["window_id"])
    errs = _rows_by_stream(_table(root, "errors"), ["kind"])
    out = []
    for sid in sorted(set(wins) | set(errs)):
        rows = wins.get(sid, [])
        ids = sorted(r["window_id"] for r in rows)
        top: dict[str, int] = {}
        for r in rows:
            if r["labels"]:
                top[r["labels"][0]["label"]] = top.get(r["labels"][0]["label"], 0) + 1
        kinds: dict[str, int] = {}
        for r in errs.get(sid, []):
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        out.append(
            StreamSummary(
                stream_id=sid,
                windows=len(rows),
                first_window=ids[0] if ids else None,
                last_window=ids[-1] if ids else None,
                missing_ids=(ids[-1] - ids[0] + 1 - len(ids)) if ids else 0,
                with_video=sum(r["has_video"] for r in rows),
                with_audio=sum(r["has_audio"] for r in rows),
                with_points=sum(r["has_points"] for r in rows),
                state_resets=sum(r["state_reset"] for r in rows),
                flow_rows=len(flows.get(sid, [])),
                errors=kinds,
                top_labels=dict(sorted(top.items(), key=lambda kv: -kv[1])),
            )
        )
    return out


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(data)).convert("RGB"))


def write_pictures(output_dir: str | Path, *, flows_per_stream: int = 6) -> list[Path]:
    """Write the flow and label pictures under ``<output_dir>/_inspect/``; returns their paths."""
    root = Path(output_dir)
    windows = _table(root, "windows")
    if windows is None:
        raise PipelineError(f"no 'windows' table under {root} (is this a perceiver-stream output folder?)")
    dest = root / "_inspect"
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for sid, rows in _rows_by_stream(windows, ["t_start", "labels"]).items():
        rows.sort(key=lambda r: r["t_start"])
        names = [r["labels"][0]["label"] if r["labels"] else "" for r in rows]
        scores = [r["labels"][0]["score"] if r["labels"] else 0.0 for r in rows]
        classes = sorted(set(names))
        fig = Figure(figsize=(10, 3))
        ax = fig.subplots()
        ax.scatter([r["t_start"] for r in rows], [classes.index(n) for n in names], c=scores, cmap="viridis",
                   vmin=0, vmax=1, s=18)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("media time (s)")
        ax.set_title(f"{sid}: top label per window (colour = score)")
        fig.tight_layout()
        written.append(dest / f"labels_{sid}.png")
        fig.savefig(written[-1], dpi=100)
    flow = _table(root, "flow")
    has_frame = flow is not None and "frame" in flow.column_names
    cols = ["window_id", "t", "height", "width", "flow"] + (["frame"] if has_frame else [])
    for sid, rows in _rows_by_stream(flow, cols).items():
        rows.sort(key=lambda r: r["window_id"])
        pick = [rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, flows_per_stream).round().astype(int)))]
        ncol = 2 if has_frame else 1
        fig = Figure(figsize=(3 * ncol, 3 * len(pick)))
        axes = fig.subplots(len(pick), ncol, squeeze=False)
        for i, r in enumerate(pick):
            field_ = np.asarray(r["flow"], dtype=np.float32).reshape(r["height"], r["width"], 2)
            mag = float(np.hypot(field_[..., 0], field_[..., 1]).max())
            axes[i][-1].imshow(flow_to_rgb(field_))
            axes[i][-1].set_title(f"window {r['window_id']}: flow to t = {r['t']:.2f} s, max {mag:.1f} px", fontsize=8)
            if has_frame and r["frame"]:
                axes[i][0].imshow(_decode_png(r["frame"]))
                axes[i][0].set_title(f"window {r['window_id']}: the earlier frame", fontsize=8)
            for ax in axes[i]:
                ax.axis("off")
        fig.tight_layout()
        written.append(dest / f"flow_{sid}.png")
        fig.savefig(written[-1], dpi=100)
    return written
