"""The typed Python API (issue 20): options of the wrong type are InvalidOptionError naming the field (was: a
bare TypeError from a comparison), the package ships py.typed, and type checkers see the lazy exports."""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path

import pytest

import flashlm
from flashlm.errors import InvalidOptionError
from flashlm.options import (
    GenerationOptions,
    LoadOptions,
    SamplingOptions,
    generation_options,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("temperature", None), ("top_p", "0.9"), ("min_p", [0.1]), ("top_k", 2.5),
    ("top_k", "40"), ("repeat_penalty", "1.1"), ("repeat_last_n", 1.5), ("seed", "42"), ("seed", True),
    ("max_tokens", 2.5), ("max_tokens", "16"), ("stop", 5), ("ignore_eos", "yes"), ("ctx_overflow", 3),
])
def test_generation_option_types(field, value):
    with pytest.raises(InvalidOptionError, match=field) as info:
        generation_options(**{field: value})
    assert info.value.field == field


def test_sampling_options_as_an_override():
    # generate(..., sampling=SamplingOptions(...)) was a TypeError from dataclasses.replace; top-level keys win
    opts = generation_options(sampling=SamplingOptions(temperature=0, top_k=5), top_k=7)
    assert (opts.sampling.temperature, opts.sampling.top_k) == (0, 7)
    with pytest.raises(InvalidOptionError, match="sampling"):
        generation_options(sampling={"temperature": 0})


@pytest.mark.parametrize("field,value", [
    ("threads", "2"), ("ctx_size", 512.0), ("batch_size", None), ("io_threads", 1.5), ("window", "0"),
    ("memory_budget", [1]), ("memory_budget", "lots"), ("verbose", "no"), ("sparsity", "half"),
])
def test_load_option_types(field, value):
    with pytest.raises(InvalidOptionError, match=field) as info:
        LoadOptions(**{field: value}).validate()
    assert info.value.field == field


def test_model_calls_raise_typed_errors(model):
    with pytest.raises(InvalidOptionError, match="temperature"):
        model.generate("hi", temperature="hot", max_tokens=2)
    with pytest.raises(InvalidOptionError, match="sampling"):
        model.generate("hi", GenerationOptions(sampling={"temperature": 0}))  # type: ignore[arg-type]
    assert SamplingOptions(temperature=0).validate().temperature == 0  # ints are numbers too


def test_py_typed_ships_and_lazy_exports_are_visible_to_type_checkers():
    assert resources.files("flashlm").joinpath("py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["flashlm"]
    tree = ast.parse((ROOT / "flashlm" / "__init__.py").read_text())
    checked = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    assert checked, "no `if TYPE_CHECKING:` block"
    imported = {(n.module, a.name) for n in ast.walk(checked[0]) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {(module, name) for name, module in flashlm._EXPORTS.items()} <= imported
    for name in flashlm._EXPORTS:  # each resolves at run time too
        assert getattr(flashlm, name) is not None


def test_public_api_is_annotated():
    """Every public function and method of the API has annotated parameters and return."""
    import inspect

    from flashlm.model import Model, Session, load

    items = [load] + [f for cls in (Model, Session) for name, f in vars(cls).items()
                      if not name.startswith("_") and inspect.isfunction(f)]
    for f in items:
        sig = inspect.signature(f)
        missing = [p for p in sig.parameters if p != "self" and sig.parameters[p].annotation is inspect.Parameter.empty]
        assert not missing and sig.return_annotation is not inspect.Signature.empty, (f.__qualname__, missing)


def test_model_aliases(smollm_path):
    """smollm2 / gemma3 name the installed models, for -m and flashlm.load (was: no such file)."""
    from flashlm.loaders.default_model import resolve_alias

    from .test_bad_input import run_cli

    assert resolve_alias("smollm2") == resolve_alias("SmolLM2") == smollm_path
    assert resolve_alias("other.gguf") == "other.gguf"
    proc = run_cli("info", "-m", "smollm2", "--json")
    assert proc.returncode == 0, proc.stderr
    with flashlm.load("smollm2", ctx_size=64) as m:
        assert m.path == smollm_path


def test_type_checker_sees_the_api(tmp_path):
    """mypy (in the test extra) resolves flashlm.load and the chat overloads."""
    import subprocess
    import sys

    pytest.importorskip("mypy")
    user = tmp_path / "use.py"
    user.write_text('import flashlm\n\nmodel = flashlm.load(threads=2)\n'
                    'reveal_type(model.chat([{"role": "user", "content": "Hi"}], stream=True))\n'
                    'reveal_type(model.chat([{"role": "user", "content": "Hi"}]))\n')
    proc = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                           "--cache-dir", str(tmp_path / "cache"), str(user)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout
    assert 'Iterator[flashlm.runtime.generate.GenerationResponse]"' in proc.stdout
    assert 'Revealed type is "str"' in proc.stdout or 'Revealed type is "builtins.str"' in proc.stdout


def test_numpy_numbers_and_stop_lists_stay_valid():
    import numpy as np

    opts = GenerationOptions(stop=["\n"], max_tokens=np.int64(3),
                             sampling=SamplingOptions(temperature=np.float32(0.5), top_k=np.int32(4))).validate()
    assert opts.stop == ("\n",)
    with pytest.raises(InvalidOptionError, match="stop"):
        GenerationOptions(stop="\n").validate()  # type: ignore[arg-type]  (each character was a stop string)
