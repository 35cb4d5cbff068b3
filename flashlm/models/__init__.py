"""Architecture families, one file each; `family_for(arch)` picks the module that runs a GGUF architecture."""

from __future__ import annotations

from types import ModuleType

from ..errors import UnsupportedModelError
from . import gemma3, llama

FAMILIES: list[ModuleType] = [llama, gemma3]


def family_for(arch: str, path: str = "", where: str = "") -> ModuleType:
    """where: the key's place in the file, for the message (GGUFFile.where)."""
    for module in FAMILIES:
        if arch in module.ARCHITECTURES:
            return module
    supported = ", ".join(sorted(a for m in FAMILIES for a in m.ARCHITECTURES))
    prefix = f"{path}: " if path else ""
    raise UnsupportedModelError(f"{prefix}architecture {arch!r}{where} is not supported (supported: {supported})")
