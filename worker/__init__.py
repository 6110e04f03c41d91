"""The generation worker.

    WorkerError
    ├── ModelError       the model file cannot be fetched, verified or found
    └── PromptTooLong    the current turn does not fit the model's context (a terminal `error`)
"""

from __future__ import annotations


class WorkerError(Exception):
    pass


class ModelError(WorkerError):
    pass


class PromptTooLong(WorkerError):
    """Raised before generation: even without any earlier turn, the prompt needs `tokens`
    of the `budget` the context leaves it."""

    def __init__(self, tokens: int, budget: int, n_ctx: int) -> None:
        super().__init__(
            f"the message is too long for the model: its prompt needs {tokens} tokens, "
            f"the context ({n_ctx} tokens) leaves {budget} for it; send a shorter text"
        )
        self.tokens = tokens
        self.budget = budget
