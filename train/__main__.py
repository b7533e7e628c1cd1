"""`python -m train [hydra overrides]`: compose the config, validate it, train.

Plain overrides (`model=small train.steps=100 output_dir=runs/x`) compose through Hydra's compose API so
that any configuration mistake is one line on stderr and exit code 2, before anything heavy happens.
Hydra's own flags (`--multirun`/`-m`, `--cfg`, `--help`, `hydra/launcher=...` sweeps) go through
`@hydra.main`, which then calls the same `run`.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

from .config import CONF_DIR, compose_config, one_line, register_model_schema  # noqa: F401


def run(cfg) -> int:
    from pathlib import Path

    from .env import rank_env
    from .outdir import make_output_dir, remove_if_empty
    from .trainer import Trainer

    made = make_output_dir(Path(cfg.output_dir)) if rank_env(os.environ).rank == 0 else []
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.setup()
        return trainer.run()
    except BaseException:
        remove_if_empty(made)  # a run that failed on its data or init_from leaves no empty output_dir it made
        raise
    finally:
        if trainer is not None:
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


def check_layout(cfg, env) -> None:
    """The parallel layout against this job's world size (LayoutError, one line). A layout that fails once torchrun
    restarted the job held on its first world: the job re-formed on fewer hosts (launch.nodes=MIN:MAX), which the
    line says."""
    from parallel.dims import LayoutError

    from .config import validate_layout
    from .env import rank_env, ranks_per_host

    world = rank_env(env).world
    try:
        validate_layout(cfg, world, ranks_per_host=ranks_per_host(env))
    except LayoutError as e:
        if int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            raise
        hosts = env.get("GROUP_WORLD_SIZE", "?")
        raise LayoutError(f"the job re-formed on {hosts} host(s), {world} rank(s), after losing some, and its layout "
                          f"cannot shrink to them: {one_line(e)}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if any(a.startswith("-") or a.startswith("hydra/") for a in argv):
        return _hydra_main(argv)
    from .env import reports_for_job
    from .errors import INPUT_EXIT, report

    try:  # what every rank finds alike, before any process group: printed once, by rank 0 (README "torchrun")
        cfg = compose_config(argv)
        check_layout(cfg, os.environ)
    except ValueError as e:
        code = report(e, show=reports_for_job(os.environ))
        if code is None:
            raise
        return code
    from .checkpoint import SaveError
    from .watch import CollectiveFailure

    try:
        return run(cfg)
    except CollectiveFailure:  # one rank has printed the report (train/watch.py); the others stop quietly
        return INPUT_EXIT
    except Exception as e:  # noqa: BLE001 — report() picks the input errors; anything else is re-raised
        code = report(e, show=not isinstance(e, SaveError) or reports_for_job(os.environ))
        if code is None:
            raise
        return code


if __name__ == "__main__":
    # a rank killed by a native fault (SIGSEGV, SIGABRT, ...) prints every thread's Python stack on stderr first
    faulthandler.enable(all_threads=True)
    sys.exit(main())
