"""Every actor restarts: the sink and the distill actor killed by SIGKILL mid-run (found by their
``ray::`` process title) come back, and the run commits every window exactly once."""

from __future__ import annotations

import os
import re
import signal

import polars as pl
import psutil
import pytest
import ray

from actors.deaths import death_cause
from actors.runner import run
from actors.streams import RunningPipeline
from pipeline.config import parse_config, student_checkpoint_path
from test_source_pool import ids_by_stream, make_cfg, rows, synthetic


def kill_by_title(title: str, sibling: int) -> int:
    """SIGKILL the process titled ``ray::<title>...`` started by the raylet that started
    ``sibling`` (other Ray clusters may run on this machine); its pid."""
    raylet = psutil.Process(sibling).ppid()
    found = [p.pid for p in psutil.Process(raylet).children() if (p.cmdline() or [""])[0].startswith(f"ray::{title}")]
    assert len(found) == 1, found
    os.kill(found[0], signal.SIGKILL)
    return found[0]


def kill_when(title: str, windows: int):
    """``(killed pids, on_progress)``: kills ``title`` once the run has ``windows`` windows."""
    killed: list[int] = []

    def on_progress(p: RunningPipeline) -> None:
        if not killed and p.windows >= windows:
            killed.append(kill_by_title(title, ray.get(p.sink.info.remote())["pid"]))

    return killed, on_progress


def test_death_causes_name_the_signal_or_exit_and_never_rays_internals():
    assert death_cause(RuntimeError("worker 1a2b on 10.0.0.1 was killed by signal 9")) == "killed by signal 9"
    assert death_cause(RuntimeError("Worker exit detail: exit code 3")) == "exited with code 3"
    rays = "The actor 9814f0 is unavailable: RpcError: Socket closed. ... crashed due to SIGSEGV"
    assert death_cause(RuntimeError(rays)) == death_cause(None) == "its process ended; Ray reported no signal or exit code"


def test_a_sink_killed_mid_run_is_restarted_and_every_window_is_committed_once(ray_session, tiny_checkpoint, tmp_path):
    cfg = make_cfg(tiny_checkpoint, [synthetic(f"s{i}", i, 8.0) for i in range(2)], source_actors=1)
    killed, on_progress = kill_when("SinkActor", 10)
    out = tmp_path / "out"
    summary = run(cfg, out, on_progress=on_progress)
    n = 15  # 8 s at 1 s / 0.5 s
    assert killed and summary.exit_code == 0 and summary.restarts == 1, summary.fatal
    assert ids_by_stream(out) == {"s0": list(range(n)), "s1": list(range(n))}  # each window exactly once
    assert summary.committed == {"s0": n, "s1": n}
    errors = rows(out, "errors").sort("stream_id")
    assert errors["kind"].to_list() == ["SinkRestarted"] * 2 and errors["stream_id"].to_list() == ["s0", "s1"]
    for msg in errors["message"]:
        assert "the sink died (its process ended; Ray reported no signal or exit code); restarted, " in msg
        assert str(killed[0]) not in msg and "actor" not in msg.replace("the sink", "")



def test_a_sink_past_its_restart_budget_ends_the_run_with_one_line(ray_session, tiny_checkpoint, tmp_path):
    cfg = make_cfg(tiny_checkpoint, [synthetic("z", 1, 6.0)], source_actors=1, max_restarts_per_hour=0)
    killed, on_progress = kill_when("SinkActor", 4)
    out = tmp_path / "out"
    summary = run(cfg, out, on_progress=on_progress)
    assert killed and summary.exit_code == 1 and summary.restarts == 1
    assert summary.fatal == "the sink died more than 0 times within an hour; rows not committed are redone on resume"
    committed = ids_by_stream(out).get("z", []) if (out / "windows").exists() else []
    assert summary.committed.get("z", 0) == len(committed) and committed == list(range(len(committed)))


def test_a_model_actor_killed_mid_run_writes_one_row_per_stream_naming_the_death(ray_session, tiny_checkpoint, tmp_path):
    cfg = make_cfg(tiny_checkpoint, [synthetic(f"m{i}", i, 6.0) for i in range(2)], source_actors=1)
    killed, on_progress = kill_when("ModelActor", 5)
    out = tmp_path / "out"
    summary = run(cfg, out, on_progress=on_progress)
    n = 11  # 6 s at 1 s / 0.5 s
    assert killed and summary.exit_code == 0 and summary.restarts == 1, summary.fatal
    assert ids_by_stream(out) == {"m0": list(range(n)), "m1": list(range(n))}
    errors = rows(out, "errors").sort("stream_id")
    assert errors["kind"].to_list() == ["ModelRestarted"] * 2 and errors["stream_id"].to_list() == ["m0", "m1"]
    assert all("model replica 0 died (its process ended; Ray reported no signal or exit code); restarted, " in m
               and m.endswith("windows resent, state reset") for m in errors["message"])


def test_a_distill_actor_killed_mid_run_resumes_its_student_from_the_checkpoint(ray_session, tiny_checkpoint, tmp_path):
    cfg = make_cfg(tiny_checkpoint, [synthetic(f"d{i}", i, 6.0) for i in range(2)], source_actors=1)
    distill = {"enabled": True, "checkpoint_every": 1, "student": {"encoder": {"num_latents": 4}}}
    cfg = parse_config({**cfg.model_dump(mode="json"), "distill": distill})
    killed: list[int] = []

    def on_progress(p: RunningPipeline) -> None:  # once the student has a checkpoint
        if not killed and (student_checkpoint_path(out) / "config.json").is_file():
            killed.append(kill_by_title("DistillActor", ray.get(p.sink.info.remote())["pid"]))

    out = tmp_path / "out"
    summary = run(cfg, out, on_progress=on_progress)
    assert killed and summary.exit_code == 0 and summary.restarts == 1, summary.fatal
    assert summary.distill is not None and "error" not in summary.distill and summary.distill["resumed"]
    assert ids_by_stream(out) == {"d0": list(range(11)), "d1": list(range(11))}
    errors = rows(out, "errors").filter(pl.col("kind") == "DistillRestarted").sort("stream_id")
    assert errors["stream_id"].to_list() == ["d0", "d1"]
    assert all(re.search(r"the distill actor died \(its process ended; Ray reported no signal or exit code\); "
                         r"restarted from its student checkpoint at step [1-9]", m) for m in errors["message"])
