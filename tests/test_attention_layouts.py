"""MHA and GQA under tensor (tp=2), context (cp=2, Ulysses) and pipeline (pp=2, 1F1B) parallelism against one
process, on CPU with gloo.

One 2-process job (tests/conftest.py's run_ranks) runs every case in one gloo group: the `tiny`
preset cut to 2 layers (one dense, one MoE; balance losses off, so the loss is a mean over tokens whatever
the split), one forward and backward on a fixed batch. Each case's loss and every gradient it holds equal
the whole model's in this process. GQA has 2 K/V heads for 4 query heads, so each tp/cp rank holds one K/V
head and the two query heads that read it.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from conftest import close, cross_entropy, fixed_batch, full, run_ranks, tiny, tiny_model
from model.transformer import Transformer

WORLD, B, T = 2, 4, 32
VARIANTS = {"mha": {"attention": "mha"}, "gqa": {"attention": "gqa", "num_key_value_heads": 2}}
CASES = [f"{layout}_{variant}" for layout in ("tp2", "cp2", "pp2") for variant in VARIANTS]


def build(variant: str) -> Transformer:
    return tiny_model(tiny(num_hidden_layers=2, aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0,
                           **VARIANTS[variant]))


def reference(variant: str) -> dict:
    model = build(variant)
    tokens, labels = fixed_batch(model.cfg.vocab_size, B, T)
    loss = cross_entropy(model(tokens), labels)
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


# --------------------------------------------------------------------------------------------- worker side
def run_tp(variant: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from parallel.tensor import apply_tp, tp_loss

    model = build(variant)
    apply_tp(model, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)))
    tokens, labels = fixed_batch(model.cfg.vocab_size, B, T)
    loss = tp_loss(model(tokens), labels)
    loss.backward()
    heads = model.layers["0"].self_attn.k_proj.weight.to_local().shape[0]
    return {"loss": loss.item(), "grads": {n: full(p.grad) for n, p in model.named_parameters()}, "k_rows": heads}


def run_cp(variant: str) -> dict:
    """Each rank its half of every sequence; the loss and gradients averaged over the two halves."""
    from torch.distributed.device_mesh import init_device_mesh
    from parallel.context import apply_cp

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("cp",))
    model = build(variant)
    apply_cp(model, mesh)
    tokens, labels = fixed_batch(model.cfg.vocab_size, B, T)
    part = slice(mesh.get_local_rank() * T // WORLD, (mesh.get_local_rank() + 1) * T // WORLD)
    loss = cross_entropy(model(tokens[:, part]), labels[:, part])
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[n] = p.grad / WORLD
    dist.all_reduce(loss := loss.detach())
    return {"loss": loss.item() / WORLD, "grads": grads}


def run_pp(variant: str) -> dict:
    from parallel.pipeline import build_pipeline

    model = build(variant)
    tokens, labels = fixed_batch(model.cfg.vocab_size, B, T)
    pipeline = build_pipeline(model, None, "1F1B", 2, 1, cross_entropy, torch.device("cpu"),
                              microbatch_size=B // 2, seq_len=T)
    loss = pipeline.step(tokens, labels)
    return {"loss": None if loss is None else loss.item(),
            "grads": {n: p.grad.clone() for part in pipeline.parts for n, p in part.named_parameters()}}


def rank_results(rank: int, world: int) -> dict[str, dict]:
    """Every case in this rank's gloo group; a failing case's result is its traceback (its test reports it) and
    the other cases still run."""
    torch.set_num_threads(1)
    results = {}
    for name in CASES:
        layout, variant = name.split("_")
        try:
            results[name] = {"tp2": run_tp, "cp2": run_cp, "pp2": run_pp}[layout](variant)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    return results


# --------------------------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    ranks = run_ranks(rank_results, WORLD, tmp_path_factory.mktemp("attn_layouts"))
    return {name: [r[name] for r in ranks] for name in CASES}


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {variant: reference(variant) for variant in VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_layout_equals_one_process(name, results, references):
    layout, variant = name.split("_")
    ranks = results[name]
    errors = [r["error"] for r in ranks if "error" in r]
    assert not errors, errors[0]
    ref = references[variant]
    losses = [r["loss"] for r in ranks if r["loss"] is not None]
    assert losses and all(loss == pytest.approx(ref["loss"], rel=1e-5) for loss in losses)
    held = set()
    for r in ranks:
        for n, g in r["grads"].items():
            close(g, ref["grads"][n], f"{name} {n}")
        held |= set(r["grads"])
    assert held == set(ref["grads"])  # every parameter checked (pp: between the two stages)
    assert any("k_proj" in n for n in held)
    if layout == "tp2":  # each rank holds half the K/V heads (tiny: width 16 per head)
        assert ranks[0]["k_rows"] == {"mha": 2, "gqa": 1}[variant] * 16


def test_heads_that_do_not_divide_are_one_line_errors():
    from parallel.context import check_cp
    from parallel.tensor import check_tp

    mqa = tiny(attention="mqa")
    with pytest.raises(ValueError, match=r"tp=2 must divide model.num_key_value_heads=1"):
        check_tp(mqa, 2)
    with pytest.raises(ValueError, match=r"model.attention=gqa has 2 K/V heads, not divisible by cp=4"):
        check_cp(tiny(attention="gqa", num_key_value_heads=2), 4)
    check_tp(tiny(attention="gqa", num_key_value_heads=2), 2)  # divides: no error

