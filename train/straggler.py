"""Stragglers: which rank the others wait for, and where.

In a synchronous job every rank's step takes the same wall time (the collectives tie them together); what differs
is how much of it a rank spends waiting in collectives for the others. A thread of each rank samples the training
thread every `SAMPLE_S` and charges the wall time since its previous sample to "waiting in <operation>" when the
training thread waits in a collective (the operations train/watch.py names: the expert all-to-all of a layer, the
FSDP all-gather or reduce-scatter of a module, the pipeline send/recv, the gradient-norm all-reduce; else the
torch.distributed call and the function that made it), else to the rank's own work. At most two intervals of a
gap count as waiting: a longer gap means the process did not run at all (stopped, starved of CPU), its own time.

Each logged step the ranks exchange their own-work seconds per step since the previous record (one all_gather of
one number per rank): `step_time/slowest_rank`, `step_time/max_over_median` (the slowest rank's own work over the
median of the other ranks') and `step_time/spread_s` (slowest minus fastest, seconds) go to metrics.jsonl and
TensorBoard. When one rank has been the slowest, at more than `log.straggler_factor` x that median and by more
than `RESOLUTION_S` a step, in each of the last `log.straggler_window` records, rank 0 warns once, naming the
rank, its host and the operation where the other ranks spent most of their waiting.

How the sampler looks without touching another thread's frames: on Linux it reads the thread's state and run count
from /proc/self/task/<tid>. A thread asleep (state S or D) through a whole interval waits (a collective, mostly);
a running one works. What a sleep waits in comes from the thread's stack, read at most every `NAME_EVERY_S` and
once per sleep, as the text `faulthandler.dump_traceback` writes (one C call under the GIL, no frame objects); a
sleep whose stack was not read counts as UNNAMED, one whose stack is outside any collective as the rank's own time,
and the warning names the most common named operation. Walking `f_back` from `sys._current_frames()` while the
thread ran on crashed ranks under CPython 3.11 (SIGSEGV in `PyFrame_GetBack` on the sampler's thread). Without
/proc every look reads the stack as text.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .watch import code_operation

log = logging.getLogger(__name__)

SAMPLE_S = 0.01  # seconds between two samples of the training thread's stack
REPO = str(Path(__file__).resolve().parent.parent) + os.sep  # frames of this project's code start with it
# a straggler's own work must also exceed the others' median by this much a step: differences of a few samples
# are the sampling's own noise (steps of tens of milliseconds)
RESOLUTION_S = 5 * SAMPLE_S
NAME_EVERY_S = 1.0  # the training thread's stack is read at most this often
UNNAMED = "a wait whose stack was not read"  # the thread sleeps (a collective, mostly); where was not looked up
OWN = "asleep outside any collective"  # a sleep whose stack was read: the rank's own time (I/O, time.sleep)


def waiting_in(stack: list[tuple[str, str]]) -> Optional[str]:
    """The collective a stack of (file, function) entries, innermost first, waits in, or None when it is not in one:
    the innermost operation train/watch.py names, else the torch.distributed call and the function of this project
    that made it."""
    call, caller = None, None
    for path, name in stack:
        found = code_operation(path, name)  # from the code alone: the frame runs in another thread
        if found:
            return found
        if path.replace(os.sep, "/").endswith("torch/distributed/distributed_c10d.py") and call is None:
            call = name
        elif call is not None and caller is None and path.startswith(REPO):
            caller = name
    return f"torch.distributed.{call} in {caller or 'torch'}" if call else None


def thread_stack(dump: str, ident: int) -> list[tuple[str, str]]:
    """The (file, function) entries, innermost first, of thread `ident` in the text of faulthandler's dump."""
    stack, inside = [], False
    for line in dump.splitlines():
        head = re.match(r"(?:Current thread|Thread) (0x[0-9a-f]+)", line)
        if head:
            inside = int(head.group(1), 16) == ident
        elif inside and line.startswith('  File "'):
            path, _, rest = line[len('  File "'):].partition('", line ')
            stack.append((path, rest.partition(" in ")[2]))
    return stack


class ThreadWatch:
    """Whether the thread that creates it waits, and in what: asleep (/proc) is waiting; what it waits in is read
    from faulthandler's dump of its stack at most every `NAME_EVERY_S`, once per sleep (module docstring). Without
    /proc, every look reads the stack."""

    def __init__(self):
        self.ident = threading.get_ident()
        self._proc = Path(f"/proc/self/task/{threading.get_native_id()}")
        self._dump = tempfile.TemporaryFile()
        self._runs: Optional[int] = None  # the thread's run count at the previous look
        self._where: Optional[str] = None  # what the current sleep waits in (UNNAMED until its stack is read)
        self._named_at = -NAME_EVERY_S  # when the stack was last read (time.monotonic)

    def _sched(self) -> tuple[Optional[int], str]:
        """(times the thread was scheduled, its state letter), or (None, "") without /proc."""
        try:
            runs = int((self._proc / "schedstat").read_text().split()[2])
            state = (self._proc / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError, ValueError):
            return None, ""
        return runs, state

    def where(self) -> Optional[str]:
        """The collective the thread waits in now (UNNAMED: asleep, its stack not read), or None: it works. A thread
        counts as waiting once it has slept through a whole interval: shorter sleeps are mostly waits for the GIL,
        which this sampler holds while it looks."""
        runs, state = self._sched()
        if runs is None:
            return waiting_in(self._stack())
        if state == "R" or runs != self._runs:
            self._runs, self._where = runs, None
            return None
        if self._where is None:  # the first look at this sleep
            self._where = UNNAMED
            now = time.monotonic()
            if now - self._named_at >= NAME_EVERY_S:
                self._named_at, self._where = now, waiting_in(self._stack()) or OWN
        return None if self._where == OWN else self._where

    def _stack(self) -> list[tuple[str, str]]:
        fd = self._dump.fileno()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        faulthandler.dump_traceback(self._dump, all_threads=True)
        size = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, 0, os.SEEK_SET)
        return thread_stack(os.read(fd, size).decode(errors="replace"), self.ident)

    def close(self) -> None:
        self._dump.close()


class WaitSampler:
    """Samples the thread that creates it from a daemon thread: seconds waited in each collective, seconds in all,
    since the last `take()`."""

    def __init__(self, interval: float = SAMPLE_S):
        self.interval, self.watch = interval, ThreadWatch()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.waited: Counter = Counter()
        self.total, self._last = 0.0, time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True, name="straggler-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            where = self.watch.where()
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
        if not self._thread.is_alive():
            self.watch.close()


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
        named = [op for op, _ in others.most_common() if op != UNNAMED]
        where = named[0] if named else "no collective the sampler named"
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
