"""Trainer-side client of the reward server: a `RewardFn` over HTTP.

    reward_fn = RemoteReward("http://reward-host:8100", token=os.environ.get("MEMBUILDER_REWARD_TOKEN"))
    rewards = reward_fn(requests)          # list[SessionRewardRequest] -> list[SessionReward], in order

It is called exactly like the in-process reward function, so a trainer switches between the two
with one config field (a URL or none).

Failures: scoring is idempotent, so a connection that cannot be made or breaks before the answer,
and a 503 (server busy or shutting down), are retried `retries` times with exponential backoff
(`backoff_s`, doubling, at most `max_backoff_s`; a longer Retry-After is honoured up to that cap).
Everything else raises `RewardServerError` naming the server and the cause at once: an error
status (with the server's error type and message), an answer that breaks the contract, or no
answer within `timeout_s` (not retried: the server may still be scoring it). Each attempt waits at
most `connect_timeout_s` to connect and `timeout_s` for any one read, so a call that meets a dead
or vanished server ends within about (retries + 1) x (connect_timeout_s + timeout_s) plus the
backoffs; it never hangs.

Safe to call from several threads at once (each call opens its own connection) and picklable.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Sequence

from reward.types import RewardInputError, SessionReward, SessionRewardRequest


class RewardServerError(RuntimeError):
    """The reward server could not give a reward; the message names the server and the cause.

    `status` is the HTTP status (None when no answer came) and `kind` the server's error type.
    """

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.kind = status, kind


class _Retryable(Exception):
    def __init__(self, cause: str, wait_s: float = 0.0):
        super().__init__(cause)
        self.cause, self.wait_s = cause, wait_s


class RemoteReward:
    """A reward server seen as a `RewardFn` (module docstring)."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout_s: float = 600.0,
                 retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 connect_timeout_s: float = 10.0):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port][/prefix], got {base_url!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("timeouts must be > 0; retries, backoff_s and max_backoff_s >= 0")
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        if token is not None and not (token and token.isascii() and token.isprintable()):
            raise ValueError("token must be a non-empty printable ASCII string or None")
        self.token = token
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s

    def __repr__(self) -> str:  # never shows the token
        return f"RemoteReward({self.base_url!r}, token={'***' if self.token else None})"

    def __call__(self, requests: Sequence[SessionRewardRequest]) -> list[SessionReward]:
        """One `SessionReward` per request, in order (the `RewardFn` contract)."""
        requests = list(requests)
        if not requests:
            return []
        if not all(isinstance(r, SessionRewardRequest) for r in requests):
            raise TypeError("RemoteReward takes a list of SessionRewardRequest")
        out = self._call("POST", "/score", {"requests": [r.to_dict() for r in requests]})
        raw = out.get("rewards") if isinstance(out, dict) else None
        if not isinstance(raw, list) or len(raw) != len(requests):
            got = f"{len(raw)} rewards" if isinstance(raw, list) else "no 'rewards' list"
            raise RewardServerError(f"reward server {self.base_url}: {len(requests)} requests got {got}")
        try:
            rewards = [SessionReward.from_dict(d) for d in raw]
        except (RewardInputError, TypeError, ValueError) as e:
            raise RewardServerError(f"reward server {self.base_url} sent a malformed reward: {e}") from None
        for i, (req, rew) in enumerate(zip(requests, rewards)):
            if req.session_id != rew.session_id:
                raise RewardServerError(f"reward server {self.base_url}: reward {i} is for session "
                                        f"{rew.session_id!r}, the request was {req.session_id!r}")
        return rewards

    def health(self) -> dict:
        """The server's /health answer (retried like a score)."""
        return self._call("GET", "/health", None)

    # ---- transport ------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return self._once(method, path, data)
            except _Retryable as r:
                if attempt == self.retries:
                    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                    raise RewardServerError(f"reward server {self.base_url}: {method} {path} failed after "
                                            f"{tries}: {r.cause}") from None
                time.sleep(min(self.max_backoff_s, max(delay, r.wait_s)))
                delay = min(self.max_backoff_s, delay * 2)
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, data: bytes | None) -> dict:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.connect_timeout_s)
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            try:
                conn.connect()
            except TimeoutError:
                raise _Retryable(f"no connection within {self.connect_timeout_s} s") from None
            except OSError as e:  # refused, unreachable, name not resolved
                raise _Retryable(f"cannot connect: {e}") from None
            conn.sock.settimeout(self.timeout_s)
            sent: OSError | None = None
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
            except (BrokenPipeError, ConnectionResetError) as e:
                # The server may have answered early (401, 413) and closed: read that answer below.
                sent = e
            except TimeoutError:
                raise RewardServerError(f"reward server {self.base_url}: {method} {path}: the request could not "
                                        f"be sent within {self.timeout_s} s") from None
            try:
                resp = conn.getresponse()
                status, retry_after, payload = resp.status, resp.getheader("Retry-After"), resp.read()
            except TimeoutError:
                raise RewardServerError(f"reward server {self.base_url}: no answer to {method} {path} within "
                                        f"{self.timeout_s} s") from None
            except (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead) as e:
                cause = sent or e
                raise _Retryable(f"the connection broke: {type(cause).__name__}: {cause}") from None
            except OSError as e:
                raise _Retryable(f"the connection failed: {type(e).__name__}: {e}") from None
            except http.client.HTTPException as e:  # not an HTTP answer at all
                raise RewardServerError(f"reward server {self.base_url}: {method} {path} got no valid HTTP "
                                        f"answer: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError:
            decoded = None
        if status == 200:
            if not isinstance(decoded, dict):
                raise RewardServerError(f"reward server {self.base_url}: {method} {path} answered 200 "
                                        f"without a JSON object", status=status)
            return decoded
        err = decoded.get("error") if isinstance(decoded, dict) else None
        kind = err.get("type") if isinstance(err, dict) else None
        message = err.get("message") if isinstance(err, dict) else payload[:200].decode("utf-8", "replace")
        if status == 503:
            raise _Retryable(f"503 {kind}: {message}", wait_s=_seconds(retry_after))
        raise RewardServerError(f"reward server {self.base_url}: {method} {path} -> {status} {kind}: {message}",
                                status=status, kind=kind)


def _seconds(retry_after: str | None) -> float:
    try:
        return max(0.0, float(retry_after)) if retry_after else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0
