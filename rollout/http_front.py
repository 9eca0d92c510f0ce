"""The HTTP side of the rollout server: request handler, JSON body reading, request-field parsing.

Kept apart from `rollout.server` (the endpoints and the scheduler) so each stays readable. The
handler refuses as early as it can: an unknown route or a wrong API key is answered from the
headers alone, before the body is read (the connection is then closed, since the unread body
would otherwise be taken for the next request); a body is read under a socket timeout, so a
client that announces more bytes than it sends ties a handler thread up for that long only.
"""

from __future__ import annotations

import hmac
import json
import select
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from rollout.types import GenerationCancelled, InvalidRequestError, WeightSyncError

if TYPE_CHECKING:
    from rollout.server import RolloutServer

MAX_BODY_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 32  # a chat request needs 5 levels (body, messages, message, content parts, part)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def unavailable(message: str) -> HTTPError:
    return HTTPError(503, message, "service_unavailable")


def get(body: dict, key: str, default: Any) -> Any:
    """A request field, with JSON null meaning "not given" as OpenAI clients use it."""
    value = body.get(key)
    return default if value is None else value


def flag(body: dict, key: str) -> bool:
    """A boolean request field: true, false or null (= false); anything else is refused, since
    Python's truth of e.g. the string "false" is True."""
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{key} must be true or false, got {value!r:.40}")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in children)
    return depth


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog: socketserver's default of 5 resets connections when many clients
    # (a trainer's rollout burst) connect at once.
    request_queue_size = 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> RolloutServer:
        return self.server.app  # type: ignore[attr-defined]

    def setup(self) -> None:
        # StreamRequestHandler applies `timeout` to the connection's socket: reading the request
        # line, the headers or the body raises TimeoutError once the client stalls that long.
        self.timeout = self.app.request_timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise here
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _authorized(self) -> bool:
        key = self.app.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        # Constant-time: the time to refuse must not tell how many leading characters matched.
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def _client_gone(self) -> bool:
        """Whether the client closed its side: the socket reads as end-of-file (data waiting, e.g. a
        pipelined next request, means it is still there)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed
            return True

    def _dispatch(self, method: str) -> None:
        app = self.app
        app._request_started()
        app._client.gone = self._client_gone
        try:
            path = self.path.split("?", 1)[0]
            route = app.routes().get((method, path))
            if route is None:
                self.close_connection = True  # the body, if any, stays unread
                raise HTTPError(404, f"no route {method} {path}", "not_found_error")
            if path != "/health" and not self._authorized():
                self.close_connection = True
                raise HTTPError(401, "missing or wrong API key", "authentication_error")
            if app.closing and path != "/health":
                self.close_connection = True
                raise unavailable("the server is shutting down")
            body = self._read_body() if method == "POST" else {}
            status, payload = route(body)
            self._send(status, payload)
        except HTTPError as e:
            self._send(e.status, {"error": {"message": e.message, "type": e.kind, "code": e.status}})
        except (InvalidRequestError, WeightSyncError) as e:
            self._send(400, {"error": {"message": str(e), "type": "invalid_request_error", "code": 400}})
        except GenerationCancelled as e:
            self._send(503, {"error": {"message": str(e), "type": "service_unavailable", "code": 503}})
        except Exception as e:
            self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "internal_error", "code": 500}})
        finally:
            app._request_finished()

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise HTTPError(411, "a JSON body with a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise HTTPError(408, f"the request body did not arrive within {self.timeout} s") from None
        if len(raw) < int(length):
            self.close_connection = True
            raise HTTPError(400, f"the request body ended after {len(raw)} of {length} bytes")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise HTTPError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        if json_depth(body) > MAX_JSON_DEPTH:
            raise HTTPError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
        return body

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away; nothing left to tell it
            self.close_connection = True
