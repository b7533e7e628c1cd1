"""Several hosts on one machine (launch/localcluster.py: network namespaces on a bridge, tbf-limited links): the
cluster itself, and multi-host runs through the real launchers, whose losses equal the same layout on one host."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import PY, ROOT, base_args, metrics

# a TCP sink on port 5001: once the sender closes, prints the bytes received and the seconds from the first to the last
SINK = ("import socket, time\ns = socket.create_server(('0.0.0.0', 5001))\nc, _ = s.accept()\nn = len(c.recv(1 << 20))\n"
        "t = time.time()\nwhile d := c.recv(1 << 20):\n    n += len(d)\nprint(n, time.time() - t, flush=True)")


def send(cluster, host: int, to: str, megabytes: int, timeout: float = 2.0) -> subprocess.CompletedProcess:
    """`megabytes` MB from `host` to port 5001 of `to`."""
    code = (f"import socket\ns = socket.create_connection(('{to}', 5001), timeout={timeout})\n"
            f"s.sendall(b'x' * {megabytes << 20})\ns.close()")
    return cluster.run(host, [sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def test_hosts_resolve_each_other_links_are_limited_and_cables_cut(local_cluster):
    t0 = time.monotonic()
    cluster = local_cluster(2, rate="100mbit")
    setup = time.monotonic() - t0
    assert setup < 5, f"set-up took {setup:.1f} s"
    me = cluster.run(1, ["sh", "-c", "hostname; getent hosts $(hostname) node0"], capture_output=True, text=True)
    assert me.stdout.split() == ["node1", "10.77.0.2", "node1", "10.77.0.1", "node0"]
    sink = cluster.popen(0, [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    sent = send(cluster, 1, "node0", 8)
    assert sent.returncode == 0, sent.stderr
    received, seconds = sink.communicate(timeout=30)[0].split()
    rate = int(received) / float(seconds) / 1e6  # MB/s through a 100 Mbit/s (12.5 MB/s) link
    assert int(received) == 8 << 20 and 9 < rate < 13, rate
    cluster.cut(1)
    assert send(cluster, 1, "node0", 1, timeout=1).returncode != 0, "a cut cable carried a connection"
    cluster.restore(1)
    sleeper = cluster.popen(1, ["sleep", "60"])
    assert cluster.pause(1) == [sleeper.pid]
    assert open(f"/proc/{sleeper.pid}/stat").read().split()[2] == "T"  # stopped
    cluster.resume(1)
    cluster.kill(1)
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    namespaces = [h.ns for h in cluster.hosts]
    cluster.close()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in namespaces if ns in left.split()]


def launch_on_hosts(cluster, args: list[str], port: int = 29400) -> list[subprocess.Popen]:
    """`python -m launch launch=torchrun ...` on every host of `cluster`, c10d rendezvous at host 0, 2 ranks each,
    gloo on each host's cable (launch.env names the interface)."""
    args = [*args, "launch=torchrun", f"launch.nodes={len(cluster.hosts)}", "launch.procs_per_node=2",
            f"launch.master_addr={cluster.hosts[0].name}", f"launch.master_port={port}",
            "++launch.env.GLOO_SOCKET_IFNAME=eth0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return [cluster.popen(h.index, [PY, "-m", "launch", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) for h in cluster.hosts]


EP4 = {"parallel.ep": 4, "train.micro_batch_size": 1}


@pytest.mark.slow
def test_experts_on_two_hosts_train_like_one_host(dataset, reference_run, local_cluster, tmp_path):
    """2 hosts x 2 ranks, ep=4 (each host holds half the experts; every all-to-all and FSDP collective crosses the
    bridge): the losses and gradient norms of the same layout on one host, bit for bit."""
    cluster, out = local_cluster(2), tmp_path / "run"
    nodes = launch_on_hosts(cluster, base_args(dataset, out, 3, **EP4))
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
        assert f"--rdzv-endpoint=node0:29400" in stdout.splitlines()[0]
    ref = reference_run(3, 4, **EP4)
    assert metrics(out) == metrics(ref)
    assert metrics(out, "grad_norm") == metrics(ref, "grad_norm")
