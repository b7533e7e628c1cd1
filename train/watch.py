"""A collective that fails (a peer hung, died or was cut off, past `parallel.collective_timeout_s`): one line naming
the step, the operation that waited and the ranks (and their hosts) that did not answer.

Every rank records its host in the job's store (the rendezvous store torchrun or rank 0 serves) and keeps a thread
that answers a probe. The first rank whose collective fails probes: every rank that still runs answers from its
thread, blocked in a collective or not, so the ranks that stay silent are the ones paused, dead or cut off. That
rank prints the report; the others stop without one. A rank that cannot reach the store either reports alone.

The operation is read from the failed call's stack: the expert all-to-all (parallel/expert.py's dispatcher, its MoE
layer), the FSDP all-gather or reduce-scatter (its module), the pipeline's send/recv, or else the training-loop
phase.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

PROBE_WAIT_S = 3.0  # how long the reporting rank waits for answers to its probe
PROBE_POLL_S = 1.0  # how often every rank looks for a probe
CLOSE_WAIT_S = 15.0  # how long close() waits for the answering thread's store request to return


class CollectiveFailure(RuntimeError):
    """A collective of the run failed; the message is the report (one line), or empty for a rank that stays quiet
    because another rank reports."""


def _module_of(fqn: str | None) -> str:
    """ "layers.3" -> "layer 3"; the root module -> "the embedding and head"."""
    if not fqn:
        return "the embedding and head"
    parts = fqn.split(".")
    return f"layer {parts[1]}" if parts[0] == "layers" and len(parts) > 1 else fqn


def frame_operation(frame) -> str | None:
    """The collective a finished stack frame (a raised error's) stands for, or None."""
    return code_operation(frame.f_code.co_filename, frame.f_code.co_name, frame.f_locals)


def code_operation(path: str, name: str, loc: dict | None = None) -> str | None:
    """The collective a frame of function `name` in file `path` stands for, or None. `loc`: the frame's locals,
    which name its MoE layer or module; None: from the code alone."""
    path, with_locals, loc = path.replace(os.sep, "/"), loc is not None, loc or {}
    if path.endswith("parallel/expert.py"):
        label = getattr(loc.get("self"), "label", None) or getattr(loc.get("ctx"), "label", None)
        if name in ("dispatch", "compute", "combine", "backward") and (label or not with_locals):
            step = {"dispatch": "dispatch, forward", "compute": "combine, forward", "combine": "combine, forward",
                    "backward": "backward"}[name]
            return f"the expert all-to-all of {label} ({step})" if label else f"the expert all-to-all ({step})"
    if path.endswith("_fsdp_param_group.py") and name in ("unshard", "wait_for_unshard", "post_backward"):
        what = "reduce-scatter" if name == "post_backward" else "all-gather"
        if not with_locals:
            return f"the FSDP {what}"
        return f"the FSDP {what} of {_module_of(getattr(loc.get('self'), '_module_fqn', None))}"
    if "/pipelining/" in path and name in ("_batch_p2p", "_wait_batch_p2p"):
        return "the pipeline send/recv between stages"
    if path.endswith("parallel/__init__.py") and name == "clip_grad_norm_":
        return "the gradient-norm all-reduce"
    return None


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective (or the store) giving up on a peer: a timeout, a closed connection."""
    return isinstance(error, dist.DistError) or any(
        s in str(error) for s in ("gloo/transport", "Connection closed by peer", "Connection reset by peer",
                                  "Timed out waiting"))


def failed_operation(error: BaseException, phase: str) -> str:
    """The innermost collective named on the stack of `error`, else the training loop's `phase`."""
    tb, found = error.__traceback__, None
    while tb is not None:
        found = frame_operation(tb.tb_frame) or found
        tb = tb.tb_next
    return found or phase


class Watch:
    """One rank's part: its host in the store, the probe-answering thread, and the report of a failed collective."""

    @classmethod
    def of_job(cls, rank: int, world: int, timeout_s: float) -> "Watch | None":
        """The watch of a multi-rank job whose store is at MASTER_ADDR:MASTER_PORT (torchrun, srun); else None."""
        if world == 1 or not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
            return None
        return cls(rank, world, timeout_s)

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.host, self.timeout_s = rank, world, socket.gethostname(), timeout_s
        self.where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self.store = self._client(timeout_s)
        self.store.set(f"host/{rank}", self.host)
        self._stop = threading.Event()
        self.failed = False  # a collective failed and report() ran
        # its own connection: a client serves one request at a time, and this one blocks in wait()
        self._thread = threading.Thread(target=self._answer, args=(self._client(timeout_s),), daemon=True,
                                        name="watch")
        self._thread.start()

    @staticmethod
    def _client(timeout_s: float):
        """A connection to the job's store, its keys under this run (and torchrun restart)'s prefix."""
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return dist.PrefixStore(f"dsv2_watch/{run}/", client)

    def _answer(self, store) -> None:
        try:
            while not self._stop.wait(PROBE_POLL_S):  # check() returns at once (a blocking wait() logs each timeout)
                if store.check(["probe"]):
                    store.set(f"alive/{self.rank}", "1")
                    return
        except Exception:  # noqa: BLE001 — the store is gone: nothing left to answer
            return

    def close(self) -> None:
        """Stop the probe-answering thread: it ends within a second, unless a store request of its own blocks.
        A store request does not time out, so the wait is bounded here; a daemon thread still inside one when the
        interpreter finalizes aborts the process (std::terminate while its C++ frames unwind), so the bound is
        generous: only a store that stopped answering holds the thread that long. After a failed collective the
        store may be cut off for good, and the process ends with an error anyway: then it waits a second."""
        self._stop.set()
        self._thread.join(timeout=PROBE_POLL_S if self.failed else CLOSE_WAIT_S)

    def report(self, step: int, error: BaseException, phase: str) -> CollectiveFailure:
        """The failure to raise for `error`, a collective that failed at `step` (0-based) while the training loop
        was in `phase`. The reporting rank prints the report (before any rank exits, so torchrun, which stops the
        others when one exits, does not cut it short); the others wait for it and stay quiet."""
        what = failed_operation(error, phase)
        self.failed, found = True, {}
        # a store across a cut cable blocks its client without end: the exchange runs where it can be abandoned
        asking = threading.Thread(target=lambda: found.update(silent=self._probe()), daemon=True)
        asking.start()
        asking.join(self.timeout_s + PROBE_WAIT_S)
        here = f"step {step + 1}: {what} failed on rank {self.rank} ({self.host})"
        if "silent" not in found:
            line = f"{here}, and the job's store at {self.where} does not answer: this host is cut off"
        elif found["silent"] is None:
            return CollectiveFailure("")
        else:
            silent, hosts = found["silent"]
            who = f"ranks {', '.join(map(str, silent))} on {', '.join(hosts)}" if silent else "none (all answered)"
            line = f"{here}: {_first_line(error)}; did not answer: {who}"
        print(f"collective error: {line}", file=sys.stderr, flush=True)
        if "silent" in found:
            self.store.set("reported", "1")
        return CollectiveFailure(line)

    def _probe(self) -> tuple[list[int], list[str]] | None:
        """(ranks that do not answer the probe, their hosts); None on every rank but the first to fail, once that
        one has its answer."""
        self.store.set(f"alive/{self.rank}", "1")
        if self.store.add("reporters", 1) != 1:
            deadline = time.monotonic() + PROBE_WAIT_S + 5
            while time.monotonic() < deadline and not self.store.check(["reported"]):
                time.sleep(0.1)
            return None
        self.store.set("probe", "1")
        others = [r for r in range(self.world) if r != self.rank]
        deadline = time.monotonic() + PROBE_WAIT_S
        while time.monotonic() < deadline and not self.store.check([f"alive/{r}" for r in others]):
            time.sleep(0.1)
        silent = [r for r in others if not self.store.check([f"alive/{r}"])]
        return silent, sorted({self.store.get(f"host/{r}").decode() for r in silent})


def _first_line(error: BaseException) -> str:
    """The first sentence of `error`'s message, without gloo's "[file.cc:line] " prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split("] ", 1)[-1].split(". ")[0]
