"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding on load, published atomically.

Layout under `<output_dir>/checkpoints/`:
    step_00000100/            a published checkpoint (renamed from step_00000100.tmp once complete)
        .metadata, *.distcp   DCP: model (incl. expert-bias buffers) and optimizer, sharded by rank
        train_state.json      step, scheduler, data-loader position, resolved config (rank 0)
        rng/rank_<r>.pt       each rank's RNG states
        checksums.json        every other file's size and CRC-32, written last (rank 0)
A directory without the `.tmp` suffix is only ever created by an atomic rename after every rank finished
writing, so a crash mid-save leaves at most a `.tmp` directory, which is never loaded. Before a checkpoint is
loaded its files are checked against checksums.json (the ranks share the files between them); one that does not
verify, or fails to load all the same, is skipped with one warning line naming the file, for the previous one.
Each rank checksums the files it wrote as soon as they are written (in the background for async saves).
"""

from __future__ import annotations

import json
import contextlib
import logging
import mmap
import os
import random
import shutil
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from .targets import MANIFEST, is_checkpoint_dir

log = logging.getLogger(__name__)
PREFIX = "step_"
# loggers through which DCP reports a failed read with a full traceback per failure; a failure here is one
# warning line of our own instead
_DCP_LOGGERS = ("torch.distributed.checkpoint", "torch.distributed.checkpoint.utils",
                "torch.distributed.checkpoint.logger")


# what DCP warns each time a process without a process group saves or loads, which a one-process run does on purpose
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def _dcp_quiet():
    """DCP without its tracebacks and without its single-process warning."""
    loggers = [logging.getLogger(name) for name in _DCP_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _single() -> bool:
    """No process group: DCP saves and loads as one process (no_dist), as a single-process run means to."""
    return not dist.is_initialized()


# optimizer state keyed by parameter name (not by position), merged over the model parts a rank holds:
# any layout (a different split into pipeline stages, data/expert sharding) reads the same keys back
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_LOAD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


def merged_state(parts, optimizers) -> dict[str, dict]:
    """{"model": ..., "optim": ...} over every (model part, its optimizer) of this rank."""
    state: dict[str, dict] = {"model": {}, "optim": {}}
    for part, opt in zip(parts, optimizers):
        model_sd, optim_sd = get_state_dict(part, opt, options=_OPTIONS)
        state["model"].update(model_sd)
        state["optim"].update(optim_sd)
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True when every rank reports ok."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- integrity
def crc32_of(path: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits, read through mmap (the page cache's bytes, not copied)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return f"{0:08x}"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return f"{zlib.crc32(mm):08x}"


def checksums(directory: Path, files) -> dict[str, list]:
    """{path relative to `directory`: [size in bytes, CRC-32]} of `files`."""
    return {str(p.relative_to(directory)): [p.stat().st_size, crc32_of(p)] for p in files}


def files_written_by(directory: Path, rank: int) -> list[Path]:
    """The files of a checkpoint that rank `rank` wrote itself: its RNG state and its DCP data files."""
    own = [directory / "rng" / f"rank_{rank}.pt"]
    return [p for p in own if p.is_file()] + sorted(directory.glob(f"__{rank}_*"))


def seal(directory: Path, known: dict[str, list] | None = None) -> None:
    """Write the directory's checksums.json: the entries of `known` (checksums the writers computed) and those
    of every other file beneath `directory`."""
    entries = dict(known or {})
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_file() and rel != MANIFEST and rel not in entries:
            entries.update(checksums(directory, [p]))
    (directory / MANIFEST).write_text(json.dumps({"algorithm": "crc32", "files": entries}, sort_keys=True))


def verify(directory: Path, rank: int = 0, world: int = 1) -> str | None:
    """The first file of this rank's share (every `world`-th, from the `rank`-th) of the checkpoint's files that
    does not match checksums.json, as a line naming it; None when all match."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
        expected = {rel: (int(size), str(crc)) for rel, (size, crc) in entries.items()}
    except OSError:
        return f"{directory / MANIFEST} is missing (a checkpoint is published with it)"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{directory / MANIFEST} is damaged (not the JSON of a list of files)"
    for rel in sorted(expected)[rank::world]:
        path, (size, crc) = directory / rel, expected[rel]
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} recorded at save"
        got = crc32_of(path)
        if got != crc:
            return f"{path} fails its checksum (CRC-32 {got}, {crc} recorded at save)"
    return None


