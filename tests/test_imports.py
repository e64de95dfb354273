"""The package's import graph (every import, function-level ones included): no circle, and nothing
below the command line imports sd3exp.cli; what a command really imports: `stage=plan` loads no
plotting, image or template library. Run alone: `python -m pytest tests/test_imports.py`."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parent.parent / "sd3exp"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: Set[str]) -> Set[str]:
    """The sd3exp modules `path` imports anywhere in it (a name imported from a package counts as
    its submodule when there is one)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def graph() -> Dict[str, Set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def test_the_import_graph_has_no_circle():
    try:
        graphlib.TopologicalSorter(graph()).prepare()
    except graphlib.CycleError as err:
        raise AssertionError(f"import circle: {' -> '.join(err.args[1])}") from None


def test_only_the_entry_point_imports_the_cli():
    importers = sorted(name for name, deps in graph().items() if "sd3exp.cli" in deps)
    assert importers == ["sd3exp.__main__"]


def imported_modules(*args: str, cwd: Path) -> Set[str]:
    """The modules `python -X importtime -m sd3exp ARGS` imports (its stderr lists each one)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sd3exp", *args], cwd=PACKAGE.parent,
                            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return {line.rpartition("|")[2].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_planning_imports_no_plotting_image_or_template_library(tmp_path):
    modules = imported_modules("experiment=fantasy_art", "stage=plan", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "sd3exp.plan" in modules  # the listing is complete enough to see our own modules
    heavy = sorted(m for m in modules if m.split(".")[0] in ("matplotlib", "PIL", "jinja2", "optuna", "sqlalchemy"))
    assert not heavy, f"stage=plan imports {heavy[:5]}"


def test_compiling_draws_no_chart_and_loads_no_plotting_library(tmp_path):
    """lr_curve.png is drawn with the report that shows it (tests/test_report.py), not on every compile."""
    run = tmp_path / "run"
    modules = imported_modules("experiment=fantasy_art", "stage=compile", f"hydra.run.dir={run}", cwd=tmp_path)
    assert (run / "plan.json").is_file() and not (run / "lr_curve.png").exists()
    assert not [m for m in modules if m.split(".")[0] == "matplotlib"]
