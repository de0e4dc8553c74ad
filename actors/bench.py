"""``run_pipeline.py bench``: the whole pipeline's throughput against the model alone.

``model_windows_per_s`` feeds the same ModelActor (same resources, batch size and in-flight
bounds) with windows decoded beforehand and put in the object store; ``pipeline_windows_per_s``
runs the pipeline (distillation off) on the same streams into a scratch folder. Both rates are
steady state: windows completed between 10 % and 90 % of the total, over the time between, so
actor start-up, model loading and the last partial batches do not count. ``ratio`` is pipeline
over model.

So that a reader can judge the ratio on a shared machine, ``cpu_ms_per_window`` gives, for both
phases and over the same steady-state span, the CPU time per window of each kind of process
(the model actor, the source pool actors together, the sink, this driver, the raylet), read from
Linux's ``/proc``, and ``load_average`` the 1/5/15-minute load before and after.

Each phase runs ``--repeat`` times (default 3), interleaved, and the medians are reported: one
run of the default config takes a few seconds, so a single one is at the mercy of a passing load.

``student_windows_per_s`` runs the same ModelActor (resources, batch size, in-flight bounds) on
the same pre-built windows with ``model.student`` set; ``student_speedup`` is that rate over
``model_windows_per_s``. The student is the checkpoint given (``student.weights: "checkpoint"``)
or, without one, a student shaped by ``perceiver_stream.student.student_config`` from the
teacher and ``distill.student``, with random weights (``"random"``): its speed does not depend
on its weights.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.model import ModelActor
from actors.plan import cluster_nodes, plan_actors, shipped_inputs
from actors.processes import actor_pids
from actors.predictor import load_predictor
from actors.batching import send_now
from actors.runner import run
from actors.streams import RunningPipeline
from perceiver_stream.checkpoint import save_checkpoint
from perceiver_stream.streaming import StreamingPerceiverIO
from perceiver_stream.student import student_config
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.read import open_stream
from pipeline.window import Window

STEADY = (0.1, 0.9)


def steady_marks(n: int) -> tuple[int, int]:
    """The completion counts (1-based) at 10 % and 90 % of ``n`` that `steady_rate` measures between."""
    lo, hi = int(STEADY[0] * (n - 1)), int(STEADY[1] * (n - 1))
    return (lo + 1, hi + 1) if hi > lo else (1, n)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (all its threads), from Linux's
    ``/proc``; None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU milliseconds per window of named process groups over the steady-state span.

    ``update(done)`` takes a reading of every process when ``done`` windows have completed
    reaches the first and then the second of `steady_marks` (``total``); `per_window` divides
    each group's CPU time between the readings by the windows completed between them.
    """

    def __init__(self, pids: dict[str, list[int]], total: int) -> None:
        self.pids = pids
        self.marks = steady_marks(total)
        self.readings: list[tuple[int, dict[str, float | None]]] = []

    def _read(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for group, pids in self.pids.items():
            values = [cpu_seconds(p) for p in pids]
            out[group] = None if any(v is None for v in values) else sum(v for v in values if v is not None)
        return out

    def update(self, done: int) -> None:
        """Note that ``done`` windows have completed (call it as they do)."""
        n = len(self.readings)
        if n < 2 and done >= self.marks[n] and (n == 0 or done > self.readings[0][0]):
            self.readings.append((done, self._read()))

    def per_window(self) -> dict[str, float | None]:
        """Each group's CPU ms per window between the two readings (empty before both)."""
        if len(self.readings) < 2:
            return {}
        (n0, a), (n1, b) = self.readings
        per = {g: None if a[g] is None or b[g] is None else 1000 * (b[g] - a[g]) / (n1 - n0) for g in self.pids}
        known = [v for v in per.values() if v is not None]
        return {**{g: None if v is None else round(v, 2) for g, v in per.items()}, "total": round(sum(known), 2)}


def steady_rate(times: list[float]) -> float:
    """Windows per second between the completions at 10 % and 90 % of ``times`` (sorted)."""
    n = len(times)
    if n < 2:
        return float("nan")
    lo, hi = steady_marks(n)
    span = times[hi - 1] - times[lo - 1]
    return (hi - lo) / span if span > 0 else float("inf")


def prebuilt_windows(cfg: Config, max_windows: int | None) -> dict[str, list[Window]]:
    """Every stream's windows (at most ``max_windows`` each), decoded now, as the pipeline's sources
    ship them for this model (trailing frames, the points it reads, no ground truth)."""
    frames, points = shipped_inputs(cfg)
    streams: dict[str, list[Window]] = {}
    for s in cfg.streams:
        windows = []
        for w in open_stream(s, cfg, video_frames=frames, points=points, truth=False):
            windows.append(w)
            if max_windows is not None and len(windows) >= max_windows:
                break
        streams[s.id] = windows
    return streams


def round_robin(lengths: dict[str, int], next_seq: dict[str, int], in_flight: dict[str, int],
                per_stream: int, room: int) -> list[str]:
    """The streams to take one more window from, in order, one stream at a time in turn (as the
    pipeline driver tops up its sources): at most ``room`` windows, none from a stream with
    ``per_stream`` in flight or no windows left. Filling one stream to its bound first would leave
    the others none of the shared bound, and the model would batch the few streams that have any."""
    taken = {sid: 0 for sid in lengths}
    order: list[str] = []
    while len(order) < room:
        ready = [sid for sid in lengths
                 if next_seq[sid] + taken[sid] < lengths[sid] and in_flight[sid] + taken[sid] < per_stream]
        if not ready:
            break
        for sid in ready[: room - len(order)]:
            taken[sid] += 1
            order.append(sid)
    return order


def model_only(cfg: Config, streams: dict[str, list[Window]]) -> tuple[float, int, dict[str, float | None]]:
    """Steady-state windows/s of a ModelActor fed the pre-built windows, how many it ran, and the
    CPU ms per window of the model actor, this driver and the raylet over the same span.

    Windows go to the model as the pipeline sends them: by `ModelActor.infer_many`, in calls of
    up to a batch, when `actors.batching.send_now` says so, by value (Ray inlines a window under
    its inline size limit in the call, as it does a source's result, and puts a larger one in
    the object store), and only the small outcome list comes back."""
    opts = plan_actors(cfg, cluster_nodes())
    model = (
        ray.remote(ModelActor)
        .options(
            num_cpus=opts.model_cpus,
            num_gpus=opts.model_gpus,
            max_concurrency=cfg.runtime.max_in_flight + 16,
        )
        .remote(cfg, device=opts.device, num_cpus=opts.model_cpus)
    )

    def send(calls: list[tuple[str, int, bool]]) -> ray.ObjectRef:
        flags = [(seq, chain) for _, seq, chain in calls]
        windows = [streams[sid][seq] for sid, seq, _ in calls]
        return model.infer_many.options(num_returns=len(calls) + 1).remote(flags, *windows)[0]

    try:
        ray.get(model.info.remote())
        ray.get(model.set_open_streams.remote(list(streams)))
        ((model_pid, raylet),) = actor_pids([model])
        # Warm-up: one window per stream (first-call costs: allocations, cached projections).
        ray.get(send([(sid, 0, True) for sid, ws in streams.items() if ws]))
        next_seq = {sid: 1 for sid in streams}
        outstanding: dict[ray.ObjectRef, list[str]] = {}
        per_stream = {sid: 0 for sid in streams}
        in_flight = 0
        done: list[float] = []
        total = sum(max(len(r) - 1, 0) for r in streams.values())
        meter = CpuMeter({"model": [model_pid], "driver": [os.getpid()], "raylet": [raylet]}, total)
        held: list[tuple[str, int, bool]] = []  # windows the bounds allow, not yet sent
        size = cfg.model.batch_size
        while len(done) < total:
            for sid in round_robin({s: len(w) for s, w in streams.items()}, next_seq, per_stream,
                                   cfg.runtime.max_in_flight_per_stream, cfg.runtime.max_in_flight - in_flight):
                held.append((sid, next_seq[sid], False))
                next_seq[sid] += 1
                per_stream[sid] += 1
                in_flight += 1
            # The pipeline driver's rule (`send_now`), in calls of at most a batch.
            if send_now(len(held), sum(len(v) for v in outstanding.values()), size):
                held.sort()
                for i in range(0, len(held), size):
                    outstanding[send(held[i : i + size])] = [sid for sid, _, _ in held[i : i + size]]
                held = []
            ready, _ = ray.wait(list(outstanding), num_returns=1)
            ready, _ = ray.wait(list(outstanding), num_returns=len(outstanding), timeout=0)
            now = time.monotonic()
            for ref in ready:
                outcomes = ray.get(ref)
                failed = [o for o in outcomes if isinstance(o, BaseException)]
                if failed:
                    raise failed[0]
                for sid in outstanding.pop(ref):
                    per_stream[sid] -= 1
                    in_flight -= 1
                    done.append(now)
            meter.update(len(done))
        return steady_rate(done), len(done), meter.per_window()
    finally:
        ray.kill(model)


def pipeline_rate(
    cfg: Config, max_windows: int | None, output: Path, expected: int
) -> tuple[float, int, dict[str, float | None]]:
    """Steady-state windows/s of the whole pipeline, how many windows it wrote, and the CPU ms per
    window of each kind of process over the same span (``expected``: the windows it will write)."""
    done: list[float] = []
    meter: list[CpuMeter] = []

    def started(p: RunningPipeline) -> None:
        sources = list(p.pools.values())
        ids = actor_pids([p.model, p.sink, *sources])
        groups = {
            "model": [ids[0][0]],
            "sources": [pid for pid, _ in ids[2:]],
            "sink": [ids[1][0]],
            "driver": [os.getpid()],
            "raylet": [ids[0][1]],
        }
        meter.append(CpuMeter(groups, expected))

    def record(p: RunningPipeline) -> None:
        now = time.monotonic()
        done.extend([now] * (p.windows - len(done)))
        meter[0].update(p.windows)

    summary = run(cfg, output, max_windows=max_windows, on_start=started, on_progress=record)
    return steady_rate(done), summary.windows, meter[0].per_window()


def random_student(cfg: Config, path: Path) -> Path:
    """Save to ``path`` a student of ``cfg``'s model (``distill.student`` overrides) with random weights."""
    teacher = load_predictor(cfg, torch.device("cpu")).model
    try:
        config = student_config(teacher.config, cfg.distill.student)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"distill.student: {e}") from None
    torch.manual_seed(0)
    return save_checkpoint(path, StreamingPerceiverIO(config), {"role": "student", "weights": "random"})


