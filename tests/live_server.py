"""A scripted HTTP server on 127.0.0.1 for the live-source tests.

Each connection plays the next step of a script over one payload (an MPEG-TS file's bytes):
``("full",)`` sends it all; ``("nolength",)`` sends it all without a Content-Length header (a
body whose end only the closed connection tells); ``("paced", r)`` sends it all at ``r`` bytes
per second (a live feed, or one faster than real time); ``("stall", n)`` sends ``n`` bytes then
goes silent until the server stops; ``("drop", n)`` sends ``n`` bytes then closes the
connection mid-body; ``("mute",)`` accepts and never answers. Every other response claims the
full length, so a drop is visibly short. ``port`` (0: any free one) lets a test bring a server
up on a URL a source already tries.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedServer:
    """Serves ``payload`` at ``url`` following ``script`` (the last step repeats)."""

    def __init__(self, payload: bytes, script: list[tuple], port: int = 0) -> None:
        self.payload = payload
        self.script = list(script)
        self.connections = 0
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                step = server.script[min(server.connections, len(server.script) - 1)]
                server.connections += 1
                if step[0] == "mute":
                    server.stop.wait(30)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                if step[0] != "nolength":
                    self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                n = step[1] if step[0] in ("stall", "drop") else len(server.payload)
                try:
                    if step[0] == "paced":
                        for i in range(0, n, 4096):
                            self.wfile.write(server.payload[i : i + 4096])
                            self.wfile.flush()
                            time.sleep(4096 / step[1])
                    self.wfile.write(server.payload[:n] if step[0] != "paced" else b"")
                    self.wfile.flush()
                    if step[0] == "stall":
                        server.stop.wait(30)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/live.ts"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
