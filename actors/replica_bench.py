"""``run_pipeline.py bench --replicas 1,2,4``: how the pipeline scales with model replicas.

It measures the orchestration, not the model: on a local 4-node Ray (`ray.cluster_utils.Cluster`,
`NODE_CPUS` logical CPUs each, started once for every point), 64 streams whose sources replay a
few windows decoded beforehand (`Replay`), state on, batch 8, and replicas that run a stand-in
for a GPU (`StandIn`: each batch costs `BATCH_COST_S` of sleep whatever its size) between the
real collate and the real rows. One replica can then do at most 8 windows per `BATCH_COST_S`;
the table says how close ``n`` replicas come to ``n`` times that. Per point:

- ``windows_per_s``: steady state, between 10 % and 90 % of the windows written (`actors.bench`);
- ``ratio``: over the 1-replica point (or the smallest asked for);
- ``cpu_ms_per_window``: CPU ms per window of each kind of process over the same span (the
  replicas together, the source pools together, the sink, this driver, the raylets together).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.cluster_utils import Cluster

from actors.bench import CpuMeter, steady_rate
from actors.plan import shipped_inputs
from actors.processes import actor_pids
from actors.runner import run
from actors.streams import RunningPipeline
from perceiver_stream.outputs import ModelOutput
from pipeline.config import Config, StreamConfig, SyntheticConfig
from pipeline.read import open_stream
from pipeline.sources.synthetic import CLASSES
from pipeline.window import Window

NODES = 4
NODE_CPUS = 2
NODE_STORE_BYTES = 200 * 2**20
STREAMS = 64
BATCH = 8
BATCH_COST_S = 0.2
DECODED = 8  # windows decoded beforehand and replayed by every stream


class StandIn:
    """A predictor standing in for a GPU: every batch costs `BATCH_COST_S` whatever its size, and
    returns outputs of the right shapes (zeros) for the rows and the carried state."""

    name = "stand-in"
    stateful = True  # the state is carried, as by the teacher it stands in for
    class_names = list(CLASSES)
    device = torch.device("cpu")

    def __init__(self, video_frames: int | None) -> None:
        self.video_frames = video_frames

    def __call__(self, batch: Any, state: torch.Tensor | None) -> ModelOutput:
        time.sleep(BATCH_COST_S)
        n = len(batch.stream_ids)
        return ModelOutput(
            embedding=torch.zeros(n, 16),
            label_logits=torch.zeros(n, len(self.class_names)),
            flow=None,
            flow_valid=torch.zeros(n, dtype=torch.bool),
            state=torch.zeros(n, 4, 8),
        )


@dataclass
class StandInBuild:
    """The replicas' model loader for the bench (picklable, so Ray ships it to them)."""

    video_frames: int | None

    def __call__(self, cfg: Config, device: torch.device) -> StandIn:
        return StandIn(self.video_frames)


@dataclass
class Replay:
    """A source opener replaying ``windows`` in turn as each stream's windows 0 .. ``per_stream`` - 1."""

    windows: list[Window]
    per_stream: int
    hop: float

    def __call__(self, stream: StreamConfig, cfg: Config, *, start_window: int = 0, **_: Any) -> Iterator[Window]:
        for k in range(start_window, self.per_stream):
            w = self.windows[k % len(self.windows)]
            yield replace(w, stream_id=stream.id, window_id=k, t_start=k * self.hop,
                          t_end=k * self.hop + (w.t_end - w.t_start))


