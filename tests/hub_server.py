"""A stand-in for the weight servers a real cluster downloads from, on 127.0.0.1: plain URLs (torch hub's
download.pytorch.org) and the Hugging Face hub's `/{repo}/resolve/{revision}/{file}` (timm's weights), counting
every GET so a test can tell how many downloads a run made."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, files: dict[str, Path]):
        """`files`: URL path (e.g. "/timm/test_resnet.r160_in1k/resolve/main/model.safetensors") -> local file."""
        self.files = files
        self.gets: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = server.files.get(self.path.split("?")[0])
                if path is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")  # the hub's answer for a missing file
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if body:
                    server.gets[self.path] += 1
                    self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (a machine without network, as far as a download can tell)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
