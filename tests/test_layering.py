"""Data flows one way: ``modules/`` (drop-in nn.Modules) imports no other area of the package except
the leaf modules it needs. Checked on the source (AST), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ctnocvr_rec"
#: what modules/ may import from the package: itself, the label leaf, and the field schema
#: (ctnocvr_rec.data.schema is torch-free and imports nothing from data/ but resources/yaml_strict)
MODULES_MAY_IMPORT = ("ctnocvr_rec.modules", "ctnocvr_rec.labels", "ctnocvr_rec.data.schema")


def package_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] == "ctnocvr_rec"}


def test_modules_import_only_leaves() -> None:
    bad = {
        str(path.relative_to(PACKAGE)): sorted(
            n for n in package_imports(path) if not n.startswith(MODULES_MAY_IMPORT)
        )
        for path in sorted((PACKAGE / "modules").glob("*.py"))
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"modules/ imports other package areas: {bad}"


def test_label_has_one_definition() -> None:
    defining = [
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
        if "def derive_ctnocvr_label" in p.read_text(encoding="utf-8")
    ]
    assert defining == ["labels.py"]


def test_scorer_needs_only_the_dense_transform_from_the_package():
    """``Scorer`` (serving/scorer.py + contract.py) is embedded in services without our training code:
    from the package it may import only itself and the numpy-only dense transform, which imports nothing
    of the package (docs/serving.md, "Self-contained")."""
    allowed = {"ctnocvr_rec.serving.contract", "ctnocvr_rec.data.dense"}
    for name in ("serving/scorer.py", "serving/contract.py"):
        assert package_imports(PACKAGE / name) <= allowed, (name, package_imports(PACKAGE / name) - allowed)
    assert package_imports(PACKAGE / "data" / "dense.py") == set()


def test_experiments_never_import_the_cli() -> None:
    """Experiments call library functions (synth, prepare, train.api), never the CLI entry point."""
    bad = {
        str(path.relative_to(PACKAGE)): sorted(n for n in package_imports(path) if n.startswith("ctnocvr_rec.cli"))
        for path in sorted((PACKAGE / "experiments").glob("*.py"))
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"experiments/ imports the CLI: {bad}"
