"""The package's layout as README's "The code" states it: every module is in its table, and a
module imports only modules of its own row or the rows above (type-checking imports aside)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "peftlab"


def readme_rows() -> list[set[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The code"):]
    section = section[:section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| layer"):
            cell = line.split("|")[2]
            # `methods/`, `study/spec`, `report/load`: the top-level module or package
            rows.append({re.split(r"[/.]", name)[0] for name in re.findall(r"`([\w/.]+)", cell)})
    return rows


def top_module(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported(path: Path) -> set[str]:
    source = re.sub(r"if TYPE_CHECKING:\n(?:    .*\n|\n)+", "", path.read_text())
    found = re.findall(r"^\s*(?:from|import) peftlab\.(\w+)", source, re.M)
    return set(found)


def test_every_module_is_in_the_readme_and_imports_only_rows_above_or_its_own():
    rows = readme_rows()
    rank = {name: i for i, row in enumerate(rows) for name in row}
    modules = {top_module(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert modules <= set(rank), modules - set(rank)
    upward = [(top_module(p), name) for p in PACKAGE.rglob("*.py") if top_module(p) in rank
              for name in imported(p) if rank[name] > rank[top_module(p)]]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The regular expressions find the imports they must (a check that finds none passes)."""
    module = tmp_path / "x.py"
    module.write_text("from typing import TYPE_CHECKING\n\nfrom peftlab.run import run\n"
                      "if TYPE_CHECKING:\n    from peftlab.study import Cell\n\n\n"
                      "def f():\n    import peftlab.report\n")
    assert imported(module) == {"run", "report"}
    assert {"run", "study"} <= {n for row in readme_rows() for n in row}


def test_the_command_line_starts_without_torch():
    """`peftlab --help` and a mistyped flag answer before torch loads (5 s here)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, peftlab.cli, peftlab.config; "
                           "print(sorted(m for m in ('torch', 'transformers') if m in "
                           "sys.modules))"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
