"""``compact`` (a subcommand of the CLI): publish everything committed in an output folder no run owns, and apply retention.

For a folder whose run ended without draining (killed, a lost node): its committed rows stay in
hidden parts, read by `pipeline.reader.open_dataset` but not by plain glob readers, until a run
resumes into it or this job publishes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError, PipelineError
from pipeline.manifest import stream_ids
from pipeline.outputfs import open_output
from pipeline.parquet import OutputWriter
from pipeline.tables import TABLES


def compact_output(output: str | Path, *, retain_days: float | None = None) -> dict[str, Any]:
    """Publish every stream's committed rows under ``output`` (a path or URI), delete published
    periods older than ``retain_days`` (media time), compact the manifests. Returns, per stream,
    the periods ``published`` and ``retired`` and its published files per table.
    `pipeline.errors.OutputError` if a live run owns the folder or it holds no outputs."""
    if not stream_ids(open_output(output)):  # before the writer's lock creates a folder at a mistyped path
        raise OutputError("no perceiver-stream outputs here (no _manifest/stream_id=...)", source=str(output))
    with OutputWriter(output, model_name="", config_hash="", retain_days=retain_days) as w:
        done = w.publish(everything=True)
        for sid, what in done.items():
            files = w.state(sid).published()
            what["files"] = {t: n for t in TABLES if (n := sum(f["table"] == t for f in files))}
    return {"output": str(output), "streams": done}


def add_compact_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the ``compact`` subcommand (`cmd_compact`)."""
    p.add_argument("--output", required=True, help="output folder or pyarrow.fs URI (no live run may own it)")
    p.add_argument("--retain-days", type=float, metavar="DAYS",
                   help="also delete published periods this many days of media time older than each stream's latest")


def cmd_compact(args: argparse.Namespace) -> int:
    """``compact``: print `compact_output`'s JSON; exit 0, or 1 with one line (a live run owns the
    folder, a full disk), or 2 for a bad ``--retain-days``."""
    if args.retain_days is not None and args.retain_days <= 0:
        print(f"run_pipeline.py: error: --retain-days must be positive, got {args.retain_days}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(compact_output(args.output, retain_days=args.retain_days), indent=2))
    except PipelineError as exc:
        print(f"run_pipeline.py: compact failed: {exc}", file=sys.stderr)
        return 1
    return 0
