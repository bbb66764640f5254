"""The docs: the python cells of docs/notebook.md run, every link and cited file is inside the
repository, and every file in docs/raw/ is cited by a page."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_notebook_cells_run(smollm2_ckpt, monkeypatch, capsys):
  text = read(os.path.join(ROOT, "docs", "notebook.md"))
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


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_stay_inside_the_repository(page):
  """Relative links resolve to files of the repository; no page names an absolute path of some
  machine, a working-history heading or a remote-run tool."""
  text = read(page)
  here = os.path.dirname(page)
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if re.match(r"[a-z]+://", target) or target.startswith("#"):
      continue
    path = os.path.normpath(os.path.join(here, target.split("#")[0]))
    assert os.path.commonpath([path, ROOT]) == ROOT, f"{target} points outside the repository"
    assert os.path.exists(path), f"{target}: no such file"
  for bad in (r"(?<![\w.~])/(?:work|root|tmp|home|mnt|data|shared)/", r"(?i)\bsession \d+", r"(?i)device[- ]tool",
              r"\$OUT\b", r"DESIGN\.md"):
    m = re.search(bad, text)
    assert m is None, f"{os.path.relpath(page, ROOT)} names {m.group(0)!r}: {text[max(0, m.start() - 60):m.end() + 60]!r}"


def test_every_raw_file_is_cited_and_every_citation_exists():
  texts = "\n".join(read(p) for p in PAGES)
  raw = sorted(os.listdir(os.path.join(ROOT, "docs", "raw")))
  assert raw, "docs/raw/ is empty"
  uncited = [name for name in raw if f"docs/raw/{name}" not in texts]
  assert not uncited, f"files in docs/raw/ that no page cites: {uncited}"
  missing = sorted({m.rstrip(".") for m in re.findall(r"docs/raw/[\w.\-]+", texts)} -
                   {f"docs/raw/{name}" for name in raw})
  assert not missing, f"cited but not in docs/raw/: {missing}"


def test_readme_python_imports_resolve():
  """The README's Python example imports what the package provides."""
  text = read(os.path.join(ROOT, "README.md"))
  cells = re.findall(r"```python\n(.*?)```", text, re.S)
  imports = [ln for cell in cells for ln in cell.splitlines() if re.match(r"(from \S+ )?import ", ln)]
  assert len(imports) >= 3
  exec(compile("\n".join(imports), "README.md imports", "exec"), {})
