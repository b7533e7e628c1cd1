"""What the tools that read a finished run share (train.export, train.sample, train.evaluate): their
`key=value` command line, the run's checkpoint and configuration, its tokenizer, its model on one device."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from model import Transformer

from .checkpoint import CheckpointError, load_model_weights, select
from .config import ConfigError, RunConfig, build_config, one_line

log = logging.getLogger(__name__)


def parse_args(argv: list[str], section: type, name: str) -> tuple[Path, object, list[str]]:
    """`output_dir=<run> <name>.<field>=<value> ...` -> (output_dir, the section dataclass, other overrides);
    values are read as JSON where they parse (numbers, true/false), else kept as strings."""
    values, rest, out = {}, [], None
    known = {f.name: f for f in fields(section)}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"expected key=value, got {arg!r}")
        if key == "output_dir":
            out = Path(value)
        elif key.startswith(name + "."):
            field = key[len(name) + 1:]
            if field not in known:
                raise ConfigError(f"unknown key {key}; known: {sorted(name + '.' + k for k in known)}")
            values[field] = _value(value, known[field].type)
        else:
            rest.append(arg)
    if out is None:
        raise ConfigError("output_dir=<the run's output_dir> is required")
    return out, section(**values), rest


def _value(text: str, tp) -> object:
    if "str" in str(tp) and "int" not in str(tp) and "float" not in str(tp) and "bool" not in str(tp):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def checkpoint_of(run: Path, step: int | None) -> Path:
    """The run's newest published checkpoint that verifies, or the one of `step` (train/checkpoint.py)."""
    return select(run / "checkpoints", step)


def run_config(ckpt: Path, overrides: list[str] = ()) -> RunConfig:
    """The resolved configuration the checkpoint was written with (`key=value` overrides applied)."""
    try:
        data = json.loads((ckpt / "train_state.json").read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt / 'train_state.json'}: unreadable ({type(e).__name__}: {e})") from None
    for arg in overrides:
        key, _, value = arg.partition("=")
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = _value(value, object)
    return build_config(data)


def load_model(ckpt: Path, cfg: RunConfig, device: torch.device) -> Transformer:
    """The checkpoint's model, whole, on one device, in eval mode."""
    model = Transformer(cfg.model)
    load_model_weights(ckpt, [model], check=False)  # checkpoint_of verified it
    return model.to(device).eval()


def run_data(cfg: RunConfig) -> list[Path]:
    """The data a run read: its dataset directory, or its Megatron corpora's .bin/.idx files."""
    from .data.builtin import builtin_dataset

    if cfg.data.format == "megatron":
        return [Path(prefix + ext) for prefix in cfg.data.prefixes for ext in (".bin", ".idx")]
    return [Path(cfg.data.path) if cfg.data.path else builtin_dataset()]


@dataclass
class RunTokenizer:
    """The tokenizer of the run's data: `decode`, `encode`, `eos_id`; `file` is its tokenizer.json (None: bytes)."""
    tok: object
    file: Path | None


def run_tokenizer(cfg: RunConfig, data: Path | None = None) -> RunTokenizer:
    """The tokenizer of the dataset `data` (default: the run's)."""
    from .data.builtin import builtin_dataset
    from .data.tokenizer import ByteTokenizer, HFTokenizer

    path = data or (Path(cfg.data.path) if cfg.data.path else builtin_dataset())
    try:
        index = json.loads((path / "index.json").read_text())
    except (OSError, ValueError):
        index = {}
    name = index.get("tokenizer_file")
    if name and (path / name).is_file():
        return RunTokenizer(HFTokenizer(path / name), path / name)
    return RunTokenizer(ByteTokenizer(), None)


def main_guard(fn, argv: list[str] | None) -> int:
    """Run a tool; a bad input is one line on stderr (exit 2 for configuration, 1 for files)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    from parallel.dims import LayoutError

    try:
        return fn(argv)
    except (ConfigError, LayoutError) as e:
        print(f"config error: {one_line(e)}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
