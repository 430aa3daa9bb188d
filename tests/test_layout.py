"""The package's layers (docs/design.md): the shared top-level modules import no job group,
and predict's groups (pipeline, models, archs, qc) import nothing of training or benchmark,
which build on them. Every import counts, lazy ones included."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "meshseg"
SHARED = {"errors", "io", "metrics", "progress", "__init__"}  # and cli, the entry point
GROUPS = {"pipeline", "models", "archs", "qc", "training", "benchmark"}
# The one edge from the shared modules into a group: io.load_volume reads through the
# reading gate, pipeline.validate.
SHARED_EXCEPTIONS = {("io", "pipeline.validate")}
MUST_NOT_IMPORT = {
    "pipeline": {"training", "benchmark"},
    "models": {"training", "benchmark", "qc"},
    "archs": {"training", "benchmark", "pipeline", "qc"},
    "qc": {"training", "benchmark"},
}


def imports_of(path: Path) -> set[str]:
    """The meshseg modules a file imports, as 'pipeline.predict', 'io', ..."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "meshseg" and not node.module.startswith("meshseg."):
                continue
            module = node.module.removeprefix("meshseg").removeprefix(".")
            if (PACKAGE / module.replace(".", "/")).is_dir():  # from a package: its modules
                found |= {f"{module}.{a.name}".removeprefix(".") for a in node.names}
            else:
                found.add(module)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("meshseg.") for a in node.names
                      if a.name.startswith("meshseg.")}
    return found


def modules(where: Path) -> list[Path]:
    return sorted(where.glob("*.py"))


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_modules_import_no_group(name):
    allowed = {target for source, target in SHARED_EXCEPTIONS if source == name}
    wrong = {target for target in imports_of(PACKAGE / f"{name}.py")
             if target.split(".")[0] in GROUPS | {"cli"}}
    assert wrong - allowed == set()


@pytest.mark.parametrize("group", sorted(MUST_NOT_IMPORT))
def test_predicts_groups_import_no_training_or_benchmark(group):
    wrong = {f"{path.stem} -> {name}" for path in modules(PACKAGE / group)
             for name in imports_of(path) if name.split(".")[0] in MUST_NOT_IMPORT[group]}
    assert wrong == set()
