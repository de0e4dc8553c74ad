"""Live sources against a local HTTP server: stall detection, dropped connections, reconnects
with backoff, giving up, unreachable URLs. Media time continues across a reconnect."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from clips import write_clip
from live_server import ScriptedServer
from pipeline import read_windows
from pipeline.errors import SourceOpenError, SourceReconnected, SourceTimeout
from pipeline.sources.policy import SourceSettings, is_url

FAST = {"open_timeout_s": 1.0, "read_timeout_s": 0.5, "reconnect_tries": 2, "reconnect_backoff_s": 0.05}


@pytest.fixture(scope="module")
def ts_bytes(tmp_path_factory):
    path = write_clip(tmp_path_factory.mktemp("live") / "live.ts", seconds=4, video_codec="libx264",
                      audio_codec="aac", container_format="mpegts")
    return path.read_bytes()


def run(url: str, errors: list) -> tuple[list, Exception | None]:
    got, raised = [], None
    try:
        for w in read_windows({"id": "live0", "video": url, "audio": "same"}, sources=FAST, on_error=errors.append):
            got.append(w)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        raised = e
    return got, raised


def check_continuous(ws: list) -> None:
    ids = [w.window_id for w in ws]
    assert ids == list(range(len(ids)))  # numbering continues across the break
    times = np.concatenate([w.video_t for w in ws])
    assert np.all(np.diff(np.unique(times)) > 0)
    assert all(w.has_video and w.has_audio for w in ws)


@pytest.mark.parametrize("first", ["stall", "drop"])
def test_reconnect_after_stall_or_drop(ts_bytes, first):
    errors = []
    with ScriptedServer(ts_bytes, [(first, len(ts_bytes) // 2), ("full",)]) as server:
        ws, raised = run(server.url, errors)
    assert raised is None and server.connections == 2
    assert len(errors) == 1 and isinstance(errors[0], SourceReconnected)
    assert ("stalled" if first == "stall" else "dropped") in str(errors[0])
    assert "live0" in str(errors[0]) and server.url in str(errors[0])
    check_continuous(ws)
    gaps = [w.window_id for w in ws if w.gap]
    assert len(gaps) == 1 and 1 <= gaps[0] < len(ws) - 1
    # Half a clip, then the whole clip again after it: more windows than one pass gives (7).
    assert len(ws) > 7


def test_gives_up_after_reconnect_tries_and_keeps_earlier_windows(ts_bytes):
    errors = []
    with ScriptedServer(ts_bytes, [("stall", len(ts_bytes) // 2), ("mute",)]) as server:
        ws, raised = run(server.url, errors)
    assert isinstance(raised, SourceTimeout) and "gave up after reconnect_tries=2" in str(raised)
    assert server.connections == 3  # the first connection and two failed reconnects
    assert errors == [] and ws
    check_continuous(ws)


def test_repeated_breaks_each_reported(ts_bytes):
    errors = []
    script = [("drop", len(ts_bytes) // 3), ("stall", len(ts_bytes) // 2), ("mute",), ("full",)]
    with ScriptedServer(ts_bytes, script) as server:
        ws, raised = run(server.url, errors)
    assert raised is None
    assert [type(e) for e in errors] == [SourceReconnected, SourceReconnected]
    assert "reconnected (attempt 2)" in str(errors[1])  # one failed open before it came back
    check_continuous(ws)
    assert sum(w.gap for w in ws) == 2


def test_unreachable_url_is_retried_then_given_up():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cam.ts"
    errors = []
    with pytest.raises(SourceOpenError, match="could not be opened.*gave up after reconnect_tries=2") as e:
        list(read_windows({"id": "cam0", "video": url}, sources=FAST, on_error=errors.append))
    assert url in str(e.value) and "cam0" in str(e.value)
    # The first failure is reported at once (a camera down at start shows before it gives up).
    assert [type(x) for x in errors] == [SourceOpenError]


def test_open_timeout(ts_bytes):
    with ScriptedServer(ts_bytes, [("mute",)]) as server:
        with pytest.raises(SourceTimeout, match="open_timeout_s=1.0"):
            list(read_windows({"id": "cam0", "video": server.url}, sources={**FAST, "reconnect_tries": 0}))


def test_is_url_and_settings():
    assert is_url("rtsp://cam/stream") and is_url("https://x/y.ts") and not is_url("clips/a.mp4")
    assert not is_url("file:///tmp/a.mp4") and not is_url("C:/videos/a.mp4")
    assert SourceSettings.of({"read_timeout_s": 2}).read_timeout_s == 2
    assert SourceSettings.of(None) == SourceSettings()
