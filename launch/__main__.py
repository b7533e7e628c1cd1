"""`python -m launch [train overrides] launch=<local|torchrun|slurm> launch.<key>=...`: print the exact
command of a run, then run it (`launch.dry_run=true`: print only).

  local     torchrun --standalone on this node (plain `python -m train` for one process without restarts)
  torchrun  one node of a multi-node job: run the same command on every node; they rendezvous (c10d) at
            launch.master_addr:launch.master_port
  slurm     renders <output_dir>/slurm/<job_name>.sbatch (srun torchrun on every node, rendezvous on the
            job's first node, requeue on the time-limit warning) and submits it with sbatch

The whole configuration is composed and checked first: a mistake is one line and exit code 2.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from parallel.dims import LayoutError
from train.config import ConfigError, compose_config, one_line, validate_layout

from .slurm import render_sbatch, torchrun_args


def command(cfg, overrides: list[str]) -> tuple[list[str], str | None]:
    """(argv to run, sbatch script text or None). Train overrides pass through unchanged, launch.* dropped."""
    launch = cfg.launch
    train_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("launch", "output_dir="))]
    train_overrides.append(f"output_dir={Path(cfg.output_dir).resolve()}")  # the same run from any directory
    if launch.mode == "slurm":
        script = render_sbatch(launch, train_overrides, str(Path(cfg.output_dir).resolve()))
        path = Path(cfg.output_dir) / "slurm" / f"{launch.job_name}.sbatch"
        return ["sbatch", str(path)], script
    if launch.mode == "local" and launch.max_nodes * launch.procs_per_node == 1 and not launch.max_restarts:
        return [sys.executable, "-m", "train", *train_overrides], None
    endpoint = f"{launch.master_addr}:{launch.master_port}"
    return [sys.executable, *torchrun_args(launch, endpoint, launch.job_name), "-m", "train", *train_overrides], None


def main(argv: list[str]) -> int:
    try:  # the layout against the processes the launch starts, before any of them starts
        cfg = compose_config(argv)
        world = f"launch.nodes={cfg.launch.nodes} x launch.procs_per_node={cfg.launch.procs_per_node}"
        validate_layout(cfg, cfg.launch.max_nodes * cfg.launch.procs_per_node,
                        ranks_per_host=cfg.launch.procs_per_node)
    except ConfigError as e:
        print(f"config error: {one_line(e)}", file=sys.stderr)
        return 2
    except LayoutError as e:
        print(f"config error: {one_line(e)} (world: {world})", file=sys.stderr)
        return 2
    argv_run, script = command(cfg, argv)
    if script is not None:
        path = Path(argv_run[-1])
        if not cfg.launch.dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(script)
        print(script if cfg.launch.dry_run else f"wrote {path}")
    print(shlex.join(argv_run), flush=True)
    if cfg.launch.dry_run:
        return 0
    env = {**os.environ, **{k: str(v) for k, v in cfg.launch.env.items()}}
    try:
        return subprocess.call(argv_run, env=env)
    except FileNotFoundError:
        print(f"launch error: {argv_run[0]} not found on PATH (launch={cfg.launch.mode} needs it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
