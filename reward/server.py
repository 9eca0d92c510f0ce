"""Reward server: the reward library over HTTP, for trainers on other machines.

    python -m reward.server --snapshots DIR --tokenizer TOKENIZER [--host 127.0.0.1] [--port 8100]
        [--token-file FILE] [--answerer extractive|MODEL] [--judge rule|MODEL] [--base-url URL]
        [--embedder hashing|minilm|none] [--reward-config FILE.json] [--set FIELD=VALUE ...]
        [--max-concurrency 4] [--max-queue 64] [--shutdown-grace-s 30] ...   (--help lists all)

The reward is the library's (`reward.make_reward_fn`) with the policy's tokenizer (a folder or a
.gguf file), the answerer, judge and embedder named, and a `RewardConfig` from --reward-config /
--set; /health shows all of it, so a trainer can check it scores as its in-process reward would.
The bearer token comes from --token-file or $MEMBUILDER_REWARD_TOKEN (never the command line,
which other users can read); without one, keep the default 127.0.0.1.

Endpoints (JSON):
  GET  /health  {"status": "ok" | "draining", "version", "snapshots" (ids in the store),
                "in_flight" (scoring now), "queued", "served", "rejected", limits, "reward" (config)}
                Open without the token: it reveals counts and the reward configuration only.
  POST /score   {"requests": [SessionRewardRequest.to_dict(), ...]}
                -> {"rewards": [SessionReward.to_dict(), ...], "elapsed_s"}: one per request, in order.

`reward.client.RemoteReward` is the matching client: a `RewardFn` like the in-process one.

Errors are `{"error": {"type": ..., "message": ...}}`:
  400 invalid_request   malformed or over-nested JSON, a bad field, a path-like snapshot id, over
                        the session / QA / G limits (the message names the field and the limit)
  401 unauthorized      missing or wrong bearer token (checked before the body is read)
  404 unknown_snapshot  a well-formed snapshot id the store does not hold (named); not_found: no route
  405 method_not_allowed
  408 timeout           the body did not arrive within the socket timeout
  411 length_required   no Content-Length
  413 too_large         Content-Length over the limit (refused before reading)
  500 scorer_error / snapshot_error / internal_error   the scorer failed or broke its contract
  503 overloaded / shutting_down, with Retry-After: safe to retry (scoring is idempotent)

Concurrency: at most `max_concurrency` scoring calls run at once (worker threads); up to
`max_queue` more wait, first come first served; a request beyond that gets 503 with Retry-After at
once, from its headers alone, rather than waiting in an unbounded queue (the client backs off and
retries). A slot is taken before the body is read, so at most max_concurrency + max_queue request
bodies (each under max_body_bytes) are held at once. The scorer is called from up to
`max_concurrency` threads at once and must be safe for that (the library's is).

Masks: a sample whose reward could not be computed (an answerer or judge that timed out, a
session without QA) comes back exactly as the scorer masked it; the server never fills in a value,
and a non-finite number from the scorer is a 500, never a NaN on the wire.

Shutdown (SIGTERM or SIGINT, or `RewardServer.shutdown`): stop accepting connections; requests that
arrive on open connections get 503 shutting_down; scoring in flight or queued gets up to
`shutdown_grace_s` to finish, after which its request is answered 503; then the process exits 0,
within shutdown_grace_s + socket_timeout_s at most (a scorer thread still running is abandoned).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler
from importlib import metadata
from typing import Any, Callable, Sequence

from membuilder.http_util import HTTPError, JSONHTTPServer, bearer_ok, read_json_body, send_error, send_json
from membuilder.snapshots import SnapshotStore, UnknownSnapshotError, check_snapshot_id
from membuilder.types import InvalidInputError
from reward.types import (RewardComputationError, RewardFn, RewardInputError, SessionReward,
                          SessionRewardRequest)

log = logging.getLogger("reward.server")

TOKEN_ENV = "MEMBUILDER_REWARD_TOKEN"


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts and how it paces itself (see the module docstring)."""

    max_body_bytes: int = 64 * 2**20
    max_sessions: int = 256          # session requests in one POST
    max_qa: int = 64                 # QA pairs of one session
    max_group: int = 64              # candidates G of one session
    max_concurrency: int = 4         # scoring calls at once
    max_queue: int = 64              # admitted requests waiting for a scoring slot
    socket_timeout_s: float = 30.0   # any one read or write on a connection (also idle keep-alive)
    retry_after_s: int = 1           # the Retry-After of a 503
    shutdown_grace_s: float = 30.0   # how long shutdown lets admitted scoring finish
    max_connections: int = 512       # connections served at once (a thread each); more get 503

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_sessions", "max_qa", "max_group", "max_concurrency",
                     "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.retry_after_s < 0:
            raise ValueError("ServerLimits.max_queue and retry_after_s must be >= 0")
        if not self.socket_timeout_s > 0 or not self.shutdown_grace_s >= 0:
            raise ValueError("ServerLimits.socket_timeout_s must be > 0 and shutdown_grace_s >= 0")


