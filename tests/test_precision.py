"""bf16 GEMMs emulated in fp32 (train/precision.py, `precision.bf16_gemm_emulate`) against torch's native bf16
GEMMs: the same numbers up to the order of the fp32 accumulation, forward and both backward GEMMs."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from train.precision import Bf16GemmEmulation

ROOT = Path(__file__).resolve().parent.parent
ULP = 2.0 ** -7  # bf16 spacing relative to a value in [1, 2): one unit in the last place, at most


def bf16_inputs(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).bfloat16().requires_grad_() for s in shapes]


def assert_same_as_native(emulated: torch.Tensor, native: torch.Tensor, min_equal: float = 0.999):
    """bf16, bitwise equal almost everywhere, elsewhere one ulp apart (a different fp32 summation order).

    From the arithmetic, whatever the CPU's native path (AVX2, AVX512-BF16, AMX: all accumulate in fp32): bf16
    products are exact in fp32; two summation orders of K random-signed terms differ by ~sqrt(K) 2^-24 of the
    terms' scale, the sum is ~sqrt(K) of it, and the roundings to bf16 (spacing ~2^-8 of the sum) differ only
    where a rounding boundary falls between the two sums: about 2^-24 / 2^-8 = 2^-16 (1.5e-5) of the elements,
    far below the 1e-3 allowed."""
    assert emulated.dtype == native.dtype == torch.bfloat16
    diff = (emulated.float() - native.float()).abs()
    assert float(diff.max()) <= ULP * float(native.float().abs().max())
    assert float((diff == 0).float().mean()) >= min_equal


def linear(x, w, b):
    return F.linear(x, w, b)  # addmm forward; mm for dgrad and wgrad


def bmm(x, w):
    return torch.bmm(x, w)


def baddbmm(c, x, w):
    return torch.baddbmm(c, x, w, alpha=0.5)


def grouped(x, w):
    offs = torch.tensor([40, 40, 96, 128], dtype=torch.int32)  # one empty group
    return torch._grouped_mm(x, w, offs=offs)


CASES = {"linear": (linear, [(96, 160), (72, 160), (72,)]), "bmm": (bmm, [(3, 48, 160), (3, 160, 40)]),
         "baddbmm": (baddbmm, [(3, 48, 40), (3, 48, 160), (3, 160, 40)]),
         "grouped_mm": (grouped, [(128, 160), (4, 160, 48)])}


@pytest.mark.parametrize("case", CASES)
def test_emulated_gemms_equal_native_bf16_forward_and_backward(case):
    fn, shapes = CASES[case]
    results = []
    for emulate in (False, True):
        inputs = bf16_inputs(*shapes)
        with Bf16GemmEmulation() if emulate else contextlib.nullcontext():
            y = fn(*inputs)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16())
        results.append([y.detach()] + [t.grad for t in inputs])
    native, emulated = results
    for e, n in zip(emulated, native):
        assert_same_as_native(e, n)


class KernelDtypes(TorchDispatchMode):
    """Entered before the emulation mode, so it sees the GEMMs the emulation hands down to the kernels."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.seen.append(tuple(a.dtype for a in args))
        return func(*args, **(kwargs or {}))


def test_kernels_get_fp32_operands_and_results_are_rounded_fp32_products():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=g), torch.randn(512, 32, generator=g)
    with KernelDtypes() as kernels, Bf16GemmEmulation():
        fp32 = a @ b
        emulated = a.bfloat16() @ b.bfloat16()
    assert kernels.seen == [(torch.float32, torch.float32)] * 2
    assert torch.equal(fp32, a @ b)
    assert torch.equal(emulated, (a.bfloat16().float() @ b.bfloat16().float()).bfloat16())


def test_torchao_fp8_linear_under_the_mode_is_unchanged():
    """torchao's FP8 tensors (a tensor subclass) keep their own dispatch: the emulated FP8 linear gives the same
    output and input gradient with and without the mode."""
    from torch import nn
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    model = convert_to_float8_training(nn.Sequential(nn.Linear(64, 128, bias=False)),
                                       config=Float8LinearConfig(emulate=True))
    results = []
    for mode in (None, Bf16GemmEmulation()):
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with mode or contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(x)
            y.float().square().sum().backward()
        results.append((y.detach(), x.grad))
    assert results[0][0].dtype == torch.bfloat16
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


DTENSOR_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from train.precision import Bf16GemmEmulation
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
g = torch.Generator().manual_seed(0)
a, b = torch.randn(48, 96, generator=g).bfloat16(), torch.randn(96, 40, generator=g).bfloat16()
da = distribute_tensor(a, mesh, [Shard(0)]).requires_grad_()
with Bf16GemmEmulation():
    out = da @ distribute_tensor(b, mesh, [Replicate()])
    out.sum().backward()
ref = (a.float() @ b.float()).bfloat16()
print(type(out).__name__, out.dtype, torch.equal(out.to_local(), ref), da.grad.dtype)
"""


def test_dtensor_operands_compute_in_fp32():
    """Tensor parallelism's DTensors: the local GEMM runs in fp32 and the DTensor result is bf16."""
    proc = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["DTensor", "torch.bfloat16", "True", "torch.bfloat16"]
