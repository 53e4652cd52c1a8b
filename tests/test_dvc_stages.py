"""dvc.yaml cannot drift from the code: a stage depends on every project module its command imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def _imported_modules(path: Path) -> set[str]:
    """Project modules a file imports anywhere (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            if node.module == PACKAGE:
                found |= {f"{PACKAGE}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return {name for name in found if (REPO / f"{name.replace('.', '/')}.py").is_file()}


def import_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += _imported_modules(REPO / f"{name.replace('.', '/')}.py")
    return seen


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_the_closure_follows_lazy_and_indirect_imports():
    closure = import_closure("pipeline.train")
    assert {"pipeline.rewards", "pipeline.scoring"} <= closure  # rewards imported inside train(), scoring by rewards


def test_each_stage_depends_on_every_module_it_imports():
    for name, stage in _stages().items():
        match = re.fullmatch(r"python -m (pipeline\.\w+)", stage["cmd"])
        assert match, f"stage {name}: command {stage['cmd']!r} is not `python -m pipeline.<module>`"
        needed = {f"{module.replace('.', '/')}.py" for module in import_closure(match.group(1))}
        missing = sorted(needed - set(stage["deps"]))
        assert not missing, f"dvc.yaml stage {name!r} imports but does not depend on: {', '.join(missing)}"


def test_every_listed_module_exists():
    for name, stage in _stages().items():
        for dep in stage["deps"]:
            if dep.startswith(f"{PACKAGE}/"):
                assert (REPO / dep).is_file(), f"dvc.yaml stage {name!r} depends on a missing file {dep}"


def test_metrics_and_plots_are_the_paths_the_code_writes():
    """One path per report for every run (pipeline.params.Reports), so DVC compares runs."""
    from pipeline.params import Reports

    declared = set()
    for stage in _stages().values():
        for kind in ("metrics", "plots"):
            for entry in stage.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                assert "${" not in path, f"{path}: a report path must not change with the run"
                declared.add(path)
    written = {Reports.data, Reports.train, Reports.train_curves / "plots" / "metrics", Reports.evaluation,
               Reports.comparison}
    assert declared == {str(path) for path in written}