@dataclass(eq=False)  # hashed by identity: kept in a set of live jobs
class _Job:
    requests: list[SessionRewardRequest]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[SessionReward] | None = None
    error: BaseException | None = None
    aborted: bool = False


def _version() -> str:
    try:
        return metadata.version("membuilder")
    except metadata.PackageNotFoundError:
        return "unknown"


class RewardServer:
    """HTTP front of one reward function over one snapshot store.

    `scorer` is a `RewardFn` (for the library, `reward.make_reward_fn(...)`) that reads its
    state-before banks from `snapshots`; the server loads each request's snapshots through the same
    store first (its LRU cache is shared), so an unknown or corrupt snapshot is named in a 4xx/5xx
    before scoring starts. `info` (JSON-able, e.g. the reward config) is shown on /health.
    """

    def __init__(self, scorer: RewardFn, snapshots: SnapshotStore, *, host: str = "127.0.0.1",
                 port: int = 8100, token: str | None = None, limits: ServerLimits = ServerLimits(),
                 info: dict | None = None):
        if token is not None and not (token and token.isascii() and token.isprintable()):
            raise ValueError("token must be a non-empty printable ASCII string or None")
        self.scorer, self.snapshots, self.token, self.limits = scorer, snapshots, token, limits
        self.info = info or {}
        self.version = _version()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._admitted = 0      # running + queued
        self._running = 0
        self._live: set[_Job] = set()
        self._served = self._rejected = 0
        self._answering = 0     # /score handlers between reading the request and sending the answer
        self._draining = False  # refuse new calls
        self._aborting = False  # in-flight calls have been answered 503
        self._started_at = time.monotonic()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, name=f"reward-worker-{i}", daemon=True)
                         for i in range(limits.max_concurrency)]
        handler = type("_BoundHandler", (_Handler,), {"timeout": limits.socket_timeout_s})
        self._httpd = JSONHTTPServer((host, port), handler)
        self._httpd.max_connections = limits.max_connections
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RewardServer:
        """Serve in background threads; returns self."""
        for w in self._workers:
            w.start()
        # A 0.1 s poll makes shutdown prompt (the default 0.5 s would add that much to every stop).
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,), name="reward-http",
                                        daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> RewardServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self, grace_s: float | None = None) -> dict:
        """Stop accepting, let admitted scoring finish within `grace_s`, answer the rest 503.

        Returns {"finished_in_grace": bool, "aborted": n}. Safe to call twice. Must not be called
        from a request handler (it waits for the accept loop to stop).
        """
        grace = self.limits.shutdown_grace_s if grace_s is None else grace_s
        with self._lock:
            if self._closed:
                return {"finished_in_grace": True, "aborted": 0}
            self._closed = self._draining = True
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            finished = self._idle.wait_for(lambda: self._admitted == 0, timeout=grace)
            self._aborting = True
            aborted = list(self._live)
            for job in aborted:  # their handlers answer 503; the scorer threads are daemons
                job.aborted = True
                job.done.set()
            # Let the handlers send those answers (each write is bounded by the socket timeout).
            self._idle.wait_for(lambda: self._answering == 0, timeout=self.limits.socket_timeout_s)
        for _ in self._workers:
            self._jobs.put(None)
        return {"finished_in_grace": finished, "aborted": len(aborted)}

    # ---- scoring ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                run = not job.aborted  # a job aborted while queued is only accounted for
                self._running += run
            try:
                if run:
                    job.result = self._score(job.requests)
            except BaseException as e:  # answered by the handler; the worker keeps serving
                job.error = e
            finally:
                with self._lock:
                    self._running -= run
                    self._admitted -= 1
                    self._live.discard(job)
                    self._idle.notify_all()
                job.done.set()

    def _score(self, requests: list[SessionRewardRequest]) -> list[SessionReward]:
        for snapshot_id in dict.fromkeys(r.snapshot_id for r in requests):
            try:
                self.snapshots.get(snapshot_id)  # warms the shared cache; checks the content hash
            except UnknownSnapshotError as e:  # deleted since admission
                raise HTTPError(404, "unknown_snapshot", str(e)) from None
            except InvalidInputError as e:
                raise HTTPError(500, "snapshot_error", f"snapshot {snapshot_id}: {e}") from None
        try:
            rewards = self.scorer(requests)
        except UnknownSnapshotError as e:
            raise HTTPError(404, "unknown_snapshot", str(e)) from None
        except RewardInputError as e:
            raise HTTPError(400, "invalid_request", str(e)) from None
        except RewardComputationError as e:
            raise HTTPError(500, "scorer_error", f"the reward could not be computed: {e}") from None
        except Exception as e:
            log.exception("the scorer raised")
            raise HTTPError(500, "scorer_error", f"the scorer raised {type(e).__name__}: {e}") from None
        if not isinstance(rewards, list) or len(rewards) != len(requests) or not all(
                isinstance(r, SessionReward) for r in rewards):
            got = f"{len(rewards)} items" if isinstance(rewards, list) else type(rewards).__name__
            raise HTTPError(500, "scorer_error",
                            f"the scorer broke its contract: {len(requests)} requests gave {got}")
        for i, (req, rew) in enumerate(zip(requests, rewards)):
            if req.session_id != rew.session_id:
                raise HTTPError(500, "scorer_error", f"the scorer broke its contract: reward {i} is for "
                                f"session {rew.session_id!r}, request {i} for {req.session_id!r}")
        return rewards

    def _reserve(self) -> None:
        """Take a slot (running or queued) before the body is read, or raise 503 at once.

        Reserving first bounds the memory held by request bodies to (max_concurrency + max_queue)
        x max_body_bytes, and an overloaded server answers without reading the body.
        """
        retry = {"Retry-After": str(self.limits.retry_after_s)}
        with self._lock:
            if self._draining:
                raise HTTPError(503, "shutting_down", "the reward server is shutting down", headers=retry,
                                close=True)
            capacity = self.limits.max_concurrency + self.limits.max_queue
            if self._admitted >= capacity:
                self._rejected += 1
                raise HTTPError(503, "overloaded", f"the reward server is busy ({self._running} scoring, "
                                f"{self._admitted - self._running} queued, capacity {capacity}); retry later",
                                headers=retry, close=True)
            self._admitted += 1

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
            self._idle.notify_all()

    def _run(self, requests: list[SessionRewardRequest]) -> list[SessionReward]:
        """Queue a job on the reserved slot (the worker gives the slot back) and wait for it."""
        job = _Job(requests)
        retry = {"Retry-After": str(self.limits.retry_after_s)}
        with self._lock:
            if self._aborting:  # shutdown has already answered everything it knew of
                self._admitted -= 1
                self._idle.notify_all()
                raise HTTPError(503, "shutting_down", "the reward server is shutting down", headers=retry)
            self._live.add(job)
        self._jobs.put(job)
        job.done.wait()
        if job.aborted:
            raise HTTPError(503, "shutting_down", "the reward server shut down before this score finished",
                            headers=retry)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    # ---- endpoints ----------------------------------------------------------------------------

    def health(self) -> dict:
        with self._lock:
            counts = {"in_flight": self._running, "queued": self._admitted - self._running,
                      "served": self._served, "rejected": self._rejected}
            status = "draining" if self._draining else "ok"
        return {"status": status, "version": self.version, "snapshots": len(self.snapshots.ids()),
                **counts, "uptime_s": round(time.monotonic() - self._started_at, 3),
                "limits": asdict(self.limits), "reward": self.info}

    def parse_score(self, body: Any) -> list[SessionRewardRequest]:
        """Validate a /score body into requests, or raise HTTPError naming the bad field."""
        lim = self.limits
        if not isinstance(body, dict):
            raise HTTPError(400, "invalid_request", f"the body must be a JSON object, got {type(body).__name__}")
        extra = sorted(set(body) - {"requests"})
        if extra:
            raise HTTPError(400, "invalid_request", f"unknown fields {extra}; the body is {{\"requests\": [...]}}")
        raw = body.get("requests")
        if not isinstance(raw, list) or not raw:
            raise HTTPError(400, "invalid_request", "requests must be a non-empty list of session requests")
        if len(raw) > lim.max_sessions:
            raise HTTPError(400, "invalid_request",
                            f"{len(raw)} session requests is over the limit of {lim.max_sessions} per call")
        requests = []
        for i, d in enumerate(raw):
            where = f"requests[{i}]"
            try:
                req = SessionRewardRequest.from_dict(d, where)
                check_snapshot_id(req.snapshot_id)
            except (ValueError, TypeError) as e:  # RewardInputError, InvalidInputError, or a stray type
                message = str(e) if where in str(e) else f"{where}: {e}"
                raise HTTPError(400, "invalid_request", message) from None
            if len(req.qa) > lim.max_qa:
                raise HTTPError(400, "invalid_request",
                                f"{where}.qa has {len(req.qa)} pairs, over the limit of {lim.max_qa}")
            if not 1 <= req.group_size <= lim.max_group:
                raise HTTPError(400, "invalid_request", f"{where}.outputs has {req.group_size} candidates; "
                                f"G must lie in [1, {lim.max_group}]")
            if req.snapshot_id not in self.snapshots:
                raise HTTPError(404, "unknown_snapshot",
                                f"{where}.snapshot_id: no snapshot {req.snapshot_id} on this server")
            requests.append(req)
        return requests

    def score(self, read_body: Callable[[], Any]) -> dict:
        """Answer one /score call; `read_body` reads the request's JSON once a slot is reserved."""
        start = time.perf_counter()
        self._reserve()
        try:
            requests = self.parse_score(read_body())
        except BaseException:
            self._release()
            raise
        rewards = self._run(requests)
        with self._lock:
            self._served += 1
        return {"rewards": [r.to_dict() for r in rewards], "elapsed_s": round(time.perf_counter() - start, 6)}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        app: RewardServer = self.server.app  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with app._lock:
            app._answering += 1
        try:
            self._route(app, method, path)
        finally:
            with app._lock:
                app._answering -= 1
                app._idle.notify_all()

    def _route(self, app: RewardServer, method: str, path: str) -> None:
        routes: dict[str, tuple[str, Callable[[], dict]]] = {
            "/health": ("GET", app.health),
            "/score": ("POST", lambda: app.score(lambda: read_json_body(self, app.limits.max_body_bytes))),
        }
        try:
            if path not in routes:
                raise HTTPError(404, "not_found", f"no route {path}; the routes are GET /health and POST /score",
                                close=method == "POST")
            if routes[path][0] != method:
                raise HTTPError(405, "method_not_allowed", f"{path} takes {routes[path][0]}, not {method}",
                                close=method == "POST", headers={"Allow": routes[path][0]})
            # The token is checked from the headers alone: an unauthorised client's body is never read.
            if app.token is not None and path != "/health" and not bearer_ok(self.headers.get("Authorization"),
                                                                           app.token):
                raise HTTPError(401, "unauthorized", "missing or wrong bearer token", close=True,
                                headers={"WWW-Authenticate": "Bearer"})
            payload = routes[path][1]()
            try:
                send_json(self, 200, payload)
            except ValueError as e:  # NaN / infinity from the scorer: never put on the wire
                raise HTTPError(500, "scorer_error", f"the scorer returned a non-finite number: {e}") from None
        except HTTPError as e:
            self._answer(e)
        except (ConnectionError, TimeoutError):  # the client left or stalled while we answered
            self.close_connection = True
        except Exception as e:
            log.exception("unexpected error answering %s %s", method, path)
            self._answer(HTTPError(500, "internal_error", f"{type(e).__name__}: {e}"))

    def _answer(self, error: HTTPError) -> None:
        try:
            send_error(self, error)
        except (ConnectionError, TimeoutError):
            self.close_connection = True


