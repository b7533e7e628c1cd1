"""Expert-parallel communication over a real link (launch/localcluster.py: hosts as network namespaces on a bridge,
tbf on both ends of each host's cable), each host's ranks started by torchrun inside it, every rank running the
trainer's own step (train/runtime.py, train/step.py). Needs root (network namespaces).

    python bench/ep_overlap.py [--rates unlimited,800mbit,400mbit] [--steps 5] [--skip 2]
                               [--parts overlap,link,dispatch,pipeline] [--chunks 2] [--mb 3]

overlap   2 hosts x 1 rank, parallel.ep=2, the issue's setting (`RUN`), with the expert all-to-alls blocking and
          overlapped (`parallel.ep_overlap`; one run per `--chunks` value, `parallel.ep_chunks`), at each link
          rate. Per run, over the steps after `--skip`:
          - step: the median step time;
          - a2a exposed: the seconds a step's main thread waits on the expert all-to-alls: inside the blocking
            `dist.all_to_all_single` calls (the dispatch's counts; every row exchange when blocking; timed by
            wrapping the function) plus, overlapped, in `wait_tensor`, where an asynchronous exchange is waited for
            at first use (forward and backward; torch's profiler, CPU events of the main thread); in brackets the
            part of it inside autograd's backward (a blocking call the engine makes, a wait below one of the
            engine's evaluate_function events);
          - runnable, not running: the seconds the main thread was ready to run but waited for a CPU (the kernel's
            schedstat): on this machine's few cores, the compute time that gloo's threads, the network stack and
            the other ranks took from it, which a GPU's copy engines and NICs would not;
          - other exposed: the rest of the main thread's waiting, i.e. wall time - the main thread's CPU time
            (its compute: OMP_NUM_THREADS=1, gloo moves bytes on threads of its own) - a2a exposed - runnable, not
            running: FSDP's all-gathers and reduce-scatters, the loss and statistics all-reduces;
          - a2a on the link: the rows the dispatcher sent to the other host (dispatch and combine, forward and
            backward) x hidden x 4 bytes, over the link's rate measured by a TCP transfer at set-up.
          - beyond unlimited: a2a exposed less the same mode's over the unlimited link, where the wait is for the
            other rank (skew), not for bytes: what the link adds.
          With the overlap on, the share of the all-to-all left exposed is beyond unlimited / a2a on the link (target
          <= 25%). The planner's estimate (launch/plan/cost.py) of the same exposed time uses its byte count and
          overlap model with this CPU's compute rate (the step's training FLOPs over the main thread's CPU time of
          the unlimited-link blocking run) and the link's TCP rate at `cluster.link_efficiency` (0.7), the fraction
          of a link's bandwidth the planner assumes collectives achieve.
link      2 hosts x 1 rank, gloo alone, at each limited rate, `--mb` MB crossing the link each way (the run above
          sends about 3 MB per all-to-all and direction): the seconds of an all-to-all alone and beside an all-gather
          of as many bytes on another process group started just before it (as FSDP's prefetch shares the cable), of
          a send and a recv posted together on each rank (both directions at once, no all-to-all algorithm), and of
          a one-way send; each also as a multiple of `--mb` MB's time at the TCP stream's rate. This separates what
          the exchange itself costs on the cable from what sharing the cable costs.
dispatch  2 hosts x 2 ranks, parallel.ep=4, `parallel.ep_dispatch` flat and hierarchical at the first limited
          rate: step time, rows of hidden states the dispatchers sent between hosts, and the bytes each host's
          cable carried (its interface counters, everything included).
pipeline  4 hosts x 1 rank, parallel.pp=2 x ep=2 under DualPipeV (`PIPE`; each ep group spans two hosts, and so does
          each pipeline send), with `parallel.pp_overlap_fb` off (each overlapped action's forward, then its backward)
          and on (both at once, the backward on a second thread), at each rate: the median step and its speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.localcluster import LocalCluster, namespaces_problem  # noqa: E402

# the setting: small with 4 layers and top-8 routing, 8 sequences of 512 tokens a step
RUN = ["model=small", "model.num_hidden_layers=4", "model.num_experts_per_tok=8", "data.seq_len=512",
       "train.global_batch_size=8", "train.micro_batch_size=4", "parallel.ep=2"]
# 2 hosts x 2 ranks: tiny-width experts so that four ranks fit two cores; groups map to hosts (n_group % 2 == 0)
DISPATCH = ["model=small", "model.num_hidden_layers=2", "model.num_experts_per_tok=6", "data.seq_len=256",
            "train.global_batch_size=8", "train.micro_batch_size=2", "parallel.ep=4"]
# 4 hosts x 1 rank, pp=2 x ep=2 under DualPipeV: 4 stages of one layer, 4 microbatches of 1 x 256 tokens a rank
PIPE = ["model=small", "model.num_hidden_layers=4", "model.num_experts_per_tok=6", "data.seq_len=256",
        "train.global_batch_size=8", "train.micro_batch_size=1", "parallel.ep=2", "parallel.pp=2",
        "parallel.pp_schedule=DualPipeV"]
COMMON = ["train.val_every=0", "checkpoint.every=0", "log.every=1", "train.peak_tflops=1.0", "checkpoint.load=false"]


# --------------------------------------------------------------------------------------------- one rank
def worker(overrides: list[str], steps: int, skip: int, result: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from train.config import compose_config
    from train.runtime import build_runtime
    from train.step import Step

    blocked = {"s": 0.0, "backward": 0.0}
    original = dist.all_to_all_single

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            blocked["s"] += time.perf_counter() - t
            if torch._C._current_graph_task_id() != -1:  # called by autograd's engine: a backward all-to-all
                blocked["backward"] += time.perf_counter() - t
    dist.all_to_all_single = timed
    cfg = compose_config([*overrides, f"train.steps={steps}"])
    rt = build_runtime(cfg)
    step = Step(rt)
    rows = lambda: sum(getattr(m.dispatcher, "host_rows", 0) for m in rt.moe_layers().values())  # noqa: E731
    record = []
    for i in range(steps):
        batch = step.sequence_part(rt.loader.next_batch())
        blocked["s"], blocked["backward"], rows0 = 0.0, 0.0, rows()
        with profile(activities=[ProfilerActivity.CPU]) if i >= skip else _nothing() as prof:
            wall, cpu, queued = time.perf_counter(), time.thread_time(), _queued()
            step(batch, i)
            wall, cpu, queued = time.perf_counter() - wall, time.thread_time() - cpu, _queued() - queued
        waits, backward = _waits(prof)
        record.append({"wall": wall, "cpu": cpu, "queued": queued, "a2a": blocked["s"] + waits, "rows": rows() - rows0,
                       "a2a_backward": blocked["backward"] + backward})
    gathered = [None] * rt.env.world
    dist.all_gather_object(gathered, record)
    if rt.env.rank == 0:
        Path(result).write_text(json.dumps({"ranks": gathered, "hidden": cfg.model.hidden_size,
                                            "flops": _step_flops(rt)}))
    dist.destroy_process_group()


def _queued() -> float:
    """Seconds this thread has spent runnable but not running (waiting on a CPU's run queue; the kernel's
    schedstat): on a machine with fewer cores than busy threads, the compute time other threads took from it."""
    return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9


def _waits(prof) -> tuple[float, float]:
    """Seconds the profiled step spent in `wait_tensor` (an asynchronous collective waited for at first use), and of
    them inside autograd's backward (an event below one of the engine's evaluate_function events)."""
    if prof is None:
        return 0.0, 0.0
    total = backward = 0.0
    for e in prof.events():
        if e.name != "_c10d_functional::wait_tensor":
            continue
        total += e.cpu_time_total / 1e6
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("autograd::engine::evaluate_function"):
            parent = parent.cpu_parent
        backward += e.cpu_time_total / 1e6 if parent is not None else 0.0
    return total, backward


def exchange_worker(mb: float, reps: int, result: str) -> None:
    """Rank 0 and 1, one per host, `mb` MB crossing the link each way: median seconds of an all-to-all (alone, and
    beside an async all-gather of as many bytes on a second group), of a send and recv posted together on each rank
    (both directions at once, without the all-to-all's algorithm), and of a send from rank 1 to rank 0 alone."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, other = dist.get_rank(), dist.new_group(backend="gloo")
    rows = int(mb * 2 ** 20 / 4)  # fp32 rows of one element; of each side's 2 x rows, half stay home, half cross
    inp, out = torch.randn(2 * rows), torch.empty(2 * rows)
    shard, gathered = torch.randn(rows), torch.empty(2 * rows)
    times: dict[str, list[float]] = {"a2a": [], "a2a_beside_gather": [], "both_ways": [], "send": []}

    def timed(name, fn):
        dist.barrier()
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)

    def both_ways():
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, inp[:rows], 1 - rank),
                                            dist.P2POp(dist.irecv, out[:rows], 1 - rank)]):
            work.wait()

    for _ in range(reps + 1):  # the first of each is left out (connections, buffers)
        timed("a2a", lambda: dist.all_to_all_single(out, inp))
        work = dist.all_gather_into_tensor(gathered, shard, group=other, async_op=True)
        timed("a2a_beside_gather", lambda: dist.all_to_all_single(out, inp))
        work.wait()
        timed("both_ways", both_ways)
        timed("send", lambda: dist.send(inp[:rows], 0) if rank == 1 else dist.recv(out[:rows], 1))
    if rank == 0:
        Path(result).write_text(json.dumps({k: statistics.median(v[1:]) for k, v in times.items()}))
    dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _step_flops(rt) -> float:
    """One rank's training FLOPs of a step (model/analysis.py: 6 x activated parameters + attention)."""
    from model.analysis import training_flops_per_token

    cfg = rt.cfg
    tokens = cfg.train.global_batch_size * cfg.data.seq_len / rt.dims.dp
    return training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens


