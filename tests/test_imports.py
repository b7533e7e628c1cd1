"""The packages import one way, launch -> train -> parallel -> model (docs/ARCHITECTURE.md), read from the source's
import statements: model/ imports none of the others, parallel/ not train/ or launch/, train/ not launch/. And no
function in them runs over 60 lines."""

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
    source.write_text("import os\nfrom launch.plan import cost\nfrom .sibling import y\n\n"
                      "def f():\n    import train.env\n")
    assert imported_packages(source) == {"os", "launch", "train"}


MAX_FUNCTION_LINES = 60


def long_functions(path: Path) -> dict[str, int]:
    """{"file:function": lines} of the functions and methods in a file longer than MAX_FUNCTION_LINES (from `def`
    to the last line of the body, decorators not counted)."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found[f"{path.name}:{node.name}"] = lines
    return found


def test_no_function_runs_over_60_lines():
    files = [f for package in ("model", "parallel", "train", "launch") for f in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 40
    assert {k: v for f in files for k, v in long_functions(f).items()} == {}


def test_the_length_check_counts_a_function_of_61_lines(tmp_path):
    """A function of 60 lines passes, a method of 61 (def line to last line) does not."""
    def body(n: int, indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))
    source = tmp_path / "x.py"
    source.write_text(f"def fits():\n{body(59, '    ')}\n\nclass A:\n    def long(self):\n{body(60, '        ')}")
    assert long_functions(source) == {"x.py:long": 61}
