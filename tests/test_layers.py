"""The library never imports the command line: argv parsing and printing live in ``finetune.cli`` alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
# ``python -m finetune`` (``__main__.py``) is the command line's entry point, not library.
LIBRARY = sorted(
    p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
)


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return found


def test_the_library_is_checked():
    names = {str(p.relative_to(PACKAGE)) for p in LIBRARY}
    assert {"runs.py", "plan.py", "export.py", "callbacks/report.py", "distill/teacher.py"} <= names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_module_does_not_import_the_cli(path):
    offending = [m for m in imported_modules(path) if m == "finetune.cli" or m.startswith("finetune.cli.")]
    assert not offending, (
        f"{path.relative_to(PACKAGE)} imports {offending}: move what it needs into the library"
    )


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from finetune.cli.lightning import run_cli\n")
    assert "finetune.cli.lightning" in imported_modules(module)
