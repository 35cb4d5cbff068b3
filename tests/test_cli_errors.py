"""The CLI's contract on failure: one line on stderr, exit 2 for usage errors and 1 for runtime failures, and with
--json one JSON document on stdout on success, nothing on failure (even a failure part-way through generation)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .test_bad_input import assert_one_line_error, run_cli

# Runs the CLI with the engine's decode step failing at the 4th token, as failing storage would.
FAIL_MIDWAY = """
import sys
from flashlm.errors import StorageError
from flashlm.runtime.executor import Engine
evaluate, calls = Engine._eval, [0]
def failing_eval(self, *a, **kw):
    calls[0] += 1
    if calls[0] == 4:  # the prompt, then the 3rd decode step
        raise StorageError("model.flash: read failed at byte 123456: Input/output error")
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
    assert_one_line_error(run_cli("generate", "-m", smollm_path, "-p", "hi", "--top-p", "3", "--json"), "--top-p")
    assert_one_line_error(run_cli("generate", "-m", str(tmp_path / "absent.gguf"), "-p", "hi", "--json"),
                          "absent.gguf", code=2)
    assert_one_line_error(run_cli("generate", "-m", smollm_path, "-c", "16", "-p", "word " * 40, "--json"),
                          "context", code=2)
    proc = run_cli("convert", smollm_path, "-o", str(tmp_path / "no_such_dir" / "x.flash"))  # an OSError
    assert_one_line_error(proc, "x.flash", code=1)
    assert_one_line_error(run_cli("bench", "-m", smollm_path, "--flash", str(tmp_path / "absent.flash")),
                          "absent.flash", code=2)


