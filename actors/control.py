"""The run's control endpoint: streams added and removed while it runs (``streams add|remove|list``).

`ControlServer` serves HTTP on 127.0.0.1 only, on a free port, and writes the port and a random
token to ``<output>/_control.json`` (readable by its owner only); a request without that token is
refused. So access is limited to the local machine, and on it to whoever may read the output
folder's control file. The server thread only queues each request; the driver loop answers them
between its steps (`StreamControl.serve`), so the run's bookkeeping stays single-threaded.

- ``add``: the entry is validated like a config file's stream (`pipeline.stream_set`), starts at
  its lowest uncommitted window (the sink's resume point), on the source pool it hashes to.
- ``remove``: the run stops asking for its windows; those in flight run and are committed; then
  its state is ``removed``.
- ``list``: every stream of the run and its state.

Both changes are saved in ``<output>/_streams.json`` before they are answered (an add once its
source is started).
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import secrets
import threading
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.pools import SourcePools
from actors.streams import StreamStatus
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.stream_set import CONTROL_FILE, read_stream_set, validate_stream, write_stream_set

ANSWER_TIMEOUT_S = 60.0  # the driver answers between steps, a fraction of a second apart
MAX_BODY = 1 << 16


class ControlServer:
    """The HTTP endpoint of one run (see the module docstring); `requests` holds what it received."""

    def __init__(self, output: Path) -> None:
        self.requests: queue.Queue[tuple[dict[str, Any], Future]] = queue.Queue()
        self._token = secrets.token_urlsafe(32)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)
        self._thread.start()
        self._file = output / CONTROL_FILE
        output.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"port": self._server.server_address[1], "token": self._token, "pid": os.getpid()}, fh)

    def authorised(self, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(header, f"Bearer {self._token}")

    def close(self) -> None:
        """Stop serving and remove the control file; requests still queued are refused."""
        self._server.shutdown()
        self._server.server_close()
        self._file.unlink(missing_ok=True)
        while not self.requests.empty():
            self.requests.get_nowait()[1].set_exception(ConfigError("the run has ended"))


def _handler(server: ControlServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if not server.authorised(self.headers.get("Authorization")):
                return self._reply(403, {"error": "wrong or missing token (see the output folder's _control.json)"})
            size = int(self.headers.get("Content-Length") or 0)
            if self.path != "/streams" or size > MAX_BODY:
                return self._reply(400, {"error": "POST /streams with a JSON body of at most 64 KiB"})
            try:
                request = json.loads(self.rfile.read(size))
            except ValueError:
                return self._reply(400, {"error": "the body is not JSON"})
            answer: Future = Future()
            server.requests.put((request, answer))
            try:
                self._reply(200, answer.result(timeout=ANSWER_TIMEOUT_S))
            except ConfigError as exc:
                self._reply(400, {"error": str(exc)})
            except TimeoutError:
                self._reply(503, {"error": "the run did not answer in time"})

        def _reply(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # not to the run's console
            pass

    return Handler


class StreamControl:
    """Applies the queued requests to the run: its ``streams`` (the loop's records, by id), its
    ``pools``, the ``sink`` actor (for resume points) and ``max_windows`` per stream."""

    def __init__(self, server: ControlServer, cfg: Config, output: Path, pools: SourcePools, sink: Any,
                 streams: dict[str, StreamStatus], max_windows: int | None) -> None:
        self.server = server
        self.cfg = cfg
        self.output = output
        self.pools = pools
        self.sink = sink
        self.streams = streams
        self.max_windows = max_windows
        self.removed: set[str] = set()
        self._drop: set[str] = set()  # removed, to be dropped from their pool once drained

    def serve(self) -> None:
        """Answer every queued request; drop the drained removed streams from their pools."""
        for sid in [s for s in self._drop if self.streams[s].finished]:
            self._drop.discard(sid)
            self.pools.handle_of(sid).drop.remote(sid)
        while not self.server.requests.empty():
            request, answer = self.server.requests.get_nowait()
            try:
                answer.set_result(self._apply(request))
            except ConfigError as exc:
                answer.set_exception(exc)
            except RayActorError:  # the sink or the stream's pool is restarting
                answer.set_exception(ConfigError("an actor of the run is restarting; try again in a minute"))

    def listing(self) -> list[dict[str, Any]]:
        """Each stream's id, state and windows taken by the sink in this run."""
        return [{"id": sid, "state": "removed" if sid in self.removed and st.finished else
                 ("removing" if sid in self.removed else st.state.value), "windows": st.windows,
                 "start_window": st.start_window} for sid, st in self.streams.items()]

    def _apply(self, request: dict[str, Any]) -> Any:
        op = request.get("op") if isinstance(request, dict) else None
        if op == "list":
            return self.listing()
        if op == "add":
            return self._add(request.get("stream"))
        if op == "remove":
            return self._remove(str(request.get("id")))
        raise ConfigError(f"unknown request {op!r}: add, remove or list")

    def _add(self, entry: Any) -> dict[str, Any]:
        running = [sid for sid, st in self.streams.items() if not st.finished]
        stream = validate_stream(self.cfg, entry, running)
        start = ray.get(self.sink.resume_points.remote([stream.id]))[stream.id]
        self.pools.host(stream)
        self.pools.add({stream.id: (start, 0, self.max_windows)})
        self.cfg = self.cfg.model_copy(update={"streams": [*[s for s in self.cfg.streams if s.id != stream.id], stream]})
        added, removed = read_stream_set(self.output)
        added[stream.id] = entry  # as given: a ${NAME} stays a placeholder in the saved set
        write_stream_set(self.output, added, [r for r in removed if r != stream.id])
        self.removed.discard(stream.id)
        self.streams[stream.id] = StreamStatus(stream.id, start_window=start)
        return {"id": stream.id, "state": "running", "start_window": start}

    def _remove(self, sid: str) -> dict[str, Any]:
        st = self.streams.get(sid)
        if st is None or sid in self.removed:
            raise ConfigError(f"no stream {sid!r} is running (streams list shows them)")
        added, removed = read_stream_set(self.output)
        added.pop(sid, None)
        write_stream_set(self.output, added, sorted({*removed, sid}))
        self.removed.add(sid)
        if st.asks_source:
            st.source_ended()
            self._drop.add(sid)
        return {"id": sid, "state": "removed" if st.finished else "removing"}
