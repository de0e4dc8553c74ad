"""Wall time of the shipped teacher's whole recipe (checkpoints/README.md), phase by phase.

Runs, one after the other, as a user would: phase 1 (``train_synthetic.yaml``), the real-texture
rig, phase 2 (``train_teacher.yaml``) and phase 3 (``train_teacher_chains.yaml``, which writes
``checkpoints/default``), each train afresh (``--no-resume``) with its final evaluation. Each
step's wall time, the total and each train's summary go to ``--out`` as JSON. This rewrites the
shipped teacher: run it on a checkout whose teacher you mean to replace.

    python bench/recipe.py [--out bench/results/recipe.json] [--from N]

``--from N`` starts at step N (0-3), reusing what the steps before it wrote; their times are
taken from the report already at ``--out``, so the total stays the whole recipe's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RIG_CLIPS = ("128", "12")
STEPS = (
    ("phase 1: synthetic rigs", ["train", "--config", "configs/train_synthetic.yaml", "--no-resume"]),
    ("real-texture rig", ["rig", "--out", "outputs/rig", "--clips", *RIG_CLIPS]),
    ("phase 2: flow refiner", ["train", "--config", "configs/train_teacher.yaml", "--no-resume"]),
    ("phase 3: state over chains", ["train", "--config", "configs/train_teacher_chains.yaml", "--no-resume"]),
)


def run_step(args: list[str]) -> tuple[float, object]:
    """Run ``run_pipeline.py args`` (progress on stderr, passed through); its wall seconds and the
    JSON summary it prints on stdout."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "run_pipeline.py", *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"run_pipeline.py {' '.join(args)} exited {done.returncode}")
    return seconds, json.loads(done.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recipe.json")
    p.add_argument("--from", dest="first", type=int, default=0, choices=range(len(STEPS)))
    args = p.parse_args()
    earlier = json.loads(args.out.read_text())["steps"][:args.first] if args.first and args.out.exists() else []
    if len(earlier) < args.first:
        raise SystemExit(f"--from {args.first}: {args.out} lacks the times of the steps before it")
    report: dict[str, object] = {"steps": earlier}
    total = sum(step["wall_s"] for step in earlier)
    for name, cmd in STEPS[args.first:]:
        seconds, summary = run_step(cmd)
        total += seconds
        report["steps"].append({"step": name, "command": "python run_pipeline.py " + " ".join(cmd),
                                "wall_s": round(seconds, 1), "summary": summary})
        print(f"{name:<30} {seconds / 60:6.1f} min", file=sys.stderr, flush=True)
    report["total_min"] = round(total / 60, 1)
    print(f"{'total':<30} {total / 60:6.1f} min", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
