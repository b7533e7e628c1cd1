"""The GPUs the capacity planner knows: vendor datasheet numbers (SXM parts, dense, no sparsity).

Link figures are per GPU: NVLink as the datasheet states it (both directions added up; a collective moves
data one way at half of it), InfiniBand as one 400 Gb/s NIC per GPU (8x400 Gb/s per 8-GPU node, the
DeepSeek-V2/V3 clusters), i.e. 50 GB/s each way. Achieved fractions of these peaks are the cluster config's
stated assumptions (`cluster.gemm_efficiency`, `cluster.link_efficiency`), not hidden in here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense BF16 tensor-core peak
    fp8_tflops: float  # dense FP8 tensor-core peak
    memory_gib: float  # HBM as the driver reports it (nvidia-smi total)
    hbm_tbps: float  # HBM bandwidth, TB/s
    nvlink_gbps: float  # NVLink per GPU, GB/s, both directions together (datasheet)
    ib_gbps: float = 50.0  # InfiniBand per GPU, GB/s one way (400 Gb/s NIC)

    @property
    def nvlink_one_way_gbps(self) -> float:
        return self.nvlink_gbps / 2


GPUS = {
    # H800 SXM5: the export variant of H100 with NVLink cut to 400 GB/s; the same compute and HBM.
    "h800": GPU("H800 SXM5 80GB", bf16_tflops=989.0, fp8_tflops=1979.0, memory_gib=79.6, hbm_tbps=3.35,
                nvlink_gbps=400.0),
    "h100": GPU("H100 SXM5 80GB", bf16_tflops=989.0, fp8_tflops=1979.0, memory_gib=79.6, hbm_tbps=3.35,
                nvlink_gbps=900.0),
    "h200": GPU("H200 SXM 141GB", bf16_tflops=989.0, fp8_tflops=1979.0, memory_gib=140.4, hbm_tbps=4.8,
                nvlink_gbps=900.0),
}


# GPUs the trainer may run on but the planner does not plan for: their dense BF16 peak, for MFU only.
OTHER_BF16_TFLOPS = {"h20": 148.0, "a100": 312.0, "a800": 312.0}


def device_bf16_tflops(device_name: str) -> float | None:
    """Dense BF16 peak of the GPU that torch names `device_name` ("NVIDIA H100 80GB HBM3"), None if unknown.
    Matched by whole words, so an H20 is not taken for an H200."""
    words = set(device_name.lower().replace("-", " ").split())
    peaks = {**{key: spec.bf16_tflops for key, spec in GPUS.items()}, **OTHER_BF16_TFLOPS}
    return next((tflops for key, tflops in peaks.items() if key in words), None)


def gpu(name: str) -> GPU:
    """The GPU named by `cluster.gpu`, or ValueError listing the known ones."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"cluster.gpu={name!r} is unknown; known: {', '.join(GPUS)}") from None
