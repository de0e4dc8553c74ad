"""Student vs teacher: seconds per window producing the same outputs (flow, labels, embedding).

Runs both models over the same windows of a synthetic stream (stateless batches, no grad), best
of ``--repeats`` in CPU time (robust on a shared machine), one torch thread; prints one JSON object with
milliseconds per window, parameter counts and the ratio ``speedup = teacher / student``.

    python bench/bench_student.py                                  # shipped teacher, default student
    python bench/bench_student.py --teacher checkpoints/default --student outputs/distill/_checkpoints/student
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from perceiver_stream.checkpoint import load_checkpoint
    from perceiver_stream.streaming import StreamingPerceiverIO
    from perceiver_stream.student import student_config
    from pipeline.collate import collate
    from pipeline.distill import per_window_seconds
    from pipeline.read import read_windows
    from pipeline.training import video_frames_needed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(ROOT / "checkpoints" / "default"))
    p.add_argument("--student", default=None, help="student checkpoint (default: an untrained default student)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher, meta = load_checkpoint(args.teacher)
    if args.student:
        student, _ = load_checkpoint(args.student)
    else:
        student = StreamingPerceiverIO(student_config(teacher.config)).eval()
    size = list(teacher.config.flow.size)
    windows = list(read_windows({"id": "b", "synthetic": {"seed": 999, "seconds": args.batch / 2 + 1}},
                                video={"size": size}))[: args.batch]
    batch = collate(windows, video_frames=video_frames_needed(teacher.config))
    t = per_window_seconds(teacher, batch, args.repeats)
    s = per_window_seconds(student, batch, args.repeats)
    print(json.dumps({
        "teacher_ms_per_window": round(1e3 * t, 3),
        "student_ms_per_window": round(1e3 * s, 3),
        "speedup": round(t / s, 2),
        "teacher_params": sum(q.numel() for q in teacher.parameters()),
        "student_params": sum(q.numel() for q in student.parameters()),
        "batch": len(batch),
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
