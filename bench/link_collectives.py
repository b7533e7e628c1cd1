"""Collective throughput across hosts whose links are limited (launch/localcluster.py: 2 network namespaces on a
bridge, tbf on both ends of each host's cable): gloo all-gather and all-to-all between one rank per host, against the
rate set. Needs root (network namespaces).

Per rank and call, `--mbytes` MB of fp32 in: all-gather receives the other rank's whole tensor over the link;
all-to-all keeps half and sends half. Link MB/s = bytes that cross the link in one direction / seconds per call
(both directions carry that much at once, each through its own tbf).

    python bench/link_collectives.py [--mbytes 8] [--calls 3] [--rates unlimited,1gbit,100mbit]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import describe  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.localcluster import LocalCluster, namespaces_problem  # noqa: E402

RATE_MBYTES = {"1gbit": 125.0, "100mbit": 12.5}  # what each rate allows, MB/s


def worker(rank: int, mbytes: float, calls: int) -> None:
    """One rank (run inside a host): time all_gather_single and all_to_all_single; print JSON (rank 0)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = int(mbytes * 1e6 / 4)
    x = torch.randn(n)
    gathered, exchanged = torch.empty(2 * n), torch.empty(n)
    result = {}
    for name, call, crossing in (("all_gather", lambda: dist.all_gather_single(gathered, x), n * 4),
                                 ("all_to_all", lambda: dist.all_to_all_single(exchanged, x), n * 2)):
        call()  # warm-up: connections, buffers
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        seconds = (time.perf_counter() - start) / calls
        result[name] = crossing / seconds / 1e6
    if rank == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


def measure(rate: str | None, mbytes: float, calls: int) -> dict:
    with LocalCluster(2, rate=rate) as cluster:
        env = {**os.environ, "MASTER_ADDR": cluster.hosts[0].name, "MASTER_PORT": "29600", "OMP_NUM_THREADS": "1",
               "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(ROOT)}
        procs = [cluster.popen(h.index, [sys.executable, __file__, "--worker", str(h.index), "--mbytes", str(mbytes),
                                         "--calls", str(calls)], env=env, stdout=subprocess.PIPE, text=True)
                 for h in cluster.hosts]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        return json.loads(outs[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbytes", type=float, default=8.0)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rates", default="unlimited,1gbit,100mbit")
    ap.add_argument("--worker", type=int, default=None)
    args = ap.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.mbytes, args.calls)
    problem = namespaces_problem()
    if problem:
        sys.exit(f"link_collectives: {problem}")
    print(describe())
    print(f"gloo, 2 hosts x 1 rank, {args.mbytes:g} MB per rank per call, {args.calls} calls; "
          f"link MB/s (one direction)")
    print("| link rate | allows MB/s | all-gather MB/s | all-to-all MB/s |")
    print("|---|---|---|---|")
    for rate in args.rates.split(","):
        r = measure(None if rate == "unlimited" else rate, args.mbytes, args.calls)
        allows = RATE_MBYTES.get(rate)
        share = (lambda v: f"{v:,.1f} ({v / allows:.0%})") if allows else (lambda v: f"{v:,.1f}")
        print(f"| {rate} | {allows or '-'} | {share(r['all_gather'])} | {share(r['all_to_all'])} |", flush=True)


if __name__ == "__main__":
    main()
