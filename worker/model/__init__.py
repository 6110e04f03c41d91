"""The tiny built-in GGUF model that the llama engine runs when no model path is given."""

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
