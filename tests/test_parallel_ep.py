"""Expert-parallel dispatch on its own (2 gloo processes): skewed routing where most experts and a whole
rank get zero tokens must neither hang nor produce NaN, and outputs and gradients must equal one process, with
blocking all-to-alls and with asynchronous ones over token chunks (parallel.ep_overlap)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from conftest import run_ranks
from model.config import load_preset
from model.moe import MoE

WORLD, T = 2, 8


def skewed_moe(seed: int = 0) -> MoE:
    """A MoE whose router sends every (positive) token to experts 0 and 1 (rank 0's), never to 2..7."""
    cfg = dataclasses.replace(load_preset("tiny"), topk_method="greedy", n_group=1, topk_group=1)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.fill_(-0.1)
        moe.gate.weight[:2] = 0.1
    return moe


def tokens(rank: int, d: int) -> torch.Tensor:
    return torch.randn(1, T, d, generator=torch.Generator().manual_seed(100 + rank)).abs()


def run_single() -> dict:
    moe = skewed_moe()
    x = torch.cat([tokens(r, moe.cfg.hidden_size) for r in range(WORLD)]).requires_grad_()
    out = moe(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).mean().backward()
    return {"out": out.detach(), "x_grad": x.grad, "k": moe.cfg.num_experts_per_tok,
            **{n: p.grad for n, p in moe.named_parameters()}}


def rank_result(rank: int, world: int, overlap: bool = False, chunks: int = 1) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.expert import apply_ep, reduce_loads_over

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    moe = skewed_moe()
    dispatchers = apply_ep(moe, mesh, overlap, chunks)
    moe.reduce_counts = reduce_loads_over(None)
    moe.aux_loss_scale = 1.0 / WORLD  # each rank's loss is its share of the global mean
    x = tokens(rank, moe.cfg.hidden_size).requires_grad_()
    out = moe(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).mean().div(WORLD).backward()
    grads = {}
    for name, p in moe.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # expert stacks: each rank holds its experts' complete gradient
            g = g.full_tensor()
        else:  # replicated weights: the global gradient is the sum of the ranks' parts
            dist.all_reduce(g)
        grads[name] = g
    return {"out": out.detach(), "x_grad": x.grad, "sent": dispatchers[0].sent_rows, **grads}


@pytest.mark.parametrize("overlap,chunks", [(False, 1), (True, 1), (True, 3)], ids=["blocking", "async", "chunks3"])
def test_zero_token_experts_and_ranks_match_one_process(tmp_path, overlap, chunks):
    single = run_single()
    ranks = run_ranks(rank_result, WORLD, tmp_path, overlap, chunks)
    # rank 1's tokens all go to rank 0's experts (8 tokens x top-k), rank 0's stay home; in 3 uneven chunks too
    assert [got["sent"] for got in ranks] == [0, T * single["k"]]
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["out"], single["out"][r:r + 1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["x_grad"], single["x_grad"][r:r + 1], rtol=1e-5, atol=1e-9)
        for name in single:
            if name not in ("out", "x_grad", "k"):
                torch.testing.assert_close(got[name], single[name], rtol=1e-5, atol=1e-9, msg=name)
                assert torch.isfinite(got[name]).all()
    # the case is what it claims: experts 2..7 and rank 1's experts received nothing
    assert single["experts.gate_up_proj"][2:].abs().sum() == 0
    assert single["experts.gate_up_proj"][:2].abs().sum() > 0
