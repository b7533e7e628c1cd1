"""`python -m train [hydra overrides]`: compose the config, validate it, train.

Plain overrides (`model=small train.steps=100 output_dir=runs/x`) compose through Hydra's compose API so
that any configuration mistake is one line on stderr and exit code 2, before anything heavy happens.
Hydra's own flags (`--multirun`/`-m`, `--cfg`, `--help`, `hydra/launcher=...` sweeps) go through
`@hydra.main`, which then calls the same `run`.
"""

from __future__ import annotations

import logging
import sys

from .config import CONF_DIR, compose_config, one_line, register_model_schema  # noqa: F401


def run(cfg) -> int:
    from .trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()


def _hydra_main(argv: list[str]) -> int:
    import hydra
    from omegaconf import OmegaConf

    from .config import build_config

    register_model_schema()

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def entry(composed) -> int:
        return run(build_config(OmegaConf.to_container(composed, resolve=True)))

    sys.argv = [sys.argv[0]] + argv
    entry()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if any(a.startswith("-") or a.startswith("hydra/") for a in argv):
        return _hydra_main(argv)
    from .config import ConfigError

    from parallel.dims import LayoutError

    from .checkpoint import CheckpointError
    from .data.loader import DataError
    from .spike import TrainingError
    from .watch import CollectiveFailure

    try:
        cfg = compose_config(argv)
        return run(cfg)
    except (ConfigError, LayoutError) as e:
        print(f"config error: {one_line(e)}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {one_line(e)}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"checkpoint error: {one_line(e)}", file=sys.stderr)
        return 1
    except TrainingError as e:
        print(f"training error: {one_line(e)}", file=sys.stderr)
        return 1
    except CollectiveFailure:  # one rank has printed the report (train/watch.py); the others stop quietly
        return 1


if __name__ == "__main__":
    sys.exit(main())
