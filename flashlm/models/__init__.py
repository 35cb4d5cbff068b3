"""Architecture families, one file each (its ModelArgs from metadata, tensor names, layer and head).
`family_for(arch)` picks the module that runs a GGUF architecture; `read_model(path)` opens a file and returns it
with its family and ModelArgs."""

from __future__ import annotations

from types import ModuleType

from flashlm.errors import UnsupportedModelError
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.models import gemma3, llama, qwen3
from flashlm.models.base import Metadata

FAMILIES: list[ModuleType] = [llama, gemma3, qwen3]


def family_for(arch: str, path: str = "", where: str = "") -> ModuleType:
    """where: the key's place in the file, for the message (GGUFFile.where)."""
    for module in FAMILIES:
        if arch in module.ARCHITECTURES:
            return module
    supported = ", ".join(sorted(a for m in FAMILIES for a in m.ARCHITECTURES))
    prefix = f"{path}: " if path else ""
    raise UnsupportedModelError(f"{prefix}architecture {arch!r}{where} is not supported (supported: {supported})")


def read_model(path: str) -> tuple[GGUFFile, ModuleType, object]:
    """Open and validate the file; return it with its architecture family and ModelArgs (no weights read)."""
    f = GGUFFile(path)
    try:
        family = family_for(Metadata(f).arch, path, f.where("general.architecture"))
        return f, family, family.ModelArgs.from_gguf(f)
    except Exception:
        f.close()
        raise


def output_matrix(f: GGUFFile):
    """The output matrix's TensorInfo: its own, or the token embedding when tied."""
    return f.tensors.get("output.weight") or f.tensors["token_embd.weight"]
