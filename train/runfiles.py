"""What the tools that read a finished run share (train.export, train.sample, train.evaluate): their
`key=value` command line, the run's checkpoint and configuration, its tokenizer, its model on one device."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from model import Transformer

from .checkpoint import CheckpointError, load_model_weights, select
from .config import ConfigError, RunConfig, build_config, build_section, parse_override
from .errors import report

log = logging.getLogger(__name__)


def parse_args(argv: list[str], section: type, name: str) -> tuple[Path, object, list[str]]:
    """`output_dir=<run> <name>.<field>=<value> ...` -> (output_dir, the section dataclass, other overrides).
    The values take the path of `python -m train`'s: Hydra's override grammar reads them (text fields keep the
    text as given: a prompt is not grammar), `build_section` checks their types and the section its ranges."""
    values, rest, out = {}, [], None
    hints = typing.get_type_hints(section)
    for arg in argv:
        key, eq, text = arg.partition("=")
        if not eq:
            raise ConfigError(f"expected key=value, got {arg!r}")
        if key == "output_dir":
            out = Path(text)
        elif key.startswith(name + "."):
            field = key[len(name) + 1:]
            values[field] = _read(arg, hints.get(field))
        else:
            rest.append(arg)
    if out is None:
        raise ConfigError("output_dir=<the run's output_dir> is required")
    return out, build_section(section, values, name + "."), rest


def _read(arg: str, tp) -> object:
    """The value of `key=value` for a field of type `tp`: for a text field (str, Optional[str]) the text as given
    (null: None where it is optional), for any other field what Hydra's override grammar reads."""
    text = arg.partition("=")[2]
    if tp is str:
        return text
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}:
        return None if text == "null" else text
    return parse_override(arg)[1]


def _field_type(cls: type, dotted: str):
    """The declared type of the field `dotted` ("data.path") of the dataclass `cls`; None if there is none."""
    tp = cls
    for name in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(name)
    return tp


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
        key = arg.partition("=")[0]
        value = _read(arg, _field_type(RunConfig, key))
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
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
    from .data.loader import DataError, read_index
    from .data.tokenizer import ByteTokenizer, HFTokenizer

    path = data or (Path(cfg.data.path) if cfg.data.path else builtin_dataset())
    name = read_index(path).get("tokenizer_file")  # the dataset's index names its tokenizer; null: bytes
    if name is None:
        return RunTokenizer(ByteTokenizer(), None)
    if not isinstance(name, str) or not (path / name).is_file():
        raise DataError(f"{path / 'index.json'} names tokenizer_file={name!r}, which is not a file in {path}")
    try:
        return RunTokenizer(HFTokenizer(path / name), path / name)
    except ValueError as e:  # the tokenizers library's error for a damaged file, named by HFTokenizer
        raise DataError(str(e)) from None


def main_guard(fn, argv: list[str] | None) -> int:
    """Run a tool; a bad input is one line on stderr with the exit code of train/errors.py."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    try:
        return fn(argv)
    except Exception as e:  # noqa: BLE001 — report() picks the input errors; anything else is re-raised
        code = report(e, broad=True)
        if code is None:
            raise
        return code
