"""Small pieces shared by the project's JSON-over-HTTP servers (stdlib `http.server`).

Written for the reward server and meant for any other one (the rollout server can take them
without importing `reward`): the faults they avoid are the usual ones of a hand-rolled handler:

- the bearer token is compared in constant time (`hmac.compare_digest`) and checked from the
  headers alone, before a byte of the body is read;
- a body must announce its size (`Content-Length`; chunked bodies get 411) and one over the limit
  is refused (413) before it is read;
- a body that stops short never blocks a handler thread for ever: the handler's socket timeout
  turns the stalled read into a 408;
- malformed JSON, and JSON nested deeper than a small bound, is a 400, never a 500 from a
  `RecursionError` somewhere later;
- every error is `{"error": {"type": ..., "message": ...}}`; a response after which the unread
  body would corrupt the connection closes it.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

# Deeper than any request the project sends (a reward request is 4 levels deep), shallow enough
# that nothing downstream can run out of recursion on it.
MAX_JSON_DEPTH = 32


class HTTPError(Exception):
    """An error answer: status, a short machine-readable `kind`, a message naming what was wrong.

    `close` asks the handler to drop the connection after answering (set when the body was not
    read); `headers` are extra response headers (e.g. Retry-After).
    """

    def __init__(self, status: int, kind: str, message: str, *, close: bool = False,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.close = close
        self.headers = dict(headers or {})


def error_payload(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Whether an `Authorization` header carries `Bearer <token>`, compared in constant time."""
    if authorization is None:
        return False
    # http.server decodes header bytes as latin-1, so encoding back gives the bytes that were sent.
    sent = authorization.encode("latin-1", errors="replace")
    return hmac.compare_digest(sent, b"Bearer " + token.encode("utf-8"))


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests containers more than `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (the standard has no NaN or infinities)")


def read_json_body(handler: BaseHTTPRequestHandler, max_bytes: int, *,
                   max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read and parse the request's JSON body, or raise `HTTPError` (411, 400, 413, 408).

    The size is checked from the headers before reading; the read itself is bounded by the
    handler's socket timeout (set `timeout` on the handler class).
    """
    if handler.headers.get("Transfer-Encoding"):
        raise HTTPError(411, "length_required",
                        "chunked request bodies are not supported: send a Content-Length", close=True)
    length = handler.headers.get("Content-Length")
    if length is None:
        raise HTTPError(411, "length_required", "a JSON body with a Content-Length header is required",
                        close=True)
    digits = length.strip()
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:  # int() of a 5,000-digit string raises
        raise HTTPError(400, "invalid_request", f"Content-Length must be a non-negative integer, got {length!r:.40}",
                        close=True)
    size = int(digits)
    if size > max_bytes:
        raise HTTPError(413, "too_large", f"request body of {size} bytes is over the limit of {max_bytes} bytes",
                        close=True)
    try:
        raw = handler.rfile.read(size)
    except TimeoutError:
        raise HTTPError(408, "timeout", f"the request body did not arrive in full ({size} bytes announced) "
                        "within the socket timeout", close=True) from None
    if len(raw) < size:
        raise HTTPError(400, "invalid_request", f"the request body ended after {len(raw)} of {size} announced bytes",
                        close=True)
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise HTTPError(400, "invalid_request", "the request body is JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise HTTPError(400, "invalid_request", f"the request body is not valid JSON: {e}") from None
    if json_depth_exceeds(body, max_depth):
        raise HTTPError(400, "invalid_request", f"the request body is JSON nested deeper than {max_depth} levels")
    return body


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: Any, *,
              headers: Mapping[str, str] | None = None, close: bool = False) -> None:
    """Send `payload` as JSON. Raises ValueError (before sending anything) for NaN or infinity."""
    # ASCII escapes: a lone surrogate that arrived as "\udc80" in a request goes back the same way.
    data = json.dumps(payload, allow_nan=False).encode("ascii")
    handler.send_response(status, HTTPStatus(status).phrase)
    handler.send_header("Content-Type", "application/json; charset=utf-8")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    if close:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    handler.wfile.write(data)


def send_error(handler: BaseHTTPRequestHandler, error: HTTPError) -> None:
    """Answer `error`; if it closes the connection, close it without losing the answer."""
    send_json(handler, error.status, error_payload(error.kind, error.message), headers=error.headers,
              close=error.close)
    if error.close:
        lingering_close(handler)


def lingering_close(handler: BaseHTTPRequestHandler, *, max_bytes: int = 2**20, timeout_s: float = 2.0) -> None:
    """Half-close and discard what the client still sends (bounded), so that closing a socket with
    an unread body does not reset the connection before the client has read our answer."""
    try:
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_WR)
        handler.connection.settimeout(timeout_s)
        deadline, seen = time.monotonic() + timeout_s, 0
        while seen < max_bytes and time.monotonic() < deadline:
            chunk = handler.connection.recv(65536)
            if not chunk:
                break
            seen += len(chunk)
    except OSError:  # the client is gone or silent: nothing more to protect
        pass


_BUSY_BODY = json.dumps(error_payload("overloaded", "too many open connections; retry later")).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class JSONHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server whose handler threads never keep the process alive, with at most
    `max_connections` connections served at once (one thread each): a connection beyond that is
    answered 503 and closed at once, so idle or trickling clients cannot pile up threads."""

    daemon_threads = True
    # socketserver's default backlog of 5 resets connections when a trainer connects in a burst.
    request_queue_size = 1024
    max_connections = 512

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._open = 0
        self._open_lock = threading.Lock()

    @property
    def open_connections(self) -> int:
        return self._open

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
        if full:
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1
