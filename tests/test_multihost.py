"""Several hosts on one machine (launch/localcluster.py: network namespaces on a bridge, tbf-limited links): the
cluster itself, and multi-host runs through the real launchers, whose losses equal the same layout on one host."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PY, ROOT, base_args, metrics, stderr_tail, train

# a TCP sink on port 5001: says when it listens; once the sender closes, prints the bytes and the seconds they took
SINK = ("import socket, time\ns = socket.create_server(('0.0.0.0', 5001))\nprint('listening', flush=True)\n"
        "c, _ = s.accept()\n"
        "n = len(c.recv(1 << 20))\nt = time.time()\nwhile d := c.recv(1 << 20):\n    n += len(d)\n"
        "print(n, time.time() - t, flush=True)")


def send(cluster, host: int, to: str, megabytes: int, timeout: float = 2.0) -> subprocess.CompletedProcess:
    """`megabytes` MB from `host` to port 5001 of `to`."""
    code = (f"import socket\ns = socket.create_connection(('{to}', 5001), timeout={timeout})\n"
            f"s.sendall(b'x' * {megabytes << 20})\ns.close()")
    return cluster.run(host, [sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def comm(pid: int) -> str:
    """The name of the program process `pid` runs."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_hosts_resolve_each_other_links_are_limited_and_cables_cut(local_cluster):
    t0 = time.monotonic()
    cluster = local_cluster(2, rate="100mbit")
    setup = time.monotonic() - t0
    assert setup < 5, f"set-up took {setup:.1f} s"
    me = cluster.run(1, ["sh", "-c", "hostname; getent hosts $(hostname) node0"], capture_output=True, text=True)
    assert me.stdout.split() == ["node1", "10.77.0.2", "node1", "10.77.0.1", "node0"]
    sink = cluster.popen(0, [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "listening"  # a busy machine starts the sink's Python slowly
    sent = send(cluster, 1, "node0", 8)
    assert sent.returncode == 0, sent.stderr
    received, seconds = sink.communicate(timeout=30)[0].split()
    rate = int(received) / float(seconds) / 1e6  # MB/s through a 100 Mbit/s (12.5 MB/s) link
    assert int(received) == 8 << 20 and 9 < rate < 13, rate
    cluster.cut(1)
    assert send(cluster, 1, "node0", 1, timeout=1).returncode != 0, "a cut cable carried a connection"
    cluster.restore(1)
    sleeper = cluster.popen(1, ["sleep", "60"])
    # the pid joins the namespace at `ip netns exec`, and its shell forks `hostname` before it execs `sleep`
    deadline = time.monotonic() + 5
    while (comm(sleeper.pid) != "sleep" or cluster.pids(1) != [sleeper.pid]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cluster.pause(1) == [sleeper.pid]
    deadline = time.monotonic() + 2  # SIGSTOP takes effect asynchronously
    while Path(f"/proc/{sleeper.pid}/stat").read_text().split()[2] != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert Path(f"/proc/{sleeper.pid}/stat").read_text().split()[2] == "T"  # stopped
    cluster.resume(1)
    cluster.kill(1)
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    namespaces = [h.ns for h in cluster.hosts]
    cluster.close()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in namespaces if ns in left.split()]


def launch_on_hosts(cluster, args: list[str], port: int = 29400, procs: int = 2,
                    nodes: str | None = None) -> list[subprocess.Popen]:
    """`python -m launch launch=torchrun ...` on every host of `cluster`, c10d rendezvous at host 0, `procs` ranks
    each, gloo on each host's cable (launch.env names the interface); `nodes`: launch.nodes (default: every host)."""
    args = [*args, "launch=torchrun", f"launch.nodes={nodes or len(cluster.hosts)}", f"launch.procs_per_node={procs}",
            f"launch.master_addr={cluster.hosts[0].name}", f"launch.master_port={port}",
            "++launch.env.GLOO_SOCKET_IFNAME=eth0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return [cluster.popen(h.index, [PY, "-m", "launch", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) for h in cluster.hosts]


def finished(nodes: list[subprocess.Popen]) -> list[str]:
    """Every host's stdout once all have ended; every host's stderr tail in the message when any failed."""
    outs = [node.communicate(timeout=300) for node in nodes]
    failed = [f"host {i} (exit {node.returncode}): {stderr_tail(err)}" for i, (node, (_, err))
              in enumerate(zip(nodes, outs)) if node.returncode != 0]
    assert not failed, "\n".join(failed)
    return [out for out, _ in outs]


EP4 = {"parallel.ep": 4, "train.micro_batch_size": 1}
STEPS = 6


def workers(cluster, host: int) -> list[int]:
    """The training processes (torchrun's workers) running on `host`."""
    def module(pid: int) -> str:  # what `python [-u] -m <module>` runs
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        return argv[argv.index("-m") + 1] if "-m" in argv else ""
    return [pid for pid in cluster.pids(host) if module(pid) == "train"]


def wait_for_step(out: Path, step: int, deadline: float) -> dict[int, float]:
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and max(metrics(out), default=0) >= step:
            return metrics(out)
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {out}/metrics.jsonl in time")


@pytest.mark.slow
def test_experts_on_two_hosts_survive_a_killed_worker(dataset, reference_run, local_cluster, tmp_path):
    """2 hosts x 2 ranks, ep=4 (each host holds half the experts; every all-to-all and FSDP collective crosses the
    bridge), launch=torchrun with the c10d rendezvous at host 0 and launch.max_restarts=1. A rank of host 1 is
    SIGKILLed from outside after step 4: every worker restarts and resumes the step-3 checkpoint, and the run's
    losses and gradient norms equal the same layout on one host, uninterrupted, bit for bit."""
    cluster, out = local_cluster(2), tmp_path / "run"
    nodes = launch_on_hosts(cluster, [*base_args(dataset, out, STEPS, **EP4, **{"checkpoint.every": 3}),
                                      "launch.max_restarts=1"])
    deadline = time.monotonic() + 180
    wait_for_step(out, 4, deadline)
    victim = workers(cluster, 1)[0]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    before = metrics(out)
    rows = len(before)
    while len(metrics(out)) >= rows and time.monotonic() < deadline:  # the resumed run rewinds metrics.jsonl
        time.sleep(0.05)
    resumed_at = max(metrics(out), default=0)
    wait_for_step(out, resumed_at + 1, deadline)
    recovered = time.monotonic() - killed
    for stdout in finished(nodes):
        assert "--rdzv-endpoint=node0:29400" in stdout.splitlines()[0] and "--max-restarts=1" in stdout
    ref = reference_run(STEPS, 4, **EP4)
    assert metrics(out) == metrics(ref)
    assert metrics(out, "grad_norm") == metrics(ref, "grad_norm")
    recomputed = max(before) - resumed_at
    print(f"killed rank pid {victim} after step {max(before)}: first new step {recovered:.1f} s later, "
          f"resumed from step {resumed_at}, {recomputed} step(s) recomputed")
    assert resumed_at == 3


@pytest.mark.slow
def test_a_paused_host_ends_the_job_with_one_line(dataset, local_cluster, tmp_path):
    """Host 1 frozen (SIGSTOP, every process) after step 3, parallel.collective_timeout_s=4: host 0's ranks stop
    within the timeout plus the probe, and host 0's output ends with one report naming the step, the collective
    and the ranks and host that did not answer, then torchrun's one-line summary; no traceback."""
    cluster, out = local_cluster(2), tmp_path / "run"
    nodes = launch_on_hosts(cluster, [*base_args(dataset, out, 40, **EP4, **{"checkpoint.every": 2}),
                                      "parallel.collective_timeout_s=4"])
    wait_for_step(out, 3, time.monotonic() + 300)
    cluster.pause(1)
    paused = time.monotonic()
    _, stderr = nodes[0].communicate(timeout=120)
    stopped = time.monotonic() - paused
    assert nodes[0].returncode == 1
    reports = [line for line in stderr.splitlines() if line.startswith("collective error:")]
    last = max(metrics(out))
    assert len(reports) == 1, stderr[-3000:]
    assert reports[0].startswith(f"collective error: step {last + 1}: the "), reports[0]
    # the collective when the stack names it; a failure inside autograd's backward names the phase, and a pause
    # that lands after the step (a loaded machine) finds host 0 in the loop's end-of-step all-reduce
    assert re.search(r": (the (FSDP all-gather|FSDP reduce-scatter|expert all-to-all) of (MoE )?layer \d|"
                     r"the training step|the end-of-step check \(all-reduce\)) ", reports[0]), reports[0]
    assert reports[0].endswith("did not answer: ranks 2, 3 on node1"), reports[0]
    assert "Traceback" not in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("launch: train failed on node0: first rank ")
    assert stopped < 4 + 3 + 30, stopped  # timeout, probe, torchrun's teardown (slower on loaded cores)
    print(f"host 1 paused after step {last}: host 0 stopped {stopped:.1f} s later: {reports[0]}")


@pytest.mark.slow
def test_a_replica_per_host_trains_like_one_host(dataset, reference_run, local_cluster, tmp_path):
    """HSDP with parallel.dp_replicate=2 on 2 hosts x 1 rank (a replica per host; the gradient all-reduce crosses
    the bridge): the losses of the 2-process run on one host (FSDP over both ranks; with two ranks every gradient
    sum adds the same two numbers), bit for bit. The gradient norms agree to 1e-6: FSDP sums squares per shard
    first, replication over whole tensors."""
    cluster, out = local_cluster(2), tmp_path / "run"
    nodes = launch_on_hosts(cluster, base_args(dataset, out, 3, **{"parallel.dp_replicate": 2}), procs=1)
    finished(nodes)
    ref = reference_run(3, 2)
    assert metrics(out) == metrics(ref)
    assert metrics(out, "grad_norm") == pytest.approx(metrics(ref, "grad_norm"), rel=1e-6)


# layout: (hosts, ranks per host, overrides). ep=4 on 2 x 2: two ep ranks on each host (the fan-out crosses the
# host's ranks); tp=2 x ep=2 on 2 x 2: an ep group's ranks lie tp apart, so each host holds one rank of every ep
# group and both tensor-parallel ranks of it; pp=2 x ep=2 on 4 x 1: the ep groups lie inside a pipeline stage (the
# mesh's fastest dims), so they span hosts only with one rank a host, and the MoE layers of a rank's two DualPipeV
# stages share the groups, with the forward and backward of each overlapped action at once (their twin groups)
HIERARCHICAL = {"ep4": (2, 2, EP4),
                "tp2_ep2": (2, 2, {"parallel.tp": 2, "parallel.ep": 2, "train.micro_batch_size": 1}),
                "pp2_ep2_dualpipev_paired": (4, 1, {"parallel.pp": 2, "parallel.ep": 2, "train.micro_batch_size": 1,
                                                    "parallel.pp_schedule": "DualPipeV", "train.global_batch_size": 8,
                                                    "parallel.pp_overlap_fb": "true"})}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(HIERARCHICAL))
def test_hierarchical_expert_dispatch_across_hosts_trains_like_flat_on_one(dataset, reference_run, local_cluster,
                                                                           tmp_path, layout):
    """4 ranks on 2 or 4 hosts, parallel.ep_dispatch=hierarchical (a token crosses the bridge once per host holding
    any of its experts, then fans out on its host): the losses and gradient norms of the flat dispatch on one host.
    Not bit for bit: each host sums its experts' weighted outputs before the hosts' sums are added (fp32; the
    loss differences seen: at most 8e-8 relative)."""
    hosts, procs, over = HIERARCHICAL[layout]
    cluster, out = local_cluster(hosts), tmp_path / "run"
    nodes = launch_on_hosts(cluster, [*base_args(dataset, out, STEPS, **over), "parallel.ep_dispatch=hierarchical"],
                            procs=procs)
    finished(nodes)
    ref = reference_run(STEPS, 4, **over)
    assert list(metrics(out)) == list(range(1, STEPS + 1))
    assert metrics(out) == pytest.approx(metrics(ref), rel=1e-6)
    assert metrics(out, "grad_norm") == pytest.approx(metrics(ref, "grad_norm"), rel=1e-6)


PP2 = {"parallel.pp": 2}


@pytest.mark.slow
def test_sbatch_script_on_two_hosts_is_preempted_requeued_and_resumed(dataset, reference_run, local_cluster,
                                                                      tmp_path):
    """The rendered SLURM batch script with an srun stand-in that starts one task inside each host (the cluster's
    srun_script): torchrun on 2 hosts x 1 rank, pp=2 (a pipeline stage per host). SIGUSR1 to the batch
    shell after step 2 -> every rank checkpoints at one step -> the script requeues the job -> running it again
    resumes, and the losses equal the same layout on one host, uninterrupted, bit for bit."""
    steps, cluster, out = 5, local_cluster(2), tmp_path / "run"
    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(cluster.srun_script())
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\nif [ "$1" = show ]; then printf "node0\\nnode1\\n"; '
                                      f'else echo "$@" >> {requeued}; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    submit = subprocess.run([PY, "-m", "launch", *base_args(dataset, out, steps, **PP2), "launch=slurm",
                             "launch.nodes=2", "launch.procs_per_node=1", "launch.master_port=29400",
                             "launch.env.OMP_NUM_THREADS=1", "++launch.env.GLOO_SOCKET_IFNAME=eth0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 2 and "sbatch not found on PATH" in submit.stderr, submit.stderr[-2000:]
    script = out / "slurm" / "dsv2.sbatch"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "78",
           "SLURM_JOB_NODELIST": "node[0-1]", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 2, time.monotonic() + 300)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert "rendezvous on node0:29400, 2 node(s) x 1 process(es)" in stdout
    assert requeued.read_text().split() == ["requeue", "78"]
    saved = [int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and 2 <= saved[0] < steps and max(metrics(out)) == saved[0]
    again = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert requeued.read_text().split() == ["requeue", "78"], "a run that finishes is not requeued"
    ref = reference_run(steps, 2, **PP2)
    assert metrics(out) == metrics(ref)
    assert metrics(out, "grad_norm") == metrics(ref, "grad_norm")


def test_without_root_the_cluster_says_why(monkeypatch):
    from launch.localcluster import namespaces_problem

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert namespaces_problem() == "network namespaces need root (this process runs as uid 1000)"


ELASTIC = ["launch.nodes=1:2", "launch.max_restarts=1", "parallel.collective_timeout_s=4",
           # the rendezvous waits 3 s for more hosts once one is there, and drops a host silent for 2 x 1 s
           "++launch.rdzv_conf.last_call_timeout=3", "++launch.rdzv_conf.keep_alive_interval=1",
           "++launch.rdzv_conf.keep_alive_max_attempt=2"]


@pytest.mark.slow
def test_a_host_lost_for_good_the_job_goes_on_with_the_hosts_that_remain(dataset, local_cluster, tmp_path):
    """2 hosts x 1 rank, launch.nodes=1:2: host 1's cable is cut for good after step 13. Host 0's rank stops on the
    collective timeout, torchrun re-forms the job on host 0 alone, which resumes the step-10 checkpoint with
    data-parallel 2 -> 1 and 2 micro-batches accumulated instead of 1 (the global batch of the configuration), says
    so in one line, and finishes; its losses after the resume equal those of a one-process run resumed from the same
    checkpoint, bit for bit (the same rows of data in the same order through one rank)."""
    steps, cluster, out = 20, local_cluster(2), tmp_path / "run"
    args = [*base_args(dataset, out, steps, **{"checkpoint.every": 5, "checkpoint.keep": 10}), *ELASTIC]
    nodes = launch_on_hosts(cluster, args, procs=1, nodes="1:2")
    deadline = time.monotonic() + 300
    wait_for_step(out, 13, deadline)
    cluster.cut(1)
    cut = time.monotonic()
    before = metrics(out)
    while len(metrics(out)) >= len(before) and time.monotonic() < deadline:  # the resumed run rewinds metrics.jsonl
        time.sleep(0.05)
    resumed_at = max(metrics(out), default=0)
    wait_for_step(out, resumed_at + 1, deadline)
    recovered = time.monotonic() - cut
    stdout, stderr = nodes[0].communicate(timeout=300)
    assert nodes[0].returncode == 0, stderr[-3000:]
    assert "--nnodes=1:2" in stdout.splitlines()[0]
    assert resumed_at == 10, resumed_at
    lines = [line for line in stderr.splitlines() if "resumed step" in line]
    assert len(lines) == 1 and lines[0].endswith("resumed step 10 on 1 rank (was 2): data-parallel 2 -> 1, "
                                                 "gradient accumulation 1 -> 2"), stderr[-3000:]
    assert "Traceback" not in stderr
    ref = tmp_path / "ref"
    shutil.copytree(out / "checkpoints" / "step_00000010", ref / "checkpoints" / "step_00000010")
    train(base_args(dataset, ref, steps, **{"checkpoint.every": 5}))
    after = {s: v for s, v in metrics(out).items() if s > resumed_at}
    assert sorted(after) == list(range(11, steps + 1))
    assert after == metrics(ref)
    print(f"host 1 cut after step {max(before)}: first new step on host 0 alone {recovered:.1f} s later, resumed "
          f"from step {resumed_at}, {max(before) - resumed_at} step(s) recomputed")


@pytest.mark.slow
def test_a_layout_that_cannot_shrink_ends_with_one_line(dataset, local_cluster, tmp_path):
    """2 hosts x 1 rank, pp=2 (a pipeline stage per host, no replica), launch.nodes=1:2: host 1's cable cut for good.
    The job re-forms on host 0 alone, where two pipeline stages cannot fit one rank: host 0's output ends with one
    line saying so, exit 2, no traceback."""
    cluster, out = local_cluster(2), tmp_path / "run"
    nodes = launch_on_hosts(cluster, [*base_args(dataset, out, 40, **PP2, **{"checkpoint.every": 2}), *ELASTIC],
                            procs=1, nodes="1:2")
    wait_for_step(out, 3, time.monotonic() + 300)
    cluster.cut(1)
    _, stderr = nodes[0].communicate(timeout=300)
    assert nodes[0].returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.rstrip().splitlines()[-1]
    assert last.startswith("config error: the job re-formed on 1 host(s), 1 rank(s), after losing some, and its "
                           "layout cannot shrink to them: "), stderr[-3000:]
    assert len([line for line in stderr.splitlines() if line.startswith("config error:")]) == 1
    print(last)


@pytest.mark.slow
def test_a_slowed_rank_is_named_once_with_its_host_and_where_the_others_wait(dataset, local_cluster, tmp_path):
    """2 hosts x 1 rank; from step 3 on, host 1's training process is stopped (SIGSTOP) for 0.3 s of every 0.4 s
    from outside. The logged steps from 6 on name rank 1 the slowest (step_time/slowest_rank) at more than 1.5x the
    other's own work, and rank 0 warns exactly once, naming rank 1, node1 and the operation rank 0 waits in."""
    steps, cluster, out = 14, local_cluster(2), tmp_path / "run"
    nodes = launch_on_hosts(cluster, base_args(dataset, out, steps), procs=1)
    wait_for_step(out, 3, time.monotonic() + 300)
    victim = workers(cluster, 1)[0]
    while nodes[0].poll() is None:  # until the job ends (the process is gone: ProcessLookupError)
        try:
            os.kill(victim, signal.SIGSTOP)
            time.sleep(0.3)
            os.kill(victim, signal.SIGCONT)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    _, stderr = nodes[0].communicate(timeout=300)
    assert nodes[0].returncode == 0, stderr[-3000:]
    rows = {s: (metrics(out, "step_time/slowest_rank")[s], metrics(out, "step_time/max_over_median")[s])
            for s in range(6, steps + 1)}
    # most, not all: on a loaded machine a rank starved of CPU for a step looks slow too
    assert sum(slowest == 1 and ratio > 1.5 for slowest, ratio in rows.values()) >= 0.75 * len(rows), rows
    warnings = [line for line in stderr.splitlines() if "is a straggler" in line]
    assert len(warnings) == 1, stderr[-3000:]
    assert re.search(r"rank 1 \(node1\) is a straggler: its own work takes \d+\.\dx the median of the other ranks' "
                     r"\(\d+\.\d+ s a step over the last 3 records\); the others wait for it in \S", warnings[0])
    print(warnings[0])
