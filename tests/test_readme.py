"""The README's "The memory library" snippets run in the order they appear, in one fresh folder,
and print exactly what their comments say; the LongMemEval command of the accuracy runner names a
dataset that exists and the embedder the published figures used.

Expected output is written next to a `print(...)` line, after `  # `, or on the comment lines that
directly follow it (one printed line each); a trailing note in parentheses after three spaces is
not part of the output (`# 1   (the shoes were not added either)`).
"""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NOTE = re.compile(r" {3,}\(.*\)$")


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def expected_output(code: str) -> list[str]:
    """What the snippet says it prints, in order, from the comments of its print lines."""
    lines = code.splitlines()
    out = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("print("):
            continue
        if "  # " in stripped:
            out.append(NOTE.sub("", stripped.split("  # ", 1)[1]).rstrip())
            continue
        follow = []
        for nxt in lines[i + 1:]:
            if not nxt.strip().startswith("# "):
                break
            follow.append(nxt.strip()[2:])
        assert follow, f"README print line without its expected output: {stripped}"
        out += follow
    return out


@pytest.mark.slow  # Memory() loads the local MiniLM model, as the README's reader gets it (5-30 s here)
def test_the_memory_library_snippets_run_in_order_and_print_what_they_say(tmp_path, monkeypatch):
    blocks = python_blocks(section("The memory library"))
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # a fresh folder: the snippets share bank.sqlite
    for n, code in enumerate(blocks, start=1):
        expected = expected_output(code)
        assert expected, f"snippet {n} shows no output"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"README.md (memory library snippet {n})", "exec"), {"__name__": f"readme_{n}"})
        assert printed.getvalue().splitlines() == expected, f"snippet {n}"


def test_expected_output_reading():
    code = ("x = 1\nprint(x)                # 1   (a note)\nprint([x, x])\n# [1, 1]\n"
            "try:\n    print('a')  # a\nexcept ValueError:\n    pass\n")
    assert expected_output(code) == ["1", "[1, 1]", "a"]
    with pytest.raises(AssertionError, match="without its expected output"):
        expected_output("print(2)\nx = 3\n")


def test_longmemeval_command_names_existing_data_and_the_hashing_embedder():
    from benchmarks.eval_memory import parse_args
    from membuilder.datasets import DATASET_NAMES

    text = section("Memory agents, answering and the accuracy runner")
    lines = [line for line in text.splitlines()
             if line.startswith("python -m benchmarks.eval_memory") and "longmemeval" in line]
    assert len(lines) == 1
    argv = shlex.split(lines[0])[3:]
    args = parse_args(argv)
    assert args.dataset == "longmemeval_s_dev" and args.dataset in DATASET_NAMES
    assert args.data is None and args.embedder == "hashing"  # the published LongMemEval figures' embedder


@pytest.mark.slow  # tiny SFT (4 steps), then tiny ADRPO (1 step on a generated world): about a minute
def test_the_training_quickstart_runs_in_order_and_prints_what_it_says(tmp_path, monkeypatch):
    import json

    import torch

    from trainers.metrics import read_metrics

    blocks = python_blocks(section("Training"))
    assert len(blocks) == 2 and "SFTTrainer" in blocks[0] and "ADRPOTrainer" in blocks[1]
    monkeypatch.chdir(tmp_path)  # a fresh folder: the second snippet starts from the first's checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n, code in enumerate(blocks, start=1):
            expected = expected_output(code)
            assert expected, f"training snippet {n} shows no output"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"README.md (training snippet {n})", "exec"), {"__name__": f"readme_train_{n}"})
            # The trainer prints its config first; the snippet's own lines come last.
            assert printed.getvalue().splitlines()[-len(expected):] == expected, f"training snippet {n}"
    finally:
        torch.set_num_threads(threads)
    sft_model = "runs/sft-quickstart/checkpoints/step-000004/model"
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "sft-quickstart")] == [1, 2, 3, 4]
    saved = json.loads((tmp_path / "runs" / "adrpo-quickstart" / "trainer_config.json").read_text())
    assert saved["model"]["path"] == sft_model  # ADRPO started from the SFT checkpoint
    (row,) = read_metrics(tmp_path / "runs" / "adrpo-quickstart")
    # 1 session x 4 agents x G = 2 samples, all scored by the in-process reward.
    assert row["batch/samples"] == 8 and row["batch/masked_reward_failed"] == 0


def test_the_install_lines_name_extras_that_exist():
    import tomllib

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = section("Install")
    lines = [line for line in re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0].splitlines() if "pip install" in line]
    assert "pip install ." in lines  # the memory library alone
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in lines
    named = {e for line in lines for group in re.findall(r'"\.\[([a-z,]+)\]"', line) for e in group.split(",")}
    assert named == {"embedder", "test", "cpu", "gpu"} and named <= extras.keys()
