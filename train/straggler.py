"""Stragglers: which rank the others wait for, and where.

In a synchronous job every rank's step takes the same wall time (the collectives tie them together); what differs
is how much of it a rank spends waiting in collectives for the others. A thread of each rank samples the training
thread's stack every `SAMPLE_S` and charges the wall time since its previous sample to "waiting in <operation>"
when the stack is inside a collective (the operations train/watch.py names: the expert all-to-all of a layer, the
FSDP all-gather or reduce-scatter of a module, the pipeline send/recv, the gradient-norm all-reduce; else the
torch.distributed call and the function that made it), else to the rank's own work. At most two intervals of a
gap count as waiting: a longer gap means the process did not run at all (stopped, starved of CPU), its own time.

Each logged step the ranks exchange their own-work seconds per step since the previous record (one all_gather of
one number per rank): `step_time/slowest_rank`, `step_time/max_over_median` (the slowest rank's own work over the
median of the other ranks') and `step_time/spread_s` (slowest minus fastest, seconds) go to metrics.jsonl and
TensorBoard. When one rank has been the slowest, at more than `log.straggler_factor` x that median and by more
than `RESOLUTION_S` a step, in each of the last `log.straggler_window` records, rank 0 warns once, naming the
rank, its host and the operation where the other ranks spent most of their waiting.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .watch import frame_operation

log = logging.getLogger(__name__)

SAMPLE_S = 0.01  # seconds between two samples of the training thread's stack
REPO = str(Path(__file__).resolve().parent.parent) + os.sep  # frames of this project's code start with it
# a straggler's own work must also exceed the others' median by this much a step: differences of a few samples
# are the sampling's own noise (steps of tens of milliseconds)
RESOLUTION_S = 5 * SAMPLE_S


def waiting_in(frame) -> Optional[str]:
    """The collective the stack of `frame` (innermost first) waits in, or None when it is not in one: the innermost
    operation train/watch.py names, else the torch.distributed call and the function of this project that made it."""
    call, caller = None, None
    while frame is not None:
        found = frame_operation(frame, with_locals=False)  # the frame runs in another thread
        if found:
            return found
        path = frame.f_code.co_filename
        if path.replace(os.sep, "/").endswith("torch/distributed/distributed_c10d.py") and call is None:
            call = frame.f_code.co_name
        elif call is not None and caller is None and path.startswith(REPO):
            caller = frame.f_code.co_qualname
        frame = frame.f_back
    return f"torch.distributed.{call} in {caller or 'torch'}" if call else None


class WaitSampler:
    """Samples the thread that creates it from a daemon thread: seconds waited in each collective, seconds in all,
    since the last `take()`."""

    def __init__(self, interval: float = SAMPLE_S):
        self.target, self.interval = threading.get_ident(), interval
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.waited: Counter = Counter()
        self.total, self._last = 0.0, time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True, name="straggler-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.target)
            where = waiting_in(frame) if frame is not None else None
            now = time.perf_counter()
            with self._lock:
                gap, self._last = now - self._last, now
                self.total += gap
                if where:  # a gap well past the interval: the process did not run (stopped, starved), its own time
                    self.waited[where] += min(gap, 2 * self.interval)

    def take(self) -> tuple[float, Counter]:
        """(the fraction of the time since the last take spent waiting, the seconds per operation); restarts."""
        with self._lock:
            waited, total = self.waited, self.total
            self.waited, self.total = Counter(), 0.0
        return (sum(waited.values()) / total if total else 0.0), waited

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class Stragglers:
    """One rank's part: its own-work time per step, exchanged each logged step, and the warning (rank 0, once)."""

    def __init__(self, rank: int, world: int, device: torch.device, factor: float, window: int):
        self.rank, self.world, self.device = rank, world, device
        self.factor, self.window = factor, window
        self.sampler = WaitSampler()
        self.history: deque = deque(maxlen=window)  # per record: every rank's own-work seconds per step
        self.waited: Counter = Counter()  # this rank's waits over the records in `history`
        self.waited_history: deque = deque(maxlen=window)
        self.warned = False

    def record(self, step: int, step_time: float) -> dict[str, float]:
        """The straggler metrics of a record whose steps took `step_time` seconds each on average."""
        fraction, waited = self.sampler.take()
        own = torch.tensor([step_time * (1 - fraction)], dtype=torch.float64, device=self.device)
        every = [torch.empty_like(own) for _ in range(self.world)]
        dist.all_gather(every, own)
        times = [float(t) for t in every]
        self.history.append(times)
        self.waited_history.append(waited)
        slowest = max(range(self.world), key=times.__getitem__)
        ratio = _over_median(times, slowest)
        if not self.warned and self.factor:
            self._maybe_warn(step)
        return {"step_time/slowest_rank": slowest, "step_time/max_over_median": ratio,
                "step_time/spread_s": max(times) - min(times)}

    def _maybe_warn(self, step: int) -> None:
        """Warn once when one rank was the slowest, past the factor, in every record of the window (the decision
        is the same on every rank: it reads the gathered times)."""
        if len(self.history) < self.window:
            return
        slow = {max(range(self.world), key=times.__getitem__) for times in self.history}
        if len(slow) != 1:
            return
        rank = slow.pop()
        ratios = [_over_median(times, rank) for times in self.history]
        excess = min(times[rank] - _median_of_others(times, rank) for times in self.history)
        if min(ratios) <= self.factor or excess < RESOLUTION_S:
            return
        self.warned = True
        waited = sum(self.waited_history, Counter()) if self.rank != rank else Counter()
        found: list = [None] * self.world
        dist.all_gather_object(found, (socket.gethostname(), dict(waited)))
        others = sum((Counter(w) for r, (_, w) in enumerate(found) if r != rank), Counter())
        where = others.most_common(1)[0][0] if others else "no collective the sampler saw"
        own = statistics.mean(times[rank] for times in self.history)
        if self.rank == 0:
            log.warning("step %d: rank %d (%s) is a straggler: its own work takes %.1fx the median of the other "
                        "ranks' (%.3f s a step over the last %d records); the others wait for it in %s", step, rank,
                        found[rank][0], statistics.mean(ratios), own, self.window, where)

    def close(self) -> None:
        self.sampler.close()


def _median_of_others(times: list[float], rank: int) -> float:
    return statistics.median(t for r, t in enumerate(times) if r != rank)


def _over_median(times: list[float], rank: int) -> float:
    """`rank`'s time over the median of the other ranks' times (at least one sample interval: less is not measured)."""
    return times[rank] / max(_median_of_others(times, rank), SAMPLE_S)
