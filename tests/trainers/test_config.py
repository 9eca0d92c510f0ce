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
