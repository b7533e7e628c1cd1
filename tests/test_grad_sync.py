"""Gradient accumulation under HSDP (4 gloo processes: dp_replicate=2 x dp_shard=2, experts split ep=2), three
ways, with the same gradients (the first is what tests/test_parallel_layouts.py ties to one process):
  every      reduce-scatter and all-reduce after every micro-batch
  default    reduce-scatter after every micro-batch, all-reduce across replicas once, after the last
  unsharded  parallel.accumulate_unsharded: blocks stay gathered, gradients unsharded; one all-gather,
             one reduce-scatter and one all-reduce per FSDP unit and step."""


import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import Transformer, load_preset
from parallel import ParallelDims, end_of_step, micro_batch_sync, parallelize
from conftest import run_ranks

WORLD, MICRO = 4, 3
COLLECTIVES = ("all_reduce", "all_gather_single", "reduce_scatter_single")
MODES = {"every": dict(defer=False, keep_unsharded=False), "default": dict(defer=True, keep_unsharded=False),
         "unsharded": dict(defer=True, keep_unsharded=True)}


def batches(rank: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    return [torch.randint(0, vocab, (2, 17), generator=gen) for _ in range(MICRO)]


def accumulate(mode: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Full gradients after MICRO micro-batches, and how often FSDP called each collective."""
    cfg = load_preset("tiny").replace(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    torch.manual_seed(0)
    dims = ParallelDims.resolve(WORLD, dp_replicate=2, dp_shard=2, ep=2)
    model = parallelize(Transformer(cfg), dims.build_mesh("cpu"), dims)
    calls = dict.fromkeys(COLLECTIVES, 0)
    real = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        defer, keep = MODES[mode]["defer"], MODES[mode]["keep_unsharded"]
        for i, tokens in enumerate(batches(rank, cfg.vocab_size)):
            micro_batch_sync([model], dims, first=i == 0, last=not defer or i == MICRO - 1, keep_unsharded=keep)
            logits = model(tokens[:, :-1])
            (F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) / MICRO).backward()
        end_of_step([model], keep)
    finally:
        for name in COLLECTIVES:
            setattr(dist, name, real[name])
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}, calls


def rank_result(rank: int, world: int) -> dict:
    return {mode: accumulate(mode, rank) for mode in MODES}


def test_gradient_sync_per_step_not_per_micro_batch(tmp_path):
    results = run_ranks(rank_result, WORLD, tmp_path)
    cfg = load_preset("tiny")
    # FSDP units: every block and the root shard dense weights over dp_shard=2; every MoE layer's experts over
    # efsdp = dp_shard / ep = 1 (nothing to gather or scatter); all of them all-reduce over dp_replicate=2
    dense = cfg.num_hidden_layers + 1
    units = dense + sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    for r in results:
        every, default, unsharded = (r[mode][1] for mode in MODES)
        assert every["all_reduce"] == MICRO * units and every["reduce_scatter_single"] == MICRO * dense, every
        assert default["all_reduce"] == units and default["reduce_scatter_single"] == MICRO * dense, default
        assert unsharded == {"all_reduce": units, "all_gather_single": dense, "reduce_scatter_single": dense}
        assert every["all_gather_single"] > MICRO * dense  # gathered again for every forward and backward
        for mode in ("default", "unsharded"):
            for name, g in r["every"][0].items():
                torch.testing.assert_close(r[mode][0][name], g, rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{mode} {name}: {m}")
    # replicas (ranks 0 and 2, 1 and 3) end with identical gradients
    for a, b in ((0, 2), (1, 3)):
        for mode in MODES:
            for name, g in results[a][mode][0].items():
                torch.testing.assert_close(results[b][mode][0][name], g, rtol=0, atol=0)
