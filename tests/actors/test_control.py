"""Streams added and removed while a pipeline runs (``streams add|remove|list`` against its control
endpoint), and a restarted driver that resumes them from the output folder."""

from __future__ import annotations

import json
import threading

import pytest

from actors.runner import run
from actors.streams import RunningPipeline
from jobs.streams import request
from pipeline.errors import ConfigError
from pipeline.stream_set import CONTROL_FILE, STREAMS_FILE
from test_source_pool import ids_by_stream, make_cfg, synthetic


def test_streams_added_and_removed_while_running_commit_and_survive_a_driver_restart(
    ray_session, tiny_checkpoint, tmp_path
):
    cfg = make_cfg(tiny_checkpoint, [synthetic("a", 1, 4.0), synthetic("b", 2, 4.0)], source_actors=1)
    out = tmp_path / "out"
    answers: dict[str, object] = {}

    def control() -> None:
        answers["add"] = request(out, {"op": "add", "stream": synthetic("c", 3, 4.0)})
        answers["remove"] = request(out, {"op": "remove", "id": "b"})
        answers["list"] = {s["id"]: s["state"] for s in request(out, {"op": "list"})}
        for bad in ({"op": "add", "stream": {"id": "d"}}, {"op": "add", "stream": synthetic("a", 9, 1.0)},
                    {"op": "remove", "id": "zz"}):
            try:
                request(out, bad)
            except ConfigError as exc:
                answers.setdefault("refused", []).append(str(exc))

    threads: list[threading.Thread] = []

    def on_progress(p: RunningPipeline) -> None:
        if not threads and p.windows >= 2:
            threads.append(threading.Thread(target=control))
            threads[0].start()

    first = run(cfg, out, max_windows=5, realtime=True, on_progress=on_progress)
    threads[0].join(timeout=30)
    assert first.exit_code == 0 and sorted(first.streams) == ["a", "b", "c"]
    assert answers["add"] == {"id": "c", "state": "running", "start_window": 0}
    assert answers["remove"]["state"] in ("removing", "removed")
    assert answers["list"]["a"] == "running" and answers["list"]["b"] in ("removing", "removed")
    assert [m.split(":")[-1].strip() for m in answers["refused"]] == [
        "needs at least one of video, audio, points or synthetic", "a stream 'a' is already running",
        "no stream 'zz' is running (streams list shows them)"]
    got = ids_by_stream(out)
    k = len(got["b"])  # b stopped early; what it had in flight was committed
    assert got["a"] == got["c"] == list(range(5)) and 1 <= k <= 5 and got["b"] == list(range(k))
    saved = json.loads((out / STREAMS_FILE).read_text())
    assert list(saved["added"]) == ["c"] and saved["removed"] == ["b"]
    assert not (out / CONTROL_FILE).exists()  # only while running

    second = run(cfg, out)  # the same config: c is resumed from the folder, b stays removed
    assert second.exit_code == 0 and sorted(second.streams) == ["a", "c"]
    assert ids_by_stream(out) == {"a": list(range(7)), "b": list(range(k)), "c": list(range(7))}


def test_the_streams_command_needs_a_running_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="no pipeline is running into"):
        request(tmp_path, {"op": "list"})
