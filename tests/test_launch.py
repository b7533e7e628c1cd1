"""Launching (launch/): SLURM variables -> ranks, the rendered sbatch script, multi-node torchrun, and
preemption: SIGUSR1 -> one coordinated checkpoint -> requeue -> the resumed run equals an uninterrupted one."""

import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from train.env import first_host, torch_env_from_slurm
from conftest import PY, ROOT, base_args, free_port, metrics, stderr_tail, train



def launch(*args: str, env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([PY, "-m", "launch", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


# ------------------------------------------------------------------------------------------ SLURM variables
def test_first_host_of_a_nodelist():
    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("node7,node8") == "node7"
    assert first_host("h100-a-12") == "h100-a-12"


def test_ranks_from_slurm_variables():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "4242"}
    assert torch_env_from_slurm(env) == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5",
                                         "MASTER_ADDR": "gpu07", "MASTER_PORT": str(29500 + 242)}
    assert torch_env_from_slurm({**env, "RANK": "0"}) == {}  # torchrun already set it
    assert torch_env_from_slurm({**env, "SLURM_NTASKS": "1"}) == {}  # one task: nothing to set up
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        torch_env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})


def test_srun_tasks_train_like_torchrun(dataset, reference_run, tmp_path):
    """Two tasks started as `srun python -m train` would start them (only SLURM_* set): the same run as
    torchrun with two processes."""
    ref, got = reference_run(3, 2), tmp_path / "srun"
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    procs = [subprocess.Popen([PY, "-m", "train", *base_args(dataset, got, 3)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(r), "SLURM_NTASKS": "2",
                                   "SLURM_LOCALID": str(r), "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port})
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert metrics(got) == metrics(ref)
    assert metrics(got, "grad_norm") == metrics(ref, "grad_norm")


# ------------------------------------------------------------------------------------------ commands
def test_dry_run_prints_a_valid_sbatch_script(tmp_path):
    out = tmp_path / "run"
    proc = launch("launch=slurm", "launch.dry_run=true", "launch.nodes=4", "launch.partition=h800",
                  "launch.account=proj", "launch.time=12:00:00", "model=small", "train.global_batch_size=256",
                  f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    script, _, cmd = proc.stdout.rstrip().rpartition("\n")
    assert cmd == f"sbatch {out}/slurm/dsv2.sbatch"
    assert not out.exists(), "a dry run writes nothing"
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=h800",
                 "#SBATCH --account=proj", "#SBATCH --time=12:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1"):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert ("-m launch.torchrun --nproc-per-node=8 --nnodes=4 --rdzv-backend=c10d "
            '--rdzv-endpoint="$HEAD":29500 --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 '
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1") in srun
    assert srun.endswith(f"-m train model=small train.global_batch_size=256 output_dir={out} &")


def test_launch_config_errors_exit_2():
    proc = launch("launch=local", "launch.nodes=2", "launch.dry_run=true")
    assert proc.returncode == 2 and "launch.nodes=2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_an_elastic_node_range_reaches_torchrun_and_bad_ones_are_one_line():
    from launch.__main__ import command
    from train.config import ConfigError, compose_config

    cfg = compose_config(["launch=torchrun", "launch.nodes=2:4", "launch.max_restarts=1", "launch.procs_per_node=8",
                          "++launch.rdzv_conf.last_call_timeout=5", "parallel.ep=8"])
    assert cfg.launch.node_range == (2, 4) and cfg.launch.max_nodes == 4
    argv = command(cfg, [])[0]
    assert "--nnodes=2:4" in argv and "--rdzv-conf=last_call_timeout=5" in argv and "--max-restarts=1" in argv
    for nodes, restarts, error in [("2:1", 1, "1 <= MIN <= MAX"), ("1:x", 1, "an elastic range MIN:MAX"),
                                   ("1:2", 0, "set launch.max_restarts >= 1")]:
        with pytest.raises(ConfigError, match=re.escape(error)):
            compose_config(["launch=torchrun", f"launch.nodes={nodes}", f"launch.max_restarts={restarts}"])


def test_two_nodes_on_one_machine_equal_one_node(dataset, reference_run, tmp_path):
    """Two `launch=torchrun` launches (nnodes 2, c10d rendezvous on localhost), one process each: the same
    losses as one node with two processes."""
    ref, got = reference_run(3, 2), tmp_path / "two_nodes"
    port = str(free_port())
    args = [*base_args(dataset, got, 3), "launch=torchrun", "launch.nodes=2", "launch.procs_per_node=1",
            f"launch.master_port={port}", "launch.job_name=two_nodes"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([PY, "-m", "launch", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-2000:]
        assert "--nnodes=2 --rdzv-backend=c10d" in out.splitlines()[0]  # the exact command, printed first
    assert metrics(got) == metrics(ref)


def test_submitit_sweep_runs_each_job_like_a_direct_run(dataset, tmp_path):
    """`python -m train -m hydra/launcher=submitit_local ...`: a two-point lr sweep through submitit (the local
    twin of submitit_slurm); each job equals the same run started directly."""
    sweep = tmp_path / "sweep"
    args = [a for a in base_args(dataset, tmp_path, 2) if not a.startswith("output_dir=")]
    proc = subprocess.run([PY, "-m", "train", "-m", "hydra/launcher=submitit_local", *args,
                           f"output_dir={sweep}/lr${{optim.lr}}", "optim.lr=0.001,0.004",
                           f"hydra.sweep.dir={sweep}/hydra"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    direct = tmp_path / "direct"
    train(base_args(dataset, direct, 2, **{"optim.lr": 0.004}))
    assert metrics(sweep / "lr0.004") == metrics(direct)
    assert metrics(sweep / "lr0.001")[2] != metrics(direct)[2]


def test_submitit_slurm_launcher_composes():
    proc = subprocess.run([PY, "-m", "train", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=h800",
                           "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=8", "--cfg", "hydra"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in proc.stdout
    assert "partition: h800" in proc.stdout and "tasks_per_node: 8" in proc.stdout


# ------------------------------------------------------------------------------------------ dry run
HOLDS = re.compile(r"rank (\d+) holds parameters (\{.*?\})")


def dry_run(*args: str) -> dict[int, dict]:
    proc = subprocess.run([PY, "-m", "launch.dryrun", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {int(r): json.loads(c) for r, c in HOLDS.findall(proc.stdout)}


def test_dry_run_builds_what_real_ranks_hold(dataset, tmp_path):
    """Fake process group + meta device on one process: per-rank parameters by mesh axis equal what each of
    four real gloo ranks (pp=2 x ep=2) holds."""
    layout = ["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1"]
    proc = train(base_args(dataset, tmp_path / "real", 1) + layout, 4)
    real = {int(r): json.loads(c) for r, c in HOLDS.findall(proc.stderr)}
    assert sorted(real) == [0, 1, 2, 3]
    assert dry_run("--ranks=0,1,2,3", "model=tiny", *layout, "launch=slurm", "launch.nodes=1",
                   "launch.procs_per_node=4") == real
    assert set(real[0]) == {"dense:dp_shard", "experts:efsdp+ep"}


def test_dry_run_of_deepseek_v2_on_2048_ranks():
    """DeepSeek-V2 (60 layers, 160 experts of 5120 x 1536) with pp=16, ep=8 on 2,048 ranks: a stage-1 rank
    holds 4 MoE layers; per layer its ep rank owns 20 experts, split over 16 efsdp ranks in chunks of 2
    (torch.chunk), so it holds 4 x 2 experts x 3 x 5120 x 1536 parameters."""
    held = dry_run("--ranks=128", "model=deepseek_v2", "parallel.pp=16", "parallel.ep=8", "launch=slurm",
                   "launch.nodes=256", "launch.procs_per_node=8")[128]
    assert held["experts:efsdp+ep"] == 4 * 2 * 3 * 5120 * 1536


# ------------------------------------------------------------------------------------------ preemption
def _shims(bin_dir: Path, requeued: Path) -> None:
    """Stand-ins for srun (runs the command in place, so signals reach torchrun) and scontrol."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" >> {requeued}; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)


def test_time_limit_signal_checkpoints_requeues_and_resumes(dataset, tmp_path):
    """The rendered batch script, 2 processes: SIGUSR1 to the batch shell (SLURM's --signal=B:USR1) ->
    every rank checkpoints at one step and exits 0 -> the script requeues the job -> running the same script
    again resumes, and the losses equal an uninterrupted run."""
    steps = 30
    out, straight = tmp_path / "run", tmp_path / "straight"
    requeued, bin_dir = tmp_path / "requeued", tmp_path / "bin"
    _shims(bin_dir, requeued)
    args = [*base_args(dataset, out, steps), "launch=slurm", "launch.nodes=1", "launch.procs_per_node=2",
            f"launch.master_port={free_port()}", "launch.env={OMP_NUM_THREADS: 1}"]
    submit = launch(*args)  # no SLURM here: the script is written, sbatch is missing, we run it by hand
    assert submit.returncode == 2 and "sbatch not found on PATH" in submit.stderr
    script = out / "slurm" / "dsv2.sbatch"
    assert script.exists()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "localhost"}
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (
            (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr_tail(stderr)
    assert requeued.read_text().split() == ["requeue", "77"]
    saved = [int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and 3 <= saved[0] < steps and max(metrics(out)) == saved[0]
    again = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, stderr_tail(again.stderr)
    assert requeued.read_text().split() == ["requeue", "77"], "a run that finishes is not requeued"
    train(base_args(dataset, straight, steps), 2)
    assert metrics(out) == metrics(straight)
