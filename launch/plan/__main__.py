"""`python -m launch.plan [overrides]`: will this layout fit, how fast is it, and which layout is best.

    python -m launch.plan model=deepseek_v2 parallel.pp=16 parallel.ep=8 parallel.pp_schedule=ZBVZeroBubble \
        parallel.pp_stages_per_rank=2 cluster.gpus=2048 cluster.gpu=h800 data.seq_len=4096 \
        train.global_batch_size=9216 train.micro_batch_size=1 precision=bf16

Prints, for the configured layout on `cluster.gpus` GPUs (0: launch.nodes x launch.procs_per_node):
the model's parameter and KV-cache figures; the per-GPU memory of the fullest rank, by component, for each
recomputation mode, and FP8 against BF16; the communication volume per step by collective; the pipeline
bubble; the estimated step time, tokens/s/GPU, MFU and GPU-hours per trillion tokens. Then it ranks
candidate layouts (pp, tp, ep, cp for long sequences, schedule, recomputation) of the same model, batch and GPU
count that fit in memory by estimated tokens/s/GPU (`--top N` first, default 10; `--top 0` skips the search).
A configured layout that cannot run (the batch does not split over its data-parallel ranks, say) is one line on
stderr, and the search still runs (exit 0; exit 2 with `--top 0`).
Every constant is in train/hardware.py or the cluster config; the method is in launch/plan/*.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import typing

from model.analysis import kv_cache_bytes_per_token, kv_cache_elements, kv_cache_elements_per_token, param_counts
from parallel.dims import LayoutError
from train.config import ConfigError, Recompute, compose_config
from train.hardware import GPU, gpu as find_gpu

from .cost import StepCost, step_cost
from .memory import Layout, RankMemory, StageShapes, layout_of, memory_of, meta_model

GIB = 2**30
PAPER_V2_GPU_HOURS_PER_T = 172.8e3  # DeepSeek-V2 report, sec. 3.1: H800 GPU-hours per trillion tokens


@dataclasses.dataclass
class Estimate:
    layout: Layout
    memory: RankMemory  # the fullest rank
    cost: StepCost

    @property
    def gpu_hours_per_trillion(self) -> float:
        return 1e12 / self.cost.tokens_per_s_per_gpu / 3600


def fullest_rank(model, layout: Layout, ranks=None) -> RankMemory:
    """The highest per-rank memory over the pipeline ranks (at data-parallel coordinate 0: FSDP's largest
    shards); `ranks`: pipeline ranks to look at (default all)."""
    d = layout.dims
    per_pp = d.world_size // d.pp
    pp_ranks = range(d.pp) if ranks is None else ranks
    return max((memory_of(model, layout, p * per_pp, "cuda") for p in pp_ranks), key=lambda r: r.total)


def estimate(model, layout: Layout, cfg, gpu: GPU, ranks=None) -> Estimate:
    return Estimate(layout, fullest_rank(model, layout, ranks),
                    step_cost(model, layout, cfg.data.seq_len, cfg.train.global_batch_size, gpu, cfg.cluster))


def fits(e: Estimate, cfg, gpu: GPU) -> bool:
    return e.memory.total / GIB + cfg.cluster.memory_reserve_gib <= gpu.memory_gib


# --------------------------------------------------------------------------------------------- search
CP_MIN_PART = 4096  # the search splits sequences over cp ranks only down to parts of this many tokens


def context_parallel_sizes(cfg) -> list[int]:
    """cp sizes worth searching: 1, and powers of two leaving parts of >= CP_MIN_PART tokens (so pretraining at
    4K searches none; a 128K extension up to 32), plus the configured one."""
    seq = cfg.data.seq_len
    return sorted({1, cfg.parallel.cp} | {2**k for k in range(1, 8) if seq % 2**k == 0 and seq // 2**k >= CP_MIN_PART})


def candidates(cfg, world: int):
    """Every layout of `cfg`'s model, batch and precision on `world` GPUs worth trying: pp over powers of two,
    tp within a node, ep dividing the experts and the data-parallel ranks, cp for long sequences (without tp),
    each schedule, each recomputation, and where an ep group spans nodes each expert dispatch (hierarchical
    where layout_of accepts it)."""
    m, p, per_node = cfg.model, cfg.parallel, cfg.cluster.gpus_per_node
    twos = [2**k for k in range(8)]
    schedules = [("1F1B", 1), ("Interleaved1F1B", 2), ("ZBVZeroBubble", 2), ("DualPipeV", 2)]
    for pp, tp, ep, cp, mode in itertools.product(twos, twos[:4], [1] + twos[1:], context_parallel_sizes(cfg),
                                                  typing.get_args(Recompute)):
        if world % (pp * tp * cp) or tp > per_node or (ep > 1 and m.n_routed_experts % ep) or (cp > 1 and tp > 1):
            continue
        dispatches = ("flat", "hierarchical") if ep > 1 and ep * tp > per_node else ("flat",)
        for (schedule, v), unsharded, dispatch in itertools.product(schedules if pp > 1 else [("1F1B", 1)],
                                                                    (False,) if pp > 1 else (False, True), dispatches):
            par = dataclasses.replace(p, pp=pp, tp=tp, ep=ep, cp=cp, dp_replicate=1, dp_shard=-1,
                                      pp_schedule=schedule, pp_stages_per_rank=v, activation_checkpoint=mode,
                                      pp_microbatches=0, accumulate_unsharded=unsharded, ep_dispatch=dispatch)
            try:
                yield layout_of(dataclasses.replace(cfg, parallel=par), world, ranks_per_host=per_node)
            except (LayoutError, ValueError):
                continue


def search(cfg, world: int, gpu: GPU, model) -> list[Estimate]:
    """Candidate layouts that fit, fastest first."""
    found = []
    for layout in candidates(cfg, world):
        pp = layout.dims.pp
        e = estimate(model, layout, cfg, gpu, ranks=sorted({0, min(1, pp - 1), pp - 1}))
        if fits(e, cfg, gpu):
            found.append(e)
    return sorted(found, key=lambda e: -e.cost.tokens_per_s_per_gpu)


# --------------------------------------------------------------------------------------------- printing
def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def describe(layout: Layout) -> str:
    d = layout.dims
    sched = f" {layout.schedule}" + (f"x{d.pp_stages_per_rank}" if d.pp_stages_per_rank > 1 else "") if d.pp > 1 else ""
    unsharded = " accumulate_unsharded" if layout.accumulate_unsharded and d.pp == 1 else ""
    cp = f" cp={d.cp}" if d.cp > 1 else ""
    dispatch = (" hierarchical" if layout.ep_hierarchical else " flat") if d.ep > 1 else ""
    return (f"pp={d.pp} dp={d.dp_replicate}x{d.dp_shard}{cp} tp={d.tp} ep={d.ep}{dispatch}{sched} "
            f"ac={layout.activation_checkpoint} micro={layout.n_micro}{unsharded}")


def print_model(cfg) -> None:
    m = cfg.model
    pc = param_counts(m)
    mla, mha = kv_cache_elements_per_token(m)
    mla_b, mha_b = kv_cache_bytes_per_token(m)
    print(f"model: {pc.total / 1e9:.2f}B parameters, {pc.active / 1e9:.2f}B activated per token"
          + (f" (+{pc.mtp / 1e9:.2f}B MTP)" if pc.mtp else ""))
    if m.attention != "mla":
        own = kv_cache_elements(m)
        print(f"KV cache per token: {m.attention.upper()} ({m.kv_heads} K/V heads of {m.attn_head_dim}) {own} "
              f"elements/layer ({own * m.num_hidden_layers} in all, {own * m.num_hidden_layers * 2 / 1024:.1f} KiB "
              f"in BF16); MLA of this config's MLA shapes would cache {mla}")
        return
    print(f"KV cache per token: MLA {mla} elements/layer ({mla * m.num_hidden_layers} in all, "
          f"{mla_b / 1024:.1f} KiB in BF16) vs MHA {mha} ({mha_b / 1024:.1f} KiB): {mha / mla:.1f}x smaller")


def print_memory(model, cfg, layout: Layout, gpu: GPU) -> None:
    rows = ["params", "grads", "optimizer", "gathered", "activations", "backward_workspace", "optimizer_workspace"]
    modes = {mode: fullest_rank(model, dataclasses.replace(layout, activation_checkpoint=mode))
             for mode in typing.get_args(Recompute)}
    print(f"\nper-GPU memory of the fullest rank, GiB (recomputation: {' / '.join(modes)}); "
          f"{layout.n_micro} micro-batches of {layout.micro_tokens} tokens per step")
    for row in rows:
        print(f"  {row:22s}" + "".join(_gib(getattr(r, row)) for r in modes.values()))
    print(f"  {'total (peak)':22s}" + "".join(_gib(r.total) for r in modes.values())
          + f"   + {cfg.cluster.memory_reserve_gib} reserve vs {gpu.memory_gib} on {gpu.name}")
    bf16 = dataclasses.replace(layout, param_bytes=2, fp8=None, fp8_all_gather=False)
    fp8 = dataclasses.replace(layout, param_bytes=2, fp8="tensorwise", fp8_all_gather=True)
    print(f"  BF16 vs FP8 (tensorwise, FP8 all-gather of dense weights), this recomputation: "
          f"{fullest_rank(model, bf16).total / GIB:.2f} vs {fullest_rank(model, fp8).total / GIB:.2f} GiB")


def print_cost(e: Estimate, gpu: GPU, cfg) -> None:
    c = e.cost
    print(f"\ncommunication per GPU per step ({gpu.name}: NVLink {gpu.nvlink_one_way_gbps:.0f} GB/s one way, "
          f"IB {gpu.ib_gbps:.0f} GB/s; at {cfg.cluster.link_efficiency:.0%})")
    for coll in c.comms:
        print(f"  {coll.name:42s} {coll.bytes_per_step / 1e9:9.2f} GB over {coll.link:6s} {coll.seconds:8.3f} s"
              f"  exposed {coll.exposed:7.3f} s")
    print(f"compute {c.compute_s:.3f} s per step at {cfg.cluster.gemm_efficiency:.0%} of peak; "
          f"pipeline bubble {c.bubble_fraction:.1%} ({e.layout.schedule})")
    print(f"estimate: step {c.step_s:.2f} s, {c.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {c.mfu:.1%}, "
          f"{e.gpu_hours_per_trillion / 1e3:.1f}K GPU-hours per trillion tokens")


def main(argv: list[str]) -> int:
    top = 10
    if argv and argv[0].startswith("--top"):
        top = int(argv[0].split("=", 1)[1]) if "=" in argv[0] else int(argv[1])
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    try:
        cfg = compose_config(argv)
        gpu = find_gpu(cfg.cluster.gpu)
        world = cfg.cluster.gpus or cfg.launch.max_nodes * cfg.launch.procs_per_node
        model = StageShapes(meta_model(cfg.model))
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        layout = layout_of(cfg, world, ranks_per_host=cfg.cluster.gpus_per_node)
    except (ConfigError, ValueError) as e:  # the search may still find layouts for this model, batch and cluster
        print(f"config error: the configured layout on {world} GPUs: {e}", file=sys.stderr)
        if not top:
            return 2
        print(f"plan: {world} x {gpu.name}, the configured layout is impossible (stderr); searching")
        print_search(cfg, world, gpu, model, top)
        return 0
    print_plan(cfg, world, gpu, model, layout)
    if top:
        print_search(cfg, world, gpu, model, top)
    return 0


def print_plan(cfg, world: int, gpu: GPU, model, layout: Layout) -> None:
    print(f"plan: {world} x {gpu.name}, {describe(layout)}, precision={cfg.precision.name}, "
          f"seq_len={cfg.data.seq_len}, global batch {cfg.train.global_batch_size} sequences")
    print_model(cfg)
    print_memory(model, cfg, layout, gpu)
    e = estimate(model, layout, cfg, gpu)
    print_cost(e, gpu, cfg)
    other = dataclasses.replace(layout, fp8=None if layout.fp8 else "blockwise", fp8_all_gather=False)
    oc = step_cost(model, other, cfg.data.seq_len, cfg.train.global_batch_size, gpu, cfg.cluster)
    print(f"the same layout {'in BF16' if layout.fp8 else 'with FP8 GEMMs'}: {oc.tokens_per_s_per_gpu:,.0f} "
          f"tokens/s/GPU, MFU {oc.mfu:.1%} (of the BF16 peak)")
    print("fits" if fits(e, cfg, gpu) else "DOES NOT FIT", f"({e.memory.total / GIB:.1f} GiB + reserve on "
          f"{gpu.memory_gib} GiB)")
    if cfg.model.n_routed_experts == 160 and cfg.model.hidden_size == 5120:
        print(f"DeepSeek-V2 report: {PAPER_V2_GPU_HOURS_PER_T / 1e3:.1f}K GPU-hours per trillion tokens on H800; "
              f"estimate / paper = {e.gpu_hours_per_trillion / PAPER_V2_GPU_HOURS_PER_T:.2f}")


def print_search(cfg, world: int, gpu: GPU, model, top: int) -> None:
    ranked = search(cfg, world, gpu, model)
    print(f"\nfastest layouts that fit ({len(ranked)} of the candidates), by estimated tokens/s/GPU:")
    for r in ranked[:top]:
        print(f"  {r.cost.tokens_per_s_per_gpu:9,.0f} tok/s/GPU  MFU {r.cost.mfu:5.1%}  "
              f"{r.memory.total / GIB:6.1f} GiB  {describe(r.layout)}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
