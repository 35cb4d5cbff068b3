"""Import a dependency's submodule without running its package __init__, where that __init__ imports far more
than flashlm uses (measured RSS after numpy: `import llama_cpp` +13.6 MB against +3.9 MB for its ctypes bindings
`llama_cpp.llama_cpp`; `import gguf` +3.7 MB against +1.4 MB for `gguf.constants` and `gguf.quants`). Every MB a
process holds before loading weights is part of each memory budget's baseline.

The submodule is loaded under a bare stand-in for its package and then taken out of sys.modules again (with the
stand-in and any sibling it pulled in), so it is flashlm's private copy: a later `import gguf` or `import
llama_cpp` by the application (or a benchmark) gets the real package with all its attributes, and loads its own
copy of the submodule (the same shared library underneath, for llama.cpp's bindings)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_LOCK = threading.Lock()
_PRIVATE: dict[str, types.ModuleType] = {}


def bare_import(name: str) -> types.ModuleType:
    """`pkg.sub` (one level): the real one if `pkg` is already imported, else a private copy (see above)."""
    with _LOCK:
        package = name.partition(".")[0]
        if package in sys.modules:
            return importlib.import_module(name)
        if name in _PRIVATE:
            return _PRIVATE[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{package} is not installed", name=package)
        stub = types.ModuleType(package)  # a package without its __init__: its submodules still import
        stub.__path__, stub.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules[package] = stub
        # siblings loaded by an earlier bare_import of this package go back in, so they are shared, not reloaded
        sys.modules.update({k: m for k, m in _PRIVATE.items() if k.startswith(package + ".")})
        try:
            module = importlib.import_module(name)
        finally:
            for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
                loaded = sys.modules.pop(key)
                if key != package:
                    _PRIVATE[key] = loaded
        return module
