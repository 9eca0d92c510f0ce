"""One OpenAI-compatible client for chat and embeddings (OpenAI, vLLM `serve`, our rollout server, ...).

What it adds on top of the `openai` package, and why:
- a whole-request deadline (`membuilder.llm_deadline`): `timeout_s` bounds each HTTP attempt
  from connect to the last byte of the body (the SDK's own timeout is per read, so a server that
  drips one byte at a time could hold a call for minutes); an attempt past its deadline is a
  timeout, retried like one;
- retries with exponential backoff and jitter on transient failures only (connection errors,
  timeouts, HTTP 408/409/429/5xx); any other 4xx fails at once. The SDK's own retries are off
  (`max_retries=0`) so every retry is ours and counted;
- a concurrency limit: one semaphore shared by all threads using the client, held only while a
  request is on the wire (not during backoff sleeps);
- thread-safe accounting of calls, HTTP requests, retries, failures, cache hits and tokens;
- an optional SQLite response cache keyed by a hash of the full request (endpoint, model, messages,
  every sampling parameter), so rerunning an evaluation does not pay twice. Only complete, usable
  completions are stored (not one cut by the token limit or filtered, not an empty one, not one
  the caller's `cache_if` refuses), and a stored one the caller refuses is asked again, so a rerun
  that retries errors really asks the server again;
- typed errors: a failure always raises an `LLMError` subclass carrying the cause; an error text
  is never returned as if it were an answer. A completion cut by the token limit
  (`finish_reason == "length"`) is returned as is, flagged `truncated`: the caller decides.

Responses are read through `with_raw_response` and parsed here, so a malformed body (bad JSON,
HTML, no `choices`, a `usage` that is not counts, duplicate embedding indices) becomes an
`LLMResponseError` naming what was wrong instead of a stray `ValueError`, `TypeError` or
`AttributeError` from inside the SDK or from a silently misordered result.

Environment (explicit arguments win, then the MEMBUILDER_ names, then the OPENAI_ names):
`MEMBUILDER_LLM_BASE_URL` / `OPENAI_BASE_URL`, `MEMBUILDER_LLM_API_KEY` / `OPENAI_API_KEY`,
`MEMBUILDER_LLM_MODEL`; embeddings may use their own endpoint: `MEMBUILDER_EMBED_BASE_URL`,
`MEMBUILDER_EMBED_API_KEY`, `MEMBUILDER_EMBED_MODEL`. Without their own endpoint, embeddings go
to the chat endpoint with the embeddings key, else the chat key; a separate embeddings endpoint
gets the embeddings key only, never the chat or OpenAI key (it may be a third party's host).
`LLMConfig.embedding_endpoint` is that rule, and `membuilder.embedders.OpenAIEmbedder` uses it
too: one configuration path. A local server needs no key: when a base URL is set and no key is
found, the fixed key "not-needed" is sent, because the openai SDK refuses an empty key and
keyless servers ignore it (`endpoint_api_key`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import openai
from tqdm import tqdm

from membuilder.llm_deadline import DeadlineSetupError, deadline_http_client, request_deadline
from membuilder.types import MemBuilderError

ENV_BASE_URL = ("MEMBUILDER_LLM_BASE_URL", "OPENAI_BASE_URL")
ENV_API_KEY = ("MEMBUILDER_LLM_API_KEY", "OPENAI_API_KEY")
ENV_MODEL = ("MEMBUILDER_LLM_MODEL",)
ENV_EMBED_BASE_URL = ("MEMBUILDER_EMBED_BASE_URL",)
ENV_EMBED_API_KEY = ("MEMBUILDER_EMBED_API_KEY",)
ENV_EMBED_MODEL = ("MEMBUILDER_EMBED_MODEL",)
KEYLESS_SERVER_KEY = "not-needed"  # the SDK needs a non-empty key; `vllm serve` and the like ignore it

TRANSIENT_STATUS = frozenset({408, 409, 429})  # plus every 5xx
INCOMPLETE_FINISH_REASONS = frozenset({"length", "content_filter"})


# --- errors -------------------------------------------------------------------------------------


class LLMError(MemBuilderError):
    """Base of every client failure. `cause` is the underlying exception (also `__cause__`)."""

    def __init__(self, message: str, *, cause: BaseException | None = None, attempts: int = 0):
        super().__init__(message)
        self.cause = cause
        self.attempts = attempts


class LLMConfigError(LLMError):
    """No model, no endpoint or no key where one is needed."""


class LLMRequestError(LLMError):
    """The server refused the request with a non-transient status (400, 401, 403, 404, 422, ...)."""

    def __init__(self, message: str, *, status_code: int, cause: BaseException | None = None,
                 attempts: int = 1):
        super().__init__(message, cause=cause, attempts=attempts)
        self.status_code = status_code


class LLMInputError(LLMError, ValueError):
    """The request cannot be sent as given (e.g. a message that is not valid Unicode text)."""


class LLMResponseError(LLMError):
    """The server answered 2xx with a body that is not a valid chat/embeddings response."""


class LLMRetriesExhausted(LLMError):
    """Every attempt failed with a transient error (connection, timeout, 408/409/429/5xx)."""

    def __init__(self, message: str, *, status_code: int | None, cause: BaseException | None,
                 attempts: int):
        super().__init__(message, cause=cause, attempts=attempts)
        self.status_code = status_code


# --- configuration and value types ----------------------------------------------------------------


def _env(names: Sequence[str], environ: Mapping[str, str]) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


@dataclass(frozen=True)
class LLMConfig:
    """Endpoints, limits and cache of an `LLMClient`. Times are in seconds.

    `timeout_s` is a whole-request deadline per HTTP attempt (connect, send, wait, read the body);
    each retry gets a fresh one. Backoff before retry k (0-based): `d = min(backoff_max_s, backoff_base_s * 2**k)`, then
    jittered down to `d * (1 - jitter * u)` with u uniform in [0, 1); a `Retry-After` header
    (seconds) raises the delay to at least its value, still capped at `backoff_max_s`.
    """

    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    embedding_base_url: str | None = None
    embedding_api_key: str | None = None
    embedding_model: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    jitter: float = 0.25
    max_concurrency: int = 8
    cache_path: str | None = None
    embedding_batch_size: int = 256

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise LLMConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise LLMConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.max_concurrency < 1:
            raise LLMConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not 0.0 <= self.jitter <= 1.0:
            raise LLMConfigError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise LLMConfigError("backoff times must be >= 0")
        if self.embedding_batch_size < 1:
            raise LLMConfigError(f"embedding_batch_size must be >= 1, got {self.embedding_batch_size}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "LLMConfig":
        """Config from the environment; keyword arguments that are not None take precedence."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "base_url": _env(ENV_BASE_URL, env),
            "api_key": _env(ENV_API_KEY, env),
            "model": _env(ENV_MODEL, env),
            "embedding_base_url": _env(ENV_EMBED_BASE_URL, env),
            "embedding_api_key": _env(ENV_EMBED_API_KEY, env),
            "embedding_model": _env(ENV_EMBED_MODEL, env),
        }
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise LLMConfigError(f"unknown LLMConfig fields: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def embedding_endpoint(self) -> tuple[str | None, str | None]:
        """(base URL, API key) for embeddings: see the module doc. The key may be None."""
        if self.embedding_base_url:
            # a separate endpoint never receives the chat endpoint's (or OpenAI's) key
            return self.embedding_base_url, self.embedding_api_key
        return self.base_url, self.embedding_api_key or self.api_key


def endpoint_api_key(base_url: str | None, api_key: str | None) -> str:
    """The key to send: `api_key`; "not-needed" for a keyless server at `base_url`; else `LLMConfigError`."""
    if api_key:
        return api_key
    if base_url is None:
        raise LLMConfigError(
            "no API key and no base URL: set MEMBUILDER_LLM_API_KEY / OPENAI_API_KEY, or point "
            "MEMBUILDER_LLM_BASE_URL at a local OpenAI-compatible server")
    return KEYLESS_SERVER_KEY


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request. `None` parameters are not sent (the server default applies).

    `extra_body` carries server-specific parameters (e.g. vLLM's `top_k` or `guided_json`); it is
    part of the cache key like every other field.
    """

    messages: Sequence[Mapping[str, Any]]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | Sequence[str] | None = None
    seed: int | None = None
    response_format: Mapping[str, Any] | None = None
    extra_body: Mapping[str, Any] | None = None

    def sampling_params(self) -> dict[str, Any]:
        params = {
            "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
            "stop": list(self.stop) if isinstance(self.stop, (list, tuple)) else self.stop,
            "seed": self.seed, "response_format": self.response_format,
        }
        return {k: v for k, v in params.items() if v is not None}


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatResult:
    """A completion. `usage` is what the server reported for it (also when served from cache)."""

    text: str
    finish_reason: str | None
    usage: TokenUsage
    response_id: str | None
    cached: bool
    model: str
    reasoning: str | None = None  # `reasoning_content` / `reasoning` of reasoning servers, when sent

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def is_complete(self) -> bool:
        """The model finished on its own and said something: not cut by the token limit, not
        filtered, not empty. Only such completions are cached."""
        return self.finish_reason not in INCOMPLETE_FINISH_REASONS and bool(self.text.strip())


@dataclass(frozen=True)
class UsageStats:
    """Counters of one client. Tokens count only what was paid for (cache hits add none).

    calls: chat/embed calls made through the client, cached ones included;
    requests: HTTP requests sent (first attempts plus retries); retries: requests after a
    transient failure; failures: calls that ended in an `LLMError`.
    """

    calls: int = 0
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.embedding_tokens

    def __sub__(self, other: "UsageStats") -> "UsageStats":
        """Difference of two snapshots: the usage of one phase of a run."""
        return UsageStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


class _Accounting:
    def __init__(self):
        self._lock = threading.Lock()
        self._stats = UsageStats()

    def add(self, **deltas: int) -> None:
        with self._lock:
            self._stats = replace(self._stats, **{k: getattr(self._stats, k) + v for k, v in deltas.items()})

    def snapshot(self) -> UsageStats:
        with self._lock:
            return self._stats


# --- response cache -----------------------------------------------------------------------------


def _check_sendable(payload: Any, what: str) -> None:
    """`LLMInputError` unless the request's JSON is valid UTF-8 (a lone surrogate such as
    "\\ud83d", which a model can emit through a JSON escape, is not; the HTTP library would
    raise a bare `UnicodeEncodeError` while sending it)."""
    try:
        json.dumps(payload, ensure_ascii=False, default=_json_default).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LLMInputError(f"{what} holds text that is not valid Unicode (lone surrogate "
                            f"{exc.object[exc.start]!r}); nothing was sent", cause=exc) from None


def request_cache_key(kind: str, base_url: str | None, payload: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of (kind, endpoint, full request payload)."""
    blob = json.dumps({"kind": kind, "base_url": base_url, "payload": payload},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"request field of type {type(value).__name__} cannot be part of a cache key")


class ResponseCache:
    """SQLite file of successful responses (WAL mode, so several processes can share it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)")
            self._db.commit()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, kind: str, value: Mapping[str, Any]) -> None:
        with self._lock:
            # ASCII JSON: a reply holding a lone surrogate (invalid Unicode a server can send as a
            # JSON escape) is stored escaped and read back unchanged, where raw text would make
            # SQLite's UTF-8 encoding raise
            self._db.execute("INSERT OR REPLACE INTO responses (key, kind, value, created) VALUES (?, ?, ?, ?)",
                             (key, kind, json.dumps(value), time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- the client ---------------------------------------------------------------------------------


class LLMClient:
    """Synchronous OpenAI-compatible client, safe to share between threads.

    `sleep` and `rng` are injectable so tests can record backoff delays instead of waiting.
    Nothing touches the network at construction.
    """

    def __init__(self, config: LLMConfig | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        self.config = config if config is not None else LLMConfig.from_env()
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._rng_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.config.max_concurrency)
        self._acct = _Accounting()
        self._cache = ResponseCache(self.config.cache_path) if self.config.cache_path else None
        self._sdk: dict[str, openai.OpenAI] = {}
        self._sdk_lock = threading.Lock()

    # ---- public API

    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None,
             temperature: float | None = None, top_p: float | None = None, max_tokens: int | None = None,
             stop: str | Sequence[str] | None = None, seed: int | None = None,
             response_format: Mapping[str, Any] | None = None, extra_body: Mapping[str, Any] | None = None,
             use_cache: bool = True, cache_if: Callable[[ChatResult], bool] | None = None) -> ChatResult:
        """One chat completion. `use_cache=False` neither reads nor writes the cache (use it when
        re-asking the same request on purpose, e.g. after an unparseable answer).

        Only a complete completion (`is_complete`) is cached; `cache_if`, when given, must also
        accept it (e.g. "the answer parses"). A cached completion that `cache_if` refuses is not
        returned: the server is asked again, and the stored record replaced if the new one passes.
        """
        request = ChatRequest(messages=messages, model=model, temperature=temperature, top_p=top_p,
                              max_tokens=max_tokens, stop=stop, seed=seed, response_format=response_format,
                              extra_body=extra_body)
        return self.chat_request(request, use_cache=use_cache, cache_if=cache_if)

    def chat_request(self, request: ChatRequest, *, use_cache: bool = True,
                     cache_if: Callable[[ChatResult], bool] | None = None) -> ChatResult:
        """`chat` for a prepared `ChatRequest`."""
        self._acct.add(calls=1)
        try:
            return self._chat(request, use_cache, cache_if)
        except LLMError:
            self._acct.add(failures=1)
            raise

    def map_chat(self, requests: Sequence[ChatRequest], *, max_workers: int | None = None,
                 return_exceptions: bool = False, use_cache: bool = True,
                 progress: bool = False,
                 cache_if: Callable[[ChatResult], bool] | None = None) -> list[ChatResult | LLMError]:
        """Run many requests on a thread pool; results come back in input order.

        In-flight HTTP requests never exceed `config.max_concurrency`, whatever `max_workers`
        is (default: that limit). With `return_exceptions`, a failed request yields its
        `LLMError` in its slot; otherwise the first failure (in input order) is raised after
        all requests have finished, so no work is left running behind the caller's back.
        """
        workers = max_workers if max_workers is not None else self.config.max_concurrency
        if workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {workers}")

        def one(req: ChatRequest) -> ChatResult | LLMError:
            try:
                return self.chat_request(req, use_cache=use_cache, cache_if=cache_if)
            except LLMError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcomes = list(tqdm(pool.map(one, requests), total=len(requests), desc="chat",
                                 disable=not progress))
        if not return_exceptions:
            for outcome in outcomes:
                if isinstance(outcome, LLMError):
                    raise outcome
        return outcomes

    async def achat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> ChatResult:
        """`chat` from async code: the sync call runs in a worker thread."""
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    def embed(self, texts: Sequence[str], *, model: str | None = None, use_cache: bool = True) -> list[list[float]]:
        """Embeddings of `texts` (in order), sent in batches of `config.embedding_batch_size`."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not one string")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("embed() takes strings only")
        out: list[list[float]] = []
        size = self.config.embedding_batch_size
        for start in range(0, len(texts), size):
            self._acct.add(calls=1)
            try:
                out.extend(self._embed_batch(list(texts[start:start + size]), model, use_cache))
            except LLMError:
                self._acct.add(failures=1)
                raise
        return out

    def usage(self) -> UsageStats:
        """A snapshot of the counters (subtract two snapshots for the usage of one phase)."""
        return self._acct.snapshot()

    def close(self) -> None:
        with self._sdk_lock:
            for sdk in self._sdk.values():
                sdk.close()
            self._sdk.clear()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---- chat internals

    def _chat(self, request: ChatRequest, use_cache: bool,
              cache_if: Callable[[ChatResult], bool] | None) -> ChatResult:
        model = request.model or self.config.model
        if not model:
            raise LLMConfigError("no chat model: pass model=... or set MEMBUILDER_LLM_MODEL")
        if not request.messages:
            raise LLMConfigError("chat() needs at least one message")
        base_url, api_key = self.config.base_url, self.config.api_key
        params = request.sampling_params()
        payload = {"model": model, "messages": [dict(m) for m in request.messages], **params,
                   "extra_body": dict(request.extra_body) if request.extra_body else None}
        _check_sendable(payload, "chat request")
        key = request_cache_key("chat", base_url, payload)

        def storable(result: ChatResult) -> bool:
            return result.is_complete and (cache_if is None or bool(cache_if(result)))

        if use_cache and self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None:
                cached = _cached_chat_result(hit)
                # a record an older version stored (truncated, empty) or one this caller cannot
                # use is a miss: replaying it would repeat the failure without asking again
                if cached is not None and storable(cached):
                    self._acct.add(cache_hits=1)
                    return cached

        sdk = self._client(base_url, api_key)

        def send() -> dict:
            raw = sdk.chat.completions.with_raw_response.create(
                model=model, messages=payload["messages"], timeout=self.config.timeout_s,
                extra_body=payload["extra_body"], **params)
            return _parse_json_body(raw.text, "chat completion")

        record = _chat_record(self._with_retries(send, "chat completion"), model)
        usage = record["usage"]
        self._acct.add(prompt_tokens=usage[0], completion_tokens=usage[1])
        result = _chat_result_from_record(record, cached=False)
        if use_cache and self._cache is not None and storable(result):
            self._cache.put(key, "chat", record)
        return result

    def _embed_batch(self, texts: list[str], model: str | None, use_cache: bool) -> list[list[float]]:
        model = model or self.config.embedding_model
        if not model:
            raise LLMConfigError("no embedding model: pass model=... or set MEMBUILDER_EMBED_MODEL")
        base_url, api_key = self.config.embedding_endpoint()
        _check_sendable(texts, "embedding input")
        key = request_cache_key("embeddings", base_url, {"model": model, "input": texts})
        if use_cache and self._cache is not None:
            hit = self._cache.get(key)
            vectors = hit.get("vectors") if isinstance(hit, dict) else None
            if isinstance(vectors, list) and len(vectors) == len(texts):
                self._acct.add(cache_hits=1)
                return vectors

        sdk = self._client(base_url, api_key)

        def send() -> dict:
            # encoding_format is explicit: the SDK otherwise asks for base64, which not every
            # OpenAI-compatible server supports
            raw = sdk.embeddings.with_raw_response.create(
                model=model, input=texts, encoding_format="float", timeout=self.config.timeout_s)
            return _parse_json_body(raw.text, "embeddings")

        body = self._with_retries(send, "embeddings")
        vectors, tokens = _embedding_vectors(body, len(texts))
        self._acct.add(embedding_tokens=tokens)
        if use_cache and self._cache is not None:
            self._cache.put(key, "embeddings", {"vectors": vectors, "tokens": tokens})
        return vectors

    def _client(self, base_url: str | None, api_key: str | None) -> openai.OpenAI:
        api_key = endpoint_api_key(base_url, api_key)
        ident = f"{base_url}\0{api_key}"
        with self._sdk_lock:
            sdk = self._sdk.get(ident)
            if sdk is None:
                try:
                    http_client = deadline_http_client(self.config.timeout_s)
                except DeadlineSetupError as exc:
                    raise LLMConfigError(str(exc), cause=exc) from exc
                sdk = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                    timeout=self.config.timeout_s, http_client=http_client)
                self._sdk[ident] = sdk
        return sdk

    # ---- retries

    def backoff_delay(self, retry_index: int, retry_after: float | None = None) -> float:
        """Delay before retry number `retry_index` (0-based); see `LLMConfig`."""
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * (2.0 ** retry_index))
        with self._rng_lock:
            u = self._rng.random()
        delay *= 1.0 - cfg.jitter * u
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.backoff_max_s))
        return delay

    def _with_retries(self, send: Callable[[], dict], what: str) -> dict:
        attempts = 0
        while True:
            attempts += 1
            status: int | None = None
            retry_after: float | None = None
            try:
                with self._slots, request_deadline(self.config.timeout_s):
                    self._acct.add(requests=1)
                    return send()
            except openai.APIConnectionError as exc:  # APITimeoutError is a subclass
                last: BaseException = exc
            except openai.APIStatusError as exc:
                status = exc.status_code
                if not is_transient_status(status):
                    raise LLMRequestError(
                        f"{what} refused with HTTP {status}: {_status_detail(exc)}",
                        status_code=status, cause=exc, attempts=attempts) from exc
                retry_after = _retry_after_seconds(exc.response.headers.get("retry-after"))
                last = exc
            if attempts > self.config.max_retries:
                kind = f"HTTP {status}" if status is not None else type(last).__name__
                raise LLMRetriesExhausted(
                    f"{what} failed after {attempts} attempt(s); last error: {kind}: {_status_detail(last)}",
                    status_code=status, cause=last, attempts=attempts) from last
            self._acct.add(retries=1)
            self._sleep(self.backoff_delay(attempts - 1, retry_after))