# ---- command line ------------------------------------------------------------------------------

ScorerFactory = Callable[[SnapshotStore, argparse.Namespace], "tuple[RewardFn, dict]"]


def _load_factory(spec: str) -> ScorerFactory:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--scorer takes MODULE:FUNCTION, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--scorer {spec}: {e}") from None


def load_token_counter(spec: str) -> Callable[[str], int]:
    """A counter of the policy's tokens: `spec` is a tokenizer folder or a .gguf file (offline)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    elif path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        raise SystemExit(f"--tokenizer {spec!r} is neither a tokenizer folder nor a .gguf file")
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def reward_config(args: argparse.Namespace):
    """The `RewardConfig` of --reward-config (a JSON object of its fields) and --set FIELD=JSON."""
    from reward.config import RewardConfig

    values: dict[str, Any] = {}
    if args.reward_config:
        try:
            with open(args.reward_config, encoding="utf-8") as fh:
                values = json.load(fh)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--reward-config: {e}") from None
        if not isinstance(values, dict):
            raise SystemExit("--reward-config must hold a JSON object of RewardConfig fields")
    for item in args.set:
        key, eq, raw = item.partition("=")
        if not eq:
            raise SystemExit(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw  # a bare word: a string
    known = {f.name for f in fields(RewardConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"unknown RewardConfig fields {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return RewardConfig(**values)
    except (InvalidInputError, TypeError) as e:
        raise SystemExit(f"reward config: {e}") from None


def library_scorer(snapshots: SnapshotStore, args: argparse.Namespace) -> tuple[RewardFn, dict]:
    """The reward library (`reward.make_reward_fn`) as the command line configures it (the default
    of --scorer). Model answerers and judges share one `LLMClient` (OpenAI-compatible endpoint
    --base-url, key and defaults from the environment as `membuilder.llm.LLMConfig.from_env`)."""
    from membuilder.answering import ExtractiveAnswerer, LLMAnswerer
    from membuilder.api import make_embedder
    from membuilder.judging import LLMJudge, RuleJudge
    from membuilder.llm import LLMClient, LLMConfig
    from reward.score import make_reward_fn

    if not args.tokenizer:
        raise SystemExit("--tokenizer is required: lengths are counted in the policy's tokens")
    config = reward_config(args)
    client = None
    if args.answerer != "extractive" or args.judge != "rule":
        client = LLMClient(LLMConfig.from_env(base_url=args.base_url, cache_path=args.llm_cache,
                                              max_concurrency=max(8, config.workers)))
        if config.call_timeout_s is None:
            log.warning("a model answers or judges and call_timeout_s is unset: a stuck call holds its "
                        "scoring slot until the client's own timeout (--set call_timeout_s=60 bounds it)")
    answerer = ExtractiveAnswerer() if args.answerer == "extractive" else LLMAnswerer(client, model=args.answerer)
    judge = RuleJudge() if args.judge == "rule" else LLMJudge(client, model=args.judge)
    embedder = make_embedder(None if args.embedder == "none" else args.embedder)
    scorer = make_reward_fn(snapshots=snapshots, token_counter=load_token_counter(args.tokenizer),
                            answerer=answerer, judge=judge, config=config, embedder=embedder)
    info = {"config": asdict(config), "answerer": answerer.name, "judge": judge.name,
            "embedder": None if embedder is None else embedder.name, "tokenizer": args.tokenizer}
    return scorer, info


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as e:
            raise SystemExit(f"--token-file: {e}") from None
        if not token:
            raise SystemExit(f"--token-file {args.token_file} is empty")
    else:
        token = os.environ.get(TOKEN_ENV) or None
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise SystemExit("the bearer token must be printable ASCII without spaces")
    return token


def build_parser() -> argparse.ArgumentParser:
    d = ServerLimits()
    p = argparse.ArgumentParser(prog="python -m reward.server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--snapshots", required=True, help="the snapshot store folder (membuilder.snapshots)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback wants a token")
    p.add_argument("--port", type=int, default=8100, help="0 picks a free port (printed at start)")
    p.add_argument("--token-file", default=None,
                   help=f"file holding the bearer token clients must send (else ${TOKEN_ENV}; unset: no token)")
    p.add_argument("--cache-size", type=int, default=64, help="state-before snapshots kept parsed in memory")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="request body limit (413)")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help="session requests per call")
    p.add_argument("--max-qa", type=int, default=d.max_qa, help="QA pairs per session")
    p.add_argument("--max-group", type=int, default=d.max_group, help="candidates G per session")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency, help="scoring calls at once")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="calls waiting beyond that; more get 503")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections served at once; more are answered 503")
    p.add_argument("--socket-timeout-s", type=float, default=d.socket_timeout_s,
                   help="limit of any one read or write on a connection (a stalled body gets 408)")
    p.add_argument("--shutdown-grace-s", type=float, default=d.shutdown_grace_s,
                   help="on SIGTERM / SIGINT, how long scoring in flight may finish before its 503")
    r = p.add_argument_group("the reward (reward library)")
    r.add_argument("--tokenizer", help="the policy's tokenizer: a tokenizer folder or a .gguf file (required)")
    r.add_argument("--answerer", default="extractive", help="extractive | MODEL (on --base-url)")
    r.add_argument("--judge", default="rule", help="rule | MODEL (on --base-url)")
    r.add_argument("--embedder", choices=("hashing", "minilm", "none"), default="hashing",
                   help="the answer step's embedder (none: BM25 only); the trainer's in-process reward must match")
    r.add_argument("--base-url", help="OpenAI-compatible endpoint of MODEL answerers / judges")
    r.add_argument("--llm-cache", help="SQLite file caching model answers and verdicts")
    r.add_argument("--reward-config", help="JSON file: an object of RewardConfig fields")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a RewardConfig field (VALUE as JSON, e.g. --set dense=false --set call_timeout_s=60)")
    p.add_argument("--scorer", default=None,
                   help="MODULE:FUNCTION, a factory (store, args) -> (RewardFn, info dict) replacing the library")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = _read_token(args)
    try:
        limits = ServerLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_sessions=args.max_sessions,
                              max_qa=args.max_qa, max_group=args.max_group, max_concurrency=args.max_concurrency,
                              max_queue=args.max_queue, socket_timeout_s=args.socket_timeout_s,
                              shutdown_grace_s=args.shutdown_grace_s, max_connections=args.max_connections)
        store = SnapshotStore(args.snapshots, cache_size=args.cache_size)
    except (ValueError, InvalidInputError) as e:
        raise SystemExit(f"reward server: {e}") from None
    if not store.root.is_dir():
        raise SystemExit(f"reward server: --snapshots {store.root} is not a folder")
    factory = _load_factory(args.scorer) if args.scorer else library_scorer
    scorer, info = factory(store, args)
    # The handlers only record the signal (an Event's lock taken inside a handler can deadlock the
    # main thread that holds it); the main thread polls and does the shutdown.
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    try:
        server = RewardServer(scorer, store, host=args.host, port=args.port, token=token, limits=limits,
                              info=info).start()
    except OSError as e:
        raise SystemExit(f"reward server: cannot listen on {args.host}:{args.port}: {e}") from None
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without a bearer token: anyone who can reach it can use it", args.host)
    print(f"reward server listening on {server.url}", flush=True)
    while not signals:
        time.sleep(0.1)
    outcome = server.shutdown()
    log.info("%s: shut down (%s)", signal.Signals(signals[0]).name, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