def _gather(obj) -> list:
    """`obj` of every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def verified(path: Path) -> str | None:
    """The problem every rank hears about when the checkpoint `path` does not verify (the ranks share its files;
    a collective when a process group exists); None when it verifies."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    problems = [p for p in _gather(verify(path, _rank(), world)) if p is not None]
    return problems[0] if problems else None


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be loaded (one line for the user; nothing is deleted)."""


class SaveError(CheckpointError):
    """A checkpoint the disk refused, raised alike on every rank (they agree on it first): rank 0 reports it."""


def published(root: Path) -> list[Path]:
    """Published checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


class Checkpointer:
    """Saves, publishes, prunes and loads the checkpoints under `root`; `every` and `steps` (the run's length)
    give its cadence (`should_save`)."""

    def __init__(self, root: Path, keep: int, async_save: bool = False, every: int = 0, steps: int = 0,
                 on_error: str = "stop"):
        self.root, self.on_error = root, on_error
        self.keep = keep
        self.async_save = async_save
        self.every, self.steps = every, steps
        self._pending: tuple[Future, Path, Path, int | None] | None = None
        self._hasher: ThreadPoolExecutor | None = None  # checksums an async save's files once they are written
        if async_save and _single():  # DCP's writer thread warns on every save, outside any call's context
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        # an async save's collectives (plans, the write results) run in DCP's writer thread while training runs
        # its own: on a group of their own, or the two would pair up the wrong collectives across ranks
        self._async_group = dist.new_group(backend="gloo") if async_save and not _single() else None
        self.last_step: int | None = None  # the step of the newest save (or load) of this run

    # ------------------------------------------------------------------------------------------ save
    def should_save(self, step: int) -> bool:
        """Whether the run saves after `step` steps on its cadence (every `every`; the end of the run saves
        anyway), and has not saved that step already."""
        return bool(self.every) and step % self.every == 0 and step < self.steps and self.last_step != step

    def save(self, step: int, parts, optimizers, train_state: dict[str, Any]) -> None:
        """Write checkpoint `step`; publish it now (sync) or once its background write finished (async). A write
        that fails on any rank (a full or read-only disk) is `_failed`: stop or go on, as `on_error` says."""
        self.wait()
        previous, self.last_step = self.last_step, step
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{final.name}.tmp"
        error = _attempt(self._start, tmp, train_state) if _rank() == 0 else None
        if _all_ok(error is None):  # rank 0 made the directory
            error = _attempt(torch.save, rng_state(), tmp / "rng" / f"rank_{_rank()}.pt")
        if not _all_ok(error is None):
            return self._failed(tmp, error, previous)
        state = merged_state(parts, optimizers)
        if self.async_save:
            with _dcp_quiet():
                written = dcp.async_save(state, checkpoint_id=str(tmp), no_dist=_single(),
                                         process_group=self._async_group)
            self._hasher = self._hasher or ThreadPoolExecutor(1, thread_name_prefix="checkpoint-checksums")
            self._pending = (self._hasher.submit(_checksum_when_written, written, tmp), tmp, final, previous)
            return None
        with _dcp_quiet():
            own = _attempt(dcp.save, state, checkpoint_id=str(tmp), no_dist=_single())
        if not isinstance(own, BaseException):
            own = _attempt(lambda: checksums(tmp, files_written_by(tmp, _rank())))
        self._publish(tmp, final, own, previous)
        return None

    @staticmethod
    def _start(tmp: Path, train_state: dict[str, Any]) -> None:
        """The checkpoint's directory, afresh, with train_state.json (rank 0)."""
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of the same step
        (tmp / "rng").mkdir(parents=True)
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1, default=str))

    def in_flight(self) -> bool:
        """Whether an async save waits to be published."""
        return self._pending is not None

    def written(self) -> bool:
        """Whether this rank has nothing left to write: no async save in flight, or its part written and
        checksummed (the save is published once every rank has: `wait`)."""
        return self._pending is None or self._pending[0].done()

    def wait(self) -> None:
        """Finish and publish an in-flight async save."""
        if self._pending is not None:
            future, tmp, final, previous = self._pending
            self._pending = None
            self._publish(tmp, final, _attempt(future.result), previous)

    def _publish(self, tmp: Path, final: Path, own: dict[str, list] | BaseException, previous: int | None) -> None:
        """Seal and rename the checkpoint once every rank's files are written (`own`: this rank's checksums, or
        the error that stopped its write)."""
        gathered = _gather(own if isinstance(own, dict) else None)
        error = None if isinstance(own, dict) else own
        if _rank() == 0 and all(g is not None for g in gathered):
            error = _attempt(self._seal_and_rename, tmp, final, {k: v for g in gathered for k, v in g.items()})
        if not _all_ok(error is None):
            return self._failed(tmp, error, previous)
        _barrier()
        return None

    def _seal_and_rename(self, tmp: Path, final: Path, known: dict[str, list]) -> None:
        seal(tmp, known)
        if final.exists():  # re-saving a step (after a resume): replace it only now that tmp is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()

    def _failed(self, tmp: Path, error: BaseException | None, previous: int | None) -> None:
        """A save that did not complete on every rank: its `.tmp` directory goes (where the disk lets it; it is
        never loaded), the newest published checkpoint stays; CheckpointError (on_error=stop) or one warning."""
        self.last_step = previous
        free = _free_mib(self.root)  # before the partial write goes: what the save found
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = failure(error) if error is not None else "the write failed on another rank"
        kept = published(self.root)
        line = (f"checkpoint {tmp.name[:-len('.tmp')]} not written ({why}; {free} free in {self.root}); the newest "
                f"checkpoint stays {kept[0].name if kept else 'none'}")
        if self.on_error == "stop":
            raise SaveError(f"{line}; stopping (checkpoint.on_error=continue trains on without it)")
        if _rank() == 0:
            log.warning("%s; training on (checkpoint.on_error=continue)", line)

    def _prune(self) -> None:
        for old in published(self.root)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ load
    def load_latest(self, parts, optimizers) -> dict[str, Any] | None:
        """Load the newest checkpoint that verifies and loads on every rank; None when there is none at all."""
        candidates = published(self.root)
        for path in candidates:
            problem = verified(path)
            state = self._try_load(path, parts, optimizers) if problem is None else None
            if problem is None and _all_ok(state is not None):
                log.info("resumed from %s", path)
                self.last_step = state["step"]
                return state
            if problem is not None:
                log.warning("checkpoint %s skipped for the previous one: %s", path.name, problem)
        if candidates:
            raise CheckpointError(f"no loadable checkpoint among {[p.name for p in candidates]} in {self.root}; "
                                  f"move them away to start afresh")
        return None

    def last_good(self) -> Path | None:
        """The newest published checkpoint whose files all verify (checked on this rank alone), if any."""
        return next((path for path in published(self.root) if verify(path) is None), None)

    def newest_train_state(self) -> dict[str, Any] | None:
        """train_state.json of the newest published checkpoint that has a readable one."""
        for path in published(self.root):
            try:
                return json.loads((path / "train_state.json").read_text())
            except (OSError, ValueError):
                continue
        return None

    def _try_load(self, path: Path, parts, optimizers) -> dict[str, Any] | None:
        try:
            train_state = json.loads((path / "train_state.json").read_text())
            state = merged_state(parts, optimizers)
            with _dcp_quiet():
                dcp.load(state, checkpoint_id=str(path), no_dist=_single())
            for part, opt in zip(parts, optimizers):
                set_state_dict(part, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                               options=_LOAD_OPTIONS)
            rng_file = path / "rng" / f"rank_{_rank()}.pt"
            if rng_file.is_file():
                set_rng_state(torch.load(rng_file, weights_only=False))
            else:
                log.warning("%s has no RNG state for rank %d (different layout); keeping the seeded RNG",
                            path, _rank())
            return train_state
        except (Exception, CheckpointException) as e:  # noqa: BLE001 — any failure: not this checkpoint
            # (DCP's CheckpointException derives from BaseException, so it is named explicitly)
            log.warning("checkpoint %s skipped for the previous one: %s", path.name, failure(e))
            return None


