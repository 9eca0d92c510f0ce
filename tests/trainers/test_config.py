"""Typed config: files, overrides, type checks, error messages, round trip."""

from __future__ import annotations

import json

import pytest

from trainers.config import (
    ConfigError,
    SFTConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    format_config,
    load_config,
    save_config,
)
from trainers.sft import parse_args


def test_defaults_and_overrides_of_every_kind():
    cfg = load_config(
        SFTConfig,
        overrides=[
            "optim.lr=3e-4",  # float
            "train.batch_size=8",  # int
            "lora.enabled=true",  # bool
            "data.group_by_length=False",  # bool, Python spelling
            "model.path=/data/models/qwen3",  # str without quotes
            'checkpoint.output_dir="runs/a b"',  # str with JSON quotes
            'lora.target_modules=["q_proj", "v_proj"]',  # list[str]
            "distributed.precision=bf16",  # Literal
            "checkpoint.resume=null",  # Optional set to None
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 8
    assert cfg.lora.enabled is True and cfg.data.group_by_length is False
    assert cfg.model.path == "/data/models/qwen3"
    assert cfg.checkpoint.output_dir == "runs/a b"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.distributed.precision == "bf16"
    assert cfg.checkpoint.resume is None
    # Untouched fields keep their defaults, including the ones SFTConfig sets on its sections
    # (TrainConfig's own default is 1 epoch, SFTConfig's is 20).
    assert cfg.train.epochs == 20 and TrainConfig().epochs == 1
    assert cfg.optim.beta2 == 0.95


def test_an_int_is_accepted_for_a_float_and_stored_as_float():
    cfg = load_config(SFTConfig, overrides=["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-4", "unknown config key 'optim.lrr' (keys of optim: lr, weight_decay"),
        ("optimizer.lr=1e-4", "unknown config key 'optimizer.lr' (keys of the top level: model, lora"),
        ("optim.lr.x=1", "unknown config key 'optim.lr.x' ('optim.lr' has no sub-keys)"),
        ("optim.lr=fast", "bad value for 'optim.lr': cannot parse 'fast'"),
        ("optim.lr=true", "bad value for 'optim.lr': expected a number, got True"),
        ("train.batch_size=2.5", "bad value for 'train.batch_size': expected an integer, got 2.5"),
        ("lora.enabled=1", "bad value for 'lora.enabled': expected true or false, got 1"),
        ("distributed.precision=fp16", "bad value for 'distributed.precision': 'fp16' is not one of"),
        ("lora.target_modules=q_proj", "bad value for 'lora.target_modules': cannot parse 'q_proj'"),
        ("lora.target_modules=[1]", "bad value for 'lora.target_modules[0]': expected a string, got 1"),
        ("optim.lr=null", "bad value for 'optim.lr': expected a number, got None"),
        ("optim=1", "sets a whole section"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("logging.every_steps=0", "logging.every_steps must be >= 1, got 0"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1], got 2.0"),
        ("optim.lr", "is not of the form key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key_and_the_problem(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, overrides=[override])
    assert message in str(info.value)


def test_file_errors_name_the_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"batch_size": 4, "warmup": 3}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.warmup'"):
        load_config(SFTConfig, path)
    path.write_text(json.dumps({"train": 4}))
    with pytest.raises(ConfigError, match=r"bad value for 'train': expected a table of TrainConfig fields"):
        load_config(SFTConfig, path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"cannot parse config file"):
        load_config(SFTConfig, path)
    (tmp_path / "c.ini").write_text("[optim]\n")
    with pytest.raises(ConfigError, match=r"must end in .json, .toml, .yaml or .yml"):
        load_config(SFTConfig, tmp_path / "c.ini")
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(SFTConfig, tmp_path / "missing.json")


def test_toml_and_yaml_files_then_overrides_on_top(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlr = 0.01\nwarmup_steps = 5\n[model]\npath = "m"\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("optim:\n  lr: 0.01\n  warmup_steps: 5\nmodel:\n  path: m\n")
    for path in (toml, yaml):
        cfg = load_config(SFTConfig, path, ["optim.lr=0.02"])
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.model.path) == (0.02, 5, "m")


def test_round_trip_through_the_saved_json(tmp_path):
    cfg = load_config(SFTConfig, overrides=["optim.lr=2e-5", "lora.enabled=true", 'lora.target_modules=["q_proj"]'])
    path = save_config(cfg, tmp_path / "out" / "trainer_config.json")
    assert load_config(SFTConfig, path) == cfg
    assert config_from_dict(SFTConfig, json.loads(format_config(cfg))) == cfg
    assert config_to_dict(cfg)["lora"]["target_modules"] == ["q_proj"]


def test_sft_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"lr": 0.5}}))
    cfg = parse_args(["--config", str(path), "--data", "pairs.jsonl", "--resume", "latest", "train.batch_size=2"])
    assert (cfg.optim.lr, cfg.data.path, cfg.train.batch_size) == (0.5, "pairs.jsonl", 2)
    assert cfg.checkpoint.resume == "latest"
    assert parse_args(["--resume", "runs/x/step-000004"]).checkpoint.resume == "runs/x/step-000004"
    with pytest.raises(SystemExit):
        parse_args(["optim.nope=1"])


