"""A real HTTP server on a free loopback port that answers from a script, for client fault tests.

Each request pops the next :class:`Reply` from the script (or gets the default reply when the
script is empty); a reply may also be a callable that builds the reply from the request. Every
request is recorded (arrival time, path, headers, body) before the server answers it, so a test
can check what a client sent and when, even for requests the client gave up on.

Example:
    >>> with ScriptedServer([Reply(500), Reply(200, {"ok": True})]) as server:  # doctest: +SKIP
    ...     httpx.post(server.url + "/x")
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Recorded", "Reply", "ScriptedServer"]


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    Args:
        status: the HTTP status code.
        body: bytes or str are sent as they are; anything else is sent as JSON.
        headers: extra response headers (Content-Length is always set from the body).
        delay: seconds to wait before answering (cut short when the server shuts down).
        chunk_delay: when > 0, the body is sent one byte at a time with this pause between bytes.
    """

    status: int = 200
    body: Any = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunk_delay: float = 0.0

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, bytes):
            return self.body, "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return json.dumps(self.body).encode(), "application/json"


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    headers: Mapping[str, str]
    """Header names lower-cased."""
    body: bytes
    arrived: float
    """``time.monotonic()`` when the request had been read."""

    @property
    def json(self) -> Any:
        return json.loads(self.body)


ReplySource = Reply | Callable[[Recorded], Reply]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: ScriptedServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up is expected here: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""

    def do_POST(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Recorded(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            arrived=time.monotonic(),
        )
        reply = owner._next(request)
        if reply.delay > 0 and owner._stopping.wait(reply.delay):
            return  # shutting down: hang up without an answer
        payload, content_type = reply.encoded()
        try:
            self.send_response(reply.status)
            headers = {"Content-Type": content_type, **reply.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if reply.chunk_delay > 0:
                self.wfile.flush()
                for i in range(len(payload)):
                    if owner._stopping.wait(reply.chunk_delay):
                        return
                    self.wfile.write(payload[i : i + 1])
                    self.wfile.flush()
            else:
                self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (timeout) and closed the connection


class ScriptedServer:
    """A threaded HTTP server on ``127.0.0.1:<free port>`` answering from a script.

    Args:
        replies: answered in order, one per request.
        default: the answer once the script is used up; without one such a request gets a 599
            and is counted in :attr:`unscripted`.
    """

    def __init__(self, replies: Iterable[ReplySource] = (), default: ReplySource | None = None) -> None:
        self._script: deque[ReplySource] = deque(replies)
        self._default = default
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests: list[Recorded] = []
        self.unscripted = 0
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._started = False

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, *replies: ReplySource) -> None:
        with self._lock:
            self._script.extend(replies)

    def _next(self, request: Recorded) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._script:
                source: ReplySource | None = self._script.popleft()
            else:
                source = self._default
                if source is None:
                    self.unscripted += 1
        if source is None:
            return Reply(599, {"error": "the test script has no reply for this request"})
        return source(request) if callable(source) else source

    def start(self) -> ScriptedServer:
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._started:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