def failure(e: BaseException) -> str:
    """One line for a failed load: the first rank's own exception where DCP wrapped it."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, inner = min(e.failures.items())
        inner = inner[0] if isinstance(inner, tuple) else inner  # (exception, its stack) as DCP keeps it
        return f"rank {rank}: {failure(inner)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _free_mib(path: Path) -> str:
    """The space left on the disk of `path`, e.g. "0.2 MiB" ("unknown space" where it cannot be read)."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def _attempt(fn, *args, **kwargs):
    """`fn`'s result, or the exception it raised where that is a failed write: an OSError (a full or read-only
    disk) or DCP's CheckpointException (which wraps the ranks' own)."""
    try:
        return fn(*args, **kwargs)
    except (OSError, CheckpointException) as e:
        return e


def _checksum_when_written(written: Future, directory: Path) -> dict[str, list]:
    """Once an async save's files are written: the checksums of those this rank wrote."""
    written.result()
    return checksums(directory, files_written_by(directory, _rank()))


def load_model_weights(source: Path, parts, check: bool = True) -> Path:
    """Another run's model weights (expert-bias buffers included) into `parts`, under any layout: from the
    checkpoint directory `source`, or the newest checkpoint of the run directory `source` that verifies and
    loads (`check=False`: the caller verified it). Nothing else (optimizer, step, data position) is read.
    CheckpointError when none loads, naming the first failure."""
    candidates = [source] if is_checkpoint_dir(source) else published(source / "checkpoints")
    errors = []
    for path in candidates:
        problem = verified(path) if check else None
        if problem is None:
            problem = _load_model(path, parts)
        if _all_ok(problem is None):
            return path
        errors.append(problem or f"{path} fails to load on another rank")
        log.warning("cannot initialise from %s (%s); trying the previous checkpoint", path.name, errors[-1])
    why = errors[0] if errors else f"{source} holds no checkpoint (give a run's output_dir or its checkpoints/step_N)"
    raise CheckpointError(f"checkpoint.init_from: no checkpoint there loads into this model ({why})")


