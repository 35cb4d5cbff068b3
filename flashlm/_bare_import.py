"""Import a dependency's submodule without running its package __init__, where that __init__ imports far more
than flashlm uses (measured RSS after numpy: `import llama_cpp` +13.6 MB against +3.9 MB for its ctypes bindings
`llama_cpp.llama_cpp`; `import gguf` +3.7 MB against +1.4 MB for `gguf.constants` and `gguf.quants`). Every MB a
process holds before loading weights is part of each memory budget's baseline.

The submodule goes into sys.modules under its own name, so later `from pkg.sub import X` statements find it; a
later `import pkg` (a benchmark importing llama_cpp.Llama) runs the __init__ as usual and picks up the same
submodule objects."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_LOCK = threading.Lock()


def bare_import(name: str) -> types.ModuleType:
    """`pkg.sub` (one level) imported with a bare stand-in for `pkg` unless `pkg` is already imported."""
    with _LOCK:
        if name in sys.modules:
            return sys.modules[name]
        package = name.partition(".")[0]
        if package in sys.modules:
            return importlib.import_module(name)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{package} is not installed", name=package)
        stub = types.ModuleType(package)  # a package without its __init__: its submodules still import
        stub.__path__, stub.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules[package] = stub
        try:
            return importlib.import_module(name)
        finally:
            if sys.modules.get(package) is stub:
                del sys.modules[package]