# ---------------------------------------------------------------------------------------------
# Every enum / choice field of both trainer configs, every __post_init__ check (issue 12 item 7)
# ---------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import enum  # noqa: E402
import math  # noqa: E402
import typing  # noqa: E402

from trainers.adrpo_config import ADRPOConfig  # noqa: E402
from trainers.losses import Aggregation  # noqa: E402

CONFIG_CLASSES = {"sft": SFTConfig, "adrpo": ADRPOConfig}


def _leaf_fields(cls, prefix=""):
    """(dotted key, annotation) of every non-section field of a config class, recursively."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _leaf_fields(tp, key + ".")
        else:
            out.append((key, tp))
    return out


def _choices(tp):
    """The allowed values of an enum or Literal field (as written in a file), else None."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m.value for m in tp]
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    return None


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# Values whose section refuses them on their own: they load only with the companion setting.
_COMPANIONS = {
    ("adrpo", "loss.aggregation", "seq_sum_norm"): ["loss.norm_length=4096"],
    ("adrpo", "rollout.engine", "remote"): ["rollout.url=http://127.0.0.1:1"],
    ("adrpo", "reward.kind", "remote"): ["reward.url=http://127.0.0.1:1"],
}

CHOICE_CASES = [
    (name, key, value)
    for name, cls in CONFIG_CLASSES.items()
    for key, tp in _leaf_fields(cls)
    if _choices(tp) is not None
    for value in _choices(tp)
]


def test_the_choice_walk_sees_the_enum_fields():
    # Guards the parametrisation below from silently covering nothing.
    keys = {(name, key) for name, key, _ in CHOICE_CASES}
    assert ("adrpo", "loss.aggregation") in keys and ("sft", "distributed.precision") in keys
    assert ("sft", "model.dtype") in keys and ("adrpo", "rollout.tis") in keys


