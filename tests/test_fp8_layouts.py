"""FP8 under parallel layouts trains like FP8 in one process (the real entry point under torchrun, gloo),
with the parallelism tests' comparison: losses (rtol 1e-5), grad norms (rtol 1e-4), final weights (rtol 1e-4).

The runs compute in fp32 around emulated FP8 GEMMs, so the only rounding that differs from one process is
summation order. Equality needs the same FP8 tiles in both runs: blockwise tiles of 16 (`precision.fp8_block`)
divide every local width and every rank's tokens per micro-step, so no tile straddles ranks or shards.
Tensorwise and rowwise scales span a rank's whole batch (activations; weight gradients over tokens): under
data or expert parallelism they see other tokens than one process does, so they are compared under
pipeline parallelism, where each microbatch is the reference's micro-batch.
"""

import pytest

from test_parallel_layouts import assert_same_run, run
from test_train import dataset, metrics  # noqa: F401  (dataset is a fixture)

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
def test_fp8_layout_equals_single_process(dataset, tmp_path, layout):
    recipe, nproc, mb, ref_mb, over = LAYOUTS[layout]
    fp8 = {**FP8, "precision": f"fp8_{recipe}"}
    ref, got = tmp_path / "ref", tmp_path / layout
    run(dataset, ref, 1, **fp8, **{"train.micro_batch_size": ref_mb})
    run(dataset, got, nproc, **fp8, **{"train.micro_batch_size": mb, **over})
    assert_same_run(ref, got, tmp_path)


def test_fp8_all_gather_equals_gathering_then_casting(dataset, tmp_path):
    """fp8_tensorwise with FSDP2 all-gathering the dense weights in FP8 (torchao) trains exactly as casting
    them after a high-precision all-gather (dp=2; fp32 compute so the only cast is the FP8 one)."""
    fp8 = {**FP8, "precision": "fp8_tensorwise", "train.micro_batch_size": 1}
    plain, gathered = tmp_path / "plain", tmp_path / "fp8_gather"
    run(dataset, plain, 2, **fp8)
    run(dataset, gathered, 2, **fp8, **{"precision.fp8_fsdp_all_gather": "true"})
    for key in ("loss", "grad_norm"):
        assert metrics(gathered, key) == metrics(plain, key)
