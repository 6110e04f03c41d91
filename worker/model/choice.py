"""Which GGUF a llama worker runs: `--model` (none: SmolLM2, `builtin`, or a path) → `ModelFile`."""

from __future__ import annotations

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
