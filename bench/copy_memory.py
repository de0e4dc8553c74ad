"""Sink memory through merges and publications: large copies in a child process against in-process.

One process plays the sink: an `OutputWriter` with ``background=True`` (merges and publications on
its maintenance thread, as in `actors.sink.SinkActor`), the heap purged every 5 s (`HeapTrimmer`),
jemalloc preloaded where the machine has it (as a run does). It commits ``--streams`` streams of
11 windows at a time (a sink's ~5.5 s commit at hop 0.5) with flow rows of the default 64 x 64
video (random values, which zstd cannot shrink), faster than real time, through 2.5 periods of
``--period-s`` media seconds: every merge level, then two publications per stream. Its RSS is
sampled after every round of commits.

Each mode runs in a fresh process: ``child`` (as shipped: copies of `pipeline.partcopy`'s
``CHILD_COPY_BYTES`` or more in a child process) and ``here`` (every copy in the process). The
figure is the *step*: the mean RSS over the last tenth of the run (after both publications) minus
the mean over the tenth before the first publication (the periods close at 40 % and 80 % of the
run; the first 30 % are the allocators' warm-up), and the ratio of the two modes' steps.

    python bench/copy_memory.py [--streams 8] [--period-s 900] [--out bench/results/copy_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pipeline.partcopy  # noqa: E402
from actors.memory import HeapTrimmer, allocator_env  # noqa: E402
from pipeline.parquet import FlowRow, OutputWriter, WindowRow  # noqa: E402

HOP = 0.5
PER_COMMIT = 11


def play_sink(mode: str, streams: int, period_s: float) -> dict:
    """The sink's part of one mode; returns its RSS samples (MB) and the time it took."""
    if mode == "here":
        pipeline.partcopy.CHILD_COPY_BYTES = 1 << 62
    rng = np.random.default_rng(0)
    flow = rng.standard_normal((64, 64, 2), dtype=np.float32)
    emb = rng.standard_normal(64, dtype=np.float32)
    rounds = int(2.5 * period_s / HOP / PER_COMMIT)
    proc, trim = psutil.Process(), HeapTrimmer(every_s=5.0)
    rss: list[float] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        w = OutputWriter(tmp, model_name="bench", config_hash="h", publish_every_s=period_s, background=True)
        for r in range(rounds):
            ids = range(r * PER_COMMIT, (r + 1) * PER_COMMIT)
            for s in range(streams):
                w.write(f"cam{s}", [WindowRow(k, HOP * k, HOP * k + 1.0, True, False, False, k == 0,
                                              [("a", 0.5)], emb, "bench") for k in ids],
                        flow=[FlowRow(k, HOP * k + 0.9, flow + k) for k in ids])
            w.renew()
            trim()
            rss.append(proc.memory_info().rss / 2**20)
        w.close()
    return {"rss_mb": rss, "seconds": time.perf_counter() - t0}


def summary(rss: list[float]) -> dict:
    """RSS before the first publication, after the second, the step between them and the peak (MB)."""
    n = len(rss)
    before, after = statistics.fmean(rss[3 * n // 10 : 4 * n // 10]), statistics.fmean(rss[9 * n // 10 :])
    return {"before_mb": before, "after_mb": after, "step_mb": after - before, "peak_mb": max(rss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--period-s", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mode", choices=["here", "child"], help=argparse.SUPPRESS)  # one mode's own process
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(play_sink(a.mode, a.streams, a.period_s)))
        return
    env = {**os.environ, **allocator_env()}
    result: dict = {"streams": a.streams, "period_s": a.period_s, "allocator": allocator_env(), "modes": {}}
    for mode in ("here", "child"):
        done = subprocess.run([sys.executable, __file__, "--mode", mode, "--streams", str(a.streams),
                               "--period-s", str(a.period_s)], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {mode} run failed: {done.stderr.strip().splitlines()[-1]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        result["modes"][mode] = {**summary(run["rss_mb"]), "seconds": run["seconds"], "rss_mb": run["rss_mb"]}
        s = result["modes"][mode]
        print(f"{mode:>5}: {s['before_mb']:.0f} -> {s['after_mb']:.0f} MB (step {s['step_mb']:+.1f}), "
              f"peak {s['peak_mb']:.0f} MB, {s['seconds']:.0f} s", flush=True)
    here, child = result["modes"]["here"]["step_mb"], result["modes"]["child"]["step_mb"]
    result["step_ratio_child_to_here"] = child / here if here else None
    print(f"step ratio child/here: {result['step_ratio_child_to_here']}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
