"""Typed exceptions of flashlm's API. The CLI turns each into one line on stderr and exit status 2."""


class FlashLMError(Exception):
    """Base of every error flashlm raises on purpose."""


class ModelFileError(FlashLMError):
    """The model file is missing, unreadable, not a GGUF, truncated or malformed."""


class UnsupportedModelError(FlashLMError):
    """The file is well-formed but uses an architecture or tensor type flashlm does not run."""


class ContextLengthError(FlashLMError):
    """The prompt (plus what must follow it) does not fit in the context window."""


class InvalidOptionError(FlashLMError, ValueError):
    """A sampling, generation or load option has an invalid type or value; `field` names the option (the
    dataclass field, e.g. "max_tokens") where there is one, so the CLI can name its flag instead."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ChatTemplateError(FlashLMError):
    """The model's chat template is missing or failed to render."""


class BudgetError(FlashLMError):
    """The memory budget cannot hold what the model needs resident (the message names the smallest workable one,
    `smallest_bytes` where the planner computed it)."""

    def __init__(self, message: str, smallest_bytes: int | None = None):
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


class StorageError(ModelFileError):
    """A read of the model file failed while running (I/O error, truncated while in use): names file and byte."""
