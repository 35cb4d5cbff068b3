"""The command line on the real model: generate streams text and prints stats, chat works on a pipe, info."""

from __future__ import annotations

from .test_bad_input import run_cli


def test_generate_streams_and_prints_stats(smollm_path):
    proc = run_cli("generate", "-m", smollm_path, "-p", "The capital of France is", "-n", "12", "--temp", "0",
                   "-t", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 0
    for label in ("load time", "prompt eval", "eval ", "tok/s", "peak memory"):
        assert label in proc.stderr


def test_generate_reads_prompt_file(smollm_path, tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text("The capital of France is")
    a = run_cli("generate", "-m", smollm_path, "-f", str(p), "-n", "8", "--temp", "0")
    b = run_cli("generate", "-m", smollm_path, "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_default_model_is_announced_once():
    proc = run_cli("generate", "-p", "Hi", "-n", "2", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("default model") == 1


def test_chat_on_piped_stdin_answers_each_turn(smollm_path):
    proc = run_cli("chat", "-m", smollm_path, "--temp", "0", "-n", "24", "--verbose",
                   "--system-prompt", "You are brief.", stdin="What is 2+2?\nAnd 3+3?\n")
    assert proc.returncode == 0, proc.stderr
    answers = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2
    turns = [line for line in proc.stderr.splitlines() if line.startswith("[prompt")]
    assert len(turns) == 2
    assert "(0 cached)" in turns[0] and "(0 cached)" not in turns[1]  # the second turn reuses the KV cache


def test_info_shows_architecture_and_types(smollm_path):
    proc = run_cli("info", smollm_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("llama", "n_layers", "30", "Q4_1", "Q8_0", "feed-forward", "attention", "tied"):
        assert word in proc.stdout
