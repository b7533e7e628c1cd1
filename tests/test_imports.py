"""The packages import one way, launch -> train -> parallel -> model (DESIGN.md), read from the source's import
statements: model/ imports none of the others, parallel/ not train/ or launch/, train/ not launch/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"model": ("parallel", "train", "launch"), "parallel": ("train", "launch"), "train": ("launch",)}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a file imports (absolute imports; relative ones stay in the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_imports_flow_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & set(FORBIDDEN[package])) for f in files}
    assert {f: pkgs for f, pkgs in bad.items() if pkgs} == {}


def test_the_check_sees_an_import(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("import os\nfrom launch.plan import cost\nfrom .sibling import y\n\ndef f():\n    import train.env\n")
    assert imported_packages(source) == {"os", "launch", "train"}
