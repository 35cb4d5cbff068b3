"""Shared fixtures: the real SmolLM2 file, one flashlm model and one llama.cpp reference per test session."""

from __future__ import annotations

import os

import pytest

GPL3 = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from flashlm.loaders.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def model(smollm_path):
    import flashlm

    m = flashlm.load(smollm_path, threads=2, ctx_size=2048)
    yield m
    m.close()


@pytest.fixture(scope="session")
def reference(smollm_path):
    """llama.cpp (llama-cpp-python) on the same file, with logits for every position."""
    from llama_cpp import Llama

    return Llama(model_path=smollm_path, n_ctx=1024, n_batch=512, logits_all=True, n_threads=2, verbose=False)


@pytest.fixture(scope="session")
def gpl_text() -> str:
    if not os.path.exists(GPL3):
        pytest.skip(f"{GPL3} is not present")
    with open(GPL3, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def flash_path(tmp_path_factory, smollm_path):
    """SmolLM2 converted to a flash store (once per test session)."""
    from flashlm.tools.convert import convert_gguf

    path = str(tmp_path_factory.mktemp("flash") / "smollm2.flash")
    # per-neuron records, as the paper bundles them (--sparsity needs them); the block layout, which `convert` makes
    # of SmolLM2 by default, has its own tests (test_block_bundle.py)
    report = convert_gguf(smollm_path, path, bundle="neuron")
    print(f"converted: {report}")
    return path


@pytest.fixture(scope="session")
def resident(flash_path):
    import flashlm

    m = flashlm.load(flash_path, threads=2, ctx_size=512)
    yield m
    m.close()


SPARSE_MODEL = os.path.join(os.path.dirname(__file__), "..", "assets", "SmolLM2-135M-Instruct-ReLU.Q4_0.gguf")


@pytest.fixture(scope="session")
def sparse_path() -> str:
    """The committed ReLU-sparse SmolLM2 (assets/, made by flashlm sparsify)."""
    return SPARSE_MODEL


@pytest.fixture(scope="session")
def sparse_flash(sparse_path, tmp_path_factory) -> str:
    """The committed model as a flash store (neuron records, hot-first order from the built-in calibration text)."""
    from flashlm.tools.convert import convert_gguf

    path = str(tmp_path_factory.mktemp("sparse") / "relu.flash")
    convert_gguf(sparse_path, path)
    return path
