"""Live sources against a local HTTP server: stall detection, dropped connections, reconnects
with backoff, giving up, a camera that comes up late, when an end of data ends the stream,
skipping to the live edge, arrival wall times. Media time continues across a reconnect."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from clips import write_clip
from live_server import ScriptedServer
from pipeline import read_windows
from pipeline.config import parse_config
from pipeline.errors import ConfigError, LagSkipped, SourceOpenError, SourceReconnected, SourceTimeout
from pipeline.sources.policy import SourceSettings, backoff_s, is_endless, is_live, is_url

FAST = {"open_timeout_s": 1.0, "read_timeout_s": 0.5, "reconnect_tries": 2, "reconnect_backoff_s": 0.05}


@pytest.fixture(scope="module")
def ts_bytes(tmp_path_factory):
    path = write_clip(tmp_path_factory.mktemp("live") / "live.ts", seconds=4, video_codec="libx264",
                      audio_codec="aac", container_format="mpegts")
    return path.read_bytes()


@pytest.fixture(scope="module")
def gop_bytes(tmp_path_factory):
    """8 s of video only, a keyframe every 0.4 s: where a skip to the live edge can land."""
    path = write_clip(tmp_path_factory.mktemp("live") / "gop.ts", seconds=8, video_codec="libx264",
                      audio_codec=None, container_format="mpegts", gop=10)
    return path.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(url: str, errors: list, sources: dict = FAST, **spec) -> tuple[list, Exception | None]:
    got, raised = [], None
    try:
        for w in read_windows({"id": "live0", "video": url, "audio": "same", **spec}, sources=sources, on_error=errors.append):
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
    url = f"http://127.0.0.1:{free_port()}/cam.ts"
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


FOREVER = {**FAST, "reconnect_tries": None, "reconnect_backoff_s": 0.1, "max_backoff_s": 0.4}


def test_camera_down_at_start_is_waited_for(ts_bytes):
    port, errors, servers = free_port(), [], []
    # Refused for 1.5 s (a bound socket would accept), tried after 0.1 + 0.2 + 0.4 + 0.4 ... s.
    up = threading.Timer(1.5, lambda: servers.append(ScriptedServer(ts_bytes, [("full",)], port=port).__enter__()))
    t0 = time.time()
    up.start()
    try:
        ws, raised = run(f"http://127.0.0.1:{port}/live.ts", errors, FOREVER)
    finally:
        up.join()
        servers[0].__exit__()
    assert raised is None
    assert [type(e) for e in errors] == [SourceOpenError, SourceReconnected]
    assert "down at start (could not be opened" in str(errors[1]) and "reconnected (attempt" in str(errors[1])
    assert int(str(errors[1]).split("attempt ")[1].rstrip(")")) >= 3
    check_continuous(ws)
    assert len(ws) == 7 and not any(w.gap for w in ws)  # the whole 4 s clip once it is up
    assert all(t0 + 1.5 <= w.t_wall <= time.time() for w in ws)  # arrival, after it came up
    assert [w.t_wall for w in ws] == sorted(w.t_wall for w in ws)


def test_camera_that_drops_and_comes_back_late(ts_bytes):
    port, errors, servers = free_port(), [], []
    first = ScriptedServer(ts_bytes, [("drop", len(ts_bytes) // 2)], port=port).__enter__()

    def swap() -> None:  # the camera goes away after its first connection, back 1.5 s later
        while first.connections == 0:
            time.sleep(0.01)
        first.__exit__()
        time.sleep(1.5)
        servers.append(ScriptedServer(ts_bytes, [("full",)], port=port).__enter__())

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        ws, raised = run(first.url, errors, FOREVER)
    finally:
        swapper.join()
        servers[0].__exit__()
    assert raised is None and servers[0].connections == 1
    assert [type(e) for e in errors] == [SourceReconnected]
    assert "dropped" in str(errors[0])
    check_continuous(ws)  # ids continue across the outage
    gaps = [i for i, w in enumerate(ws) if w.gap]
    assert len(gaps) == 1
    # The whole clip again after the break: at least its 7 windows are delivered after it came up.
    assert len(ws) - gaps[0] >= 7
    assert ws[gaps[0]].t_wall - ws[gaps[0] - 1].t_wall >= 1.5


def test_finite_body_without_content_length_ends_once(ts_bytes):
    errors = []
    with ScriptedServer(ts_bytes, [("nolength",)]) as server:
        ws, raised = run(server.url, errors)
    assert raised is None and server.connections == 1 and errors == []
    check_continuous(ws)
    assert len(ws) == 7 and not any(w.gap for w in ws)


def test_live_http_source_reconnects_at_its_end(ts_bytes):
    errors = []
    sources = {**FAST, "open_timeout_s": 0.5}
    with ScriptedServer(ts_bytes, [("nolength",), ("full",), ("mute",)]) as server:
        ws, raised = run(server.url, errors, sources, live=True)
    # Two bodies, each end a drop (FFmpeg's I/O error without a length, a clean end with one);
    # then two reconnects that time out, and it gives up.
    assert isinstance(raised, SourceTimeout) and "gave up after reconnect_tries=2" in str(raised)
    assert "the source ended" in str(raised) and server.connections == 4
    assert [type(e) for e in errors] == [SourceReconnected] and "dropped" in str(errors[0])
    check_continuous(ws)
    assert sum(w.gap for w in ws) == 1 and len(ws) >= 14


@pytest.mark.parametrize("max_lag_s", [1.0, None])
def test_a_slow_consumer_skips_to_the_live_edge(gop_bytes, max_lag_s):
    # The feed arrives at 4x real time, the consumer takes 0.25 s a window: half its speed.
    errors, ws = [], []
    with ScriptedServer(gop_bytes, [("paced", len(gop_bytes) / 2)]) as server:
        for w in read_windows({"id": "cam0", "video": server.url}, sources=FAST, max_lag_s=max_lag_s,
                              on_error=errors.append):
            ws.append(w)
            time.sleep(0.25)
    ids = [w.window_id for w in ws]
    assert ids == sorted(set(ids))
    if max_lag_s is None:
        assert errors == [] and ids == list(range(15)) and not any(w.gap for w in ws)
        return
    assert errors and all(isinstance(e, LagSkipped) for e in errors)
    assert all(e.seconds > 0 and f"skipped {e.seconds:.1f} s" in str(e) for e in errors)
    assert sum(e.seconds for e in errors) > 1.0
    assert len(ws) < 15  # fewer windows than the clip holds: skipped ones are not queued
    assert sum(w.gap for w in ws) >= 1


def test_backoff_schedule_and_source_kinds():
    assert [backoff_s(a, 1.0, 30.0) for a in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(10**6, 0.5, 30.0) == 30.0
    with pytest.raises(ValueError):
        backoff_s(0, 1.0, 30.0)
    assert not SourceSettings(reconnect_tries=None).gave_up(10**6)
    assert SourceSettings(reconnect_tries=2).gave_up(3) and not SourceSettings(reconnect_tries=2).gave_up(2)
    # End of data: files and HTTP bodies end; RTSP/RTMP/UDP/SRT/TCP and devices reconnect; live overrides.
    assert not is_endless("http://cam/x.ts") and not is_endless("/clips/a.mp4")
    assert all(is_endless(u) for u in ("rtsp://cam/s", "rtmp://h/app", "udp://@:1234", "srt://h:9000", "tcp://h:1"))
    assert is_endless("/dev/video0", "v4l2") and is_endless("hw:0", "alsa") and is_endless("default", "pulse")
    assert is_endless("http://cam/mjpeg", live=True) and not is_endless("rtsp://cam/s", live=False)
    assert is_live("/dev/video0", "v4l2") and is_live("clip.ts", live=True) and not is_live("clip.ts")


def test_camera_keys_in_a_config(tmp_path):
    cfg = parse_config({
        "streams": [
            {"id": "door", "video": "rtsp://cam/s", "options": {"rtsp_transport": "tcp", "stimeout": 5000000}},
            {"id": "desk", "video": "/dev/video0", "format": "v4l2"},
            {"id": "mic", "audio": "hw:0", "format": "alsa"},
            {"id": "mjpeg", "video": "http://cam/mjpeg", "live": True},
            {"id": "clip", "video": "clips/a.mp4"},
        ],
        "sources": {"reconnect_tries": None, "max_backoff_s": 60},
        "runtime": {"max_lag_s": 2.5},
    }, base_dir=tmp_path)
    door, desk, mic, mjpeg, clip = cfg.streams
    assert door.options == {"rtsp_transport": "tcp", "stimeout": 5000000} and door.live is None
    assert mic.audio == "hw:0" and desk.video == "/dev/video0"  # device names are not paths
    assert clip.video == str(tmp_path / "clips" / "a.mp4")
    assert mjpeg.live is True and cfg.runtime.max_lag_s == 2.5
    settings = SourceSettings.of(cfg.sources)
    assert settings.reconnect_tries is None and settings.max_backoff_s == 60
    for bad in ({"id": "s", "synthetic": {"seed": 1}, "format": "v4l2"},
                {"id": "s", "points": "scans/", "live": True}):
        with pytest.raises(ConfigError, match="apply to a video or audio source"):
            parse_config({"streams": [bad]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="max_lag_s"):
        parse_config({"streams": [{"id": "s", "video": "a.mp4"}], "runtime": {"max_lag_s": 0}})


def test_format_and_options_reach_ffmpeg(ts_bytes, tmp_path):
    # The named format is the one FFmpeg opens with (an unknown one is an open error naming the
    # stream), options go along.
    raw = tmp_path / "feed"
    raw.write_bytes(ts_bytes)
    ws = list(read_windows({"id": "f", "video": str(raw), "format": "mpegts", "options": {"probesize": 500000}}))
    assert len(ws) == 7
    with pytest.raises(SourceOpenError, match="stream 'f'.*could not be opened"):
        list(read_windows({"id": "f", "video": str(raw), "format": "no-such-format"}))
