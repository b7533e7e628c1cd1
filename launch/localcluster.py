"""A cluster on one machine, for tests and benchmarks: N "hosts", each a Linux network namespace with its own
address, hostname and cable (a veth pair whose outer end is a port of one bridge).

    with LocalCluster(2, rate="1gbit") as cluster:
        proc = cluster.popen(0, [sys.executable, "-m", "launch", ...])   # runs inside host 0
        cluster.cut(1); cluster.restore(1)          # host 1's cable out, and back in
        cluster.pause(1); cluster.resume(1)         # SIGSTOP / SIGCONT every process of host 1
        cluster.kill(1)                             # SIGKILL every process of host 1

Each host resolves every host's name to that host's address (`ip netns exec` binds /etc/netns/<ns>/hosts over
/etc/hosts) and runs its commands in its own UTS namespace with `hostname` set, so `socket.gethostname()` names
it and resolves to its own address, as on a real node (torchrun's c10d rendezvous relies on this to tell which
host serves the store). A link rate applies in both directions: a tbf qdisc on each end of the host's cable.

Needs root, `ip`, `tc` and `unshare` (`namespaces_problem()` says which is missing). Everything is torn down on
`close()` (the context manager's exit), when the object is collected, at interpreter exit, and by the next
cluster created on the machine if the process that made one died without cleaning up (names carry its pid).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

PREFIX = "lc"  # every namespace, bridge and port name of a local cluster starts with it
SUBNET = "10.77.0"  # hosts are 10.77.0.1, .2, ...: each cluster has its own bridge, the root namespace no address
NETNS_ETC = Path("/etc/netns")
_COUNTER = itertools.count()


def namespaces_problem() -> str | None:
    """Why this machine cannot make a local cluster, in one line; None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (this process runs as uid %d)" % os.geteuid()
    missing = [tool for tool in ("ip", "tc", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"network namespaces need {', '.join(missing)} on PATH"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _teardown(namespaces: list[str], ports: list[str], bridge: str) -> None:
    """Kill every process of the namespaces, delete them, their hosts files, cables and the bridge (idempotent)."""
    for ns in namespaces:
        pids = _netns_pids(ns)
        _signal_all(pids, signal.SIGCONT)  # a stopped process dies of SIGKILL too, but its children must run to exit
        _signal_all(pids, signal.SIGKILL)
    for ns in namespaces:
        deadline = time.monotonic() + 5
        while _netns_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.02)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    for port in ports:  # deleting a namespace does not always take its veth pair with it
        _ip("link", "del", port, check=False)
    _ip("link", "del", bridge, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans() -> None:
    """Tear down what clusters of processes that no longer run left behind (a test runner killed mid-test)."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    owners: dict[int, list[str]] = {}
    for name in names:
        m = re.fullmatch(rf"{PREFIX}(\d+)x(\d+)h\d+", name)
        if m and not _alive(int(m.group(1))):
            owners.setdefault((int(m.group(1)), int(m.group(2))), []).append(name)
    for (pid, n), namespaces in owners.items():
        tag = f"{PREFIX}{pid}x{n}"
        _teardown(namespaces, [ns.replace(f"{tag}h", f"{tag}p") for ns in namespaces], tag)


@dataclass
class Host:
    index: int
    name: str  # its hostname (socket.gethostname() inside it), resolvable on every host of the cluster
    addr: str
    ns: str  # the network namespace
    port: str  # the bridge end of its cable


class LocalCluster:
    """`hosts` namespaces on one bridge; `rate` (tc syntax, e.g. "1gbit", "100mbit"; None: unlimited) on every
    host's link, both directions. Hostnames are `<name_prefix><index>`."""

    def __init__(self, hosts: int, rate: str | None = None, name_prefix: str = "node"):
        remove_orphans()
        tag = f"{PREFIX}{os.getpid()}x{next(_COUNTER)}"
        self.bridge = tag
        self.hosts = [Host(i, f"{name_prefix}{i}", f"{SUBNET}.{i + 1}", f"{tag}h{i}", f"{tag}p{i}")
                      for i in range(hosts)]
        self.procs: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _teardown, [h.ns for h in self.hosts],
                                          [h.port for h in self.hosts], self.bridge)
        try:
            self._build()
            for i in range(hosts):
                self.set_rate(i, rate)
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        names = "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        for h in self.hosts:
            _ip("netns", "add", h.ns)
            (NETNS_ETC / h.ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / h.ns / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
            _ip("link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _ip("link", "set", h.port, "master", self.bridge, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")

    # ---------------------------------------------------------------------------------------------- commands
    def command(self, host: int, argv: list[str]) -> list[str]:
        """`argv` as run inside `host`: its network namespace, a UTS namespace with its hostname."""
        h = self.hosts[host]
        return ["ip", "netns", "exec", h.ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', h.name,
                *argv]

    def popen(self, host: int, argv: list[str], **kw) -> subprocess.Popen:
        """subprocess.Popen of `argv` inside `host` (keyword arguments as Popen's); reaped by close()."""
        proc = subprocess.Popen(self.command(host, argv), **kw)
        self.procs.append(proc)
        return proc

    def run(self, host: int, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """subprocess.run of `argv` inside `host`."""
        return subprocess.run(self.command(host, argv), **kw)

    def srun_script(self) -> str:
        """A bash stand-in for SLURM's `srun CMD...` in a batch script: one task per host, started inside it with the
        SLURM_* variables srun sets (SLURM_JOB_NODELIST, SLURM_JOB_ID come from the batch environment); SIGUSR1 and
        SIGTERM are passed on to every task; the exit status is the first non-zero task's."""
        n, tasks = len(self.hosts), []
        for h in self.hosts:
            env = (f"SLURM_PROCID={h.index} SLURM_NODEID={h.index} SLURM_LOCALID=0 SLURM_NTASKS={n} SLURM_NNODES={n} "
                   f"SLURM_STEP_NUM_TASKS={n} SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURMD_NODENAME={h.name}")
            cmd = " ".join(shlex.quote(a) for a in self.command(h.index, ["env"]))
            tasks.append(f'{cmd} {env} "$@" &\nPIDS="$PIDS $!"')
        return "\n".join([
            "#!/bin/bash", 'while [[ "$1" == --* ]]; do shift; done  # srun options: one task per host regardless',
            'PIDS=""', *tasks, "trap 'kill -USR1 $PIDS' USR1", "trap 'kill -TERM $PIDS' TERM", "STATUS=0",
            "for pid in $PIDS; do",
            '    while true; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done  # trap ends wait',
            '    [ "$STATUS" = 0 ] && STATUS=$rc', "done", 'exit "$STATUS"', ""])

    # ---------------------------------------------------------------------------------------------- faults
    def set_rate(self, host: int, rate: str | None) -> None:
        """Limit `host`'s link to `rate` in both directions (tbf on each end of its cable); None: unlimited."""
        h = self.hosts[host]
        for ns, dev in ((None, h.port), (h.ns, "eth0")):
            where = ["-n", ns] if ns else []
            tc = ["tc", *where, "qdisc"]
            if rate is None:
                subprocess.run([*tc, "del", "dev", dev, "root"], capture_output=True)
                continue
            proc = subprocess.run([*tc, "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
                                   "latency", "200ms"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"tc tbf rate {rate} on {dev}: {proc.stderr.strip()}")

    def cut(self, host: int) -> None:
        """Pull `host`'s cable: its bridge port goes down, no packet passes either way."""
        _ip("link", "set", self.hosts[host].port, "down")

    def restore(self, host: int) -> None:
        _ip("link", "set", self.hosts[host].port, "up")

    def pids(self, host: int) -> list[int]:
        """Every process running inside `host`."""
        return _netns_pids(self.hosts[host].ns)

    def signal(self, host: int, sig: int) -> list[int]:
        """Send `sig` to every process of `host`; the pids signalled."""
        pids = self.pids(host)
        _signal_all(pids, sig)
        return pids

    def pause(self, host: int) -> list[int]:
        return self.signal(host, signal.SIGSTOP)

    def resume(self, host: int) -> list[int]:
        return self.signal(host, signal.SIGCONT)

    def kill(self, host: int) -> list[int]:
        return self.signal(host, signal.SIGKILL)

    # ---------------------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        """Kill every process of every host, reap the ones this object started, remove the namespaces."""
        self._finalizer()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
