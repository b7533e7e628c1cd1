"""Expert-parallel step time over a real link, with the expert all-to-alls blocking and overlapped
(`parallel.ep_overlap`): 2 hosts x 1 rank (launch/localcluster.py: network namespaces on a bridge, tbf on both ends
of each host's cable), experts split across the hosts (`parallel.ep=2`), each host's rank started by
`python -m launch launch=torchrun` inside it. Needs root (network namespaces).

    python bench/ep_overlap.py [--rates unlimited,800mbit] [--steps 6] [--skip 2]

Per link rate and mode: the median step time of the steps after `--skip` (metrics.jsonl's step_time, rank 0), and
the rows the dispatch sent to the other host. Both modes move the same bytes (FSDP's gathers and reduce-scatters,
the all-to-alls), so the step-time difference between them is the all-to-all time the overlap hides; the
all-to-all's own time on the link is its bytes over the link rate measured by bench/link_collectives.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import describe  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.localcluster import LocalCluster, namespaces_problem  # noqa: E402

# the setting: small with 4 layers and top-8 routing, 8 sequences of 512 tokens a step
RUN = ["model=small", "model.num_hidden_layers=4", "model.num_experts_per_tok=8", "data.seq_len=512",
       "train.global_batch_size=8", "train.micro_batch_size=4", "parallel.ep=2", "train.val_every=0",
       "checkpoint.every=0", "log.every=1", "train.peak_tflops=1.0"]


def run_once(cluster: LocalCluster, out: Path, steps: int, overlap: bool, port: int) -> list[float]:
    """Step times (s) of one 2-host run."""
    args = [*RUN, f"train.steps={steps}", f"parallel.ep_overlap={str(overlap).lower()}", f"output_dir={out}",
            "checkpoint.load=false", "launch=torchrun", "launch.nodes=2", "launch.procs_per_node=1",
            f"launch.master_addr={cluster.hosts[0].name}", f"launch.master_port={port}",
            "++launch.env.GLOO_SOCKET_IFNAME=eth0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [cluster.popen(h.index, [sys.executable, "-m", "launch", *args], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in cluster.hosts]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"a host's run failed: {err[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows if "step_time" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="unlimited,800mbit")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the median (start-up)")
    args = ap.parse_args()
    problem = namespaces_problem()
    if problem:
        raise SystemExit(f"bench/ep_overlap.py: {problem}")
    print(describe(), flush=True)
    print(f"2 hosts x 1 rank, parallel.ep=2, {' '.join(RUN[:5])}; median step time of steps {args.skip + 1}.."
          f"{args.steps}", flush=True)
    port = 29600
    for rate in args.rates.split(","):
        with LocalCluster(2, rate=None if rate == "unlimited" else rate) as cluster, \
                tempfile.TemporaryDirectory() as tmp:
            times = {}
            for overlap in (False, True):
                port += 1
                steps = run_once(cluster, Path(tmp) / f"run{port}", args.steps, overlap, port)
                times[overlap] = statistics.median(steps[args.skip:])
            print(f"link {rate:>9}: step {times[False]:.2f} s blocking, {times[True]:.2f} s overlapped "
                  f"(speed-up x{times[False] / times[True]:.2f}; hidden {times[False] - times[True]:+.2f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