def replica_config(base: Config, replicas: int, per_stream: int) -> Config:
    """``base`` with `STREAMS` streams (their sources replaced by `Replay`), batch `BATCH`, state
    on, ``replicas`` replicas, a source pool per node, unpaced, without distillation. The run may
    hold four batches a node in flight, so that a replica's next batches are ready while one runs
    (with two, replies still on their way left batches short at 4 replicas: 2.2x instead of 3.2x)."""
    cfg = base.model_copy(deep=True)
    seconds = cfg.window.seconds + (per_stream - 1) * cfg.window.hop
    cfg.streams = [StreamConfig(id=f"cam{i:02d}", synthetic=SyntheticConfig(seed=i, seconds=seconds))
                   for i in range(STREAMS)]
    cfg.model.batch_size, cfg.model.state, cfg.model.replicas = BATCH, True, replicas
    cfg.runtime.source_actors = NODES
    cfg.runtime.max_in_flight, cfg.runtime.max_in_flight_per_stream = 4 * BATCH * NODES, 3
    cfg.runtime.realtime = False
    cfg.distill.enabled = False
    return cfg


def replica_point(cfg: Config, replay: Replay, build: StandInBuild, output: Path, timeout_s: float) -> dict[str, Any]:
    """One point of the table, on the Ray this process has joined."""
    expected = len(cfg.streams) * replay.per_stream
    done: list[float] = []
    meter: list[CpuMeter] = []
    deadline: list[float] = []  # drain the run after timeout_s

    def started(p: RunningPipeline) -> None:
        replicas, pools = list(p.replicas.values()), list(p.pools.values())
        ids = actor_pids([*replicas, p.sink, *pools])
        groups = {
            "replicas": [pid for pid, _ in ids[: len(replicas)]],
            "sources": [pid for pid, _ in ids[len(replicas) + 1 :]],
            "sink": [ids[len(replicas)][0]],
            "driver": [os.getpid()],
            "raylets": sorted({raylet for _, raylet in ids}),
        }
        meter.append(CpuMeter(groups, expected))
        deadline.append(time.monotonic() + timeout_s)

    def record(p: RunningPipeline) -> None:
        now = time.monotonic()
        done.extend([now] * (p.windows - len(done)))
        meter[0].update(p.windows)
        if now > deadline[0]:
            p.stop()

    summary = run(cfg, output, on_start=started, on_progress=record, build=build, open_stream=replay)
    return {
        "replicas": cfg.model.replicas,
        "windows": summary.windows,
        "expected_windows": expected,
        "windows_per_s": round(steady_rate(done), 2),
        "cpu_ms_per_window": meter[0].per_window() if meter else {},
        "exit_code": summary.exit_code,
    }


def bench_replicas(base: Config, counts: list[int], *, total_windows: int, timeout_s: float,
                   output: Path | None) -> dict[str, Any]:
    """The table for each of ``counts`` replicas, all on one local `NODES`-node cluster started
    here; each point is also printed to stderr as it completes."""
    per_stream = max(1, total_windows // STREAMS)
    frames, points = shipped_inputs(base)
    first = replica_config(base, 1, DECODED).streams[0]
    decoded = [w for _, w in zip(range(DECODED), open_stream(first, base, video_frames=frames, points=points,
                                                               truth=False))]
    replay = Replay(decoded, per_stream, base.window.hop)
    build = StandInBuild(frames)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False,
                                                            "object_store_memory": NODE_STORE_BYTES})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=NODE_STORE_BYTES)
    cluster.wait_for_nodes()
    points_out: list[dict[str, Any]] = []
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="pstream-bench-replicas-") as tmp:
            for n in counts:
                out = (output or Path(tmp)) / f"replicas{n}"
                points_out.append(replica_point(replica_config(base, n, per_stream), replay, build, out, timeout_s))
                print(json.dumps(points_out[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    base_rate = min(points_out, key=lambda p: p["replicas"])["windows_per_s"]
    for p in points_out:
        p["ratio"] = round(p["windows_per_s"] / base_rate, 2) if base_rate else None
    return {"points": points_out, "nodes": NODES, "cpus_per_node": NODE_CPUS, "streams": STREAMS,
            "batch_size": BATCH, "batch_cost_s": BATCH_COST_S, "windows_per_stream": per_stream}
