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
