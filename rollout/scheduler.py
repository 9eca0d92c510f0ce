"""The rollout server's scheduler: the one thread that calls the engine (see `rollout.server`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rollout.types import GenerationCancelled, SamplingParams

if TYPE_CHECKING:
    from rollout.server import RolloutServer

GONE_POLL_S = 0.25  # how often a waiting request checks that its client is still connected


@dataclass
class _Job:
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False  # the client that asked for it disconnected

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def wait(self, client_gone: Callable[[], bool] | None = None, on_gone: Callable[[_Job], None] | None = None) -> Any:
        """The job's result. With `client_gone`, checked every `GONE_POLL_S` while waiting: once it
        says the client left, the job is marked `abandoned` and `on_gone(job)` is called (once)."""
        if client_gone is None:
            self.done.wait()
        else:
            while not self.done.wait(GONE_POLL_S):
                if not self.abandoned and client_gone():
                    self.abandoned = True
                    if on_gone is not None:
                        on_gone(self)
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _GenerateJob(_Job):
    prompts: list[list[int]] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)  # one per prompt


@dataclass
class _UpdateJob(_Job):
    named: list = field(default_factory=list)  # received (name, tensor) pairs
    version: int = 0


@dataclass
class _CallJob(_Job):
    """Any other engine call (sleep, wake_up), run in the scheduler's turn like the rest."""

    call: Callable[[], Any] = lambda: None


class Scheduler(threading.Thread):
    """The one thread that calls the engine (module docstring)."""

    def __init__(self, server: RolloutServer, max_batch_prompts: int):
        super().__init__(name="rollout-scheduler", daemon=True)
        self.server = server
        self.max_batch_prompts = max_batch_prompts
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.abandon = False  # set by shutdown once its grace is over: fail what is left
        self._lock = threading.Lock()
        self.call_started: float | None = None  # monotonic time the engine call in progress began
        self.running = 0  # generation requests in the engine call in progress
        self._seen: tuple[Any, float] = (None, 0.0)  # (engine progress, when it was first seen)
        self._current: list[_GenerateJob] = []  # the generation requests of the engine call in progress

    def run(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            stop = any(j is None for j in jobs)
            live = [j for j in jobs if j is not None]
            for job in [j for j in live if isinstance(j, _UpdateJob)]:
                self._call(job, lambda job=job: self.server._load_push(job))
            for job in [j for j in live if isinstance(j, _CallJob)]:
                self._call(job, job.call)
            for batch in self._batches([j for j in live if isinstance(j, _GenerateJob)]):
                self._generate(batch)
            if stop:
                return

    def _call(self, job: _Job, fn: Callable[[], Any]) -> None:
        if self.abandon:
            job.finish(error=GenerationCancelled("the server is shutting down"))
            return
        try:
            job.finish(self._timed(fn))
        except BaseException as e:
            job.finish(error=e)

    def _timed(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            self.call_started = time.monotonic()
            self._seen = (getattr(self.server.engine, "progress", None), self.call_started)
        try:
            return fn()
        finally:
            with self._lock:
                self.call_started = None

    def stalled_for(self) -> float:
        """Seconds the engine call in progress has gone without a step (0 when idle). Engines
        without a `progress` counter are judged by the call's duration alone."""
        now = time.monotonic()
        with self._lock:
            if self.call_started is None:
                return 0.0
            progress = getattr(self.server.engine, "progress", None)
            if progress is not None and progress != self._seen[0]:
                self._seen = (progress, now)
            return now - self._seen[1]

    def _batches(self, jobs: list[_GenerateJob]) -> list[list[_GenerateJob]]:
        # Engines that seed each prompt from its own content (rollout.types: both built-in ones)
        # merge seeded requests unless they share a seeded prompt (its derived seed would change
        # with the number of identical prompts before it in the call); an engine without
        # `seed_per_prompt` runs each seeded request alone, so it stays reproducible.
        per_prompt_seeds = getattr(self.server.engine, "seed_per_prompt", False)
        batches: list[list[_GenerateJob]] = []
        batch: list[_GenerateJob] = []
        keys: set = set()
        size = 0
        for job in jobs:
            seeded = {(p.seed, tuple(ids)) for ids, p in zip(job.prompts, job.params, strict=True) if p.seed is not None}
            if seeded and not per_prompt_seeds:
                batches.append([job])
                continue
            if batch and (size + len(job.prompts) > self.max_batch_prompts or seeded & keys):
                batches.append(batch)
                batch, keys, size = [], set(), 0
            batch.append(job)
            keys |= seeded
            size += len(job.prompts)
        if batch:
            batches.append(batch)
        return batches

    def client_left(self, job: _Job) -> None:
        """A waiting request's client disconnected (`job.abandoned` is set). A queued request is
        dropped when its turn comes; if every request of the engine call in progress is abandoned,
        the call is cancelled (an engine with `cancel()`), since nobody waits for its output. A
        call that also serves live requests runs to its end."""
        with self._lock:
            current = list(self._current)
        if any(j is job for j in current) and all(j.abandoned for j in current):
            cancel = getattr(self.server.engine, "cancel", None)
            if cancel is not None:
                cancel()

    def _generate(self, batch: list[_GenerateJob]) -> None:
        if self.abandon:
            for job in batch:
                job.finish(error=GenerationCancelled("the server is shutting down"))
            return
        for job in [j for j in batch if j.abandoned]:
            job.finish(error=GenerationCancelled("the client disconnected"))
        batch = [j for j in batch if not j.abandoned]
        if not batch:
            return
        try:
            prompts = [p for j in batch for p in j.prompts]
            params = [p for j in batch for p in j.params]
            self.running = len(batch)
            with self._lock:
                self._current = batch
            try:
                outputs = self._timed(lambda: self.server.engine.generate(prompts, params))
            finally:
                self.running = 0
                with self._lock:
                    self._current = []
            start = 0
            for job in batch:
                job.finish(outputs[start : start + len(job.prompts)])
                start += len(job.prompts)
        except Exception as e:  # the requests fail, the server keeps serving
            for job in batch:
                job.finish(error=e)
