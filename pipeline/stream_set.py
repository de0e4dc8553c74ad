"""The streams added and removed while a pipeline runs, kept in its output folder.

``<output>/_streams.json`` holds ``{"added": {id: stream entry}, "removed": [id, ...]}``: what
``streams add`` / ``streams remove`` changed against the config. A run into that folder applies it
(`with_saved_streams`), so a restarted driver resumes the streams added at run time and not the
removed ones; the run's control endpoint (`actors.control`) updates it. ``<output>/_control.json``
tells the ``streams`` command where that endpoint listens (`CONTROL_FILE`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Config, StreamConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.outputfs import open_output
from pipeline.redact import redact_text

STREAMS_FILE = "_streams.json"
CONTROL_FILE = "_control.json"


def read_stream_set(output: str | Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``(added entries by id, removed ids)`` saved in ``output`` (empty when there is none)."""
    out = open_output(output)
    if not out.exists(STREAMS_FILE):
        return {}, []
    data = json.loads(out.read_bytes(STREAMS_FILE))
    return dict(data.get("added", {})), list(data.get("removed", []))


def write_stream_set(output: str | Path, added: dict[str, dict[str, Any]], removed: list[str]) -> None:
    """Save the set atomically (a crash leaves the old file or the new one)."""
    open_output(output).write_bytes(STREAMS_FILE, json.dumps({"added": added, "removed": sorted(removed)}, indent=1).encode())


def with_streams(cfg: Config, streams: list[dict[str, Any]]) -> Config:
    """``cfg`` with these stream entries instead of its own, validated like a config file's
    (`ConfigError` naming the key otherwise)."""
    if not streams:
        raise ConfigError("streams: no stream is left (every one was removed)")
    return parse_config({**cfg.model_dump(mode="json"), "streams": streams})


def with_saved_streams(cfg: Config, output: str | Path) -> Config:
    """``cfg`` with the streams saved in ``output`` added and the removed ones left out."""
    added, removed = read_stream_set(output)
    if not added and not removed:
        return cfg
    keep = [s.model_dump(mode="json") for s in cfg.streams if s.id not in removed and s.id not in added]
    return with_streams(cfg, keep + [entry for sid, entry in added.items() if sid not in removed])


def validate_stream(cfg: Config, entry: dict[str, Any], running: list[str]) -> StreamConfig:
    """The stream ``entry`` validated as one more stream of ``cfg`` (its id must be new to ``running``)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"a stream entry is a mapping, got {type(entry).__name__}")
    secret = [k for k, v in entry.items() if isinstance(v, str) and redact_text(v) != v]
    if secret:
        raise ConfigError(f"streams: {entry.get('id')!r}.{secret[0]} holds a credential; write it as ${{ENV_VAR}} "
                          "(set in the pipeline's environment) so that it is never saved")
    if entry.get("id") in running:
        raise ConfigError(f"streams: a stream {entry.get('id')!r} is already running")
    new = with_streams(cfg, [s.model_dump(mode="json") for s in cfg.streams if s.id != entry.get("id")] + [entry])
    return new.streams[-1]
