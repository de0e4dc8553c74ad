"""No credential is ever written: a run with a camera URL carrying a password (down at start) and
another whose password comes from ``${CAM_PASSWORD}``; the secrets are searched for in the console,
every file of the output folder (raw bytes, and every table with its metadata read back), the
``inspect`` output, Ray's session logs and a ``/metrics`` scrape."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import run_pipeline
from perceiver_stream.checkpoint import read_config
from pipeline.resume import CONFIG_FILE

SECRET = "pa55-in-yaml"  # written in the config file
ENV_SECRET = "pa55-from-env"  # only in the environment


def closed_port() -> int:
    """A local port nothing listens on (a camera that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leaks(data: bytes) -> list[str]:
    return [s for s in (SECRET, ENV_SECRET) if s.encode() in data]


def table_text(path: Path) -> bytes:
    """A part file's rows, schema metadata and file key-value metadata, as text."""
    meta = pq.read_metadata(path)
    table = pq.read_table(path)
    return repr((table.to_pylist(), table.schema.metadata, meta.metadata, str(table.schema))).encode()


def scrape_metrics(ray, stream: str) -> str:
    """This session's Prometheus endpoint, once it shows a series of ``stream`` (Ray exports ~10 s late)."""
    node = next(n for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id())
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + 30
    while True:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if f'stream="{stream}"' in body or time.monotonic() > deadline:
            return body
        time.sleep(1)


def test_no_secret_in_console_outputs_logs_or_metrics(ray_session, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAM_PASSWORD", ENV_SECRET)
    monkeypatch.setenv("COLUMNS", "1000")  # rich would fold a long error across lines
    port = closed_port()
    cfg = {
        "streams": [
            {"id": "sim", "synthetic": {"seed": 3, "seconds": 2.0}},
            {"id": "cam", "video": f"http://user:{SECRET}@127.0.0.1:{port}/x.ts?token={SECRET}"},
            {"id": "envcam", "video": f"rtsp://user:${{CAM_PASSWORD}}@127.0.0.1:{port}/live"},
        ],
        **read_config(tiny_checkpoint)[1]["data"],
        "sources": {"open_timeout_s": 1.0, "read_timeout_s": 1.0, "reconnect_tries": 0, "reconnect_backoff_s": 0.0},
        "model": {"checkpoint": str(tiny_checkpoint), "device": "cpu", "batch_size": 4, "max_wait_ms": 20},
    }
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"

    code = run_pipeline.main(["--config", str(cfg_file), "--output", str(out), "--no-progress", "--status-every", "0",
                              "--log-level", "debug", "--log-format", "json"])
    assert run_pipeline.main(["inspect", str(out)]) == 0
    console = capsys.readouterr()
    text = console.out + console.err
    assert code == 3  # the cameras fail, the synthetic stream finishes
    assert "user:***@127.0.0.1" in text and "token=***" in text  # the URLs did reach the console, redacted
    assert '"msg": "status: ' in console.err  # JSON status lines while it ran
    assert leaks(text.encode()) == []

    files = [p for p in out.rglob("*") if p.is_file()]
    parts = [p for p in files if p.suffix == ".parquet"]
    assert len(parts) >= 3 and any("errors" in p.parts for p in parts)
    for path in files:
        assert leaks(path.read_bytes()) == [], path
    errors = b""
    for path in parts:
        errors += table_text(path) if "errors" in path.parts else b""
        assert leaks(table_text(path)) == [], path
    assert b"user:***@127.0.0.1" in errors  # the errors rows name the cameras, redacted
    saved = (out / CONFIG_FILE).read_text()
    assert "${CAM_PASSWORD}" in saved and "user:***@" in saved

    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    named = [p for p in logs if f"user:***@127.0.0.1:{port}".encode() in p.read_bytes()]
    assert named  # the source pool logged the cameras' failures (redacted) into its worker log
    for path in logs:
        assert leaks(path.read_bytes()) == [], path

    body = scrape_metrics(ray_session, "cam")
    assert 'stream="cam"' in body  # the camera's failure was counted, so its series were exported
    assert leaks(body.encode()) == []
