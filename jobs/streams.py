"""``streams add|remove|list``: change the streams of a running pipeline through its control
endpoint (`actors.control`), found in its output folder's ``_control.json``. No Ray: plain HTTP to
127.0.0.1 with the run's token."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.stream_set import CONTROL_FILE

TIMEOUT_S = 90.0


def add_streams_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``streams``."""
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("entry", nargs="?", help="add: a stream entry as YAML or JSON, e.g. '{id: cam9, video: rtsp://...}'; "
                                            "remove: the stream id")
    p.add_argument("--output", type=Path, default=Path("outputs"), help="the running pipeline's output folder")
    for key in ("id", "video", "audio", "points", "node"):
        p.add_argument(f"--{key}", help=f"add: the stream's {key} (instead of an entry)")


def stream_entry(args: argparse.Namespace) -> dict[str, Any]:
    """The stream entry ``add`` sends: the YAML/JSON ``entry`` or the ``--id/--video/...`` options;
    local paths made absolute (the run resolves nothing against this shell's folder)."""
    if args.entry is not None:
        entry = yaml.safe_load(args.entry)
        if not isinstance(entry, dict):
            raise ConfigError(f"a stream entry is a mapping such as '{{id: cam9, video: cam9.mp4}}', got {args.entry!r}")
    else:
        entry = {k: getattr(args, k) for k in ("id", "video", "audio", "points", "node") if getattr(args, k) is not None}
    for key in ("video", "audio", "points"):
        value = entry.get(key)
        if isinstance(value, str) and "://" not in value and value != "same":
            entry[key] = str(Path(value).expanduser().resolve())
    return entry


def request(output: Path, body: dict[str, Any]) -> Any:
    """Send ``body`` to the pipeline running into ``output``; its answer (`ConfigError` with the
    run's message when it refuses)."""
    try:
        control = json.loads((output / CONTROL_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no pipeline is running into {output} (it has no {CONTROL_FILE})") from None
    req = urllib.request.Request(
        f"http://127.0.0.1:{control['port']}/streams", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {control['token']}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ConfigError(json.loads(exc.read() or b"{}").get("error", str(exc))) from None
    except urllib.error.URLError as exc:
        raise ConfigError(f"the pipeline running into {output} did not answer ({exc.reason}); has it ended?") from None


def cmd_streams(args: argparse.Namespace) -> int:
    """Run ``streams``: prints the run's answer as JSON."""
    if args.action == "list":
        body: dict[str, Any] = {"op": "list"}
    elif args.action == "remove":
        if args.entry is None and args.id is None:
            raise ConfigError("streams remove: name the stream (streams remove ID)")
        body = {"op": "remove", "id": args.entry or args.id}
    else:
        body = {"op": "add", "stream": stream_entry(args)}
    print(json.dumps(request(args.output, body), indent=1))
    return 0
