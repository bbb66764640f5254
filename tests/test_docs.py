"""The python cells of docs/notebook.md run, in order, in one namespace."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_cells_run(smollm2_ckpt, monkeypatch, capsys):
  text = open(os.path.join(ROOT, "docs", "notebook.md"), encoding="utf-8").read()
  cells = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(cells) >= 3
  # The fixture converted the bundled model into its own cache folder; point the docs there.
  monkeypatch.setenv("KVRM_JAX_CACHE", str(smollm2_ckpt.parent))
  ns = {}
  for i, cell in enumerate(cells):
    try:
      exec(compile(cell, f"docs/notebook.md cell {i}", "exec"), ns)
    except Exception as e:  # noqa: BLE001
      pytest.fail(f"cell {i} failed: {type(e).__name__}: {e}")
  out = capsys.readouterr().out
  assert "Paris" in out and "decode compiles so far: 1" in out
