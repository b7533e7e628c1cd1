"""The directories a tool may write or replace. A tool that writes a directory (train.export, train.data.prepare)
asks `unsafe_target` first and refuses, whatever its overwrite option says, a target that is, contains or lies
inside anything it reads, or any directory that holds checkpoints: replacing such a target would delete the
very run or data it works from. Nothing here imports torch, so a refusal comes before any slow import.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "checksums.json"  # written last into every published checkpoint (train/checkpoint.py)


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint directory itself (DCP's .metadata or our checksums), rather than a run's output_dir."""
    return (path / ".metadata").is_file() or (path / MANIFEST).is_file()


def _relation(dest: Path, other: Path) -> str | None:
    """How `dest` relates to `other` (both resolved): "is", "contains", "lies inside", or None."""
    if dest == other:
        return "is"
    if dest in other.parents:
        return "contains"
    if other in dest.parents:
        return "lies inside"
    return None


def _is_checkpoints_root(path: Path) -> bool:
    """A run's checkpoints/ directory: it holds step_N (or step_N.tmp) directories."""
    return path.name == "checkpoints" and any(p.name.startswith("step_") for p in path.iterdir() if p.is_dir())


def _checkpoints_under(root: Path) -> Path | None:
    """The first checkpoint directory at or below `root` (a walk that stops there), else None."""
    if not root.is_dir():
        return None
    for here, dirs, _ in os.walk(root):
        if is_checkpoint_dir(Path(here)):
            return Path(here)
        dirs.sort()
    return None


def unsafe_target(dest: Path, reads: list[Path]) -> str | None:
    """Why the tool must not write or replace `dest`, as the end of a sentence that begins with the option
    naming it ("export.dir=<dest> ..."); None when it may. `reads`: the files and directories the tool reads."""
    target = dest.resolve()
    for source in reads:
        relation = _relation(target, source.resolve())
        if relation is not None:
            return f"{relation} {source}, which this tool reads"
    found = _checkpoints_under(target)
    if found is not None:
        return f"{'is' if found == target else 'contains'} the checkpoint directory {found}"
    for parent in target.parents:
        if is_checkpoint_dir(parent) or _is_checkpoints_root(parent):
            return f"lies inside {parent}, which holds checkpoints"
    return None
