"""Decode throughput of `read_windows` against a bare PyAV loop over the same clip.

Writes a 640x480 25 fps H.264 clip (30 s by default) to a temporary folder, then decodes it at its
native size (1) through ``read_windows`` (1.0 s windows, 0.5 s hop, video only) and (2) through a
bare PyAV loop with the same thread type that converts each frame to an RGB ndarray. Each is run
``--repeats`` times, alternating, and the best run counts (the machine is shared). Prints JSON:
frames per second of both, and their ratio (target >= 0.90).

    python bench/bench_decode.py [--seconds 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipeline import read_windows
from pipeline.sources.video import VideoDecoder

THREAD_TYPE = VideoDecoder().thread_type


def write_clip(path: Path, seconds: float, fps: int = 25, height: int = 480, width: int = 640) -> int:
    """A moving-gradient H.264 clip; returns its frame count."""
    n = int(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(n):
            img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, (xx + yy + i) % 256], -1).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return n


def bare_pyav(path: Path) -> int:
    """Frames decoded by a plain PyAV loop with an RGB ndarray per frame."""
    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = THREAD_TYPE
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def through_read_windows(path: Path) -> int:
    """Frames decoded through `read_windows` (counted once, though windows overlap)."""
    seen = set()
    for w in read_windows({"id": "bench", "video": str(path)}, seconds=1.0, hop=0.5):
        seen.update(w.video_t.tolist())
    return len(seen)


def timed(fn, path: Path) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn(path)
    return n, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.mp4"
        n_frames = write_clip(path, args.seconds)
        best = {"bare": 0.0, "read_windows": 0.0}
        counts = {}
        for _ in range(args.repeats):
            for name, fn in (("bare", bare_pyav), ("read_windows", through_read_windows)):
                n, dt = timed(fn, path)
                counts[name] = n
                best[name] = max(best[name], n / dt)
    result = {
        "clip": {"seconds": args.seconds, "size": [480, 640], "fps": 25, "frames": n_frames},
        "thread_type": THREAD_TYPE,
        "frames": counts,
        "bare_pyav_fps": round(best["bare"], 1),
        "read_windows_fps": round(best["read_windows"], 1),
        "ratio": round(best["read_windows"] / best["bare"], 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
