"""Gradient accumulation under HSDP (4 gloo processes: dp_replicate=2 x dp_shard=2, experts split ep=2): the
all-reduce across replicas runs once per optimizer step, after the last micro-batch, and the gradients equal
those of all-reducing after every micro-batch (which tests/test_parallel_layouts.py ties to one process)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model import Transformer, load_preset
from parallel import ParallelDims, parallelize, replica_all_reduce

WORLD, MICRO = 4, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(rank: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    return [torch.randint(0, vocab, (2, 17), generator=gen) for _ in range(MICRO)]


def grads_after_accumulation(deferred: bool, rank: int) -> tuple[dict[str, torch.Tensor], int]:
    """Full gradients after MICRO micro-batches, and the number of all-reduces FSDP issued."""
    cfg = load_preset("tiny").replace(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    dims = ParallelDims.resolve(WORLD, dp_replicate=2, dp_shard=2, ep=2)
    model = parallelize(model, dims.build_mesh("cpu"), dims)
    calls = [0]
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        for i, tokens in enumerate(batches(rank, cfg.vocab_size)):
            replica_all_reduce([model], dims, enabled=not deferred or i == MICRO - 1)
            logits = model(tokens[:, :-1])
            (F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) / MICRO).backward()
    finally:
        dist.all_reduce = real
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}, calls[0]


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        deferred, n_deferred = grads_after_accumulation(True, rank)
        every, n_every = grads_after_accumulation(False, rank)
        torch.save({"deferred": deferred, "every": every, "calls": (n_deferred, n_every)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_hsdp_all_reduces_once_per_step_with_the_same_gradients(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    cfg = load_preset("tiny")
    # FSDP units: every block, every MoE layer's experts and the root; one all-reduce each per sync
    n_groups = cfg.num_hidden_layers + sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) + 1
    for r in results:
        n_deferred, n_every = r["calls"]
        assert n_every == MICRO * n_groups and n_deferred == n_groups, r["calls"]
        for name, g in r["every"].items():
            torch.testing.assert_close(r["deferred"][name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # replicas (ranks 0 and 2, 1 and 3) end with identical gradients
    for a, b in ((0, 2), (1, 3)):
        for name, g in results[a]["deferred"].items():
            torch.testing.assert_close(results[b]["deferred"][name], g, rtol=0, atol=0)
