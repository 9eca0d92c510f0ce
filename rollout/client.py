"""Trainer-side client of a rollout server: the `RolloutEngine` protocol over HTTP + torch.distributed.

    engine = RemoteEngine("http://gen-host:8000")
    engine.connect_weights(host="trainer-host")     # builds the weight-sync group (trainer = rank 0)
    completions = engine.generate(prompts, SamplingParams(n=8, temperature=0.8, top_p=0.9))
    engine.update_weights(policy_weights(model))     # after each optimizer step

Under FSDP2 (the policy sharded over several trainer ranks) every rank calls
`rollout.weight_sync.push_weights_all_ranks(engine, named, is_sender=rank == 0)` instead of
`update_weights`, so that the shards are gathered in the same order on every rank.

Generation sends one HTTP request per `generate` call (`POST /v1/generate`, all prompts with
their sampling parameters); the server merges concurrent calls. Every `Completion` carries the
`weight_version` that produced it.

A push first announces the tensor names, shapes and dtypes (`POST /v1/weights/update`; a refusal
raises `WeightSyncError` and nothing is sent), then broadcasts the buckets, then waits over HTTP
(`/v1/weights/wait`) until the server has loaded them or failed to.

Failures of the weight-sync group: when the transport fails (the server died or gave up waiting
for a bucket, a gloo/NCCL error) or the server reports the group broken, `update_weights` drops
the dead transport, leaves the group on the server, builds a new group with the arguments of the
last `connect_weights` call and raises `WeightSyncError` saying so; the caller pushes again. If
the new group cannot be built, the error says that too and `connect_weights` must be called
before the next push.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from rollout.types import (
    Completion,
    InvalidRequestError,
    Prompt,
    RolloutError,
    SamplingParams,
    WeightSyncError,
    per_prompt_params,
)
from rollout.weight_sync import DEFAULT_BUCKET_BYTES, TensorMeta, WeightTransport, push_source


class RemoteEngine:
    """A rollout server seen as a `RolloutEngine`."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 3600,
        max_concurrency: int = 64,  # unused since generate() sends one request; kept for callers
        chat_template_kwargs: dict[str, Any] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        # Chat-template variables sent with every request (e.g. {"enable_thinking": False}), over
        # the server's own defaults: the policy sees the prompts SFT rendered.
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.api_key, self.timeout_s, self.max_concurrency = api_key, timeout_s, max_concurrency
        self.model = model or self.request("GET", "/v1/models")["data"][0]["id"]
        self._transport: WeightTransport | None = None
        self._connect_kwargs: dict[str, Any] | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON request; an error status raises with the server's message (400:
        `InvalidRequestError`, others `RolloutError`; the HTTP status is the error's `status`)."""
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
            error = {400: InvalidRequestError}.get(e.code, RolloutError)(f"{method} {path} -> {e.code}: {message}")
            error.status = e.code
            raise error from None

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """`n` completions per prompt (see `rollout.types.RolloutEngine`), in one HTTP request;
        `params` may be one `SamplingParams` per prompt. Safe to call from several threads."""
        if not prompts:
            return []
        per_prompt = per_prompt_params(params, len(prompts))
        distinct = {p: _params_json(p) for p in per_prompt}
        body: dict[str, Any] = {
            "model": self.model,
            "prompts": [p if isinstance(p, str) else [dict(m) if isinstance(m, dict) else m for m in p] for p in prompts],
            "params": distinct[per_prompt[0]] if len(distinct) == 1 else [distinct[p] for p in per_prompt],
        }
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        out = self.request("POST", "/v1/generate", body)
        return [
            [
                Completion(
                    tuple(c["prompt_token_ids"]),
                    tuple(c["token_ids"]),
                    tuple(c["logprobs"]),
                    c["text"],
                    c["finish_reason"],
                    c.get("weight_version"),
                )
                for c in samples
            ]
            for samples in out["completions"]
        ]

    def sleep(self, level: int = 1) -> None:
        """Put the server's engine to sleep (see `rollout.types.RolloutEngine.sleep`)."""
        self.request("POST", "/v1/sleep", {"level": level})

    def wake_up(self) -> None:
        self.request("POST", "/v1/wake_up", {})

    @property
    def weight_version(self) -> int:
        """The version of the weights the server generates with now."""
        return int(self.request("GET", "/v1/weights")["version"])

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
        self._connect_kwargs = dict(host=host, port=port, backend=backend, device=device, timeout_s=timeout_s)
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
        """Push a complete set of weights; raise `WeightSyncError` if the server refuses or fails to
        load it, or the weight-sync group fails (then rebuilt, see the module docstring). A
        `LazyWeights` (merged LoRA weights) is announced from its metadata and computed one bucket
        at a time while it is sent. Under FSDP2 use `rollout.weight_sync.push_weights_all_ranks`,
        which every rank calls."""
        metas, named = push_source(named_tensors)
        push_id = self._announce(metas, bucket_bytes, version)
        try:
            self._require_transport().send(named, bucket_bytes, metas=metas)
        except Exception as e:  # gloo / NCCL: the server left the group or gave up waiting; or a
            # LazyWeights tensor came out unlike its announcement, leaving the server mid-push
            self._rebuild_group(f"sending the weights failed: {type(e).__name__}: {e}")
        self._finish_push(push_id)

    def _require_transport(self) -> WeightTransport:
        if self._transport is None:
            raise RuntimeError("call connect_weights() before update_weights()")
        return self._transport

    def _announce(self, metas: Sequence[TensorMeta], bucket_bytes: int, version: int | None) -> int:
        """Announce a push (names, shapes, dtypes) to the server; its push id, or WeightSyncError."""
        self._require_transport()
        body: dict[str, Any] = {"tensors": [m.to_json() for m in metas], "bucket_bytes": bucket_bytes}
        if version is not None:
            body["version"] = version
        try:
            reply = self.request("POST", "/v1/weights/update", body)
        except InvalidRequestError as e:
            raise WeightSyncError(str(e)) from None
        except RolloutError as e:
            if getattr(e, "status", None) == 409 and "broken" in str(e):
                self._rebuild_group(str(e))
            raise WeightSyncError(str(e)) from None
        return int(reply["push_id"])

    def _finish_push(self, push_id: int) -> None:
        """Wait until the server has loaded push `push_id`; WeightSyncError if it did not."""
        push = self._wait_push(push_id)
        if push.get("broken"):
            self._rebuild_group(f"the server could not receive the push: {push['error']}")
        if not push["ok"]:
            raise WeightSyncError(f"the server failed to load the weights: {push['error']}")

    def _wait_push(self, push_id: int) -> dict:
        while True:
            state = self.request("POST", "/v1/weights/wait", {"push_id": push_id, "timeout_s": 30})
            push = state.get("last_push")
            if push is not None and push["push_id"] >= push_id:
                return push

    def _rebuild_group(self, reason: str) -> None:
        """Drop the dead transport, leave the group on the server, join a new one; always raises."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        try:
            self.request("POST", "/v1/weights/close", {})
            self.connect_weights(**(self._connect_kwargs or {}))
        except Exception as e:
            raise WeightSyncError(
                f"{reason}; rebuilding the weight-sync group failed too ({type(e).__name__}: {e}): "
                "call connect_weights() before the next push"
            ) from None
        raise WeightSyncError(f"{reason}; the weight-sync group was rebuilt: push again")

    def close(self) -> None:
        if self._transport is not None:
            try:
                self.request("POST", "/v1/weights/close", {})
            finally:
                self._transport.close()
                self._transport = None


def _params_json(p: SamplingParams) -> dict[str, Any]:
    return {
        "n": p.n,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_tokens": p.max_tokens,
        "seed": p.seed,
        "stop": list(p.stop),
        "ignore_eos": p.ignore_eos,
    }


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
