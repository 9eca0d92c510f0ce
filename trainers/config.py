"""Typed trainer configuration: dataclasses, loaded from JSON / TOML / YAML plus `key.sub=value`
overrides, checked against the field types, printed at start and saved with every checkpoint.

The sections (`ModelConfig`, `LoraConfig`, `OptimConfig`, ...) are shared by the trainers;
`SFTConfig` composes them for `trainers/sft.py`. Loading is generic over any dataclass, so other
trainers define their own top-level dataclass and reuse `load_config`.

Override syntax on the command line: `optim.lr=3e-4`, `lora.enabled=true`,
`lora.target_modules=["q_proj","v_proj"]`, `model.path=null`,
`data.chat_template_kwargs={"enable_thinking": false}` or one key of such a table,
`data.chat_template_kwargs.enable_thinking=false`. Values are parsed as JSON, except for string
fields and enums with string values, which take the text as written (so `model.path=/data/m`
needs no quotes). Enum fields load from their values (`loss.aggregation=token_mean`) and are saved
as them. Every bad value, whether a wrong type or one a section's `__post_init__` refuses, is a
`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml  # a dependency of accelerate, so always installed with the trainers

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Seeds go to `accelerate.utils.set_seed`, whose `np.random.seed` takes only [0, 2**32).
SEED_LIMIT = 2**32


def check_seed(seed: int, key: str) -> None:
    _check(0 <= seed < SEED_LIMIT, f"{key} must be in [0, 2**32), got {seed}")


# ---------------------------------------------------------------------------------------------
# The sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # A Hugging Face model folder. None builds the tiny 2-layer Qwen3 from `trainers.tiny` into
    # `<output_dir>/base_model`, so the default config runs on any machine without downloads.
    path: str | None = None
    # Dtype the weights are loaded in. FSDP2 with bf16 mixed precision upcasts trainable weights
    # to float32 masters anyway; without FSDP, bfloat16 weights are trained in bfloat16.
    dtype: Literal["float32", "bfloat16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # Seed for the tiny model built when `path` is None.
    tiny_seed: int = 0

    def __post_init__(self):
        check_seed(self.tiny_seed, "model.tiny_seed")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Also write base+adapter merged into a plain HF folder (what vLLM loads) at each checkpoint.
    save_merged: bool = True

    def __post_init__(self):
        _check(self.r >= 1, f"lora.r must be >= 1, got {self.r}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(bool(self.target_modules), "lora.target_modules must name at least one module")


@dataclass
class OptimConfig:
    """AdamW; after a linear warmup the rate follows a cosine (`schedule="cosine"`) or stays constant."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Gradient clipping on the global L2 norm; 0 disables clipping (the norm is still logged).
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    # Final learning rate of the cosine as a fraction of `lr`.
    min_lr_ratio: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0.0 <= self.beta1 < 1.0, f"optim.beta1 must be in [0, 1), got {self.beta1}")
        _check(0.0 <= self.beta2 < 1.0, f"optim.beta2 must be in [0, 1), got {self.beta2}")
        # eps = 0 divides 0 by 0 for a parameter whose gradient has always been zero.
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(self.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DataConfig:
    # JSONL of `{"messages": [...], "target": "..."}` or `{"prompt": ..., "completion": ...}`
    # rows. None trains on the small built-in set of pairs in `trainers.sft_data`.
    path: str | None = None
    max_length: int = 1024
    # Examples longer than max_length: "truncate" cuts the prompt from the left (the target stays
    # whole if it fits), "drop" skips them. Either way a warning counts them.
    truncation: Literal["truncate", "drop"] = "truncate"
    # Batch examples of similar length together (less padding); batches are still shuffled.
    group_by_length: bool = True
    shuffle: bool = True
    # Extra variables of the chat template, e.g. {"enable_thinking": false} for Qwen3. The RL
    # prompts and the rollout must render with the same ones, so the policy sees one format.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check(self.max_length >= 2, f"data.max_length must be >= 2, got {self.max_length}")
        check_template_kwargs(self.chat_template_kwargs, "data.chat_template_kwargs")


def check_template_kwargs(kwargs: dict[str, Any], key: str) -> None:
    # apply_chat_template takes these as keyword arguments next to its own: a clash would
    # silently change how the prompt is rendered (or raise a TypeError deep inside transformers).
    reserved = {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                "chat_template", "tools", "documents", "return_dict", "return_tensors"}
    clash = sorted(set(kwargs) & reserved)
    _check(not clash, f"{key} must not set apply_chat_template's own arguments, got {clash}")


@dataclass
class TrainConfig:
    # Per-process micro-batch. The global batch of one optimizer step is
    # batch_size * num_processes * grad_accum_steps examples.
    batch_size: int = 4
    grad_accum_steps: int = 1
    epochs: int = 1
    # Optimizer steps; when > 0 it replaces `epochs` as the stopping rule.
    max_steps: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _check(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(
            self.max_steps > 0 or self.epochs >= 1, f"train.epochs must be >= 1 (or set max_steps), got {self.epochs}"
        )
        check_seed(self.seed, "train.seed")


@dataclass
class DistributedConfig:
    # FSDP2 with every decoder layer fully sharded (used when more than one process runs).
    fsdp: bool = False
    # Re-shard parameters after forward (ZeRO-3 like); False keeps them gathered until backward.
    reshard_after_forward: bool = True
    # Layer class to wrap as an FSDP unit; None takes the model's `_no_split_modules`.
    wrap_class: str | None = None
    # "auto" is bf16 mixed precision on a CUDA GPU that supports it and float32 elsewhere.
    precision: Literal["auto", "no", "bf16"] = "auto"
    # When FSDP2 reduces gradients during gradient accumulation. "every_micro_batch":
    # reduce-scatter after each micro-batch's backward, so each rank only ever holds its shard of
    # the gradients (1/N of them; one collective per micro-batch). "last_micro_batch": FSDP2's
    # `no_sync` (`set_requires_gradient_sync(False)`) on all but the last micro-batch: no
    # communication until then, but every rank keeps the full unsharded gradients of the whole
    # model (4 bytes/parameter in float32) across the step. DDP always syncs on the last only
    # (its gradients are full anyway). Numbers: benchmarks/results/sft_memory.md.
    grad_accum_sync: Literal["every_micro_batch", "last_micro_batch"] = "every_micro_batch"


@dataclass
class CheckpointConfig:
    output_dir: str = "outputs/sft"
    # Save every N optimizer steps (0: only at the end). A final checkpoint is always written.
    every_steps: int = 0
    # Keep only the newest N checkpoints (0 keeps all).
    keep_last: int = 2
    # Resume from this checkpoint folder, or "latest" for the newest one under output_dir.
    resume: str | None = None
    # A new run refuses an output_dir that already holds a run; true deletes that run's files
    # first (`trainers.run_dir`).
    overwrite: bool = False

    def __post_init__(self):
        _check(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _check(self.keep_last >= 0, f"checkpoint.keep_last must be >= 0, got {self.keep_last}")


@dataclass
class LoggingConfig:
    every_steps: int = 1
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        _check(self.every_steps >= 1, f"logging.every_steps must be >= 1, got {self.every_steps}")


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Conversion with type checking
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, default: Any = None) -> Any:
    """Check `value` against the annotation `tp` and return it in that type.

    A section (dataclass) given as a table updates `default`, the field's default instance, so
    a section whose defaults its parent sets (`TrainConfig(epochs=20)`) keeps them.
    """
    origin = typing.get_origin(tp)
    if tp is Any:  # free-form values (chat-template variables): whatever the file or JSON held
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        values = [m.value for m in tp]
        # Enums load from their values; bool is excluded so `true` never matches a value of 1.
        if not isinstance(value, bool) and value in values:
            return tp(value)
        raise ConfigError(f"bad value for '{where}': {value!r} is not one of {values}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"bad value for '{where}': expected a table of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, where, default)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"bad value for '{where}': null is not allowed (expected {_type_name(tp)})")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, default)
            except ConfigError:
                continue
        raise ConfigError(f"bad value for '{where}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"bad value for '{where}': {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad value for '{where}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"bad value for '{where}': expected a table, got {value!r}")
        return {_coerce(k, key_tp, f"{where} (a key)"): _coerce(v, item_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"bad value for '{where}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"bad value for '{where}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"bad value for '{where}': expected a number, got {value!r}")
        # JSON overrides parse `NaN` and `Infinity`; every comparison with NaN is false, so range
        # checks in __post_init__ would let it through, and no setting here means anything at inf.
        if not math.isfinite(value):
            raise ConfigError(f"bad value for '{where}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"bad value for '{where}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"field '{where}' has an unsupported type {_type_name(tp)}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """`cls` built from `data` over `base` (or over the class defaults when `base` is None)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        section = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"unknown config key '{where}' (keys of {section}: {', '.join(fields)})")
    kwargs = {}
    for key, value in data.items():
        default = getattr(base, key) if base is not None else _field_default(fields[key])
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key, default)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        # A section whose __post_init__ raises a plain error (or calls code that does): still a
        # ConfigError, naming at least the section.
        raise ConfigError(f"bad value in '{prefix or 'the top level'}': {exc}") from exc


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass `cls` from nested dicts; missing keys keep their defaults."""
    return _from_dict(cls, data)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config (JSON-serialisable; enums as their values)."""
    return _plain(dataclasses.asdict(cfg))


def _read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path} must end in .json, .toml, .yaml or .yml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of sections, got {type(data).__name__}")
    return data


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of the field at `dotted` (e.g. "optim.lr"), or a ConfigError naming it."""
    tp: Any = cls
    walked: list[str] = []
    for part in dotted.split("."):
        if typing.get_origin(tp) is dict:  # one key of a free-form table
            tp = typing.get_args(tp)[1]
            walked.append(part)
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key '{dotted}' ('{'.'.join(walked)}' has no sub-keys)")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            where = ".".join(walked) or "the top level"
            raise ConfigError(f"unknown config key '{dotted}' (keys of {where}: {', '.join(hints)})")
        tp = hints[part]
        walked.append(part)
    return tp


def _is_str_field(tp: Any) -> bool:
    if tp is str:
        return True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return all(isinstance(m.value, str) for m in tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return all(isinstance(c, str) for c in typing.get_args(tp))
    return False


def parse_override(cls: type, text: str) -> tuple[list[str], Any]:
    """Split `key.sub=value` into its key path and raw value (JSON, or text for string fields)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    tp = _field_type(cls, key)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"override {text!r} sets a whole section; set its keys ({key}.<name>=...) instead")
    if raw in ("null", "None", "none") and type(None) in typing.get_args(tp):
        return key.split("."), None
    if tp is bool and raw.lower() in ("true", "false"):
        return key.split("."), raw.lower() == "true"
    if _is_str_field(tp) and not raw.startswith('"'):
        return key.split("."), raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        if tp is Any:  # a free-form value that is not JSON is the text as written
            return key.split("."), raw
        raise ConfigError(f"bad value for '{key}': cannot parse {raw!r} ({exc.msg})") from exc
    return key.split("."), value


def _set_nested(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{part}' is not a section")
    node[path[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of `cls`, updated by the file at `path` (JSON/TOML/YAML), then by overrides."""
    data = _read_file(path) if path is not None else {}
    for text in overrides:
        key_path, value = parse_override(cls, text)
        _set_nested(data, key_path, value)
    return config_from_dict(cls, data)


def format_config(cfg: Any) -> str:
    """The config as indented JSON, for printing at start."""
    return json.dumps(config_to_dict(cfg), indent=2)


def summarize_config(cfg: Any, saved_to: str | Path | None = None) -> str:
    """A few lines for the start of a run: per section, the values that differ from the defaults
    of `type(cfg)` (one line per section that has any); `saved_to` names the file with all of it."""
    defaults = config_to_dict(type(cfg)())
    lines = []
    for section, values in config_to_dict(cfg).items():
        base = defaults.get(section)
        if not isinstance(values, dict):
            if values != base:
                lines.append(f"  {section}={values if isinstance(values, str) else json.dumps(values)}")
            continue
        changed = [
            f"{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in values.items()
            if not isinstance(base, dict) or base.get(key, object()) != value
        ]
        if changed:
            lines.append(f"  {section}: {' '.join(changed)}")
    where = f"; all of it in {saved_to}" if saved_to is not None else ""
    if not lines:
        return f"config: the {type(cfg).__name__} defaults{where}"
    return f"config (what differs from the {type(cfg).__name__} defaults{where}):\n" + "\n".join(lines)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the config as JSON; `load_config(type(cfg), path)` reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_config(cfg) + "\n")
    return path
