"""vLLM backend, colocated: the engine runs inside the calling (trainer's) process.

vLLM's V1 engine core normally runs in a child process; `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps
it, and its single worker, in this process, so a weight push hands the trainer's tensors to the
worker by reference instead of serialising them. The constructor sets that variable (and refuses
to run if it is set to anything else).

Weight push (`update_weights`): the whole push is validated against the checkpoint's parameter
names and shapes first; then one `LLM.collective_rpc("reload_weights", ...)` call, vLLM's worker
method for in-place reloads, streams the tensors bucket by bucket (each bucket all-gathered from
FSDP shards and moved to the engine's device only when the loader reaches it). `reload_weights`
runs vLLM's layer-wise reload, which re-applies each layer's post-load processing. That is why no
worker extension calls `model.load_weights` on the live model here: on CPU, vLLM packs each linear
weight for oneDNN at load time and empties the original parameter, so loading into the live
parameters would not reach the weights the kernels use. Tied names (`lm_head.weight`) are always
sent: the reload unties modules while loading, and a module that receives nothing keeps its old
packed copy. Afterwards the prefix cache is reset, since cached KV blocks hold old-weight values.

vLLM logs "RotaryEmbedding: Failed to load weights" on every reload: its layer-wise reload counts
the rotary layer's precomputed cos/sin cache as loadable, no checkpoint holds it, so it warns and
puts the layer's own cache back, unchanged (outputs are exact: see the weight-push tests). The
engine filters out exactly that message; any other layer failing to load is still logged.

Generation runs vLLM's engine loop here (`_run`) rather than `LLM.generate`, for three things:
the call's requests are aborted if anything raises (vLLM leaves them in the engine otherwise, and
every later call steps them again and fails, for ever), `cancel()` stops a call from another
thread, and `progress` counts engine steps for the rollout server's health check.

Top-p on CPU: vLLM's sampler sorts the whole vocabulary of every row at every step, a third of a
decode step for SmolLM2 at top-p 0.9. On CPU the engine therefore asks vLLM for `top_p = 1` and
applies the same nucleus through `rollout.nucleus.NucleusLogitsProcessor` (vLLM's logits-processor
interface; exact, from a partial top-k). `sort_free_top_p=False` keeps vLLM's own top-p.

Threads on CPU: vLLM binds its OpenMP threads to cores at start-up, and with the OpenMP runtime
loaded the ordinary way only one core then does the work (vLLM's CPU platform code says so; it
therefore puts torch's libgomp, and its bundled tcmalloc, into LD_PRELOAD for the processes it
starts, but the process it is already running in cannot be changed any more). A colocated engine
on CPU therefore needs its process started with `LD_PRELOAD=$(python -c "from rollout.vllm_engine
import cpu_preload; print(cpu_preload())")`; the engine logs a warning when it is missing.
Measured with SmolLM2-135M on 2 cores: about 3x the throughput with it.

KV cache on CPU: vLLM's CPU build sizes its KV cache from `VLLM_CPU_KVCACHE_SPACE` (GiB) or, without
it, reserves `gpu_memory_utilization` (0.9 by default) of the machine's whole memory and refuses to
start when less than that is free, which on an ordinary machine is nearly always. So when neither
that variable nor `kv_cache_memory_bytes` / `gpu_memory_utilization` is given, the engine asks for
a KV cache of a quarter of the memory free at start-up, at least 1 GiB and at most 4 GiB (vLLM's
own documented default), and logs the size (`kv_cache_bytes`). Set `VLLM_CPU_KVCACHE_SPACE` or pass
`kv_cache_memory_bytes=` to choose.

Adapter-only sync (`update_adapter`, an engine started with `enable_lora=True`): instead of merged
weights, the trainer's LoRA adapter goes to vLLM's own LoRA support, and every generation runs
the base weights plus the adapter; a push is then the adapter's few MB.

Sleep / wake (GPU only; vLLM's CPU worker has no sleep mode, so there both are no-ops):
`sleep(level)` frees the KV cache (and offloads, level 1, or drops, level 2, the weights) while the
trainer runs; `update_weights` wakes only the weights before loading; `wake_up()` restores the rest.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from rollout.chat import encode_prompts, eos_token_ids, finish_completion
from rollout.nucleus import TOP_P_KEY, make_vllm_processor
from rollout.types import (
    Completion,
    GenerationCancelled,
    Prompt,
    SamplingParams,
    WeightSyncError,
    per_prompt_params,
    prompt_seeds,
)
from rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    WeightSpec,
    full_tensor,
    plan_buckets,
    push_source,
    tensor_metas,
)

_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's warning about the rotary embedding's cache on reload (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


_ROTARY_FILTER = _RotaryReloadFilter()


def _keep_engine_in_process() -> None:
    value = os.environ.get(_MP_ENV)
    if value not in (None, "0"):
        raise ValueError(
            f"the colocated vLLM engine runs in this process, but {_MP_ENV}={value!r} asks vLLM for a "
            f"separate engine process: unset it or set it to 0"
        )
    os.environ[_MP_ENV] = "0"


def _restore_environ(before: Mapping[str, str]) -> None:
    """Make os.environ equal `before` again (os.environ, not a new dict: the C environment follows)."""
    for key in [key for key in os.environ if key not in before]:
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


_GIB = 2**30


def default_cpu_kv_cache_bytes(available_bytes: int | None = None) -> int:
    """The CPU KV cache size used when none is configured: a quarter of the free memory
    (`available_bytes`, default: what psutil reports now), clamped to [1 GiB, 4 GiB]."""
    if available_bytes is None:
        import psutil

        available_bytes = int(psutil.virtual_memory().available)
    return int(min(4 * _GIB, max(1 * _GIB, available_bytes // 4)))


def cpu_preload() -> str:
    """LD_PRELOAD for a process that will run vLLM on CPU in-process: the current LD_PRELOAD plus
    torch's libgomp and vLLM's bundled tcmalloc (the libraries vLLM preloads for its own child
    processes), those that exist."""
    import glob

    import vllm

    torch_dir = Path(torch.__file__).parent
    libs = [os.environ.get("LD_PRELOAD", "")]
    if not any(name in libs[0] for name in ("libgomp", "libiomp", "libomp")):
        gomp = sorted(glob.glob(str(torch_dir.parent / "torch.libs" / "libgomp*.so*")))
        gomp += sorted(glob.glob(str(torch_dir / "lib" / "libgomp*.so*")))
        libs += gomp[:1]
    if "libtcmalloc" not in libs[0]:
        vllm_libs = Path(vllm.__file__).parent / "libs"
        tcmalloc = sorted(glob.glob(str(vllm_libs / "libtcmalloc_minimal*.so*")))
        tcmalloc += sorted(glob.glob(str(vllm_libs / "libtcmalloc.so*")))
        libs = tcmalloc[:1] + libs
    return ":".join(lib for lib in libs if lib)


def _kv_cache_unset(kwargs: Mapping[str, Any]) -> bool:
    return (
        os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") == ""
        and kwargs.get("kv_cache_memory_bytes") is None
        and "gpu_memory_utilization" not in kwargs
    )


class VLLMEngine:
    """Rollout engine on vLLM, in this process (CPU through vllm-cpu, or GPU)."""

    # vLLM gives every request (and every sample of it) its own generator.
    seed_per_prompt = True

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        enable_sleep_mode: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        show_progress: bool = False,
        sort_free_top_p: bool | None = None,
        **llm_kwargs: Any,
    ):
        """`llm_kwargs` go to `vllm.LLM` (e.g. `gpu_memory_utilization`, `distributed_executor_backend`)."""
        self.llm = None
        mp_setting = os.environ.get(_MP_ENV)
        _keep_engine_in_process()
        from vllm import LLM

        # Starting an engine writes process-wide settings into os.environ (on CPU: LD_PRELOAD,
        # LOCAL_WORLD_SIZE, thread and compiler settings) that every process this one starts later
        # would inherit; close() puts back the environment as it was after `import vllm`.
        self._environ_before = dict(os.environ)
        if mp_setting is None:
            del self._environ_before[_MP_ENV]

        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        # vLLM creates a default process group when none exists; only then is it ours to destroy.
        self._owns_default_group = not dist.is_initialized()
        kwargs = dict(model=str(model), tokenizer=str(model), dtype=dtype, seed=seed, enforce_eager=enforce_eager)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if self.on_gpu:
            kwargs["enable_sleep_mode"] = True if enable_sleep_mode is None else enable_sleep_mode
        else:
            # When a prompt's prefill is split over steps, vLLM rewinds the request's sampling
            # generator by its offset, which CPU generators lack: a seeded request then crashes the
            # engine. So on CPU every prompt is prefilled in one step.
            context = max_model_len or AutoConfig.from_pretrained(str(model)).max_position_embeddings
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(int(context), 8192))
        # None: on CPU only, where vLLM's top-p sorts on the CPU; on GPU its sampler kernels are fast.
        self.sort_free_top_p = not self.on_gpu if sort_free_top_p is None else sort_free_top_p
        self._nucleus_registered = self.sort_free_top_p  # vLLM takes logits processors at start-up only
        if self.sort_free_top_p:
            kwargs["logits_processors"] = [make_vllm_processor()]
        kwargs.update(llm_kwargs)
        if not self.on_gpu and not any(n in os.environ.get("LD_PRELOAD", "") for n in ("libgomp", "libiomp")):
            logging.getLogger(__name__).warning(
                "vLLM on CPU uses one core in this process: start it with LD_PRELOAD=%s (see "
                "rollout.vllm_engine.cpu_preload)", cpu_preload(),
            )
        self.kv_cache_bytes = kwargs.get("kv_cache_memory_bytes")
        if not self.on_gpu and _kv_cache_unset(kwargs):
            self.kv_cache_bytes = kwargs["kv_cache_memory_bytes"] = default_cpu_kv_cache_bytes()
            logging.getLogger(__name__).info(
                "VLLM_CPU_KVCACHE_SPACE is not set: using a KV cache of %.2f GiB (a quarter of the free "
                "memory, 1-4 GiB)", self.kv_cache_bytes / 2**30,
            )
        # vLLM's CPU worker turns torch.set_num_threads into a no-op while it holds the thread
        # binding; close() hands the process its own function back.
        self._set_num_threads = torch.set_num_threads
        try:
            self.llm = LLM(**kwargs)
        except BaseException:
            self._give_back_process_state()
            raise
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        generation_eos = None
        if (Path(model) / "generation_config.json").exists():
            generation_eos = GenerationConfig.from_pretrained(str(model)).eos_token_id
        self.eos_ids = eos_token_ids(self.tokenizer, generation_eos)
        self.weight_spec = WeightSpec.from_pretrained(model)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.bucket_bytes = bucket_bytes
        self.show_progress = show_progress
        self._asleep = False
        self._weights_awake = True
        self._weights_valid = True  # False after a level-2 sleep until the next push
        self.weight_version = 0
        self.progress = 0  # engine steps taken so far: the rollout server's sign of life
        self._state_lock = threading.Lock()
        self._running = self._cancelled = False
        self.lora_enabled = bool(kwargs.get("enable_lora"))
        self._lora_request = None  # the adapter every generation runs with (update_adapter)
        self._lora_dir: tempfile.TemporaryDirectory | None = None

    def _vllm_params(self, params: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VLLMSamplingParams

        top_p, extra_args = float(params.top_p), None
        if self.sort_free_top_p and not self._nucleus_registered:
            raise RuntimeError("sort_free_top_p was off when the engine started, so vLLM has no nucleus processor")
        if self.sort_free_top_p and top_p < 1 and not params.greedy:
            top_p, extra_args = 1.0, {TOP_P_KEY: top_p}
        return VLLMSamplingParams(
            n=params.n,
            temperature=float(params.temperature),
            top_p=top_p,
            extra_args=extra_args,
            max_tokens=params.max_tokens,
            seed=seed,
            stop=list(params.stop) or None,
            stop_token_ids=None if params.ignore_eos else sorted(self.eos_ids),
            ignore_eos=params.ignore_eos,
            logprobs=0,
            # Text is decoded by rollout.chat; vLLM only needs it to find stop strings.
            detokenize=bool(params.stop),
            skip_special_tokens=True,
        )

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """`n` completions per prompt (see `rollout.types.RolloutEngine`); `params` may be one
        `SamplingParams` per prompt. Not reentrant: one call at a time (the rollout server's
        scheduler is the only caller there); `cancel()` may be called from any thread."""
        if self._asleep:
            raise RuntimeError("the engine is asleep: call wake_up() before generate()")
        if not prompts:
            return []
        per_prompt = per_prompt_params(params, len(prompts))
        prompt_ids = encode_prompts(
            self.tokenizer, prompts, [p.max_tokens for p in per_prompt], vocab_size=self.vocab_size,
            max_model_len=self.max_model_len, chat_template_kwargs=self.chat_template_kwargs,
        )
        seeds = prompt_seeds(per_prompt, prompt_ids)
        vllm_params = [self._vllm_params(p, seed) for p, seed in zip(per_prompt, seeds, strict=True)]
        version = self.weight_version
        outputs = self._run([{"prompt_token_ids": ids} for ids in prompt_ids], vllm_params)
        results = []
        for ids, p, out in zip(prompt_ids, per_prompt, outputs, strict=True):
            samples = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                logprobs = [step[t].logprob for t, step in zip(o.token_ids, o.logprobs, strict=True)]
                c = finish_completion(self.tokenizer, ids, o.token_ids, logprobs, p, self.eos_ids)
                samples.append(dataclasses.replace(c, weight_version=version))
            results.append(samples)
        return results

    def _run(self, inputs: list[dict], vllm_params: list) -> list:
        """Add the requests and step the engine until they finish (vLLM's `LLM.generate` loop, plus
        a step counter for the server's health check, cancellation, and clean-up on failure).

        If anything raises (a request vLLM's scheduler cannot serve, `cancel()`, KeyboardInterrupt),
        the call's unfinished requests are aborted before the error propagates: left in the engine
        they would be stepped, and fail, again on every later call, which never returns."""
        engine = self.llm.llm_engine
        with self._state_lock:
            self._running, self._cancelled = True, False
        request_ids: list[str] = []
        try:
            request_ids = self.llm.enqueue(inputs, vllm_params, lora_request=self._lora_request, use_tqdm=False)
            finished = {}
            with tqdm(total=len(inputs), desc="generate (vLLM)", disable=not self.show_progress) as bar:
                while engine.has_unfinished_requests():
                    if self._cancelled:
                        raise GenerationCancelled("generation cancelled (the server is shutting down?)")
                    step_outputs = engine.step()
                    self.progress += 1
                    for out in step_outputs:
                        if out.finished:
                            finished[out.request_id] = out
                            bar.update(1)
            if len(finished) != len(inputs):
                raise RuntimeError(f"vLLM finished {len(finished)} of {len(inputs)} requests")
            return [finished[k] for k in sorted(finished, key=int)]
        except BaseException:
            self._abort(request_ids)
            raise
        finally:
            with self._state_lock:
                self._running = False

    def _abort(self, request_ids: list[str]) -> None:
        engine = self.llm.llm_engine
        try:
            if request_ids:
                engine.abort_request(request_ids, internal=True)
            # Drain what the abort left behind (outputs of the aborted requests) so the next call
            # starts from an empty engine.
            for _ in range(16):
                if not engine.has_unfinished_requests():
                    break
                engine.step()
        except Exception:  # the original error is what the caller needs to see
            pass

    def cancel(self) -> None:
        """Make the `generate` call in progress (if any) stop at its next engine step and raise
        `GenerationCancelled`; safe to call from any thread."""
        with self._state_lock:
            if self._running:
                self._cancelled = True

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], *, version: int | None = None) -> None:
        """Push a complete set of Hugging Face-named weights into the engine's model (module docstring);
        completions report `version` from now on (default: the previous version + 1)."""
        metas, named = push_source(named_tensors)
        self.weight_spec.check(metas)
        # vLLM's layer-wise reload unties tied modules while loading; a module that receives no
        # tensor keeps its old kernel state (on CPU the LM head's packed copy of the tied
        # embedding), so every tied name must be sent. A lazy push (LazyWeights: merged LoRA
        # weights) streams one tensor at a time, each followed by its missing aliases.
        if isinstance(named, list):
            stream = self._stream(self.weight_spec.with_aliases(named))
        else:
            stream = (
                (name, full_tensor(t).to(self.device, non_blocking=True))
                for name, t in self.weight_spec.stream_with_aliases(metas, named)
            )
        logging.getLogger(_RELOAD_LOGGER).addFilter(_ROTARY_FILTER)  # idempotent
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True}
        )
        if not self._asleep:  # sleeping cleared the prefix cache already; wake_up resets it again
            self.llm.reset_prefix_cache()
        self._weights_valid = True
        self.weight_version = self.weight_version + 1 if version is None else int(version)

    def _stream(self, named: list[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        start = 0
        buckets = plan_buckets(tensor_metas(named), self.bucket_bytes)
        for bucket in tqdm(buckets, desc="push weights", disable=not self.show_progress):
            chunk = named[start : start + len(bucket.entries)]
            start += len(bucket.entries)
            yield from [(name, full_tensor(t).to(self.device, non_blocking=True)) for name, t in chunk]

    def update_adapter(self, model: Any, *, version: int | None = None) -> None:
        """Adapter-only weight sync through vLLM's LoRA support: from now on every generation runs
        the base weights plus `model`'s active LoRA adapter (a peft `PeftModel`, unsharded).

        The engine must have been started with `enable_lora=True` and a `max_lora_rank` of at least
        the adapter's rank. The adapter is saved (a few MB, instead of the whole model's merged
        weights) to a folder the engine owns and loaded by vLLM under a new id; a load that vLLM
        refuses (e.g. a target module it cannot adapt) raises `WeightSyncError` and the previous
        adapter stays. Base weights pushed with `update_weights` stay below the adapter. Completions
        report `version` from now on (default: the previous version + 1)."""
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise WeightSyncError("adapter-only sync needs an engine started with enable_lora=True")
        if not hasattr(model, "peft_config") or not hasattr(model, "save_pretrained"):
            raise WeightSyncError(f"update_adapter takes a peft model, got {type(model).__name__}")
        new_version = self.weight_version + 1 if version is None else int(version)
        folder = tempfile.TemporaryDirectory(prefix="rollout-lora-")
        try:
            model.save_pretrained(folder.name, selected_adapters=[model.active_adapter])
            adapter_dir = Path(folder.name)
            if model.active_adapter != "default":  # peft saves other adapters in a subfolder
                adapter_dir = adapter_dir / model.active_adapter
            old = self._lora_request
            request = LoRARequest(f"policy-{new_version}-{id(folder)}", (old.lora_int_id + 1) if old else 1,
                                  str(adapter_dir))
            try:
                self.llm.llm_engine.add_lora(request)
            except Exception as e:
                raise WeightSyncError(f"vLLM refused the adapter: {type(e).__name__}: {e}") from None
        except BaseException:
            folder.cleanup()
            raise
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        if self._lora_dir is not None:
            self._lora_dir.cleanup()
        self._lora_request, self._lora_dir = request, folder
        self.weight_version = new_version

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory while the trainer runs (no-op on CPU)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (offload weights) or 2 (drop weights), got {level}")
        if self._asleep:
            return
        if self.on_gpu:
            self.llm.sleep(level=level)
            self._weights_awake = False
            self._weights_valid = level == 1
        self._asleep = True

    def wake_up(self) -> None:
        """Bring back what `sleep` freed (weights already woken by a push stay as they are)."""
        if not self._asleep:
            return
        if not self._weights_valid:
            raise RuntimeError("a level-2 sleep dropped the weights: push weights before wake_up()")
        if self.on_gpu:
            self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
            self.llm.reset_prefix_cache()
        self._asleep = False
        self._weights_awake = True

    def _give_back_process_state(self) -> None:
        """Undo what vLLM's start-up changed process-wide: torch.set_num_threads and os.environ."""
        torch.set_num_threads = self._set_num_threads
        _restore_environ(self._environ_before)

    def close(self) -> None:
        if self.llm is None:
            return
        if self._lora_dir is not None:
            self._lora_dir.cleanup()
            self._lora_dir = None
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        self._give_back_process_state()
        if self._owns_default_group:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