def _load_model(path: Path, parts) -> str | None:
    """Load the model weights of the checkpoint `path` into `parts`; the failure as a line, else None."""
    try:
        state = {"model": {k: v for part in parts for k, v in get_model_state_dict(part).items()}}
        with _dcp_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=_single())
        for part in parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        return None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 — as in Checkpointer._try_load
        return f"{path}: {failure(e)}"


def select(root: Path, step: int | None) -> Path:
    """For a tool that reads a finished run's checkpoints under `root`: the newest one that verifies (the newer
    ones that do not are named in a warning line each), or the one of `step`, which must verify."""
    found = published(root)
    if not found:
        raise CheckpointError(f"{root.parent} has no published checkpoint under checkpoints/ (is it a run's "
                              f"output_dir?)")
    if step is not None:
        path = next((p for p in found if int(p.name[len(PREFIX):]) == step), None)
        if path is None:
            raise CheckpointError(f"{root.parent} has no checkpoint of step {step}; it has {[p.name for p in found]}")
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path.name} does not verify: {problem}")
        return path
    problems = []
    for path in found:
        problems.append(verify(path))
        if problems[-1] is None:
            return path
        log.warning("checkpoint %s skipped for the previous one: %s", path.name, problems[-1])
    raise CheckpointError(f"no checkpoint of {root.parent} verifies ({[p.name for p in found]}); the newest: "
                          f"{problems[0]}")