def bench(
    cfg: Config,
    *,
    max_windows: int | None = None,
    output: Path | None = None,
    student: str | Path | None = None,
    repeat: int = 3,
) -> dict[str, Any]:
    """The bench JSON (see the module docstring) for ``cfg``, with distillation and pacing off;
    ``student`` is the student checkpoint to time (default: a random-weight student).

    Each phase runs ``repeat`` times, interleaved (model, student, pipeline, model, ...) so a
    passing load hits all three alike; the rates are the medians (each run is listed under
    ``runs``) and the CPU breakdown is that of the median run.
    """
    if repeat < 1:
        raise ConfigError(f"bench: repeat must be at least 1, got {repeat}")
    cfg = cfg.model_copy(deep=True)
    cfg.distill.enabled = False
    cfg.runtime.realtime = False
    cfg.model.student = None
    load_before = os.getloadavg()
    streams = prebuilt_windows(cfg, max_windows)
    expected = sum(len(windows) for windows in streams.values())
    model_runs, student_runs, pipe_runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="pstream-bench-") as tmp:
        s_cfg = cfg.model_copy(deep=True)
        s_cfg.model.student = str(student) if student is not None else str(random_student(cfg, Path(tmp) / "student"))
        for i in range(repeat):
            model_runs.append(model_only(cfg, streams))
            student_runs.append(model_only(s_cfg, streams))
            out = (output or Path(tmp)) / f"run{i}"
            pipe_runs.append(pipeline_rate(cfg, max_windows, out, expected))
    model_rate, model_n, model_cpu = _median_run(model_runs)
    student_rate = _median_run(student_runs)[0]
    pipe_rate, pipe_n, pipe_cpu = _median_run(pipe_runs)
    return {
        "model_windows_per_s": round(model_rate, 2),
        "pipeline_windows_per_s": round(pipe_rate, 2),
        "ratio": round(pipe_rate / model_rate, 3),
        "cpu_ms_per_window": {"model_only": model_cpu, "pipeline": pipe_cpu},
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "cpus": os.cpu_count(),
        "student_windows_per_s": round(student_rate, 2),
        "student_speedup": round(student_rate / model_rate, 2),
        "student": {
            "checkpoint": None if student is None else str(student),
            "weights": "checkpoint" if student is not None else "random (student_config of the teacher)",
        },
        "runs": {
            "model_windows_per_s": [round(r[0], 2) for r in model_runs],
            "student_windows_per_s": [round(r[0], 2) for r in student_runs],
            "pipeline_windows_per_s": [round(r[0], 2) for r in pipe_runs],
        },
        "windows": {"model": model_n, "pipeline": pipe_n},
        "streams": len(cfg.streams),
        "batch_size": cfg.model.batch_size,
        "device": plan_actors(cfg, cluster_nodes()).device,
    }


def _median_run(runs: list[tuple[float, int, dict[str, float | None]]]) -> tuple[float, int, dict[str, float | None]]:
    """The run with the median rate (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]