@pytest.mark.parametrize("name, key, value", CHOICE_CASES, ids=[f"{n}:{k}={v}" for n, k, v in CHOICE_CASES])
def test_every_choice_loads_from_its_value_in_overrides_and_files(name, key, value, tmp_path):
    cls = CONFIG_CLASSES[name]
    companions = _COMPANIONS.get((name, key, value), [])
    tp = dict(_leaf_fields(cls))[key]
    expected = tp(value) if isinstance(tp, type) and issubclass(tp, enum.Enum) else value
    # Bare text, as typed on a command line, and JSON-quoted text load the same.
    for override in (f"{key}={value}", f'{key}="{value}"'):
        cfg = load_config(cls, overrides=[override, *companions])
        assert _get(cfg, key) == expected and type(_get(cfg, key)) is type(expected)
    # A YAML file holding the value loads it too, and the saved JSON holds the value itself (not
    # the enum's repr) and loads back equal.
    section, leaf = key.rsplit(".", 1)
    extra = "".join(f"  {c.split('=')[0].split('.')[1]}: {c.split('=')[1]}\n" for c in companions if c.startswith(section))
    other = [c for c in companions if not c.startswith(section)]
    path = tmp_path / "c.yaml"
    # Quoted: YAML 1.1 reads a bare `no` as false (`distributed.precision: no` is refused, by name).
    path.write_text(f"{section}:\n  {leaf}: {json.dumps(value)}\n{extra}")
    from_file = load_config(cls, path, other)
    assert _get(from_file, key) == expected
    saved = save_config(from_file, tmp_path / "saved.json")
    assert json.loads(saved.read_text())[section][leaf] == value
    assert load_config(cls, saved) == from_file


def test_an_enum_refuses_a_name_that_is_not_a_value_and_a_non_string():
    with pytest.raises(ConfigError, match=r"bad value for 'loss.aggregation': 'TOKEN_MEAN' is not one of \['seq_mean"):
        load_config(ADRPOConfig, overrides=["loss.aggregation=TOKEN_MEAN"])
    with pytest.raises(ConfigError, match=r"bad value for 'loss.aggregation': 1 is not one of"):
        config_from_dict(ADRPOConfig, {"loss": {"aggregation": 1}})
    # An enum member given from Python is kept as it is.
    cfg = config_from_dict(ADRPOConfig, {"loss": {"aggregation": Aggregation.SEQ_MEAN_TOKEN_MEAN}})
    assert cfg.loss.aggregation is Aggregation.SEQ_MEAN_TOKEN_MEAN
    assert cfg.loss.policy_loss_config().aggregation is Aggregation.SEQ_MEAN_TOKEN_MEAN


