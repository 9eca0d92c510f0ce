import json

import pytest

from membuilder import models
from membuilder.types import InvalidInputError


def test_folder_paths_pass_through_and_bad_names_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert models.resolve_model(tmp_path) == tmp_path
    with pytest.raises(InvalidInputError, match="neither a known name .*smollm2"):
        models.resolve_model(tmp_path / "missing")


def test_known_name_builds_once_then_reuses_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setenv("MEMBUILDER_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(models, "gguf_to_hf_folder", fake_convert)
    first = models.resolve_model("smollm2")
    assert first == tmp_path / "models" / "smollm2-135m-instruct"
    assert models.resolve_model("smollm2") == first
    assert len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == ["smollm2-135m-instruct"]  # no temp folder left


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def broken(gguf, out):
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setenv("MEMBUILDER_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(models, "gguf_to_hf_folder", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.resolve_model("smollm2")
    assert list((tmp_path / "models").iterdir()) == []
