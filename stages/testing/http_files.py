"""A loopback HTTP file server with Range support, for download tests and the kill trials (stdlib only).

Subclass `RangeFileHandler`, set `files` (name -> bytes) and override `send_body` to shape the transfer (throttle it,
drop it); `serve(handler)` runs it on 127.0.0.1 and yields the base URL.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class RangeFileHandler(BaseHTTPRequestHandler):
    """GET/HEAD /<mode>/<name> or /<name>: the file's bytes, from the `Range: bytes=N-` offset when `honours_range`."""

    files: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.respond(send_body=False)

    def do_GET(self):
        self.respond(send_body=True)

    def mode_and_name(self) -> tuple[str, str]:
        mode, _, name = self.path.strip("/").rpartition("/")
        return mode, name

    def honours_range(self, mode: str) -> bool:
        return True

    def respond(self, send_body: bool) -> None:
        mode, name = self.mode_and_name()
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        range_header = self.headers.get("Range")
        honour = self.honours_range(mode)
        start = int(range_header[6:].split("-")[0]) if range_header and honour else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes" if honour else "none")
        self.end_headers()
        if send_body:
            self.send_body(mode, data, start, range_header)

    def send_body(self, mode: str, data: bytes, start: int, range_header: str | None) -> None:
        self.wfile.write(data[start:])


@contextmanager
def serve(handler: type[RangeFileHandler]) -> Iterator[str]:
    """Run `handler` on 127.0.0.1 (a free port) in a thread; yields "http://127.0.0.1:PORT"."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
