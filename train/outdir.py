"""A run's `output_dir`: made before any work, with one config-error line when it cannot be, and removed again
when the run that made it fails before writing anything into it. Only directories this run made are removed,
and only while empty: files are never deleted."""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError


def make_output_dir(out: Path) -> list[Path]:
    """Make `out` and its missing parents; the directories this made, outermost first. ConfigError (one line)
    when a path on the way is a file, or `out` cannot be made or written."""
    made = [p for p in (out, *out.parents) if not os.path.lexists(p)][::-1]
    blocker = next((p for p in (out, *out.parents) if os.path.lexists(p) and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"output_dir={out}: {blocker} exists and is not a directory; name a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir={out} cannot be made: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={out} is not writable by this user")
    return made


def remove_if_empty(made: list[Path]) -> None:
    """After a failed run: the directories of `made` (from make_output_dir) that are empty, innermost first, and
    the empty directories under the innermost one (all of them this run's). Stops at the first that is not empty."""
    if not made:
        return
    for root, _, _ in os.walk(made[-1], topdown=False):  # innermost first; the innermost made directory last
        _rmdir(Path(root))
    for path in reversed(made[:-1]):
        if not _rmdir(path):
            return


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except OSError:  # not empty (or already gone): kept
        return not path.exists()
    return True
