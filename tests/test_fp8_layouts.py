"""FP8 under parallel layouts trains like FP8 in one process (the real entry point under torchrun, gloo),
compared step by step: losses, grad norms and the final weights, at tolerances for FP8 (below).

The runs compute in fp32 around emulated FP8 GEMMs, so the only rounding that differs from one process is
summation order. Equality needs the same FP8 tiles in both runs: blockwise tiles of 16 (`precision.fp8_block`)
divide every local width and every rank's tokens per micro-step, so no tile straddles ranks or shards.
Tensorwise and rowwise scales span a rank's whole batch (activations; weight gradients over tokens): under
data or expert parallelism they see other tokens than one process does, so they are compared under
pipeline parallelism, where each microbatch is the reference's micro-batch.

Tolerances. FP8 rounding is discontinuous: a one-ulp difference in summation order can move an element to the
next FP8 value, and this test's aggressive optimizer (lr 1e-2, eps 1e-3) amplifies that into the weights. So
the parallelism tests' rtol 1e-5 holds or fails here by luck of the data. Measured (blockwise and rowwise under
ep=2, 3 steps): such flips move the loss by up to 1.9e-5, the grad norm by 1e-4 and the weights by 2.9e-4
(relative L2). Quantization tiles that really differ from one process (tensorwise under ep=2, whose scales
span other tokens) move the loss by 9.6e-4 at step 2, the grad norm by 5.5e-2 and the weights by 6.1e-3. The
bounds below sit between the two.
Weights are compared by each tensor's update over the run (final minus initial, relative L2), so that an error
in one small tensor (a router) cannot hide in a norm over all parameters. Flips alone move single updates by up
to 1.0e-2 (rowwise under pp=2, layer 0's kv_a_proj_with_mqa: Adam with eps 1e-3 turns a flipped near-zero
gradient element into a full-size step), 3.3e-3 (blockwise under tp=2) and below 2e-5 in the other layouts; the
bound 3e-2 sits 3x above that and 3x below a 10% error in any one tensor's update.
These layout comparisons use no bf16 arithmetic (parameters and compute fp32), so the CPU's bf16 units
(AVX512-BF16, AMX) do not enter; fp32 summation order differs between CPUs as between layouts.
"""

from pathlib import Path

import pytest
import torch
import yaml

from model import Transformer

from test_parallel_layouts import final_params, run, single_process
from conftest import metrics
from train.config import build_config

LOSS_RTOL, GRAD_NORM_RTOL, UPDATE_REL_L2 = 2e-4, 2e-3, 3e-2
FP8 = {"precision.param_dtype": "float32", "precision.fp8_emulate": "true", "precision.fp8_block": 16}

