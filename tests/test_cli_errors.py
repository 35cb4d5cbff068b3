"""The CLI's contract on failure: one line on stderr, exit 2 for usage errors and 1 for runtime failures, and with
--json one JSON document on stdout on success, nothing on failure (even a failure part-way through generation)."""

from __future__ import annotations

import json
import subprocess
import sys

from .test_bad_input import assert_one_line_error, run_cli

# Runs the CLI with the engine's decode step failing at the 4th token, as failing storage would.
FAIL_MIDWAY = """
import sys
from flashlm.errors import ModelFileError
from flashlm.runtime.executor import Engine
evaluate, calls = Engine._eval, [0]
def failing_eval(self, *a, **kw):
    calls[0] += 1
    if calls[0] == 4:  # the prompt, then the 3rd decode step
        raise ModelFileError("model.flash: read failed at byte 123456: Input/output error")
    return evaluate(self, *a, **kw)
Engine._eval = failing_eval
from flashlm.cli import main
main(sys.argv[1:])
"""


def _run_failing(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAIL_MIDWAY, *args], capture_output=True, text=True, timeout=300)


def test_generate_json_is_one_document(smollm_path):
    proc = run_cli("generate", "-m", smollm_path, "-p", "The capital of France is", "-n", "8", "--temp", "0",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["tokens"]) == 8 and doc["finish_reason"] == "length" and doc["text"]
    assert doc["timings"]["eval_tokens"] == 8 and doc["timings"]["prompt_tokens"] > 0
    plain = run_cli("generate", "-m", smollm_path, "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert plain.stdout.rstrip("\n") == doc["text"]


def test_failure_midway_json_prints_nothing_to_stdout(smollm_path):
    args = ("generate", "-m", smollm_path, "-p", "Once upon a time", "-n", "16", "--temp", "0")
    proc = _run_failing(*args, "--json")
    assert_one_line_error(proc, "byte 123456", "Input/output error", code=1)
    assert proc.stdout == ""
    streamed = _run_failing(*args)  # without --json the tokens before the failure were already streamed
    assert_one_line_error(streamed, "byte 123456", code=1)


def test_usage_and_runtime_errors_have_distinct_codes(smollm_path, tmp_path):
    assert_one_line_error(run_cli("generate", "-m", smollm_path, "-p", "hi", "--top-p", "3", "--json"), "top_p")
    assert_one_line_error(run_cli("generate", "-m", str(tmp_path / "absent.gguf"), "-p", "hi", "--json"),
                          "absent.gguf", code=1)
    assert_one_line_error(run_cli("generate", "-m", smollm_path, "-c", "16", "-p", "word " * 40, "--json"),
                          "context", code=2)
    proc = run_cli("convert", smollm_path, "-o", str(tmp_path / "no_such_dir" / "x.flash"))  # an OSError
    assert_one_line_error(proc, "x.flash", code=1)
    assert_one_line_error(run_cli("bench", "-m", smollm_path, "--flash", str(tmp_path / "absent.flash")),
                          "absent.flash", code=2)