# (config, override, the key the message must name, a piece of the message). One row per check in
# a __post_init__ of either config (SFTConfig's sections are shared by ADRPOConfig).
INVALID = [
    ("sft", "model.tiny_seed=-1", "model.tiny_seed", "[0, 2**32)"),
    ("sft", "lora.r=0", "lora.r", ">= 1"),
    ("sft", "lora.alpha=0", "lora.alpha", "> 0"),
    ("sft", "lora.dropout=1", "lora.dropout", "[0, 1)"),
    ("sft", "lora.target_modules=[]", "lora.target_modules", "at least one"),
    ("sft", "optim.lr=0", "optim.lr", "> 0"),
    ("sft", "optim.weight_decay=-0.1", "optim.weight_decay", ">= 0"),
    ("sft", "optim.beta1=1", "optim.beta1", "[0, 1)"),
    ("sft", "optim.beta2=-0.5", "optim.beta2", "[0, 1)"),
    ("sft", "optim.eps=0", "optim.eps", "> 0"),
    ("sft", "optim.max_grad_norm=-1", "optim.max_grad_norm", ">= 0"),
    ("sft", "optim.warmup_steps=-1", "optim.warmup_steps", ">= 0"),
    ("sft", "optim.min_lr_ratio=1.5", "optim.min_lr_ratio", "[0, 1]"),
    ("sft", "data.max_length=1", "data.max_length", ">= 2"),
    ("sft", 'data.chat_template_kwargs={"tokenize": true}', "data.chat_template_kwargs", "apply_chat_template"),
    ("sft", "data.chat_template_kwargs=[1]", "data.chat_template_kwargs", "expected a table"),
    ("sft", "train.batch_size=0", "train.batch_size", ">= 1"),
    ("sft", "train.grad_accum_steps=0", "train.grad_accum_steps", ">= 1"),
    ("sft", "train.max_steps=-1", "train.max_steps", ">= 0"),
    ("sft", "train.epochs=0", "train.epochs", ">= 1"),
    ("sft", "train.seed=4294967296", "train.seed", "[0, 2**32)"),
    ("sft", "checkpoint.every_steps=-1", "checkpoint.every_steps", ">= 0"),
    ("sft", "checkpoint.keep_last=-1", "checkpoint.keep_last", ">= 0"),
    ("sft", "logging.every_steps=0", "logging.every_steps", ">= 1"),
    ("adrpo", "data.sessions_per_step=0", "data.sessions_per_step", ">= 1"),
    ("adrpo", "data.world_conversations=-1", "data.world_conversations", ">= 0"),
    ("adrpo", "data.world_sessions=-1", "data.world_sessions", ">= 0"),
    ("adrpo", "data.agents=[]", "data.agents", "non-empty subset"),
    ("adrpo", 'data.agents=["core", "nope"]', "data.agents", "non-empty subset"),
    ("adrpo", "rollout.group_size=1", "rollout.group_size", ">= 2"),
    ("adrpo", "rollout.temperature=0", "rollout.temperature", "> 0"),
    ("adrpo", "rollout.top_p=0", "rollout.top_p", "(0, 1]"),
    ("adrpo", "rollout.top_p=1.01", "rollout.top_p", "(0, 1]"),
    ("adrpo", "rollout.max_tokens=0", "rollout.max_tokens", ">= 1"),
    ("adrpo", "rollout.max_batch_size=0", "rollout.max_batch_size", ">= 1"),
    ("adrpo", "rollout.vllm_gpu_memory_utilization=0", "rollout.vllm_gpu_memory_utilization", "(0, 1]"),
    ("adrpo", "rollout.vllm_gpu_memory_utilization=1.5", "rollout.vllm_gpu_memory_utilization", "(0, 1]"),
    ("adrpo", "rollout.max_model_len=6144", "rollout.max_model_len", "exceed rollout.max_tokens (6144)"),
    ("adrpo", "rollout.timeout_s=0", "rollout.timeout_s", "> 0"),
    ("adrpo", "rollout.tis_cap=0.5", "rollout.tis_cap", ">= 1"),
    ("adrpo", "rollout.engine=remote", "rollout.url", "needs"),
    ("adrpo", "reward.kind=remote", "reward.url", "needs"),
    ("adrpo", "reward.alpha=0.5", "reward.alpha", ">= 1"),
    ("adrpo", "reward.length_lambda=-1", "reward.length_lambda", ">= 0"),
    ("adrpo", "reward.timeout_s=0", "reward.timeout_s", "> 0"),
    ("adrpo", "reward.call_timeout_s=0", "reward.call_timeout_s", "> 0"),
    ("adrpo", "loss.eps_low=2.0", "loss.eps_low", "[0, 1)"),
    ("adrpo", "loss.eps_low=-0.1", "loss.eps_low", "[0, 1)"),
    ("adrpo", "loss.eps_high=-0.1", "loss.eps_high", ">= 0"),
    ("adrpo", "loss.beta=-0.02", "loss.beta", ">= 0"),
    ("adrpo", "loss.kl_clamp=-1", "loss.kl_clamp", ">= 0"),
    ("adrpo", "loss.dual_clip=0.5", "loss.dual_clip", "> 1"),
    ("adrpo", "loss.norm_length=-1", "loss.norm_length", ">= 0"),
    ("adrpo", "loss.aggregation=seq_sum_norm", "loss.norm_length", "> 0"),
    ("adrpo", "loss.adv_eps=0", "loss.adv_eps", "> 0"),
    ("adrpo", "loss.updates_per_batch=0", "loss.updates_per_batch", ">= 1"),
    ("adrpo", "loss.micro_batch_tokens=0", "loss.micro_batch_tokens", ">= 1"),
    ("adrpo", "loss.chunk_size=0", "loss.chunk_size", ">= 1"),
    ("adrpo", "train.max_steps=-1", "train.max_steps", ">= 0"),
    ("adrpo", "train.epochs=0", "train.epochs", ">= 1"),
    ("adrpo", "train.seed=-1", "train.seed", "[0, 2**32)"),
    ("adrpo", "lora.enabled=true", "lora.enabled", "LoRA"),
]


