"""bench/gpu_check.sh rehearsed on the CPU (SMOKE=1), so the prepared GPU check cannot rot before a GPU is lent:
every step exits 0 and prints its numbers, and every module its processes import is one the GPU image has
(bench/gpu_wheels.sh's header lists them) or one that bench/gpu_wheels.sh gathers as a wheel.

The imports are recorded by a `sitecustomize` put first on PYTHONPATH: every Python process of the check
(the benches, each `python -m train` run, compile workers) writes the top-level modules it loaded when it exits.
"""

import importlib.metadata as md
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("env", "fp8_kernels", "precision", "compiled")
RECIPES = {"precision": ("bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_blockwise"),
           "compiled": ("bf16", "fp8_tensorwise", "fp8_rowwise")}
# the GPU image's own Python packages (bench/gpu_wheels.sh's header); their requirements come with them
IMAGE = ("torch", "tensorboard", "tokenizers", "safetensors", "numpy", "pyyaml", "tqdm")

TRACER = """import atexit, os, sys
def _where(module):
    return getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), None) or "-"
def _write():
    top = {name: _where(m) for name, m in list(sys.modules.items()) if "." not in name}
    with open(os.path.join(os.environ["IMPORT_TRACE_DIR"], f"{os.getpid()}.txt"), "w") as f:
        f.write("\\n".join(f"{name}\\t{path}" for name, path in sorted(top.items())))
atexit.register(_write)
"""
# Hydra imports every plugin installed under this namespace (here hydra-submitit-launcher, which the check never
# uses and the GPU image does not have)
DISCOVERED = {"hydra_plugins"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distributions() -> set[str]:
    """The distributions bench/gpu_wheels.sh downloads or builds (its `name==version` arguments)."""
    text = (ROOT / "bench/gpu_wheels.sh").read_text()
    return {_canonical(n) for n in re.findall(r"([A-Za-z0-9][\w.-]*)==[\w.]+", text)}


def with_requirements(names: set[str]) -> set[str]:
    """`names` and, transitively, what their installed metadata requires (extras and other platforms left out)."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            if ";" in req and not _marker_holds(req.split(";", 1)[1]):
                continue
            todo.append(_canonical(re.match(r"[A-Za-z0-9][\w.-]*", req).group(0)))
    return seen


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate({"extra": ""})


def foreign_modules(imported: dict[str, str], allowed: set[str]) -> dict[str, str]:
    """{module: file} of the imported top-level modules installed as packages (a file under a site-packages
    folder: not the standard library, not this repository's, not inductor's generated code) whose package is
    from no allowed distribution. A module vendored inside another package (setuptools/_vendor/...) counts as
    that package's."""
    providers = md.packages_distributions()
    out = {}
    for name, path in imported.items():
        parts = Path(path).parts
        if name in DISCOVERED or name.startswith("__editable__") or "site-packages" not in parts:
            continue  # "__editable__...": the finder of this repository's editable install
        package = Path(parts[parts.index("site-packages") + 1]).stem  # module.py or a package's folder
        if not {_canonical(d) for d in providers.get(package, [])} & allowed:
            out[name] = path
    return out


def run_smoke(tmp: Path) -> tuple[str, dict[str, str]]:
    """SMOKE=1 bash bench/gpu_check.sh -> (its console output, the top-level modules its processes imported)."""
    trace, out = tmp / "trace", tmp / "out"
    trace.mkdir()
    out.mkdir()
    (trace / "sitecustomize.py").write_text(TRACER)
    env = {**os.environ, "SMOKE": "1", "PY": sys.executable, "OUT": str(out), "PYTHONPATH": str(trace),
           "IMPORT_TRACE_DIR": str(trace)}
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {}
    for f in trace.glob("*.txt"):
        imported.update(line.split("\t", 1) for line in f.read_text().splitlines())
    return proc.stdout, imported


@pytest.mark.slow
def test_gpu_check_rehearsal_runs_every_step_with_numbers_and_only_packages_the_gpu_has(tmp_path):
    text, imported = run_smoke(tmp_path)
    for step in STEPS:
        assert f"== {step}: exit 0" in text, f"step {step} did not exit 0:\n{text[-4000:]}"
        assert (tmp_path / "out" / f"{step}.txt").exists()
    assert "FAILED" not in text, text[-4000:]
    worst = float(re.search(r"worst_real_vs_emulated=(\S+)", text).group(1))
    assert math.isfinite(worst)  # the FP8 kernels step compared real and emulated GEMMs where it could
    for step, recipes in RECIPES.items():
        part = text.split(f"== {step}: ")[1]
        for recipe in recipes:
            tok_s = re.search(rf"^{recipe}\s+seed 0\s+step\s+([\d.]+) ms\s+([\d,]+) tok/s.*val (\d+\.\d+)", part, re.M)
            assert tok_s and float(tok_s.group(1)) > 0 and 0 < float(tok_s.group(3)) < 20, f"{step} {recipe}"
    allowed = with_requirements({_canonical(n) for n in IMAGE}) | wheel_distributions()
    assert {"torchao", "hydra", "omegaconf"} <= set(imported)  # the tracer saw the check's own processes
    assert foreign_modules(imported, allowed) == {}


def test_a_module_from_neither_the_image_nor_the_wheels_is_reported():
    import hydra
    import yaml

    wheels = wheel_distributions()
    assert {"torchao", "hydra-core", "omegaconf", "antlr4-python3-runtime"} <= wheels
    allowed = with_requirements({_canonical(n) for n in IMAGE}) | wheels
    imported = {"hydra": hydra.__file__, "yaml": yaml.__file__, "model": str(ROOT / "model/__init__.py")}
    assert foreign_modules(imported, allowed) == {}
    assert foreign_modules(imported, allowed - {"hydra-core"}) == {"hydra": hydra.__file__}
