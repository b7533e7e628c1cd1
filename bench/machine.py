"""The machine a benchmark ran on, printed beside its numbers.

CPUs differ in what is fast: with AMX or AVX512-BF16 units torch's bf16 GEMMs run faster than fp32 (about 6x on
an AMX Xeon), with AVX2 alone some 60x slower. So every CPU figure names the CPU model, its bf16 units and the
measured bf16 / fp32 GEMM speed; `bf16_gemms_fast()` decides whether a precision benchmark can run bf16 natively
or must emulate its GEMMs in fp32 (`precision.bf16_gemm_emulate`).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the bf16 matrix / vector units


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text."""
    model, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


@functools.cache
def cpu() -> tuple[str, set[str]]:
    path = Path("/proc/cpuinfo")
    return parse_cpuinfo(path.read_text()) if path.exists() else ("unknown CPU", set())


def bf16_units(flags: set[str]) -> str:
    found = [f for f in BF16_FLAGS if f in flags]
    return ", ".join(found) if found else "none (" + ("avx2" if "avx2" in flags else "no avx2") + ")"


def gemm_gflops(dtype: torch.dtype, n: int = 1024, repeat: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n ** 3 * repeat / (time.perf_counter() - t0) / 1e9


@functools.cache
def gemm_speeds() -> tuple[float, float]:
    """(bf16, fp32) GFLOP/s of a 1024^2 GEMM on this process's threads."""
    return gemm_gflops(torch.bfloat16), gemm_gflops(torch.float32)


def bf16_gemms_fast() -> bool:
    """A CUDA device, or a CPU whose native bf16 GEMMs are at least as fast as its fp32 ones."""
    if torch.cuda.is_available():
        return True
    bf16, fp32 = gemm_speeds()
    return bf16 >= fp32


def describe() -> str:
    """One line: the device, and on CPU the model, cores, bf16 units and measured bf16 / fp32 GEMM speed."""
    model, flags = cpu()
    line = (f"machine: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
            f"bf16 units: {bf16_units(flags)}")
    bf16, fp32 = gemm_speeds()
    line += f"; 1024^2 GEMM bf16 {bf16:,.0f} / fp32 {fp32:,.0f} GFLOP/s (x{bf16 / fp32:.2f})"
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name()}"
    return line


if __name__ == "__main__":
    print(describe())
