"""The sliding window (flash_store/residency.py NeuronWindowCache, used by runtime/streaming.py's sparse decode):
a token reads only the selected neurons the last k tokens did not use, the result does not change, and the
window's bookkeeping loses and duplicates no row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .test_flash_store import PROMPTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(path: str, window: int, n: int, sparsity: str = "0.9") -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.window_run", path, str(window), str(n), "30", sparsity,
                           PROMPTS[2]],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_window_changes_nothing_and_keeps_its_rows_straight(flash_path):
    """SmolLM2 with 90% of neurons skipped (CATS top-k): the selected records then touch few enough pages that a
    token reads only those (predictor.reads_selected), which is where the window applies. Budget: half the
    file, the scorer's rows, and 30 MB for the window (or, without one, for hot neurons)."""
    plain, windowed = _run(flash_path, 0, 64), _run(flash_path, 3, 64)
    print(f"window 3: {windowed['window_rows']} rows per layer beside {windowed['hot']} hot (plain: {plain['hot']}), "
          f"hit rate {windowed['window_hit_rate']:.1%}, {windowed['rows_moved']} rows moved, "
          f"{windowed['mb_per_token']:.1f} vs {plain['mb_per_token']:.1f} MB read per token")
    assert windowed["tokens"] == plain["tokens"]  # the same neurons, summed in the same order
    assert windowed["window_rows"] > 0 and windowed["total"] <= windowed["budget"]
    assert windowed["window_hit_rate"] > 0.2 and windowed["rows_moved"] > 0
    assert windowed["errors"] == [] and plain["errors"] == []


def test_window_on_the_sparse_model_over_500_tokens(sparse_flash):
    """The committed ReLU model, reading only its active neurons (--sparsity auto, CATS: relu(gate) > 0): 500
    tokens through a window of 4, then every row still in place; the first 64 equal to a run without a window."""
    windowed = _run(sparse_flash, 4, 500, "auto")
    plain = _run(sparse_flash, 0, 64, "auto")
    print(f"sparse model, window 4 over 500 tokens: {windowed['window_rows']} rows per layer beside {windowed['hot']} "
          f"hot, hit rate {windowed['window_hit_rate']:.1%}, {windowed['rows_moved']} rows moved, "
          f"{windowed['used']:.1%} of the FFN computed, {windowed['mb_per_token']:.1f} MB read per token")
    assert windowed["errors"] == [] and windowed["window_rows"] > 0 and windowed["rows_moved"] > 0
    assert windowed["tokens"][:64] == plain["tokens"]
