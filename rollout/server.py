"""Rollout server: OpenAI-compatible HTTP endpoints over one engine; new weights over torch.distributed.

    python -m rollout.server --model PATH --backend hf|vllm [--host 127.0.0.1] [--port 8000]

Endpoints (JSON; no streaming):
  GET  /health                 status, model, backend, weight version
  GET  /v1/models              the one served model
  POST /v1/chat/completions    OpenAI chat completions; `logprobs` gives the sampled tokens' log-probs;
                               extras: `return_token_ids` (prompt and completion token ids), `ignore_eos`
  POST /v1/completions         OpenAI completions; `prompt` is a string, token ids, or a list of either
  POST /v1/weights/init        join the trainer's weight-sync group: {host, port, world_size, rank, backend}
  POST /v1/weights/update      announce a push: {tensors: [{name, shape, dtype}], bucket_bytes, version};
                               refused with 400 (nothing received) if a name or shape is wrong; once
                               accepted, the tensors arrive over the group (`rollout.client` does both)
  GET  /v1/weights             weight-sync state: connected, version, pending, last error
  POST /v1/weights/close       leave the weight-sync group

Concurrency: HTTP handler threads parse, validate and tokenize; one scheduler thread owns the engine.
It takes every job queued since its last turn, runs weight updates first, then the generation
requests, merged into one engine call per distinct set of sampling parameters. A generation call
therefore runs entirely under one set of weights, and requests that arrive during an update wait
for it: every response comes whole from the old weights or whole from the new ones.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rollout.chat import check_length, render_prompt
from rollout.types import Completion, InvalidRequestError, SamplingParams, WeightSyncError
from rollout.weight_sync import ALIGN, DEFAULT_BUCKET_BYTES, TensorMeta, WeightTransport

MAX_BODY_BYTES = 64 * 2**20
MAX_SEQUENCES = 4096  # prompts x n in one request


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class _Job:
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _GenerateJob(_Job):
    prompts: list[list[int]] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class _UpdateJob(_Job):
    metas: list[TensorMeta] = field(default_factory=list)
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    version: int = 0


class _Scheduler(threading.Thread):
    """The one thread that calls the engine (module docstring)."""

    def __init__(self, server: RolloutServer, max_batch_prompts: int):
        super().__init__(name="rollout-scheduler", daemon=True)
        self.server = server
        self.max_batch_prompts = max_batch_prompts
        self.jobs: queue.Queue[_Job | None] = queue.Queue()

    def run(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            if any(j is None for j in jobs):
                for j in jobs:
                    if j is not None:
                        j.error = RuntimeError("the server is shutting down")
                        j.done.set()
                return
            for job in jobs:
                if isinstance(job, _UpdateJob):
                    self.server._apply_update(job)
            for batch in self._batches([j for j in jobs if isinstance(j, _GenerateJob)]):
                self._generate(batch)

    def _batches(self, jobs: list[_GenerateJob]) -> list[list[_GenerateJob]]:
        # A seed applies to a whole transformers batch, so seeded requests are merged only when the
        # engine seeds each prompt on its own (vLLM); otherwise they run alone, reproducibly.
        groups: dict[Any, list[_GenerateJob]] = defaultdict(list)
        for k, job in enumerate(jobs):
            alone = job.params.seed is not None and not self.server.engine.seed_per_prompt
            groups[(job.params, k) if alone else job.params].append(job)
        batches = []
        for group in groups.values():
            batch: list[_GenerateJob] = []
            for job in group:
                if batch and sum(len(j.prompts) for j in batch) + len(job.prompts) > self.max_batch_prompts:
                    batches.append(batch)
                    batch = []
                batch.append(job)
            batches.append(batch)
        return batches

    def _generate(self, batch: list[_GenerateJob]) -> None:
        try:
            outputs = self.server.engine.generate([p for j in batch for p in j.prompts], batch[0].params)
            start = 0
            for job in batch:
                job.result = outputs[start : start + len(job.prompts)]
                start += len(job.prompts)
        except Exception as e:  # the requests fail, the server keeps serving
            for job in batch:
                job.error = e
        for job in batch:
            job.done.set()


class RolloutServer:
    """HTTP front of one rollout engine (`HFEngine` or `VLLMEngine`)."""

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
    ):
        self.engine, self.model_name, self.backend, self.api_key = engine, model_name, backend, api_key
        self.weight_version = 0
        self.last_weight_error: str | None = None
        self._transport: WeightTransport | None = None
        self._pending_update = False
        self._lock = threading.Lock()
        # The trainer's push returns when the group's status exchange does, a moment before the
        # scheduler clears `_pending_update`: the next weight call waits for that moment.
        self._update_done = threading.Condition(self._lock)
        self._scheduler = _Scheduler(self, max_batch_prompts)
        self._httpd = _HTTPServer((host, port), _Handler)
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

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._scheduler.jobs.put(None)
        self._scheduler.join(timeout=60)
        if self._transport is not None:
            self._transport.close()

    # ---- generation -------------------------------------------------------------------------

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        job = _GenerateJob(prompts=prompts, params=params)
        self._scheduler.jobs.put(job)
        return job.wait()

    def _render(self, prompt: Any) -> list[int]:
        e = self.engine
        return render_prompt(e.tokenizer, prompt, vocab_size=e.vocab_size, chat_template_kwargs=e.chat_template_kwargs)

    def _params(self, body: dict, prompt_ids: list[list[int]]) -> SamplingParams:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:  # as vLLM: whatever context the longest prompt leaves
            max_tokens = max(1, self.engine.max_model_len - max(len(p) for p in prompt_ids))
        stop = body.get("stop")
        stop = [] if stop is None else stop
        if not isinstance(stop, (str, list)):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}")
        params = SamplingParams(
            n=_get(body, "n", 1),
            temperature=_get(body, "temperature", 1.0),
            top_p=_get(body, "top_p", 1.0),
            max_tokens=max_tokens,
            seed=body.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            ignore_eos=bool(body.get("ignore_eos")),
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

    def chat_completions(self, body: dict) -> dict:
        self._check_common(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list")
        if body.get("top_logprobs"):
            raise InvalidRequestError("top_logprobs > 0 is not supported; logprobs=true gives the sampled tokens'")
        prompt_ids = self._render([_flatten_message(i, m) for i, m in enumerate(messages)])
        params = self._params(body, [prompt_ids])
        samples = self._run([prompt_ids], params)[0]
        choices = []
        for j, c in enumerate(samples):
            choice: dict[str, Any] = {
                "index": j,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": {"content": self._token_logprobs(c)} if body.get("logprobs") else None,
            }
            if body.get("return_token_ids"):
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
        out = self._envelope("chat.completion", choices, [samples])
        if body.get("return_token_ids"):
            out["prompt_token_ids"] = prompt_ids
        return out

    def completions(self, body: dict) -> dict:
        self._check_common(body)
        if body.get("echo"):
            raise InvalidRequestError("echo=true is not supported by this server")
        prompts = body.get("prompt")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise InvalidRequestError("prompt must be a string, a list of token ids, or a non-empty list of either")
        prompt_ids = [self._render(p) for p in prompts]
        params = self._params(body, prompt_ids)
        results = self._run(prompt_ids, params)
        choices = []
        for i, samples in enumerate(results):
            for j, c in enumerate(samples):
                choice: dict[str, Any] = {"index": i * params.n + j, "text": c.text, "finish_reason": c.finish_reason}
                choice["logprobs"] = self._legacy_logprobs(c) if body.get("logprobs") is not None else None
                if body.get("return_token_ids"):
                    choice["prompt_token_ids"] = list(c.prompt_token_ids)
                    choice["token_ids"] = list(c.token_ids)
                choices.append(choice)
        return self._envelope("text_completion", choices, results)

    def _envelope(self, kind: str, choices: list, results: list[list[Completion]]) -> dict:
        prompt_tokens = sum(len(samples[0].prompt_token_ids) for samples in results)
        completion_tokens = sum(len(c.token_ids) for samples in results for c in samples)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
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
        world_size, rank = body.get("world_size", 2), body.get("rank", 1)
        backend, timeout_s = body.get("backend", "gloo"), body.get("timeout_s", 600)
        if not isinstance(host, str) or not all(isinstance(v, int) for v in (port, world_size, rank)):
            raise InvalidRequestError("weights/init needs host (str), port, world_size and rank (ints)")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise InvalidRequestError(f"timeout_s must be a positive number, got {timeout_s!r}")
        if not 1 <= rank < world_size:
            raise InvalidRequestError(
                f"rank must lie in [1, world_size) (rank 0 is the trainer), got {rank} of {world_size}"
            )
        if backend not in ("gloo", "nccl"):
            raise InvalidRequestError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        with self._lock:
            if self._transport is not None:
                raise HTTPError(409, "already in a weight-sync group: POST /v1/weights/close first", "conflict_error")
        device = "cpu" if backend == "gloo" else self.engine.device
        transport = WeightTransport(host, port, rank, world_size, backend, device, float(timeout_s))
        with self._lock:
            self._transport = transport
        return {"status": "connected", "rank": rank, "world_size": world_size}

    def weights_update(self, body: dict) -> dict:
        tensors, bucket_bytes = body.get("tensors"), body.get("bucket_bytes", DEFAULT_BUCKET_BYTES)
        if not isinstance(tensors, list) or not tensors:
            raise WeightSyncError("weights/update needs 'tensors': a non-empty list of {name, shape, dtype}")
        if not isinstance(bucket_bytes, int) or bucket_bytes < ALIGN:
            raise WeightSyncError(f"bucket_bytes must be an integer >= {ALIGN}, got {bucket_bytes!r}")
        if not all(isinstance(t, dict) for t in tensors):
            raise WeightSyncError("each entry of 'tensors' must be an object {name, shape, dtype}")
        metas = [TensorMeta.from_json(t) for t in tensors]
        self.engine.weight_spec.check(metas)
        version = _get(body, "version", self.weight_version + 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise WeightSyncError(f"version must be an integer, got {version!r}")
        with self._lock:
            if self._transport is None:
                raise HTTPError(409, "no weight-sync group: POST /v1/weights/init first", "conflict_error")
            if not self._update_done.wait_for(lambda: not self._pending_update, timeout=60):
                raise HTTPError(409, "a weight update is already in progress", "conflict_error")
            self._pending_update = True
        self._scheduler.jobs.put(_UpdateJob(metas=metas, bucket_bytes=bucket_bytes, version=version))
        return {"status": "accepted", "version": version}

    def _apply_update(self, job: _UpdateJob) -> None:
        """Receive and load a push (scheduler thread), then tell every member of the group how it went."""
        assert self._transport is not None
        code = 0
        try:
            named = self._transport.receive(job.metas, job.bucket_bytes)
            self.engine.update_weights(named)
            self.weight_version = job.version
            self.last_weight_error = None
        except Exception as e:
            code = 1
            self.last_weight_error = f"{type(e).__name__}: {e}"
        try:
            self._transport.reduce_status(code)
        except Exception as e:
            self.last_weight_error = f"status exchange failed: {type(e).__name__}: {e}"
        with self._lock:
            self._pending_update = False
            self._update_done.notify_all()
        job.done.set()

    def weights_state(self) -> dict:
        return {
            "connected": self._transport is not None,
            "version": self.weight_version,
            "pending": self._pending_update,
            "last_error": self.last_weight_error,
        }

    def weights_close(self, body: dict) -> dict:
        with self._lock:
            if not self._update_done.wait_for(lambda: not self._pending_update, timeout=60):
                raise HTTPError(409, "a weight update is in progress", "conflict_error")
            if self._transport is not None:
                self._transport.close()
            self._transport = None
        return {"status": "closed"}

    def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.model_name,
            "backend": self.backend,
            "weight_version": self.weight_version,
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "membuilder"}]}


def _get(body: dict, key: str, default: Any) -> Any:
    """A request field, with JSON null meaning "not given" as OpenAI clients use it."""
    value = body.get(key)
    return default if value is None else value


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


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog: socketserver's default of 5 resets connections when many clients
    # (a trainer's rollout burst) connect at once.
    request_queue_size = 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise here
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        app: RolloutServer = self.server.app  # type: ignore[attr-defined]
        routes = {
            ("GET", "/health"): lambda b: app.health(),
            ("GET", "/v1/models"): lambda b: app.models(),
            ("POST", "/v1/chat/completions"): app.chat_completions,
            ("POST", "/v1/completions"): app.completions,
            ("POST", "/v1/weights/init"): app.weights_init,
            ("POST", "/v1/weights/update"): app.weights_update,
            ("GET", "/v1/weights"): lambda b: app.weights_state(),
            ("POST", "/v1/weights/close"): app.weights_close,
        }
        try:
            body = self._read_body() if method == "POST" else {}
            path = self.path.split("?", 1)[0]
            route = routes.get((method, path))
            if route is None:
                raise HTTPError(404, f"no route {method} {path}", "not_found_error")
            if app.api_key and path != "/health" and self.headers.get("Authorization") != f"Bearer {app.api_key}":
                raise HTTPError(401, "missing or wrong API key", "authentication_error")
            self._send(200, route(body))
        except HTTPError as e:
            self._send(e.status, {"error": {"message": e.message, "type": e.kind, "code": e.status}})
        except (InvalidRequestError, WeightSyncError) as e:
            self._send(400, {"error": {"message": str(e), "type": "invalid_request_error", "code": 400}})
        except Exception as e:
            self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "internal_error", "code": 500}})

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(411, "a JSON body with a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def build_engine(args: argparse.Namespace) -> Any:
    """The engine the command line asks for."""
    if args.backend == "hf":
        import torch

        from rollout.hf_engine import HFEngine

        return HFEngine(
            args.model,
            dtype=getattr(torch, args.dtype),
            device=args.device,
            max_batch_size=args.max_batch_size,
            max_model_len=args.max_model_len,
            gguf_file=args.gguf_file,
        )
    if args.gguf_file:
        raise SystemExit("--gguf-file works with --backend hf; for vLLM save the model with save_pretrained first")
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(args.model, dtype=args.dtype, max_model_len=args.max_model_len)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible rollout server with torch.distributed weight updates")
    p.add_argument("--model", required=True, help="Hugging Face model folder")
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
    args = p.parse_args(argv)
    engine = build_engine(args)
    server = RolloutServer(
        engine,
        model_name=args.served_model_name or args.model,
        backend=args.backend,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
    ).start()
    print(f"rollout server listening on {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        engine.close()


if __name__ == "__main__":
    main()
