"""Trainer-side client of a rollout server: the `RolloutEngine` protocol over HTTP + torch.distributed.

    engine = RemoteEngine("http://gen-host:8000")
    engine.connect_weights(host="trainer-host")     # builds the weight-sync group (trainer = rank 0)
    completions = engine.generate(prompts, SamplingParams(n=8, temperature=0.8, top_p=0.9))
    engine.update_weights(policy_weights(model))     # after each optimizer step

Generation sends one HTTP request per prompt, many at once, so the server batches them. A push
first announces the tensor names, shapes and dtypes (`POST /v1/weights/update`; a refusal raises
`WeightSyncError` and nothing is sent), then broadcasts the buckets and waits for every receiver's
status over the group.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch import Tensor

from rollout.types import Completion, InvalidRequestError, Prompt, RolloutError, SamplingParams, WeightSyncError
from rollout.weight_sync import DEFAULT_BUCKET_BYTES, WeightTransport, tensor_metas


class RemoteEngine:
    """A rollout server seen as a `RolloutEngine`."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 3600,
        max_concurrency: int = 64,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout_s, self.max_concurrency = api_key, timeout_s, max_concurrency
        self.model = model or self.request("GET", "/v1/models")["data"][0]["id"]
        self._transport: WeightTransport | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON request; an error status raises with the server's message."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = str(e)
            error = {400: InvalidRequestError}.get(e.code, RolloutError)
            raise error(f"{method} {path} -> {e.code}: {message}") from None

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions per prompt (see `rollout.types.RolloutEngine`)."""
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(lambda p: self._generate_one(p, params), prompts))

    def _generate_one(self, prompt: Prompt, params: SamplingParams) -> list[Completion]:
        body: dict[str, Any] = {
            "model": self.model,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
            "stop": list(params.stop),
            "ignore_eos": params.ignore_eos,
            "return_token_ids": True,
        }
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and prompt and isinstance(prompt[0], dict):
            out = self.request("POST", "/v1/chat/completions", {**body, "messages": list(prompt), "logprobs": True})
            prompt_ids = tuple(out["prompt_token_ids"])
            return [
                Completion(
                    prompt_ids,
                    tuple(c["token_ids"]),
                    tuple(t["logprob"] for t in c["logprobs"]["content"]),
                    c["message"]["content"],
                    c["finish_reason"],
                )
                for c in out["choices"]
            ]
        prompt_body = prompt if isinstance(prompt, str) else list(prompt)
        out = self.request("POST", "/v1/completions", {**body, "prompt": prompt_body, "logprobs": 0})
        return [
            Completion(
                tuple(c["prompt_token_ids"]),
                tuple(c["token_ids"]),
                tuple(c["logprobs"]["token_logprobs"]),
                c["text"],
                c["finish_reason"],
            )
            for c in out["choices"]
        ]

    def connect_weights(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: str = "gloo",
        device: str = "cpu",
        timeout_s: float = 600,
    ) -> None:
        """Form the weight-sync group with the server: this process is rank 0 and hosts the group's
        TCP store on `host:port`, so `host` must be this machine's address as the server sees it
        (port 0 picks a free one)."""
        if self._transport is not None:
            raise RuntimeError("already connected")
        port = port or _free_port(host)
        init = {"host": host, "port": port, "world_size": 2, "rank": 1, "backend": backend, "timeout_s": timeout_s}
        reply: dict[str, Any] = {}

        def ask_server() -> None:
            try:
                reply["ok"] = self.request("POST", "/v1/weights/init", init)
            except Exception as e:  # re-raised in the caller's thread below
                reply["error"] = e

        # Both sides block until the other joins: the server inside its HTTP handler, we here.
        thread = threading.Thread(target=ask_server, daemon=True)
        thread.start()
        transport = WeightTransport(host, port, 0, 2, backend, device, timeout_s)
        thread.join()
        if "error" in reply:
            transport.close()
            raise reply["error"]
        self._transport = transport

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        version: int | None = None,
    ) -> None:
        """Push a complete set of weights; raise `WeightSyncError` if the server refuses or fails to load it."""
        if self._transport is None:
            raise RuntimeError("call connect_weights() before update_weights()")
        named = list(named_tensors)
        body: dict[str, Any] = {"tensors": [m.to_json() for m in tensor_metas(named)], "bucket_bytes": bucket_bytes}
        if version is not None:
            body["version"] = version
        try:
            self.request("POST", "/v1/weights/update", body)
        except InvalidRequestError as e:
            raise WeightSyncError(str(e)) from None
        self._transport.send(named, bucket_bytes)
        if self._transport.reduce_status(0) != 0:
            raise WeightSyncError(
                f"the server failed to load the weights: {self.request('GET', '/v1/weights')['last_error']}"
            )

    def close(self) -> None:
        if self._transport is not None:
            try:
                self.request("POST", "/v1/weights/close", {})
            finally:
                self._transport.close()
                self._transport = None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
