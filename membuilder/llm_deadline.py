"""A whole-request deadline for the openai SDK's synchronous HTTP client (used by `membuilder.llm`).

The SDK's `timeout` is handed to every socket operation separately: each read may wait that
long, so a body that arrives one byte at a time never times out. The deadline here is set per
attempt (thread-local: the sync SDK does all of a request's I/O in the calling thread) and every
network operation of the SDK's connection pool waits at most until it, through a wrapper around
the pool's network backend. A request past its deadline fails with the HTTP library's own
timeout error, which the SDK reports as `openai.APITimeoutError`.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from typing import Any

import openai

from membuilder.types import MemBuilderError

__all__ = ["request_deadline", "deadline_http_client", "deadline_classes", "DeadlineSetupError"]


class DeadlineSetupError(MemBuilderError):
    """The deadline could not be installed on the SDK's HTTP client (its internals changed)."""


_deadline = threading.local()


class request_deadline:
    """Context manager: network I/O of this thread's requests must end within `seconds`."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self) -> None:
        _deadline.at = time.monotonic() + self.seconds

    def __exit__(self, *exc_info: Any) -> None:
        _deadline.at = None


def _capped(timeout: float | None, error: type[BaseException]) -> float | None:
    """`timeout` shortened to what is left of this thread's deadline; `error` once it has passed."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's whole-request deadline (timeout_s) has passed")
    return left if timeout is None else min(timeout, left)


@functools.lru_cache(maxsize=None)
def deadline_classes(core: Any) -> tuple[type, type]:
    """Backend and stream wrappers for the HTTP core module `core` the SDK was built on."""

    class DeadlineStream(core.NetworkStream):
        def __init__(self, inner: Any):
            self._inner = inner

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._inner.read(max_bytes, _capped(timeout, core.ReadTimeout))

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._inner.write(buffer, _capped(timeout, core.WriteTimeout))

        def close(self) -> None:
            self._inner.close()

        def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                      timeout: float | None = None) -> Any:
            return DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                        _capped(timeout, core.ConnectTimeout)))

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class DeadlineBackend(core.NetworkBackend):
        def __init__(self, inner: Any):
            self._inner = inner

        def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                        local_address: str | None = None, socket_options: Any = None) -> Any:
            return DeadlineStream(self._inner.connect_tcp(host, port, _capped(timeout, core.ConnectTimeout),
                                                          local_address, socket_options))

        def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
            return DeadlineStream(self._inner.connect_unix_socket(path, _capped(timeout, core.ConnectTimeout),
                                                                  socket_options))

        def sleep(self, seconds: float) -> None:
            self._inner.sleep(seconds)

    return DeadlineBackend, DeadlineStream


def deadline_http_client(timeout_s: float) -> Any:
    """The SDK's default HTTP client (its limits, redirects and proxy settings), with every
    connection pool's network backend wrapped to honour the thread's request deadline.

    The pools' backend is not a public setting of the HTTP library, so the wrapping is checked:
    if no pool could be wrapped (the library changed), this raises rather than silently going
    back to per-read timeouts.
    """
    http_client = openai.DefaultHttpxClient(timeout=timeout_s)
    transports = [getattr(http_client, "_transport", None), *getattr(http_client, "_mounts", {}).values()]
    wrapped = 0
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None:
            continue
        core = importlib.import_module(type(backend).__module__.split(".")[0])
        backend_cls, _ = deadline_classes(core)
        pool._network_backend = backend_cls(backend)
        wrapped += 1
    if not wrapped:
        http_client.close()
        raise DeadlineSetupError("cannot install the whole-request deadline on the openai SDK's HTTP client "
                             f"({type(http_client).__module__}): its connection pool layout is unknown")
    return http_client
