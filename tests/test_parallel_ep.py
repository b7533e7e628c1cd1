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

    from parallel.expert import ExpertDispatch, apply_ep, reduce_loads_over

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    moe = skewed_moe()
    dispatchers = apply_ep(moe, mesh, ExpertDispatch(overlap, chunks))
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


def backward_events(rank: int, world: int) -> list[str]:
    """What one overlapped MoE layer (2 chunks) does in backward, in order: each gradient exchange it starts, each
    chunk's expert GEMMs' backward and the shared experts' backward (tensor hooks on their outputs, which fire as
    the op that made the output runs its backward)."""
    from torch.distributed.device_mesh import init_device_mesh

    import parallel.expert as expert

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe = routed_moe("spread")
    expert.apply_ep(moe, mesh, expert.ExpertDispatch(True, 2))
    events, start = [], expert.funcol.all_to_all_single

    def logged(*args, **kwargs):
        events.append("exchange")
        return start(*args, **kwargs)
    expert.funcol.all_to_all_single = logged
    def when_its_backward_runs(name: str):
        def hook(module, inputs, out) -> None:
            out.register_hook(lambda grad: events.append(name))
        return hook
    moe.experts.register_forward_hook(when_its_backward_runs("gemm"))
    moe.shared_experts.register_forward_hook(when_its_backward_runs("shared"))
    out = moe(ep4_tokens(rank, moe.cfg.hidden_size).requires_grad_())
    events.clear()
    weigh(out, world).backward()
    return events


def test_overlapped_backward_starts_every_gradient_exchange_before_the_compute_that_hides_it(tmp_path):
    """Autograd's engine runs the ready node created last in forward first. The combine's gradient exchanges of both
    chunks start before either chunk's expert GEMMs run their backward (chunk 1's travels while chunk 2's GEMMs
    run); chunk 2's dispatch gradient starts before chunk 1's GEMMs' backward, which hides it, and chunk 1's before
    the shared experts' backward. With a node per exchange created where it starts, as torch's own autograd
    all-to-all makes, each exchange's consumer would run right after it and wait at once."""
    for events in run_ranks(backward_events, 2, tmp_path):
        assert events == ["exchange", "exchange", "gemm", "exchange", "gemm", "exchange", "shared"], events


# ------------------------------------------------------------------------------ hierarchical (node-aware) dispatch
HOSTS, PER_HOST = 2, 2  # an ep=4 group on 2 hosts of 2 ranks
ROUTINGS = {  # 8 experts, 2 per rank, 4 per host
    # 4 groups (2 per host), the best 2 groups, 3 experts: a token's experts on 1 or 2 hosts
    "spread": lambda cfg: dataclasses.replace(cfg, n_group=4, topk_group=2, num_experts_per_tok=3),
    # every token to experts 0 and 1: host 1 and rank 1 receive nothing
    "skewed": lambda cfg: dataclasses.replace(cfg, topk_method="greedy", n_group=1, topk_group=1),
    # spread, and each rank's device (its 2 experts) takes at most half its share of its own tokens' assignments;
    # no balance losses: they would tie the ranks' gradients together, which the per-rank reference cannot
    "dropping": lambda cfg: dataclasses.replace(cfg, n_group=4, topk_group=2, num_experts_per_tok=3,
                                                capacity_factor=0.5, no_drop_fraction=0.0, aux_loss_alpha=0.0,
                                                device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0),
}


def routed_moe(routing: str) -> MoE:
    cfg = ROUTINGS[routing](dataclasses.replace(load_preset("tiny"), initializer_range=0.5))
    torch.manual_seed(3)
    moe = MoE(cfg)
    if routing == "skewed":
        with torch.no_grad():
            moe.gate.weight.fill_(-0.1)
            moe.gate.weight[:2] = 0.1
    return moe


def ep4_tokens(rank: int, d: int) -> torch.Tensor:
    return torch.randn(1, 7, d, generator=torch.Generator().manual_seed(7 + rank)).abs()


def weigh(out: torch.Tensor, world: int) -> torch.Tensor:
    """The loss: an uneven weighting of the output, each rank's share of the mean over all ranks."""
    return (out * torch.linspace(-1, 1, out.shape[-1])).mean() / world


