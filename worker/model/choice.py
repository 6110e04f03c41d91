"""Which GGUF a llama worker runs: `--model` (none: SmolLM2, `builtin`, or a path) → `ModelFile`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from worker import ModelError
from worker.model import smollm2
from worker.model.builder import ensure_builtin_model, file_sha256

BUILTIN = "builtin"


@dataclass(frozen=True, slots=True)
class ModelFile:
    path: Path
    name: str
    """What the worker registers and `/info` lists."""
    sha256: str


def resolve_model(spec: str | None) -> ModelFile:
    """No spec: SmolLM2-135M-Instruct (fetched and verified when missing); `builtin`: the tiny
    generated model (built when missing); anything else: a GGUF file, hashed for the log."""
    if spec is None:
        return ModelFile(smollm2.ensure_smollm2(), smollm2.NAME, smollm2.SHA256)
    if spec == BUILTIN:
        path = ensure_builtin_model()
        return ModelFile(path, BUILTIN, file_sha256(path))
    return model_file(Path(spec))


def model_file(path: Path) -> ModelFile:
    """A GGUF given by path; named after its file."""
    if not path.is_file():
        raise ModelError(f"no model file at {path} (--model takes a GGUF path, or 'builtin')")
    return ModelFile(path, path.stem, file_sha256(path))


EngineModel = ModelFile | str | os.PathLike[str] | None
"""What a llama engine is given: a resolved file, a GGUF path, or None for the built-in model."""


def engine_model_name(model: EngineModel) -> str:
    """The name an engine registers, known before it loads anything."""
    if isinstance(model, ModelFile):
        return model.name
    return BUILTIN if model is None else Path(model).stem


def engine_model_file(model: EngineModel) -> ModelFile:
    """The file an engine loads: as given, the GGUF at a path (hashed), or the built-in model
    (built when missing). Slow for the last two: call it on the engine's loading thread."""
    if isinstance(model, ModelFile):
        return model
    return resolve_model(BUILTIN) if model is None else model_file(Path(model))
