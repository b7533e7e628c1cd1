"""Parallel overhead on CPU: tokens/s, the share of step time spent in communication, and the expert
all-to-all volume against the analytic formula, for 1, 2 and 4 processes (gloo) on one preset.

Layouts: 1 process; 2 processes with ep=2 (dp_shard=2); 4 processes with ep=4 (dp_shard=4). The global
batch is the same in all (weak scaling per process is not the point: the same job, more processes).
Each worker runs the real `Trainer` step. Communication time is the wall time spent inside
torch.distributed collectives (all-to-all, all-reduce, FSDP all-gather / reduce-scatter); gloo runs them
synchronously, so this includes waiting for the slowest rank.

All-to-all volume: the dispatch sends each routed (token, expert) assignment whose expert lives on another
rank; the combine sends the result back; backward repeats both with gradients. Per rank and step:
    measured  = 4 * rows_sent * hidden * 4 bytes (fp32)
    analytic  = 4 * n_moe_layers * tokens_per_rank * top_k * (ep - 1) / ep * hidden * 4 bytes
(the analytic number assumes uniform routing; group-limited routing and imbalance move the ratio off 1).

    python bench/parallel_overhead.py [--preset small] [--seq-len 128] [--global-batch 8] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from machine import describe  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather_single", "reduce_scatter_single",
               "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")


def time_collectives(clock: dict) -> None:
    """Wrap torch.distributed's collectives so the time spent inside them adds up in clock['comm']."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None:
            continue

        def timed(*args, _original=original, **kwargs):
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                clock["comm"] += time.perf_counter() - t
        setattr(c10d, name, timed)
        setattr(dist, name, timed)


def worker(args) -> None:
    """One rank: build the trainer for the layout, time `steps` steps after one warm-up step."""
    sys.path.insert(0, str(ROOT))
    from train.config import compose_config
    import torch.distributed as dist

    from train.runtime import build_runtime
    from train.step import Step

    clock = {"comm": 0.0}
    time_collectives(clock)
    cfg = compose_config([f"model={args.preset}", f"data.seq_len={args.seq_len}", f"parallel.ep={args.ep}",
                          f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
                          f"output_dir={args.out}", "checkpoint.load=false", "train.val_every=0",
                          f"train.steps={args.steps + 1}"])
    rt = build_runtime(cfg)
    step = Step(rt)
    step(step.sequence_part(rt.loader.next_batch()), 0)  # warm-up
    sent = _sent_rows(rt)
    clock["comm"], t0 = 0.0, time.perf_counter()
    for i in range(args.steps):
        step(step.sequence_part(rt.loader.next_batch()), i + 1)
    wall = time.perf_counter() - t0
    rows = (_sent_rows(rt) - sent) / args.steps
    if rt.env.rank == 0:
        mcfg = cfg.model
        tokens_per_rank = args.global_batch // rt.dims.dp * args.seq_len
        n_moe = len(rt.moe_layers())
        routed = tokens_per_rank * mcfg.num_experts_per_tok * (args.ep - 1) / args.ep
        analytic = 4 * n_moe * routed * mcfg.hidden_size * 4
        result = {"procs": rt.env.world, "ep": args.ep,
                  "tokens_per_sec": args.global_batch * args.seq_len * args.steps / wall,
                  "step_s": wall / args.steps, "comm_fraction": clock["comm"] / wall,
                  "a2a_bytes_measured": 4 * rows * mcfg.hidden_size * 4, "a2a_bytes_analytic": analytic}
        Path(args.result).write_text(json.dumps(result))
    dist.destroy_process_group()


def _sent_rows(rt) -> int:
    """Rows this rank's expert dispatch sent to other ranks so far (0 without expert parallelism)."""
    total = 0
    for moe in rt.moe_layers().values():
        total += getattr(moe.dispatcher, "sent_rows", 0)  # the local dispatcher sends nothing
    return total


def launch(args, procs: int, ep: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        common = [__file__, "--worker", "--preset", args.preset, "--seq-len", str(args.seq_len),
                  "--global-batch", str(args.global_batch), "--micro-batch", str(args.global_batch // procs),
                  "--steps", str(args.steps), "--ep", str(ep), "--out", str(Path(tmp) / "run"),
                  "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // procs))}
        if procs == 1:
            cmd = [sys.executable, *common]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *common]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    p.add_argument("--result")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    print(describe(), flush=True)
    rows = [launch(args, procs, ep) for procs, ep in ((1, 1), (2, 2), (4, 4))]
    base = rows[0]["tokens_per_sec"]
    print(f"preset={args.preset} seq_len={args.seq_len} global_batch={args.global_batch} cpus={os.cpu_count()}")
    for r in rows:
        ratio = r["a2a_bytes_measured"] / r["a2a_bytes_analytic"] if r["a2a_bytes_analytic"] else float("nan")
        print(f"procs={r['procs']} ep={r['ep']} tokens_per_sec={r['tokens_per_sec']:.0f} "
              f"speedup_vs_1={r['tokens_per_sec'] / base:.2f} step_s={r['step_s']:.2f} "
              f"comm_fraction={r['comm_fraction']:.2f} a2a_MB_per_step={r['a2a_bytes_measured'] / 1e6:.2f} "
              f"a2a_measured_vs_analytic={ratio:.2f}")


if __name__ == "__main__":
    main()
