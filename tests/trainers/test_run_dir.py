"""trainers/run_dir.py: one run per output folder, resume only into a run configured the same way,
a finished run says so, and the command lines print user errors as one line plus the cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainers import adrpo, sft
from trainers.config import ConfigError, SFTConfig, load_config, save_config, summarize_config
from trainers.metrics import read_metrics
from trainers.run_dir import (
    RunDirError,
    check_run_dir,
    config_differences,
    describe_error,
    finished_before_start,
    holds_run,
    remove_run,
    start_run,
)


def _sft(out: Path, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, overrides=[f"checkpoint.output_dir={out}", *extra])


def _fake_checkpoint(out: Path, step: int, cfg) -> Path:
    """A checkpoint folder as far as the run-folder checks read it: its state and its config."""
    ck = out / "checkpoints" / f"step-{step:06d}"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": step}))
    save_config(cfg, ck / "trainer_config.json")
    save_config(cfg, out / "trainer_config.json")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(1, step + 1)))
    return ck


# ---------------------------------------------------------------------------------------------
# The checks, on folders laid out by hand
# ---------------------------------------------------------------------------------------------


def test_a_new_run_takes_an_empty_or_missing_folder(tmp_path):
    assert check_run_dir(_sft(tmp_path / "new")).resume is None
    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "base_model").mkdir()  # built for a run, nothing trained: not a run
    (tmp_path / "built" / "checkpoints").mkdir()  # empty
    assert holds_run(tmp_path / "built") == []
    assert check_run_dir(_sft(tmp_path / "built")).resume is None


def test_a_new_run_refuses_a_folder_that_holds_a_run_and_says_how_to_go_on(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl\): continue it with --resume latest, "
                                          r"replace it with --overwrite, or give this run its own checkpoint.output_dir"):
        check_run_dir(_sft(tmp_path))
    with pytest.raises(RunDirError, match="exclude each other"):
        check_run_dir(_sft(tmp_path, "checkpoint.resume=latest", "checkpoint.overwrite=true"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        check_run_dir(_sft(tmp_path / "file"))


def test_overwrite_deletes_the_old_runs_files_and_nothing_else(tmp_path, capsys):
    old = _sft(tmp_path, "optim.lr=0.5")
    _fake_checkpoint(tmp_path, 3, old)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "base_model").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    cfg = _sft(tmp_path, "checkpoint.overwrite=true", "train.max_steps=2")
    start = start_run(cfg, main_process=True)
    assert start.resume is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "trainer_config.json"]
    assert load_config(SFTConfig, tmp_path / "trainer_config.json") == cfg  # saved in full
    # The printed config: the header and one line per section that differs from the defaults.
    assert capsys.readouterr().out.splitlines() == [
        f"config (what differs from the SFTConfig defaults; all of it in {tmp_path / 'trainer_config.json'}):",
        "  train: max_steps=2",
        f"  checkpoint: output_dir={tmp_path} overwrite=true",
    ]
    assert remove_run(tmp_path) == ["trainer_config.json"]


def test_config_differences_ignore_what_a_resumed_run_may_change():
    saved = {"optim": {"lr": 1e-3, "beta1": 0.9}, "train": {"max_steps": 3, "seed": 0, "batch_size": 4},
             "logging": {"progress_bar": True}, "data": {"path": "a.jsonl", "old_key": 1}}  # fmt: skip
    now = {"optim": {"lr": 5e-4, "beta1": 0.9}, "train": {"max_steps": 6, "seed": 1, "batch_size": 2},
           "logging": {"progress_bar": False}, "data": {"path": "a.jsonl", "new_key": 2}}  # fmt: skip
    # max_steps, batch_size (the global batch is checked by the trainer) and logging may change;
    # keys only one side has are not compared.
    assert config_differences(saved, now) == [("optim.lr", 1e-3, 5e-4), ("train.seed", 0, 1)]


def test_resume_checks_the_saved_config_and_finds_the_checkpoint(tmp_path):
    cfg = _sft(tmp_path, "train.max_steps=4")
    ck = _fake_checkpoint(tmp_path, 2, cfg)
    start = check_run_dir(_sft(tmp_path, "train.max_steps=8", "checkpoint.resume=latest", "logging.progress_bar=false"))
    assert (start.resume, start.resume_step) == (ck, 2)
    with pytest.raises(RunDirError, match=r"cannot resume .*step-000002: the run was configured differently "
                                          r"\(data.max_length: 1024 then, 64 now; optim.lr: 0.001 then, 0.01 now\)"):
        check_run_dir(_sft(tmp_path, "checkpoint.resume=latest", "optim.lr=1e-2", "data.max_length=64"))
    with pytest.raises(RunDirError, match="is not a checkpoint folder"):
        check_run_dir(_sft(tmp_path, f"checkpoint.resume={tmp_path}"))


def test_resume_without_a_checkpoint_starts_over_and_drops_the_unsaved_metrics(tmp_path, capsys):
    cfg = _sft(tmp_path, "checkpoint.resume=latest")
    save_config(cfg, tmp_path / "trainer_config.json")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # an attempt that died before a checkpoint
    start = start_run(cfg, main_process=True, show_config=False)
    assert start.resume is None and start.fresh_after_resume
    assert not (tmp_path / "metrics.jsonl").exists()
    assert capsys.readouterr().out == f"{tmp_path}: no checkpoint to resume, starting at step 0\n"


def test_errors_read_as_one_line_and_the_cause():
    try:
        try:
            raise OSError("disk gone")
        except OSError as cause:
            raise ConfigError("cannot read the saved config x.json") from cause
    except ConfigError as exc:
        assert describe_error(exc) == "cannot read the saved config x.json\n  cause: OSError: disk gone"
    assert describe_error(ConfigError("plain")) == "plain"


def test_summarize_config_of_defaults_and_of_lists():
    assert summarize_config(SFTConfig()) == "config: the SFTConfig defaults"
    cfg = load_config(SFTConfig, overrides=['lora.target_modules=["q_proj"]', "lora.enabled=true"])
    assert summarize_config(cfg).splitlines()[1:] == ['  lora: enabled=true target_modules=["q_proj"]']


# ---------------------------------------------------------------------------------------------
# Through the command lines
# ---------------------------------------------------------------------------------------------


def test_adrpo_says_a_resumed_finished_run_is_finished_without_loading_anything(tmp_path, capsys):
    argv = [f"checkpoint.output_dir={tmp_path}", "model.path=/nonexistent/model", "train.max_steps=2"]
    cfg = adrpo.parse_args(argv)
    _fake_checkpoint(tmp_path, 2, cfg)
    adrpo.main([*argv, "--resume", "latest", "--no-progress"])  # returns: exit status 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path}: the run is already finished (step 2 of 2); nothing to train"
    assert out[1:3] == [f"metrics: {tmp_path / 'metrics.jsonl'}", f"training curves: {tmp_path / 'training_curves.png'}"]
    assert out[-1].startswith(f"checkpoint: {tmp_path / 'checkpoints' / 'step-000002'} ")
    assert finished_before_start(adrpo.parse_args([*argv, "train.max_steps=3", "--resume", "latest"])) is False


def test_adrpo_refuses_a_folder_with_another_run_in_one_line(tmp_path, capsys):
    (tmp_path / "trainer_config.json").write_text("{}")
    with pytest.raises(SystemExit) as stopped:
        adrpo.main([f"checkpoint.output_dir={tmp_path}", "model.path=null"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"adrpo.py: error: {tmp_path} already holds a run (trainer_config.json)")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow  # two tiny SFT runs of 2 steps (~10 s)
def test_sft_runs_never_mix_in_one_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train.max_steps=2", "logging.tensorboard=false", "--no-progress"]
    sft.main(base)  # the default folder, outputs/sft
    out = tmp_path / "outputs" / "sft"
    first = read_metrics(out)
    assert [r["step"] for r in first] == [1, 2]
    printed = capsys.readouterr().out.splitlines()
    ckpt = "outputs/sft/checkpoints/step-000002"
    assert printed[-1] == f"checkpoint: {ckpt} (model: {ckpt}/model)"

    # The same line again: refused in one line, nothing in the folder touched.
    with pytest.raises(SystemExit) as stopped:
        sft.main([*base, "optim.lr=1e-4"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["sft.py: error: outputs/sft already holds a run (trainer_config.json, metrics.jsonl, checkpoints): "
                   "continue it with --resume latest, replace it with --overwrite, or give this run its own "
                   "checkpoint.output_dir"]  # fmt: skip
    assert read_metrics(out) == first

    # Resuming with another learning rate would mix two runs' updates.
    with pytest.raises(SystemExit):
        sft.main([*base, "optim.lr=1e-4", "--resume", "latest"])
    assert "optim.lr: 0.001 then, 0.0001 now" in capsys.readouterr().err

    # Resuming the finished run: it says so, trains nothing, exits 0.
    sft.main([*base, "--resume", "latest"])
    finished = "outputs/sft: the run is already finished (step 2 of 2); nothing to train"
    assert capsys.readouterr().out.splitlines()[0] == finished
    assert read_metrics(out) == first

    # --overwrite replaces it: the metrics hold the new run's steps only, under the new config.
    sft.main([*base, "optim.lr=1e-4", "train.max_steps=1", "--overwrite"])
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert json.loads((out / "trainer_config.json").read_text())["optim"]["lr"] == 1e-4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
