"""What a resumed run may change, and the record of what each part of a run ran with.

A resumed run compares its config with the one its checkpoint was written under. Fields that only say how the
run is carried out (its length, micro-batch size, logging, checkpoint cadence, validation, the parallel layout,
the launcher and cluster, spike handling) apply as given. Any other change (optimizer and schedule, batch, seed,
data, precision) stops the run with one line listing each changed field with both values and the override that
forces them; forced, they are applied for real from the resumed step on (the optimizer's hyperparameters and
the lr schedule are rebuilt from the new config, see `PartOptimizers.apply_config`). A changed model is refused
by the trainer's own check (a checkpoint of other shapes cannot load; another model continues a run through
`checkpoint.init_from`).

`config.yaml` is the config the run started with; each resume writes its own beside it,
`config.step_<N>.yaml` for a resume at step N, so every value recorded is one that ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError

# dotted prefixes of the fields a resume may change freely
FREE = ("output_dir", "train.steps", "train.micro_batch_size", "train.val_every", "train.peak_tflops",
        "train.spike.", "data.val_batches", "data.cache_dir", "log.", "checkpoint.", "parallel.", "launch.",
        "cluster.", "model.")  # model: the trainer's own check


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples compare as lists."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _free(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in FREE)


def changed_fields(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) of every guarded field that differs, in key order."""
    a, b = flatten(saved), flatten(now)
    keys = sorted(k for k in set(a) | set(b) if not _free(k))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def check_resume(saved: dict, now: dict, allowed: tuple, where: str, step: int) -> list[tuple[str, Any, Any]]:
    """The forced changes; ConfigError (one line) when a guarded field changed without being allowed (an entry
    of `allowed` names a field, or a section such as `precision`)."""
    changes = changed_fields(saved, now)
    refused = [c for c in changes if not any(c[0] == a or c[0].startswith(a + ".") for a in allowed)]
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigError(f"resuming {where} at step {step} with a changed config ({listed}); to train on with "
                          f"these values from step {step}, add checkpoint.allow_changes=[{keys}]; or resume with "
                          f"the values above, or use another output_dir")
    return changes


def record_config(out: Path, config: dict, resumed_step: int | None) -> Path:
    """config.yaml for a run that starts at step 0, config.step_<N>.yaml for a resume at step N."""
    name = "config.yaml" if not resumed_step else f"config.step_{resumed_step:08d}.yaml"
    path = out / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path
