"""How `python -m train` and the run tools (train.export, train.sample, train.evaluate) report a bad input: one
line on stderr and an exit code, the same in every tool.

  exit 2  the command line is wrong: an unknown key, a value of the wrong type or out of range, a parallel
          layout the world cannot hold, a bad rank environment, an output_dir that cannot be created;
  exit 1  an input it names is missing or damaged (dataset, checkpoint, Hugging Face directory, tokenizer,
          prompt file), or the run cannot go on (a non-finite loss).
"""

from __future__ import annotations

import sys

CONFIG_EXIT = 2
INPUT_EXIT = 1


def report(e: BaseException, broad: bool = False, show: bool = True) -> int | None:
    """Print `e` as one line (when `show`) and return its exit code; None when `e` is not a reported input error
    (a bug: its traceback is worth more). `broad`: any ValueError or OSError is an input error too (the run tools,
    whose every failure past their arguments comes from the files they read)."""
    from parallel.dims import LayoutError

    from .checkpoint import CheckpointError
    from .config import ConfigError, one_line
    from .data.loader import DataError
    from .spike import TrainingError

    kinds = [((ConfigError, LayoutError), "config error", CONFIG_EXIT), (DataError, "data error", INPUT_EXIT),
             (CheckpointError, "checkpoint error", INPUT_EXIT), (TrainingError, "training error", INPUT_EXIT)]
    if broad:
        kinds.append(((ValueError, OSError), "error", INPUT_EXIT))
    for types, prefix, code in kinds:
        if isinstance(e, types):
            if show:
                print(f"{prefix}: {one_line(e)}", file=sys.stderr, flush=True)
            return code
    return None
