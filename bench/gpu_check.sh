#!/usr/bin/env bash
# The prepared GPU check of issue 5 (FP8 on real kernels), made to fit ONE call of the device tool:
#   here:          bash bench/gpu_wheels.sh                         # packages the GPU image lacks -> .whl/
#   on the device: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Steps, each under its own time limit (10 minutes in all; not yet run on a GPU), each writing to $OUT as well:
#   env.txt           GPU, driver, torch / torchao versions, compute capability
#   fp8_kernels.txt   every FP8 GEMM (dense and experts, each recipe): real kernel vs emulation vs bf16, times
#   precision.txt     a DeepSeek-V2-Lite-shaped model (4 layers, 4K context, 16K tokens a step) trained by each
#                     recipe in eager mode: step time, tokens/s, MFU, peak memory, loss, ratios against bf16
#   compiled.txt      the same with per-block torch.compile (torchao's FP8 casts are fused only when compiled)
# SMOKE=1 runs the same steps at tiny sizes (on a CPU too), to check the script itself before spending GPU time;
# its limits are 3x (a loaded 2-core CPU compiles slower than the GPU machine's 16 cores): tests/test_gpu_check.py
# runs it in the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SCALE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, output to the console and $OUT/NAME.txt
    local name=$1 limit=$(($2 * SCALE)); shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}
if [ "${SMOKE:-0}" = 1 ]; then
    SCALE=3
    export TORCHINDUCTOR_COMPILE_THREADS=1  # no pool of compile workers to start on 2 cores
    KERNELS=(--tokens 256 --dim 256 --hidden 128 --experts 4 --repeat 2)
    MODEL=(--preset tiny --steps 2 --skip 1 --batch 2 --seq-len 32)
    SETS=(model.num_hidden_layers=2)  # one dense block, one MoE block
    COMPILED=(--native-bf16-gemms)  # on a CPU the bf16 GEMM emulation (a dispatch mode) cannot be compiled
else
    KERNELS=()
    MODEL=(--preset deepseek_v2_lite --steps 16 --skip 6 --batch 4 --seq-len 4096)
    SETS=(model.num_hidden_layers=4)
    COMPILED=()
fi
step env 45 bash -c "nvidia-smi 2>&1 | head -15; $PY -c 'import torch, torchao; print(\"torch\", torch.__version__, \"torchao\", torchao.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_capability() if torch.cuda.is_available() else \"\")'"
step fp8_kernels 90 $PY bench/fp8_kernels.py "${KERNELS[@]}"
step precision 190 $PY bench/precision.py "${MODEL[@]}" --recipes bf16 fp8_tensorwise fp8_rowwise fp8_blockwise \
    --set "${SETS[@]}"
step compiled 230 $PY bench/precision.py "${MODEL[@]}" "${COMPILED[@]}" --recipes bf16 fp8_tensorwise fp8_rowwise \
    --set "${SETS[@]}" parallel.compile=true
echo "results in $OUT"
