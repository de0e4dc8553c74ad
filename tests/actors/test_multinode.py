"""Runs on a local multi-node Ray (`ray.cluster_utils.Cluster`: a head of 1 CPU and three nodes
of 2, 100 MB of object store each): streams spread over model replicas on different nodes, a pinned
stream decoded on its node, the sink on the driver's node, a cluster whose nodes are each smaller
than half of the total, and a worker node removed mid-run (with the decoded windows it held).

The module's cluster replaces the session's local Ray (conftest's ``ray_session``) while it runs
and starts that one again afterwards, so tests before and after it see the usual 2-CPU Ray."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import run_pipeline
from actors.batching import Call
from actors.restarts import RestartBudget
from actors.runner import run
from actors.sink import SinkActor
from actors.sink_guard import SinkGuard
from actors.streams import RunningPipeline
from perceiver_stream.checkpoint import read_config
from pipeline.config import parse_config
from session_ray import SESSION_RAY

STORE = 100 * 2**20


@pytest.fixture(scope="module")
def cluster():
    restore = ray.is_initialized()
    if restore:
        ray.shutdown()
    # Decoded windows (about 60 KB at these settings) go to the object store, as a 640 x 480 one
    # (over Ray's 100 KB inline size) would: a node that leaves takes those it decoded with it.
    # The model's results here (a few KB) stay inline.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                      "include_dashboard": False,
                                                      "_system_config": {"max_direct_call_object_size": 16 * 1024}})
    workers = [c.add_node(num_cpus=2, object_store_memory=STORE) for _ in range(3)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()
    if restore:
        ray.init(**SESSION_RAY)


def config_data(checkpoint: Path, streams: list[dict], **model) -> dict:
    return {
        "streams": streams,
        **read_config(checkpoint)[1]["data"],
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "batch_size": 4, "max_wait_ms": 20, **model},
        "runtime": {"max_in_flight_per_stream": 3, "max_in_flight": 12},
    }


def synthetic(sid: str, seed: int, seconds: float) -> dict:
    return {"id": sid, "synthetic": {"seed": seed, "seconds": seconds}}


def table(out: Path, name: str) -> pl.DataFrame:
    return pl.from_arrow(ds.dataset(out / name, format="parquet", partitioning="hive").to_table())


def node_of(handle) -> str:
    # A local function: Ray ships it by value (the workers cannot import this test module).
    def here(_actor) -> str:
        return ray.get_runtime_context().get_node_id()

    return ray.get(handle.__ray_call__.remote(here))


def test_streams_spread_over_replicas_on_different_nodes(cluster, tiny_checkpoint, tmp_path):
    _, workers = cluster
    pinned = workers[1].node_id
    streams = [synthetic(f"s{i}", i, 2.0) for i in range(6)] + [{**synthetic("cam", 9, 2.0), "node": pinned}]
    seen: dict[str, object] = {}

    def where(p: RunningPipeline) -> None:
        seen["replicas"] = {rid: node_of(h) for rid, h in p.replicas.items()}
        seen["owners"] = dict(p.owners)
        seen["cam"] = node_of(p.sources["cam"])
        seen["sink"] = node_of(p.sink)

    out = tmp_path / "out"
    summary = run(parse_config(config_data(tiny_checkpoint, streams, replicas="auto")), out, on_start=where)
    assert summary.exit_code == 0 and summary.windows == 7 * 3
    # One replica per node (auto on a CPU-only cluster), the streams over several of them.
    assert len(set(seen["replicas"].values())) == 4
    assert len(set(seen["owners"].values())) >= 2 and set(seen["owners"]) == {s["id"] for s in streams}
    assert seen["cam"] == pinned
    assert seen["sink"] == ray.get_runtime_context().get_node_id()
    rows = table(out, "windows")
    assert rows.group_by("stream_id").len().sort("stream_id")["len"].to_list() == [3] * 7
    assert rows["state_reset"].sum() == 7  # each stream's first window only


def test_address_on_a_cluster_whose_nodes_are_each_under_half_of_it(cluster, tiny_checkpoint, tmp_path):
    # 7 CPUs and no node with more than 2: the one model actor, once planned on the total, asked
    # for 3 and the run waited forever.
    c, _ = cluster
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config_data(tiny_checkpoint, [synthetic("a", 1, 2.0), synthetic("b", 2, 2.0)])))
    out = tmp_path / "out"
    code = run_pipeline.main(["--config", str(cfg), "--output", str(out), "--address", c.address, "--no-progress"])
    assert code == 0
    assert table(out, "windows").height == 6


def test_a_worker_node_removed_mid_run_loses_and_repeats_nothing(cluster, tiny_checkpoint, tmp_path):
    c, workers = cluster
    n = 15  # 8 s at 1 s / 0.5 s
    streams = [synthetic(f"s{i}", i, 8.0) for i in range(6)]
    removed: dict[str, object] = {}

    def remove_once(p: RunningPipeline) -> None:
        if removed or p.windows < 12:
            return
        nodes = {rid: node_of(h) for rid, h in p.replicas.items()}
        victim = next(w for w in workers if w.node_id in nodes.values())
        removed["replica"] = next(rid for rid, node in nodes.items() if node == victim.node_id)
        removed["streams"] = sorted(sid for sid, rid in p.owners.items() if rid == removed["replica"])
        c.remove_node(victim)

    out = tmp_path / "out"
    summary = run(parse_config(config_data(tiny_checkpoint, streams, replicas="auto")), out, on_progress=remove_once)
    assert removed and summary.exit_code == 0, summary.fatal
    rows = table(out, "windows")
    # Every window of every stream exactly once.
    assert rows.group_by("stream_id").len().sort("stream_id")["len"].to_list() == [n] * 6
    assert rows.select(["stream_id", "window_id"]).n_unique() == 6 * n
    errors = table(out, "errors")
    lost = errors.filter(pl.col("kind") == "ModelRestarted")
    # One row per stream the lost replica still ran, in our words; its next window resets the state.
    assert set(lost["stream_id"].to_list()) <= set(removed["streams"]) and lost["stream_id"].n_unique() == lost.height
    assert all(f"model replica {removed['replica']} was lost (its node left" in m for m in lost["message"])
    assert all("stream moved to model replica" in m and m.endswith("state reset") for m in lost["message"])
    # Windows the node held that the model had not run yet are decoded again, from the first of them.
    redone = errors.filter(pl.col("kind") == "SourceRestarted")
    assert all("decodes it again" in m or "resumed at window" in m for m in redone["message"])
    resets = rows.filter(pl.col("state_reset") & (pl.col("window_id") > 0))
    # A row names the first window resent (none when all the stream's windows had come back). The
    # lowest a stream's rows name starts a new chain (window 0, lost before the model ran it, starts
    # one anyway); a higher one may not, when a later rewind of that stream went back below it and
    # decoded it again inside that chain.
    named: dict[str, list[int]] = {}
    for r in [*lost.to_dicts(), *redone.to_dicts()]:
        if r["window_id"] is not None and 0 <= r["window_id"] < n:  # past the end: the end was decoded again
            named.setdefault(r["stream_id"], []).append(r["window_id"])
    reset_at = set(resets.select(["stream_id", "window_id"]).iter_rows())
    assert {(sid, min(ws)) for sid, ws in named.items() if min(ws) > 0} <= reset_at
    print("failover:", {"windows_per_stream": n, "state_reset_after_start": resets.height,
                        "errors": errors.group_by("kind").len().to_dicts()})


def test_results_lost_with_their_node_before_the_sink_took_them_go_back_to_the_runner(cluster, tmp_path):
    # A model result over Ray's inline size lives on its replica's node; the write call that sends
    # it to the sink fails once that node has left. The guard hands its windows back (the runner
    # decodes them again) instead of ending the run.
    c, _ = cluster
    node = c.add_node(num_cpus=1, object_store_memory=STORE)
    c.wait_for_nodes()

    class Replica:  # a local class: Ray ships it by value
        def result(self, n: int) -> bytes:
            return bytes(n)

    replica = ray.remote(Replica).options(
        num_cpus=1, max_task_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    ).remote()
    big = replica.result.remote(256 * 1024)  # over the fixture's 16 KB inline size
    ray.wait([big], fetch_local=False)
    c.remove_node(node)
    sink = ray.remote(SinkActor).options(num_cpus=0, max_restarts=-1, max_task_retries=0).remote(
        str(tmp_path / "out"), config_hash="h")
    guard = SinkGuard(sink, RestartBudget(3), lambda _actor: None)
    call = Call("a", 4, None, result=big, window_id=9)
    guard.write([call])
    pending = list(guard.calls)
    ray.wait(pending, num_returns=len(pending), timeout=60)
    taken, lost = guard.done(pending)
    assert taken == [] and lost == [call]
    assert ray.get(sink.uncommitted.remote({"a": [9]})) == {"a": [9]}  # nothing of it reached the sink
    assert guard.close() == {}  # and nothing is left held to resend
    ray.kill(sink)


@pytest.mark.parametrize("comes_back", [True, False], ids=["node-comes-back", "node-stays-away"])
def test_a_pinned_stream_waits_for_its_node_without_holding_up_the_others(cluster, tiny_checkpoint, tmp_path,
                                                                          comes_back):
    c, _ = cluster
    # Pinned by a custom resource: a node that rejoins gets a new id, and the resource finds it.
    node = c.add_node(num_cpus=2, object_store_memory=STORE, resources={"cam_host": 1})
    c.wait_for_nodes()
    streams = [synthetic(f"s{i}", i, 6.0) for i in range(3)] + [{**synthetic("cam", 9, 12.0), "node": "cam_host"}]
    when: dict[str, float] = {}
    back: list = []

    def watch(p: RunningPipeline) -> None:
        if "removed" not in when and p.streams["cam"].windows >= 2:
            c.remove_node(node)
            when["removed"] = time.monotonic()
        if "removed" in when and "others" not in when and all(p.streams[f"s{i}"].finished for i in range(3)):
            when["others"] = time.monotonic()
            if comes_back:
                back.append(c.add_node(num_cpus=2, object_store_memory=STORE, resources={"cam_host": 1}))
        if "removed" in when and "cam" not in when and p.streams["cam"].finished:
            when["cam"] = time.monotonic()

    data = {**config_data(tiny_checkpoint, streams, replicas="auto"), "sources": {"node_wait_s": 30 if comes_back else 8}}
    try:
        summary = run(parse_config(data), tmp_path / "out", on_progress=watch)
    finally:
        for n in back:  # the module's cluster is shared: leave it as it was
            c.remove_node(n)
    when.setdefault("cam", time.monotonic())  # it may end with the run's last step
    # The others went on while the pinned stream waited for its node (the wait does not block the run).
    assert when["removed"] < when["others"] < when["cam"]
    windows = table(tmp_path / "out", "windows")
    counts = windows.group_by("stream_id").len().sort("stream_id")
    assert counts.filter(pl.col("stream_id") != "cam")["len"].to_list() == [11] * 3
    cam = table(tmp_path / "out", "errors").filter((pl.col("stream_id") == "cam") & (pl.col("kind") == "SourceRestarted"))
    wait = f"waits up to sources.node_wait_s = {30 if comes_back else 8} s for its node"
    assert any(wait in m for m in cam["message"]), cam["message"].to_list()
    if comes_back:
        assert summary.exit_code == 0, summary.fatal
        ids = windows.filter(pl.col("stream_id") == "cam")["window_id"].sort().to_list()
        assert ids == list(range(23)), ids  # 12 s: every window once, the lost ones decoded again
        assert any("resumed at window" in m for m in cam["message"])
    else:
        assert summary.exit_code == 3 and summary.failed == ["cam"], summary.fatal
        assert any("no source actor is left for it" in m and "did not come back within sources.node_wait_s = 8 s" in m
                   for m in cam["message"])
