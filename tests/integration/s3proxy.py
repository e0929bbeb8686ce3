"""A counting reverse proxy in front of the S3 API server (moto) the tests run on loopback.

Requests are counted on the server side of a real connection, not inside our client, so a test
can say "one GetObject per object" or "no PUT at all" about what S3 really received. ``fail``
answers 500 to the requests it picks: a broken network path, as the uploader sees it.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Failing = Callable[[str, str], bool]
_HOP_HEADERS = {"connection", "transfer-encoding", "content-length", "keep-alive"}


class S3Proxy:
    """Forwards to ``upstream`` (``http://host:port``); ``url`` is where clients connect."""

    def __init__(self, upstream: str) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (method, path, query)
        self.fail: Failing = lambda method, query: False
        self._lock = threading.Lock()
        parts = urlsplit(upstream)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.record(self.command, self.path)
                if proxy.fail(self.command, urlsplit(self.path).query):
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(host, port, timeout=60)
                conn.request(self.command, self.path, body, dict(self.headers))
                response = conn.getresponse()
                data = response.read()
                conn.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_HEADERS:
                        self.send_header(name, value)
                # A HEAD answer's length is the object's, not that of its (empty) body.
                length_header = response.getheader("Content-Length") or "0"
                size = length_header if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", size)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def record(self, method: str, path: str) -> None:
        parts = urlsplit(path)
        with self._lock:
            self.requests[(method, parts.path, parts.query)] += 1

    def count(self, method: str, query_key: str = "") -> int:
        """Requests of ``method`` whose query string starts with ``query_key`` ("" = none)."""
        with self._lock:
            return sum(
                n
                for (m, _, query), n in self.requests.items()
                if m == method and query.split("=")[0] == query_key
            )

    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def get_objects(self, bucket: str) -> Counter[str]:
        """GetObject requests per key: GETs of /bucket/key (a listing has a query string)."""
        found: Counter[str] = Counter()
        with self._lock:
            for (method, path, query), count in self.requests.items():
                if method == "GET" and path.startswith(f"/{bucket}/") and not query:
                    found[path[len(bucket) + 2 :]] += count
        return found

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
