#!/usr/bin/env bash
# Does .whl/ (bench/gpu_wheels.sh) hold every package bench/gpu_check.sh needs beyond the GPU image's own? Builds a
# virtual environment with only what the image has (torch, pinned as in the Makefile, and the packages
# gpu_wheels.sh's header lists), installs the wheels as the check does (--no-index --no-deps), imports what the
# check imports and runs its CPU rehearsal (SMOKE=1) with that environment's Python. Takes several minutes (the
# venv, then the rehearsal), so it is a bench script, not a test: tests/test_gpu_check.py checks the same
# imports against the packages' metadata on every run.
#   bash bench/gpu_wheels.sh && bash bench/gpu_wheels_check.sh [VENV_DIR]
# Last line: gpu_wheels_check=ok, or the step that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$(mktemp -d)/venv}
compgen -G ".whl/*.whl" > /dev/null || { echo "no .whl/*.whl: run bench/gpu_wheels.sh first"; exit 1; }
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 tensorboard tokenizers safetensors numpy pyyaml tqdm
"$VENV/bin/pip" install -q --no-index --no-deps .whl/*.whl
"$VENV/bin/pip" check || echo "(pip check lists what the image's packages would bring)"
PYTHONPATH=$PWD "$VENV/bin/python" -c "import torchao, hydra, omegaconf, webdataset, train.__main__, train.trainer; \
print('imports ok: torch', __import__('torch').__version__, 'torchao', torchao.__version__)"
OUT=$(mktemp -d) SMOKE=1 PY="$VENV/bin/python" bash bench/gpu_check.sh | tee "$VENV.smoke.txt"
n_ok=$(grep -c '^== [a-z0-9_]*: exit 0$' "$VENV.smoke.txt" || true)
[ "$n_ok" = 4 ] || { echo "gpu_wheels_check=failed ($n_ok of 4 steps exited 0)"; exit 1; }
echo "gpu_wheels_check=ok"