# -- issue 20's defects: each of these failed before ------------------------------------------------------------
def test_ctrl_c_in_generate_exits_130(smollm_path):
    """Ctrl-C stops the answer, keeps what was printed, says so, and exits 130 (was: 0)."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "flashlm.cli", "generate", "-m", smollm_path, "-p", "Once upon a",
                             "-n", "2000", "--temp", "0", "--ignore-eos"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.read(8)  # the answer has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert first and proc.returncode == 130, err
    assert "[interrupted]" in err and "Traceback" not in err


def test_prompt_from_stdin(smollm_path):
    """-f - reads the prompt from standard input (was: refused as a missing file)."""
    piped = run_cli("generate", "-m", smollm_path, "-f", "-", "-n", "6", "--temp", "0", stdin="The capital of France is")
    given = run_cli("generate", "-m", smollm_path, "-p", "The capital of France is", "-n", "6", "--temp", "0")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and "Paris" in piped.stdout


def test_budget_without_a_unit_is_mb(flash_path):
    """--memory-budget 150 means 150 MB (was: 150 bytes, "a memory budget of 0 MB cannot hold this model")."""
    proc = run_cli("info", flash_path, "--memory-budget", "150", "-c", "512")
    assert proc.returncode == 0, proc.stderr
    assert "memory plan for a budget of 150.0 MB" in proc.stdout


def test_context_defaults_to_the_training_context_and_longer_warns(smollm_path, tmp_path):
    """-c defaults to min(4096, the model's training context) (was: 4096 for every model), and a context longer
    than the training one is said (was: silence)."""
    import flashlm

    from .ggufs import write_tiny_llama

    tiny = tmp_path / "tiny.gguf"
    write_tiny_llama(tiny, smollm_path)  # trained context: 512 tokens
    with flashlm.load(str(tiny)) as m:
        assert m.n_ctx == 512
    with flashlm.load(smollm_path) as m:
        assert m.n_ctx == 4096  # trained on 8192
    proc = run_cli("generate", "-m", smollm_path, "-c", "100000", "-p", "hi", "-n", "2")
    assert proc.returncode == 0, proc.stderr
    assert "warning: a context of 100000 tokens is longer than the 8192 the model was trained on" in proc.stderr


def test_every_command_takes_the_model_as_dash_m(smollm_path, flash_path, tmp_path):
    """info, convert, calibrate and verify take -m/--model as generate and chat do (they refused it), the bare
    argument still works, and convert without a model converts the default one (it required an argument)."""
    assert run_cli("info", "-m", smollm_path).stdout == run_cli("info", smollm_path).stdout != ""
    verified = run_cli("verify", "-m", flash_path)
    assert verified.returncode == 0 and "sections verified" in verified.stdout, verified.stderr
    out = tmp_path / "default.flash"
    converted = run_cli("convert", "-o", str(out), "--no-calibration")
    assert converted.returncode == 0 and out.exists(), converted.stderr
    assert "using the default model" in converted.stderr
    assert_one_line_error(run_cli("info", "-m", smollm_path, flash_path), "two models given")
    # -m reaches calibrate itself (it used to be refused as an unknown option)
    assert_one_line_error(run_cli("calibrate", "-m", smollm_path, "--text", "/dev/null"), "not a .flash store")


def test_info_json(smollm_path, flash_path):
    """info --json: the facts the text shows, as one JSON document (was: no such option)."""
    gguf = json.loads(run_cli("info", "-m", smollm_path, "--json").stdout)
    assert gguf["architecture"] == "llama" and gguf["args"]["n_layers"] == 30 and gguf["chat_template"] is True
    assert gguf["flash_store"] is None and gguf["tensor_groups"]["feed-forward"]["bytes"] > 0
    flash = json.loads(run_cli("info", "-m", flash_path, "--memory-budget", "150MB", "-c", "512", "--json").stdout)
    plan = flash["flash_store"]["plan"]
    assert plan["budget_bytes"] == 150_000_000 and 0 < plan["hot_neurons"] < plan["n_ff"]
    assert plan["total_bytes"] <= plan["budget_bytes"]


def test_llama_cpp_gpu_layers_flag_is_named_not_read_as_n(smollm_path):
    """-ngl 99 (llama.cpp's GPU layers) was read as `-n gl`: "'gl' is not a valid integer". Now one line that names
    the flag and flashlm's GPU option, on every command."""
    for args in (["generate", "-m", smollm_path, "-p", "hi", "-ngl", "99"], ["chat", "-ngl", "99"],
                 ["bench", "--n-gpu-layers=99"]):
        assert_one_line_error(run_cli(*args), args[-1].split("=")[0] if "=" in args[-1] else "-ngl",
                              "--device cuda")
    proc = run_cli("generate", "-m", smollm_path, "-p", "-ngl", "-n", "2", "--temp", "0")  # a prompt, not a flag
    assert proc.returncode == 0, proc.stderr


def test_llama_cpp_long_forms_are_accepted(smollm_path):
    """llama.cpp's spellings of the same flags: --predict (was: no such option), --ctx-size, --threads, --seed,
    --prompt, --temp, --top-k, --top-p, --repeat-penalty."""
    proc = run_cli("generate", "--model", smollm_path, "--prompt", "The capital of France is", "--predict", "4",
                   "--ctx-size", "64", "--threads", "2", "--seed", "1", "--temp", "0", "--top-k", "40", "--top-p",
                   "0.9", "--repeat-penalty", "1.0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) == 4


@pytest.mark.parametrize("flags,flag,field", [
    (["-n", "-7"], "-n/--n-predict", "max_tokens"),
    (["-c", "-5"], "-c/--ctx-size", "ctx_size"),
    (["-t", "-1"], "-t/--threads", "threads"),
    (["--top-k", "-2"], "--top-k", "top_k"),
    (["--temp", "-1"], "--temp", "temperature"),
])
def test_errors_name_the_flag_typed_not_the_api_field(smollm_path, flags, flag, field):
    """The CLI said "max_tokens must be >= -1" for -n -7: the API's field, not the flag the user typed."""
    proc = run_cli("generate", "-m", smollm_path, "-p", "hi", *flags)
    assert_one_line_error(proc, f"flashlm: error: {flag} must be")
    assert f"error: {field} " not in proc.stderr


def test_budget_error_names_the_path_given(smollm_path, tmp_path):
    """The advice to convert named `SmolLM2-135M-Instruct.Q4_1.gguf`, a bare name not in the user's folder: it
    names the model's path as given, so the command can be pasted."""
    import shutil

    copy = tmp_path / "my model.gguf"
    shutil.copy(smollm_path, copy)
    proc = run_cli("generate", "-m", str(copy), "--memory-budget", "60MB", "-p", "hi")
    assert_one_line_error(proc, f"flashlm convert -m '{copy}' -o MODEL.flash")


def test_bench_json_and_flag_errors(smollm_path):
    """bench --json is one JSON document; its errors name the flags (was: "bench needs n_prompt, n_gen ...")."""
    proc = run_cli("bench", "-m", smollm_path, "-p", "8", "-n", "4", "-r", "1", "-c", "64", "--busy", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["engines"]["flashlm"]["decode_tps"] > 0 and doc["n_gen"] == 4
    busy = doc["busy"]  # the same two engines again beside one CPU-bound process
    assert busy["processes"] == 1 and set(busy["engines"]) == {"flashlm", "llama.cpp"}
    assert busy["ratios"]["decode"] > 0 and busy["engines"]["llama.cpp"]["decode_tps"] > 0
    assert_one_line_error(run_cli("bench", "-m", smollm_path, "--busy", "-1"), "--busy")
    proc = run_cli("bench", "-m", smollm_path, "-p", "60", "-n", "10", "-c", "64")
    assert_one_line_error(proc, "-p/--n-prompt", "-c/--ctx-size")
    assert "n_prompt" not in proc.stderr
    assert_one_line_error(run_cli("bench-budget", "-m", smollm_path, "--flash", smollm_path, "-r", "0"),
                          "-r/--repetitions")