def is_transient_status(status: int) -> bool:
    """408/409/429 and every 5xx are worth retrying; other statuses are the request's fault."""
    return status in TRANSIENT_STATUS or status >= 500


def _retry_after_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP-date form; the exponential backoff is used instead
    return seconds if seconds >= 0 else None


def _status_detail(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        if isinstance(body, Mapping) and isinstance(body.get("message"), str):
            return body["message"][:500]
        return exc.response.text[:500]
    return str(exc)[:500] or type(exc).__name__


def _parse_json_body(text: str, what: str) -> dict:
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LLMResponseError(f"{what} response is not valid JSON ({exc.msg} at char {exc.pos}): "
                               f"{text[:200]!r}", cause=exc, attempts=1) from exc
    except (ValueError, RecursionError) as exc:  # a >4,300-digit integer; absurd nesting
        raise LLMResponseError(f"{what} response cannot be read: {str(exc)[:200]}", cause=exc,
                               attempts=1) from exc
    if not isinstance(body, dict):
        raise LLMResponseError(f"{what} response is a JSON {type(body).__name__}, not an object")
    return body


def _chat_record(body: dict, model: str) -> dict:
    """The cacheable essence of a chat response, validated."""
    if "error" in body and not body.get("choices"):
        raise LLMResponseError(f"chat completion response carries an error: {str(body['error'])[:300]}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise LLMResponseError("chat completion response has no 'choices'")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise LLMResponseError("chat completion response: choices[0] has no 'message' object")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise LLMResponseError(f"chat completion response: message content is a {type(content).__name__}")
    reasoning = message.get("reasoning_content") or message.get("reasoning")  # vLLM's names
    usage = _usage_object(body, "chat completion")
    return {
        "text": content or "",
        "finish_reason": _optional_str(choice.get("finish_reason"), "choices[0].finish_reason"),
        "usage": [_token_count(usage, "prompt_tokens", "chat completion"),
                  _token_count(usage, "completion_tokens", "chat completion")],
        "id": _optional_str(body.get("id"), "id"),
        "model": _optional_str(body.get("model"), "model") or model,
        "reasoning": reasoning if isinstance(reasoning, str) else None,
    }


def _optional_str(value: Any, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise LLMResponseError(f"chat completion response: '{field}' is a {type(value).__name__}, not a string")


def _usage_object(body: dict, what: str) -> dict:
    """The `usage` object; absent or null means the server did not count (zeros)."""
    usage = body.get("usage")
    if usage is None:
        return {}
    if not isinstance(usage, dict):
        raise LLMResponseError(f"{what} response: 'usage' is a {type(usage).__name__}, not an object")
    return usage


def _token_count(usage: dict, name: str, what: str) -> int:
    """A token count of `usage`: a non-negative integer (an integral float is accepted), or 0
    when absent or null. Anything else is a malformed response, not a crash."""
    value = usage.get(name)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LLMResponseError(f"{what} response: usage.{name} must be a non-negative integer, "
                               f"got {_short_repr(value)}")
    return value


def _short_repr(value: Any, n: int = 60) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 50 else "<a huge integer>"
    return text if len(text) <= n else text[: n - 3] + "..."


def _cached_chat_result(record: Any) -> ChatResult | None:
    """A cached record as a result, or None when the record is not one this version can read."""
    try:
        return _chat_result_from_record(record, cached=True)
    except (KeyError, TypeError, ValueError):
        return None


def _chat_result_from_record(record: dict, *, cached: bool) -> ChatResult:
    return ChatResult(text=record["text"], finish_reason=record["finish_reason"],
                      usage=TokenUsage(*record["usage"]), response_id=record["id"], cached=cached,
                      model=record["model"], reasoning=record.get("reasoning"))


def _embedding_vectors(body: dict, expected: int) -> tuple[list[list[float]], int]:
    """The vectors in input order, and the tokens paid. Items are placed by their `index`, which
    must name each input exactly once (a response without any `index` is taken in list order)."""
    data = body.get("data")
    if not isinstance(data, list) or len(data) != expected:
        got = len(data) if isinstance(data, list) else "no"
        raise LLMResponseError(f"embeddings response has {got} items in 'data', expected {expected}")
    if not all(isinstance(item, dict) for item in data):
        raise LLMResponseError("embeddings response: every item of 'data' must be an object")
    indices = [item.get("index") for item in data]
    if all(i is None for i in indices):
        indices = list(range(expected))
    elif sorted(i for i in indices if isinstance(i, int) and not isinstance(i, bool)) != list(range(expected)):
        raise LLMResponseError(f"embeddings response: item indices {_short_repr(indices, 200)} do not name "
                               f"each of the {expected} inputs exactly once")
    vectors: list[list[float] | None] = [None] * expected
    for index, item in zip(indices, data):
        row = item.get("embedding")
        if not isinstance(row, list) or not row:
            raise LLMResponseError(f"embeddings response: item {index} has no embedding list")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row):
            raise LLMResponseError(f"embeddings response: item {index} holds a non-number or non-finite value")
        vectors[index] = [float(x) for x in row]
    if len({len(v) for v in vectors}) > 1:
        raise LLMResponseError(f"embeddings response: vectors of different lengths "
                               f"{sorted({len(v) for v in vectors})}")
    usage = _usage_object(body, "embeddings")
    tokens = _token_count(usage, "prompt_tokens", "embeddings") or _token_count(usage, "total_tokens", "embeddings")
    return vectors, tokens
