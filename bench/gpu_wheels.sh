#!/usr/bin/env bash
# Run here (a machine with PyPI) before a device session: the Python packages the lent GPU's image lacks, as
# wheels for its Python 3.12 in .whl/ (git-ignored; the device tool carries it with carry=[".whl"]).
# The image has torch 2.11 (CUDA 13), tensorboard, tokenizers, safetensors, numpy, pyyaml, tqdm; torchao 0.18 is
# the release built against torch 2.11. antlr4 (hydra's parser) is published only as a source archive, so its
# pure-Python wheel is built here. About 4 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    torchao==0.18.0 hydra-core==1.3.2 omegaconf==2.3.0 webdataset==1.0.2 braceexpand==0.1.7
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
