"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding on load, published atomically.

Layout under `<output_dir>/checkpoints/`:
    step_00000100/            a published checkpoint (renamed from step_00000100.tmp once complete)
        .metadata, *.distcp   DCP: model (incl. expert-bias buffers) and optimizer, sharded by rank
        train_state.json      step, scheduler, data-loader position, resolved config (rank 0)
        rng/rank_<r>.pt       each rank's RNG states
A directory without the `.tmp` suffix is only ever created by an atomic rename after every rank finished
writing, so a crash mid-save leaves at most a `.tmp` directory, which is never loaded. A published
checkpoint that still fails to load (disk corruption) is skipped with a warning for the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

log = logging.getLogger(__name__)
PREFIX = "step_"
# a single-process run saves without a process group on purpose
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


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


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be loaded (one line for the user; nothing is deleted)."""


def published(root: Path) -> list[Path]:
    """Published checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


class Checkpointer:
    def __init__(self, root: Path, keep: int, async_save: bool = False):
        self.root = root
        self.keep = keep
        self.async_save = async_save
        self._pending: tuple[Future, Path, Path] | None = None
        self.last_step: int | None = None  # the step of the newest save (or load) of this run

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, parts, optimizers, train_state: dict[str, Any]) -> None:
        """Write checkpoint `step`; publish it now (sync) or once its background write finished (async)."""
        self.wait()
        self.last_step = step
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{final.name}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of the same step
            (tmp / "rng").mkdir(parents=True)
            (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1, default=str))
        _barrier()
        torch.save(rng_state(), tmp / "rng" / f"rank_{_rank()}.pt")
        state = merged_state(parts, optimizers)
        if self.async_save:
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp)), tmp, final)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._publish(tmp, final)

    def wait(self) -> None:
        """Finish and publish an in-flight async save."""
        if self._pending is not None:
            future, tmp, final = self._pending
            self._pending = None
            future.result()
            self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        _barrier()  # every rank's shards are on disk
        if _rank() == 0:
            if final.exists():  # re-saving a step (after a resume): replace it only now that tmp is whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        for old in published(self.root)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ load
    def load_latest(self, parts, optimizers) -> dict[str, Any] | None:
        """Load the newest checkpoint that loads on every rank; None when there is none at all."""
        candidates = published(self.root)
        for path in candidates:
            state = self._try_load(path, parts, optimizers)
            if _all_ok(state is not None):
                log.info("resumed from %s", path)
                self.last_step = state["step"]
                return state
            log.warning("checkpoint %s is incomplete or corrupt; trying the previous one", path)
        if candidates:
            raise CheckpointError(f"no loadable checkpoint among {[p.name for p in candidates]} in {self.root}; "
                               f"move them away to start afresh")
        return None

    def last_published(self) -> Path | None:
        """The newest published checkpoint directory, if any."""
        done = published(self.root)
        return done[0] if done else None

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
            if not (path / ".metadata").is_file():
                raise FileNotFoundError(path / ".metadata")
            state = merged_state(parts, optimizers)
            dcp.load(state, checkpoint_id=str(path))
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
            log.warning("cannot load %s: %s: %s", path, type(e).__name__, str(e).splitlines()[0][:300])
            return None


def load_model_weights(source: Path, parts) -> Path:
    """Another run's model weights (expert-bias buffers included) into `parts`, under any layout: from the
    checkpoint directory `source`, or the newest loadable checkpoint of the run directory `source`. Nothing else
    (optimizer, step, data position) is read. CheckpointError when none loads, naming the first failure."""
    candidates = [source] if (source / ".metadata").is_file() else published(source / "checkpoints")
    errors = []
    for path in candidates:
        try:
            state = {"model": {k: v for part in parts for k, v in get_model_state_dict(part).items()}}
            dcp.load(state, checkpoint_id=str(path))
            for part in parts:
                set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
            ok = True
        except (Exception, CheckpointException) as e:  # noqa: BLE001 — as in Checkpointer._try_load
            errors.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            ok = False
        if _all_ok(ok):
            return path
        log.warning("cannot initialise from %s; trying the previous checkpoint", path)
    why = errors[0] if errors else f"{source} holds no checkpoint (give a run's output_dir or its checkpoints/step_N)"
    raise CheckpointError(f"checkpoint.init_from: no checkpoint there loads into this model ({why})")
