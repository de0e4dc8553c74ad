"""``run_pipeline.py rig``: its options and what runs it (the rig itself: `jobs.texture_rig`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.errors import ConfigError


def add_rig_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``run_pipeline.py rig``."""
    p.add_argument("--out", type=Path, required=True, help="folder for the clips, flow sidecars and label tables")
    p.add_argument("--clips", type=int, nargs=2, default=[48, 16], metavar=("TRAIN", "EVAL"),
                   help="training and held-out clips (default 48 16)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per clip (default 8)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes rendering clips side by side (default: one per core)")


def cmd_rig(args: argparse.Namespace) -> int:
    """``run_pipeline.py rig``: render the rig under ``--out``; prints a JSON summary, returns 0."""
    if min(args.clips) < 1 or args.seconds <= 0 or args.workers < 1:
        raise ConfigError(f"--clips {args.clips} --seconds {args.seconds} --workers {args.workers}: need at least one clip "
                          "each, seconds > 0 and a worker")
    from jobs.texture_rig import write_rig  # local import: it needs scikit-image, a test extra the CLI does without

    print(json.dumps(write_rig(args.out, train_clips=args.clips[0], eval_clips=args.clips[1], seconds=args.seconds,
                                workers=args.workers),
                     indent=2))
    return 0
