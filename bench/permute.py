"""The MoE layer's token permutation: a stable sort by expert against a counting pass, on the same routing.

Two places order (token, expert) rows by expert:

    chunk    `Chunk.of` (model/moe.py): a chunk's n x K assignments by global expert id. The sort it runs,
             `argsort(stable=True)` of n K ids, is timed against a counting pass: an assignment's place is the
             count of assignments to lower experts plus the count of earlier tokens that chose its expert, read
             from a running sum over an (experts, tokens) table.
    received `AllToAllDispatcher.compute` (parallel/expert.py): the rows a rank received, stored in (source rank,
             local expert) blocks, to local-expert-major order. `block_transpose_order` (a counting pass over the
             block sizes alone) is timed against the stable sort by expert it replaced.

Both produce the same order (checked on every shape). One line per shape: the two times and sort / counting (> 1:
the counting pass is faster). Shapes: n tokens, E experts, K per token for `chunk`; S source ranks, E local
experts and the rows received for `received`; the default list runs from `tiny`/`small` to DeepSeek-V2 and V3
micro-batches.

    python bench/permute.py                 # one thread, the CPU
    python bench/permute.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parallel.expert import block_transpose_order  # noqa: E402
from machine import describe  # noqa: E402  (bench/, beside this file)

CHUNKS = [(256, 8, 2), (1024, 16, 4), (2048, 64, 6), (4096, 160, 6), (4096, 256, 8), (16384, 256, 8)]
RECEIVED = [(2, 8, 4096), (4, 4, 4096), (8, 20, 24576), (8, 32, 32768), (64, 4, 65536)]


def chunk_by_sort(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    return indices.flatten().argsort(stable=True)


def chunk_by_counting(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The same order as `chunk_by_sort` from counts: lower experts' assignments plus earlier tokens' choices."""
    n, k = indices.shape
    dev = indices.device
    token = torch.arange(n, device=dev).unsqueeze(1).expand(n, k)
    chose = torch.zeros(n_experts, n, dtype=torch.int32, device=dev)
    chose.index_put_((indices, token), torch.ones(1, dtype=torch.int32, device=dev))
    seen = chose.cumsum(1, dtype=torch.int32)  # tokens up to each one that chose each expert
    counts = seen[:, -1].long()
    place = (counts.cumsum(0) - counts)[indices] + seen[indices, token] - 1
    order = torch.empty(n * k, dtype=torch.int64, device=dev)
    return order.scatter_(0, place.flatten(), torch.arange(n * k, device=dev))


def received_by_sort(counts: torch.Tensor, total: int) -> torch.Tensor:
    sources, experts = counts.shape
    expert = torch.arange(experts, device=counts.device).repeat(sources)
    return torch.repeat_interleave(expert, counts.flatten(), output_size=total).argsort(stable=True)


def best_of(fn, device: torch.device, repeat: int = 5, inner: int = 10) -> float:
    """Fastest mean microseconds of `inner` calls, over `repeat` rounds after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner * 1e6)
    return best


def compare(name: str, shape: tuple, sort, counting, args: tuple, device: torch.device) -> float:
    assert torch.equal(sort(*args), counting(*args)), f"{name} {shape}: the two orders differ"
    t_sort, t_count = best_of(lambda: sort(*args), device), best_of(lambda: counting(*args), device)
    print(f"{name:9s} {str(shape):22s} sort {t_sort:9.1f} us   counting {t_count:9.1f} us   "
          f"sort/counting {t_sort / t_count:5.2f}")
    return t_sort / t_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    print(describe())
    for n, e, k in CHUNKS:  # K distinct experts per token, as top-k picks them
        indices = torch.rand(n, e, generator=g).argsort(1)[:, :k].to(device)
        compare("chunk", (n, e, k), chunk_by_sort, chunk_by_counting, (indices, e), device)
    for s, e, rows in RECEIVED:
        counts = torch.multinomial(torch.ones(s * e), rows, True, generator=g).bincount(minlength=s * e)
        compare("received", (s, e, rows), received_by_sort, block_transpose_order,
                (counts.view(s, e).to(device), rows), device)


if __name__ == "__main__":
    main()