# --------------------------------------------------------------------------------------------- the cluster
def link_rate(cluster: LocalCluster, megabytes: int = 48) -> float:
    """Bytes/s host 1 -> host 0 over a TCP connection (what the tbf-limited cable gives a stream)."""
    sink = ("import socket, time\ns = socket.create_server(('0.0.0.0', 5001))\nc, _ = s.accept()\n"
            "n = len(c.recv(1 << 20))\nt = time.time()\nwhile d := c.recv(1 << 20):\n    n += len(d)\n"
            "print(n / (time.time() - t), flush=True)")
    server = cluster.popen(0, [sys.executable, "-c", sink], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    send = (f"import socket\ns = socket.create_connection(('{cluster.hosts[0].name}', 5001))\n"
            f"s.sendall(b'x' * {megabytes << 20})\ns.close()")
    cluster.run(1, [sys.executable, "-c", send], check=True, timeout=120)
    return float(server.communicate(timeout=60)[0])


def tx_bytes(cluster: LocalCluster) -> list[int]:
    read = ["cat", "/sys/class/net/eth0/statistics/tx_bytes"]
    return [int(cluster.run(h.index, read, capture_output=True, text=True).stdout) for h in cluster.hosts]


def torchrun_on(cluster: LocalCluster, procs: int, port: int, args: list[str]) -> list[subprocess.Popen]:
    """This script with `args` under torchrun on every host of `cluster`, `procs` ranks each, c10d rendezvous at host
    0, gloo on each host's cable."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(cluster.hosts)}",
            f"--nproc-per-node={procs}", "--rdzv-backend=c10d", f"--rdzv-endpoint={cluster.hosts[0].name}:{port}",
            __file__, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "eth0"}
    return [cluster.popen(h.index, argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for h in cluster.hosts]


def run_job(cluster: LocalCluster, overrides: list[str], procs: int, steps: int, skip: int, port: int) -> dict:
    """One training job over every host of `cluster`, `procs` ranks each: the workers' records and the bytes each
    host's cable sent."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        before = tx_bytes(cluster)
        jobs = torchrun_on(cluster, procs, port, ["--worker", "--steps", str(steps), "--skip", str(skip), "--result",
                                                  str(result), "--", *overrides, *COMMON, f"output_dir={tmp}/run"])
        for job in jobs:
            _, err = job.communicate(timeout=3600)
            if job.returncode:
                raise SystemExit(f"a host's job failed: {err[-3000:]}")
        got = json.loads(result.read_text())
        got["tx"] = [b - a for a, b in zip(before, tx_bytes(cluster))]
        return got


def summary(got: dict, skip: int) -> dict:
    """Medians over the measured steps of rank 0's step and the slowest rank's waits."""
    steps = range(skip, len(got["ranks"][0]))
    med = lambda key, r: statistics.median(got["ranks"][r][i][key] for i in steps)  # noqa: E731
    ranks = range(len(got["ranks"]))
    wall = med("wall", 0)
    a2a = max(med("a2a", r) for r in ranks)
    waiting = max(med("wall", r) - med("cpu", r) for r in ranks)
    queued = max(med("queued", r) for r in ranks)
    rows = sum(med("rows", r) for r in ranks) / len(ranks)
    backward = max(med("a2a_backward", r) for r in ranks)
    return {"wall": wall, "a2a": a2a, "a2a_backward": backward, "queued": queued,
            "other": max(0.0, waiting - a2a - queued), "cpu": med("cpu", 0),
            "rows": rows,
            "bytes": rows * got["hidden"] * 4, "flops": got["flops"], "tx": got["tx"]}


# --------------------------------------------------------------------------------------------- the parts
def planned_exposed(overrides: list[str], world: int, link: float, flops_per_s: float) -> tuple[float, float, float]:
    """The planner's (all-to-all seconds, compute it hides under, exposed seconds) of a step on this link and CPU: the
    link's TCP rate at `cluster.link_efficiency`, as the planner takes a link's bandwidth."""
    from launch.plan.cost import expert_a2a_seconds
    from launch.plan.memory import layout_of
    from train.config import compose_config

    cfg = compose_config([*overrides, *COMMON])
    return expert_a2a_seconds(cfg.model, layout_of(cfg, world, ranks_per_host=1), link * cfg.cluster.link_efficiency,
                              flops_per_s)


def overlap_part(rates: list[str], chunks: list[int], steps: int, skip: int, port: int) -> None:
    """Per rate and mode (blocking; overlapped with each of `chunks` token chunks) one row; `beyond`: the
    all-to-all's exposed time less the same mode's over the unlimited link (what waiting for the other rank costs
    there, not the link), the part the planner's estimate models."""
    print("| link | measured rate | all-to-alls | step | a2a exposed (of it in backward) | beyond unlimited | "
          "runnable, not running | other exposed | a2a on the link | exposed share | planned exposed |\n"
          + "|---" * 11 + "|", flush=True)
    base, steps_s = {}, {}
    for rate in rates:
        with LocalCluster(2, rate=None if rate == "unlimited" else rate) as cluster:
            link = link_rate(cluster)
            for mode in (0, *chunks):  # 0: blocking
                port += 1
                run = [*RUN, f"parallel.ep_overlap={str(mode > 0).lower()}", f"parallel.ep_chunks={max(mode, 1)}"]
                s = summary(run_job(cluster, run, 1, steps, skip, port), skip)
                steps_s[rate, mode] = s["wall"]
                on_link = 2 * s["bytes"] / link  # forward and backward; the counters count the forward
                plan = planned_exposed(run, 2, link, s["flops"] / s["cpu"])
                beyond = s["a2a"] - base.setdefault(mode, s["a2a"])
                print(f"| {rate} | {link / 1e6:.0f} MB/s | {f'overlapped, {mode} chunks' if mode else 'blocking'} | "
                      f"{s['wall']:.2f} s | {s['a2a']:.2f} s ({s['a2a_backward']:.2f} s) | {beyond:.2f} s "
                      f"| {s['queued']:.2f} s | {s['other']:.2f} s | {on_link:.2f} s "
                      f"({2 * s['bytes'] / 1e6:.0f} MB) | {beyond / on_link:.0%} | {plan[2]:.2f} s "
                      f"(a2a {plan[0]:.2f} s, hides under {plan[1]:.2f} s) |", flush=True)
    for rate in rates:
        for n in chunks:
            speedup = steps_s[rate, 0] / steps_s[rate, n]
            print(f"link {rate}: the overlap's step speed-up with {n} chunks x{speedup:.2f}", flush=True)


def link_part(rates: list[str], mb: float, port: int) -> None:
    print(f"\n| link (TCP stream) | all-to-all, {mb:g} MB crossing each way | the same beside an all-gather of as "
          f"many | send + recv of {mb:g} MB on each rank at once | one-way send of {mb:g} MB |\n|---|---|---|---|---|",
          flush=True)
    for rate in rates:
        with LocalCluster(2, rate=rate) as cluster, tempfile.TemporaryDirectory() as tmp:
            link, port = link_rate(cluster), port + 1
            for job in torchrun_on(cluster, 1, port, ["--exchange", "--mb", str(mb), "--result", f"{tmp}/result.json"]):
                _, err = job.communicate(timeout=900)
                if job.returncode:
                    raise SystemExit(f"a host's exchange failed: {err[-3000:]}")
            got = json.loads(Path(f"{tmp}/result.json").read_text())
            ideal = mb * 2 ** 20 / link
            kinds = ("a2a", "a2a_beside_gather", "both_ways", "send")
            cells = [f"{got[k]:.3f} s ({got[k] / ideal:.2f}x)" for k in kinds]
            print(f"| {rate} ({link / 1e6:.0f} MB/s) | {' | '.join(cells)} |", flush=True)


def dispatch_part(rate: str, steps: int, skip: int, port: int) -> None:
    print("\n| dispatch (2 hosts x 2 ranks, ep=4) | step | rows between hosts per rank | bytes the cables sent |\n"
          "|---|---|---|---|", flush=True)
    with LocalCluster(2, rate=None if rate == "unlimited" else rate) as cluster:
        for how in ("flat", "hierarchical"):
            port += 1
            s = summary(run_job(cluster, [*DISPATCH, f"parallel.ep_dispatch={how}"], 2, steps, skip, port), skip)
            print(f"| {how} at {rate} | {s['wall']:.2f} s | {s['rows']:.0f} a step (forward) | "
                  f"{sum(s['tx']) / 1e6:.0f} MB in {steps} steps |", flush=True)


def pipeline_part(rates: list[str], steps: int, skip: int, port: int) -> None:
    print("\n| pipeline (4 hosts x 1 rank, pp=2 x ep=2, DualPipeV) | forward, then backward | both at once | "
          "speed-up |\n|---|---|---|---|", flush=True)
    for rate in rates:
        with LocalCluster(4, rate=None if rate == "unlimited" else rate) as cluster:
            walls = []
            for paired in ("false", "true"):
                port += 1
                got = run_job(cluster, [*PIPE, f"parallel.pp_overlap_fb={paired}"], 1, steps, skip, port)
                walls.append(summary(got, skip)["wall"])
            print(f"| {rate} | {walls[0]:.2f} s | {walls[1]:.2f} s | x{walls[0] / walls[1]:.2f} |", flush=True)


def main() -> None:
    if "--worker" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--worker", action="store_true")
        ap.add_argument("--steps", type=int)
        ap.add_argument("--skip", type=int)
        ap.add_argument("--result")
        ap.add_argument("overrides", nargs="*")
        a = ap.parse_args()
        return worker(a.overrides, a.steps, a.skip, a.result)
    if "--exchange" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--exchange", action="store_true")
        ap.add_argument("--mb", type=float)
        ap.add_argument("--result")
        a = ap.parse_args()
        return exchange_worker(a.mb, 9, a.result)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="unlimited,800mbit,400mbit")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the medians (start-up)")
    ap.add_argument("--parts", default="overlap,link,dispatch,pipeline")
    ap.add_argument("--chunks", default="2", help="overlap part: the token chunks of each overlapped run")
    ap.add_argument("--mb", type=float, default=3.0, help="link part: MB crossing each way per exchange")
    args = ap.parse_args()
    problem = namespaces_problem()
    if problem:
        raise SystemExit(f"bench/ep_overlap.py: {problem}")
    print(describe(), flush=True)
    print(f"medians of steps {args.skip + 1}..{args.steps}; overlap: 2 hosts x 1 rank, {' '.join(RUN)}", flush=True)
    rates = args.rates.split(",")
    if "overlap" in args.parts:
        overlap_part(rates, [int(n) for n in args.chunks.split(",")], args.steps, args.skip, 29600)
    if "link" in args.parts:
        link_part([r for r in rates if r != "unlimited"], args.mb, 29650)
    if "dispatch" in args.parts:
        dispatch_part(next((r for r in rates if r != "unlimited"), "unlimited"), args.steps, args.skip, 29700)
    if "pipeline" in args.parts:
        pipeline_part(rates, args.steps, args.skip, 29750)


if __name__ == "__main__":
    main()