@pytest.mark.parametrize("name, override, key, piece", INVALID, ids=[row[1] for row in INVALID])
def test_every_invalid_value_is_a_config_error_naming_its_key(name, override, key, piece):
    with pytest.raises(ConfigError) as info:  # never a bare ValueError / TypeError
        load_config(CONFIG_CLASSES[name], overrides=[override])
    assert key in str(info.value) and piece in str(info.value), str(info.value)


def test_the_paper_defaults_pass_their_own_checks():
    # The rows above each break one check; the defaults (and so every other field) must pass.
    for cls in CONFIG_CLASSES.values():
        assert load_config(cls) == cls()


NUMERIC_FIELDS = [
    (name, key, tp)
    for name, cls in CONFIG_CLASSES.items()
    for key, tp in _leaf_fields(cls)
    if tp in (int, float) or tp in (int | None, float | None)
]


@pytest.mark.parametrize("name, key, tp", NUMERIC_FIELDS, ids=[f"{n}:{k}" for n, k, _ in NUMERIC_FIELDS])
def test_hostile_numbers_load_or_fail_naming_their_key(name, key, tp):
    # Whatever a number field is given, loading either works or is a ConfigError that names the
    # key: no bare exception from a trainer, a torch call or numpy later.
    values = ["-1", "0", "1", "0.5", "-1e-9", "1e300", "4294967296", "NaN", "Infinity", "-Infinity"]
    for raw in values:
        try:
            cfg = load_config(CONFIG_CLASSES[name], overrides=[f"{key}={raw}"])
        except ConfigError as exc:
            assert key in str(exc), f"{key}={raw}: {exc}"
            continue
        value = _get(cfg, key)
        assert math.isfinite(value), f"{key}={raw} loaded a non-finite {value}"
        if "seed" in key:
            assert 0 <= value < 2**32


def test_non_finite_numbers_are_refused():
    for raw in ("NaN", "Infinity", "-Infinity", "1e400"):
        with pytest.raises(ConfigError, match=r"bad value for 'optim.lr': expected a finite number"):
            load_config(SFTConfig, overrides=[f"optim.lr={raw}"])


@dataclasses.dataclass
class _PlainErrorSection:
    n: int = 1

    def __post_init__(self):
        if self.n > 3:
            raise ValueError(f"n too big: {self.n}")


@dataclasses.dataclass
class _PlainErrorConfig:
    inner: _PlainErrorSection = dataclasses.field(default_factory=_PlainErrorSection)


def test_a_plain_error_from_a_section_is_still_a_config_error():
    # A section whose __post_init__ (or code it calls) raises ValueError/TypeError: wrapped,
    # naming the section, whatever trainer defines it.
    with pytest.raises(ConfigError, match=r"bad value in 'inner': n too big: 5"):
        load_config(_PlainErrorConfig, overrides=["inner.n=5"])


def test_chat_template_kwargs_as_a_table_one_key_at_a_time_and_in_files(tmp_path):
    cfg = load_config(SFTConfig, overrides=['data.chat_template_kwargs={"enable_thinking": false}'])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    # One key at a time: JSON when it parses, else the text as written; merged with the file's.
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  chat_template_kwargs:\n    enable_thinking: false\n")
    cfg = load_config(SFTConfig, path, ["data.chat_template_kwargs.effort=low", "data.chat_template_kwargs.n=3"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False, "effort": "low", "n": 3}
    assert load_config(SFTConfig, save_config(cfg, tmp_path / "s.json")) == cfg
    assert SFTConfig().data.chat_template_kwargs == {}
    with pytest.raises(ConfigError, match=r"bad value for 'data.chat_template_kwargs': expected a table"):
        load_config(SFTConfig, overrides=["data.chat_template_kwargs=3"])
