"""Redaction of URLs in text, ``${NAME}`` substitution at load, and what the saved config keeps."""

from __future__ import annotations

import io
import json
import logging

import pytest

from pipeline.config import config_hash, parse_config
from pipeline.errors import ConfigError, SourceOpenError
from pipeline.logs import setup_logging
from pipeline.redact import redact_text
from pipeline.resume import effective_config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://user:secret@127.0.0.1:9/x.ts", "http://user:***@127.0.0.1:9/x.ts"),
        ("refused: 'rtsp://admin:p@ss@cam:554/s' (111)", "refused: 'rtsp://admin:***@cam:554/s' (111)"),
        ("https://tok3n@example.com/a", "https://***@example.com/a"),
        ("http://cam/x?user=a&password=hunter2&Signature=ab#f", "http://cam/x?user=a&password=***&Signature=***#f"),
        ("s3://b/k?X-Amz-Credential=AKIA&X-Amz-Security-Token=zz",
         "s3://b/k?X-Amz-Credential=***&X-Amz-Security-Token=***"),
        ("rtsp://u:${CAM_PASSWORD}@cam/s?token=${TOKEN}", "rtsp://u:${CAM_PASSWORD}@cam/s?token=${TOKEN}"),
        ("rtsp://u:x${CAM_PASSWORD}@cam/s", "rtsp://u:***@cam/s"),
        ("/data/clips/cam0.mp4 and file:///tmp/a.mp4 and ray://head:10001", None),
        ("mail me at someone@example.com, a=b", None),
    ],
)
def test_redact_text(text, expected):
    assert redact_text(text) == (text if expected is None else expected)


def test_pipeline_errors_are_redacted_when_raised():
    err = SourceOpenError("could not open http://u:pw1@h/x (refused)", stream_id="cam", source="http://u:pw1@h/x")
    assert "pw1" not in str(err) and err.source == "http://u:***@h/x" and "u:***@h/x (refused)" in str(err)


def test_env_substitution_at_load_and_the_saved_form(monkeypatch):
    monkeypatch.setenv("CAM_PASSWORD", "s3cret")
    monkeypatch.setenv("CAM_HOST", "cam0.local")
    data = {"streams": [{"id": "a", "synthetic": {"seed": 1}},
                        {"id": "cam", "video": "rtsp://u:${CAM_PASSWORD}@${CAM_HOST}/s", "audio": "same"}],
            "model": {"batch_size": "${BATCH}"}}
    monkeypatch.setenv("BATCH", "4")
    cfg = parse_config(data)
    assert cfg.streams[1].video == "rtsp://u:s3cret@cam0.local/s" and cfg.model.batch_size == 4
    saved = effective_config(cfg, "/out")
    assert saved["streams"][1]["video"] == "rtsp://u:${CAM_PASSWORD}@${CAM_HOST}/s"
    assert saved["model"]["batch_size"] == "${BATCH}" and saved["output"]["dir"] == "/out"
    assert "s3cret" not in json.dumps(saved)
    hashed = config_hash(cfg)
    monkeypatch.setenv("CAM_PASSWORD", "another")
    assert config_hash(parse_config(data)) == hashed  # the hash reveals nothing of the password

    monkeypatch.delenv("CAM_PASSWORD")
    with pytest.raises(ConfigError, match=r"streams\.1\.video: environment variable CAM_PASSWORD is not set"):
        parse_config(data)


def test_literal_credentials_are_redacted_in_the_saved_config():
    cfg = parse_config({"streams": [{"id": "cam", "video": "http://u:lit3ral@h/x.ts?token=t0k"}]})
    assert effective_config(cfg, "/out")["streams"][0]["video"] == "http://u:***@h/x.ts?token=***"


def test_log_lines_are_redacted_text_and_json():
    out = io.StringIO()
    log = logging.getLogger("test_redact")
    setup_logging("info", "json", stream=out)
    try:
        log.info("opening %s", "rtsp://u:pw2@cam/s", extra={"url": "http://u:pw3@h/x", "windows": 3})
        log.debug("not shown")
        setup_logging("warning", "text", stream=out)
        log.info("not shown either")
        log.warning("dropped rtsp://u:pw4@cam/s")
    finally:
        setup_logging("info", "text")
    first, second = out.getvalue().splitlines()
    rec = json.loads(first)
    assert rec["level"] == "info" and rec["logger"] == "test_redact" and rec["ts"].endswith("+00:00")
    assert rec["msg"] == "opening rtsp://u:***@cam/s" and rec["url"] == "http://u:***@h/x" and rec["windows"] == 3
    assert second.endswith("WARNING test_redact: dropped rtsp://u:***@cam/s")