def ep4_results(rank: int, world: int, hows: list, routing: str) -> list[dict]:
    """`ep4_result` for each dispatch of `hows`, in one set of processes (they start once)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    return [ep4_result(rank, world, mesh, how, routing) for how in hows]


def ep4_result(rank: int, world: int, mesh, how, routing: str) -> dict:
    from parallel.expert import apply_ep, reduce_loads_over

    moe = routed_moe(routing)
    [dispatcher, *_] = apply_ep(moe, mesh, how)
    moe.reduce_counts = reduce_loads_over(None)
    moe.aux_loss_scale = 1.0 / world
    x = ep4_tokens(rank, moe.cfg.hidden_size).requires_grad_()
    out = moe(x)
    weigh(out, world).backward()
    grads = {}
    for name, p in moe.named_parameters():
        grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if not hasattr(p.grad, "full_tensor"):
            dist.all_reduce(grads[name])
    return {"out": out.detach(), "x_grad": x.grad, "host_rows": dispatcher.host_rows, **grads}


def expected_host_rows(moe: MoE, x: torch.Tensor, hierarchical: bool) -> list[int]:
    """Rows of D each rank sends to other hosts, dispatch and combine, from the routing alone (x: every rank's
    tokens). Flat: one per (token, expert) whose expert lives on another host, and one back from the expert's rank.
    Hierarchical: one per (token, other host holding any of its experts), and one back from the rank of that host
    with the sender's place."""
    world = x.shape[0]
    with torch.no_grad():
        owner = moe.gate(x.flatten(0, 1)).indices.view(world, -1, moe.cfg.num_experts_per_tok) // (
            moe.cfg.n_routed_experts // world)
    host = [r // PER_HOST for r in range(world)]
    sent = [0] * world
    for r in range(world):
        for token in owner[r].tolist():
            for o in token if not hierarchical else []:
                sent[r] += host[o] != host[r]
                sent[o] += host[o] != host[r]
            for h in {host[o] for o in token} - {host[r]} if hierarchical else []:
                sent[r] += 1
                sent[h * PER_HOST + r % PER_HOST] += 1
    return sent


@pytest.mark.parametrize("routing", ["spread", "skewed"])
@pytest.mark.parametrize("overlap,chunks", [(False, 1), (True, 2)], ids=["blocking", "chunks2"])
def test_hierarchical_dispatch_equals_one_process_and_counts_the_rows_between_hosts(tmp_path, overlap, chunks,
                                                                                     routing):
    from parallel.expert import ExpertDispatch

    world = HOSTS * PER_HOST
    moe = routed_moe(routing)
    x = torch.cat([ep4_tokens(r, moe.cfg.hidden_size) for r in range(world)]).requires_grad_()
    out = moe(x)
    weigh(out, 1).backward()
    hows = [ExpertDispatch(overlap, chunks, hierarchical, ranks_per_host=PER_HOST) for hierarchical in (False, True)]
    by_rank = run_ranks(ep4_results, world, tmp_path, hows, routing)
    got = {hierarchical: [results[i] for results in by_rank] for i, hierarchical in enumerate((False, True))}
    for hierarchical in (False, True):
        assert [r["host_rows"] for r in got[hierarchical]] == expected_host_rows(moe, x, hierarchical)
    rows = [sum(r["host_rows"] for r in got[h]) for h in (False, True)]
    assert rows[1] < rows[0]  # a token's experts on one host share one crossing
    # An output element sums K routed terms and the shared one, in another order (hierarchical: each host's terms
    # first) and from GEMMs over other row counts: within 2 (K + 1) rounding units (fp32, u = 2^-24) of the largest
    # output (115 here, from the large init that spreads the routing; the differences seen are 0.3-0.6 units).
    atol = 2 * (moe.cfg.num_experts_per_tok + 1) * 2.0 ** -24 * float(out.abs().max())
    for r in range(world):
        for result in got.values():
            torch.testing.assert_close(result[r]["out"], out[r:r + 1].detach(), rtol=0, atol=atol)
            torch.testing.assert_close(result[r]["x_grad"], x.grad[r:r + 1], rtol=1e-5, atol=1e-8)
            for name, p in moe.named_parameters():
                torch.testing.assert_close(result[r][name], p.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_capacity_dropping_under_expert_parallelism_equals_each_rank_alone(tmp_path):
    """Dropping (DeepSeek-V2's device-level capacity) decides over a rank's own tokens, so the one-process reference
    runs each rank's tokens through the layer alone and sums the ranks' weight gradients."""
    from parallel.expert import ExpertDispatch

    world = HOSTS * PER_HOST
    moe = routed_moe("dropping")
    outs, xs = [], []
    for r in range(world):
        xs.append(ep4_tokens(r, moe.cfg.hidden_size).requires_grad_())
        outs.append(moe(xs[-1]))
        weigh(outs[-1], world).backward()
    # the case is what it claims: of a rank's 7 x 3 assignments its 4 devices keep at most ceil(0.5 x 21 / 4) = 3 each
    assert moe.dropped.tolist() == [moe.dropped[0], world * 21] and moe.dropped[0] >= world * (21 - 4 * 3)
    atol = 2 * (moe.cfg.num_experts_per_tok + 1) * 2.0 ** -24 * max(float(o.detach().abs().max()) for o in outs)
    hows = {"flat": ExpertDispatch(), "flat_chunks2": ExpertDispatch(True, 2),
            "hierarchical_chunks2": ExpertDispatch(True, 2, True, ranks_per_host=PER_HOST)}
    by_rank = run_ranks(ep4_results, world, tmp_path, list(hows.values()), "dropping")
    for i, label in enumerate(hows):
        got = [results[i] for results in by_rank]
        for r in range(world):
            torch.testing.assert_close(got[r]["out"], outs[r].detach(), rtol=0, atol=atol, msg=label)
            torch.testing.assert_close(got[r]["x_grad"], xs[r].grad, rtol=1e-5, atol=1e-8, msg=label)
            for name, p in moe.named_parameters():
                torch.testing.assert_close(got[r][name], p.grad, rtol=1e-5, atol=1e-8, msg=f"{label} {name}")


def test_block_transpose_order_equals_a_stable_sort_by_expert():
    """The counting pass that reorders received rows from (source rank, expert) blocks to expert-major equals the
    stable argsort by expert it replaces, with empty blocks, one source and one expert."""
    from parallel.expert import block_transpose_order
    g = torch.Generator().manual_seed(3)
    for sources, experts in [(3, 5), (4, 2), (1, 7), (5, 1)]:
        counts = torch.randint(0, 4, (sources, experts), generator=g)
        counts[0, experts // 2] = 0
        by_sort = torch.repeat_interleave(torch.arange(experts).repeat(sources), counts.flatten()).argsort(stable=True)
        assert block_transpose_order(counts, int(counts.sum())).tolist() == by_sort.tolist()
    # 2 sources x 3 experts, blocks stored (0,0)(0,1)(0,2)(1,0)(1,1)(1,2) with 1,2,0,1,0,3 rows
    hand = block_transpose_order(torch.tensor([[1, 2, 0], [1, 0, 3]]), 7).tolist()
    assert hand == [0, 3, 1, 2, 4, 5, 6]
