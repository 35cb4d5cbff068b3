"""The README's Python snippet runs as written (on the default model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippet_runs_as_written(capsys):
    """Every ```python block, in order, in one namespace: as a reader would paste them on a fresh machine (the
    serving snippet runs in test_serve.py, against a live server)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "from openai" not in b]
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert "Paris" in capsys.readouterr().out  # the greedy answer to its first prompt
    assert namespace["logits"].shape == (len(namespace["ids"]), namespace["model"].info()["vocab_size"])
    namespace["model"].close()