LAYOUTS = {
    # name: (recipe, processes, per-rank micro-batch, reference micro-batch, overrides)
    "blockwise_ep2": ("blockwise", 2, 2, 4, {"parallel.ep": 2, "parallel.activation_checkpoint": "selective"}),
    "blockwise_pp2": ("blockwise", 2, 2, 2, {"parallel.pp": 2, "parallel.activation_checkpoint": "full"}),
    "tensorwise_pp2": ("tensorwise", 2, 2, 2, {"parallel.pp": 2}),
    "rowwise_pp2": ("rowwise", 2, 2, 2, {"parallel.pp": 2}),
    "blockwise_tp2": ("blockwise", 2, 2, 2, {"parallel.tp": 2}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_layout_equals_single_process(dataset, reference_run, tmp_path, layout):
    recipe, nproc, mb, ref_mb, over = LAYOUTS[layout]
    fp8 = {**FP8, "precision": f"fp8_{recipe}"}
    ref, got = single_process(reference_run, **fp8, **{"train.micro_batch_size": ref_mb}), tmp_path / layout
    run(dataset, got, nproc, **fp8, **{"train.micro_batch_size": mb, **over})
    assert_fp8_run_close(ref, got, tmp_path)


def assert_fp8_run_close(ref: Path, got: Path, tmp: Path) -> None:
    for key, rtol in (("loss", LOSS_RTOL), ("grad_norm", GRAD_NORM_RTOL)):
        a, b = metrics(ref, key), metrics(got, key)
        assert a.keys() == b.keys()
        for s in a:
            assert b[s] == pytest.approx(a[s], rel=rtol), f"{key} at step {s}"
    pa, pb = final_params(ref, tmp), final_params(got, tmp)
    assert pa.keys() == pb.keys()
    init = initial_params(ref)
    for name in pa:  # each tensor's update, so that an error in one small tensor (a router) cannot hide
        if name.endswith("expert_bias"):  # moved by sign(load error): +-gamma jumps
            continue
        da, db = (pa[name] - init[name]).double(), (pb[name] - init[name]).double()
        err = float((db - da).norm() / da.norm())
        assert err < UPDATE_REL_L2, f"{name}: its update differs by {err:.2e} (relative L2)"


def initial_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a run started from: its model initialised whole with its seed, as the trainer does."""
    cfg = build_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    model = Transformer(cfg.model)
    model.init_weights(seed=cfg.train.seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_fp8_all_gather_equals_gathering_then_casting(dataset, tmp_path):
    """fp8_tensorwise with FSDP2 all-gathering the dense weights in FP8 (torchao) trains exactly as casting
    them after a high-precision all-gather (dp=2; fp32 compute so the only cast is the FP8 one)."""
    fp8 = {**FP8, "precision": "fp8_tensorwise", "train.micro_batch_size": 1}
    plain, gathered = tmp_path / "plain", tmp_path / "fp8_gather"
    run(dataset, plain, 2, **fp8)
    run(dataset, gathered, 2, **fp8, **{"precision.fp8_fsdp_all_gather": "true"})
    for key in ("loss", "grad_norm"):
        assert metrics(gathered, key) == metrics(plain, key)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_bf16_gemm_emulation_under_tp_with_torchao_fp8(dataset, tmp_path, recipe):
    """FP8 around bf16 under tp=2 (torchao's FP8 tensors inside DTensors), with bf16 GEMMs emulated in fp32
    (train/precision.py, as bench/precision.py runs bf16 on CPU) against native bf16 GEMMs: the same losses up to
    the order of fp32 summation (measured: equal to the bit, the bf16 rounding of each result absorbs it). The
    emulation once tried to upcast those FP8 shards and crashed."""
    fp8 = {**FP8, "precision": f"fp8_{recipe}", "precision.param_dtype": "bfloat16", "parallel.tp": 2}
    native, emulated = tmp_path / "native", tmp_path / "emulated"
    run(dataset, native, 2, **fp8)
    run(dataset, emulated, 2, **fp8, **{"precision.bf16_gemm_emulate": "true"})
    # 1e-3 = a quarter of bf16's unit roundoff 2^-8, whatever the CPU's native bf16 path (see test_train.py's
    # test_bf16_run_tracks_fp32_and_emulated_bf16_gemms_track_native)
    a, b = metrics(native), metrics(emulated)
    assert a.keys() == b.keys()
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-3), f"loss at step {s}"


def test_fp8_bf16_moments_resume_under_ep2_is_exact(dataset, tmp_path):
    """DeepSeek-V3's recipe as a multi-GPU run would use it (blockwise FP8 around bf16 under FSDP2, bf16 AdamW
    moments, ep=2), stopped after 2 steps and resumed to 4: the same losses and weights as 4 steps in one go."""
    fp8 = {**FP8, "precision": "fp8_blockwise", "precision.param_dtype": "bfloat16",
           "precision.bf16_gemm_emulate": "true", "precision.moment_dtype": "bfloat16", "parallel.ep": 2,
           "train.micro_batch_size": 1, "checkpoint.every": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(dataset, straight, 2, steps=4, **fp8)
    run(dataset, resumed, 2, steps=2, **fp8)
    run(dataset, resumed, 2, steps=4, **fp8)
    assert metrics(resumed) == metrics(straight) and len(metrics(straight)) == 4
    pa, pb = final_params(straight, tmp_path), final_params(resumed, tmp_path)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
