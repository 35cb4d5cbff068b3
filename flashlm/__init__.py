"""flashlm: an on-device LLM runtime that runs models larger than the memory it is given.

Public API (imported lazily, so `flashlm --help` stays fast):
    load(path=None, **LoadOptions) -> Model
    Model.generate / stream / chat / tokenize / detokenize / logits
    LoadOptions, SamplingOptions, GenerationOptions; errors in flashlm.errors
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy exports below resolve to, for type checkers and IDEs ("X as X": re-exported)
    from flashlm.errors import ChatTemplateError as ChatTemplateError
    from flashlm.errors import ContextLengthError as ContextLengthError
    from flashlm.errors import FlashLMError as FlashLMError
    from flashlm.errors import InvalidOptionError as InvalidOptionError
    from flashlm.errors import ModelFileError as ModelFileError
    from flashlm.errors import UnsupportedModelError as UnsupportedModelError
    from flashlm.model import Model as Model
    from flashlm.model import Session as Session
    from flashlm.model import load as load
    from flashlm.options import GenerationOptions as GenerationOptions
    from flashlm.options import LoadOptions as LoadOptions
    from flashlm.options import SamplingOptions as SamplingOptions
    from flashlm.runtime.generate import GenerationResponse as GenerationResponse
    from flashlm.runtime.generate import Timings as Timings

_EXPORTS = {
    "load": "flashlm.model", "Model": "flashlm.model", "Session": "flashlm.model",
    "LoadOptions": "flashlm.options", "SamplingOptions": "flashlm.options", "GenerationOptions": "flashlm.options",
    "GenerationResponse": "flashlm.runtime.generate", "Timings": "flashlm.runtime.generate",
    "FlashLMError": "flashlm.errors", "ModelFileError": "flashlm.errors", "UnsupportedModelError": "flashlm.errors",
    "ContextLengthError": "flashlm.errors", "InvalidOptionError": "flashlm.errors",
    "ChatTemplateError": "flashlm.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flashlm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
