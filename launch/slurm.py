"""SLURM: the torch.distributed environment of a task started by `srun` (without torchrun), and the sbatch
script of a run (rendered from the `launch` config group)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# torchrun forwards these to its workers; SIGUSR1 is SLURM's "time limit near" warning (see the sbatch script)
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_args(launch, endpoint: str, run_id: str) -> list[str]:
    """torchrun's arguments for `launch.nodes` nodes (N, or an elastic MIN:MAX) rendezvousing at `endpoint` (c10d)."""
    if launch.mode == "local":  # one node (the config checks it)
        where = ["--standalone"]
    else:
        where = [f"--nnodes={launch.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                 f"--rdzv-id={run_id}"]
        if launch.rdzv_conf:
            where.append("--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in launch.rdzv_conf.items()))
    # launch.torchrun: torchrun, but a configuration error (exit 2) ends the job with only rank 0's line
    # a failed worker restarts all of them up to launch.max_restarts times; they resume from the newest checkpoint
    return ["-m", "launch.torchrun", f"--nproc-per-node={launch.procs_per_node}", *where,
            f"--max-restarts={launch.max_restarts}", f"--signals-to-handle={FORWARDED_SIGNALS}",
            f"--shutdown-timeout={launch.shutdown_timeout_s}"]


def render_sbatch(launch, train_overrides: list[str], output_dir: str, python: str = sys.executable) -> str:
    """The batch script: one `srun` task per node running torchrun, rendezvous on the job's first node.
    `--signal=B:USR1@s` warns the batch shell s seconds before the time limit; it passes SIGUSR1 to srun,
    srun to torchrun, torchrun to every worker; the workers agree on a step, checkpoint and exit 0, and the
    script requeues the job, which resumes from that checkpoint with the same command."""
    head = ["#!/bin/bash", f"#SBATCH --job-name={launch.job_name}", f"#SBATCH --nodes={launch.max_nodes}",
            "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={launch.procs_per_node}",
            f"#SBATCH --time={launch.time}", f"#SBATCH --output={output_dir}/slurm/%x-%j.out", "#SBATCH --requeue",
            f"#SBATCH --signal=B:USR1@{launch.signal_before_end_s}"]
    head += [f"#SBATCH --{k}={v}" for k, v in (("partition", launch.partition), ("account", launch.account)) if v]
    head += [f"#SBATCH {extra}" for extra in launch.sbatch_extra]
    exports = [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(launch.env.items())]
    port = launch.master_port
    cmd = shlex.join([python, *torchrun_args(launch, "__HEAD__", "__JOB__"), "-m", "train", *train_overrides])
    cmd = cmd.replace("__HEAD__", f'"$HEAD":{port}').replace("__JOB__", '"$SLURM_JOB_ID"')
    # a fixed node count ends the job when one task fails; an elastic range lets the others re-form without it
    kill = "--kill-on-bad-exit=1 " if launch.node_range[0] == launch.max_nodes else ""
    body = f"""
cd {shlex.quote(str(REPO))}
{chr(10).join(exports)}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PREEMPTED=0
warn() {{
    echo "time limit near: SIGUSR1 to the training processes (checkpoint, then requeue)"
    PREEMPTED=1
    kill -USR1 "$SRUN_PID" 2>/dev/null
}}
trap warn USR1
echo "rendezvous on $HEAD:{port}, {launch.nodes} node(s) x {launch.procs_per_node} process(es)"
srun {kill}{cmd} &
SRUN_PID=$!
STATUS=0
while kill -0 "$SRUN_PID" 2>/dev/null; do  # a trapped signal interrupts wait: wait again
    wait "$SRUN_PID"; STATUS=$?
done
if [ "$PREEMPTED" = 1 ]; then
    echo "checkpoint written; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0  # torchrun reports the forwarded signal as a failure; the checkpoint is what counts
fi
exit $STATUS
"""
    return "\n".join(head) + "\n" + body
