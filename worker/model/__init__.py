"""The models a llama worker runs: SmolLM2 by default (`smollm2`), the tiny built-in one
(`builder`), or any GGUF file (`choice`)."""

from worker.model.builder import (
    BUILTIN_VERSION,
    CHAT_TEMPLATE,
    DEFAULT_SEED,
    builtin_model_path,
    cache_dir,
    ensure_builtin_model,
    write_model,
)

__all__ = [
    "BUILTIN_VERSION",
    "CHAT_TEMPLATE",
    "DEFAULT_SEED",
    "builtin_model_path",
    "cache_dir",
    "ensure_builtin_model",
    "write_model",
]
