"""Shared test fixtures and helpers: the small real-text dataset, runs of the real entry point (`python -m train`,
one process or torchrun) and their metrics, reference runs computed once per session, the gloo multi-process
harness (run_ranks), a cluster of network namespaces (local_cluster), the tiny model, a fixed batch, the loss and
the tolerance helpers of in-process model tests, a free port for launcher tests, and the collection order (slowest
tests first)."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock

from model import ModelConfig, Transformer, load_preset

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def corpus_files(directory: Path) -> Path:
    """About 110 KB of real text: standard-library sources, so editing this package never changes the data
    (the layout tests compare runs at tolerances an edited corpus can cross)."""
    directory.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [stdlib / f"{name}.py" for name in ("bisect", "csv", "shlex", "string", "textwrap")]
    sources += sorted((stdlib / "json").glob("*.py"))
    for i, src in enumerate(sources):
        shutil.copy(src, directory / f"doc{i:03d}.txt")
    return directory


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A directory of this session that every pytest-xdist worker sees (its own base directory without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@pytest.fixture(scope="session")
def dataset(shared_dir) -> Path:
    """The shards, prepared once per session by whichever worker asks first (the others wait on its lock)."""
    base = shared_dir / "data"
    out = base / "shards"
    with FileLock(f"{base}.lock"):
        if not (base / "done").exists():
            shutil.rmtree(base, ignore_errors=True)  # what a failed attempt left
            subprocess.run([PY, "-m", "train.data.prepare", "--input", str(corpus_files(base / "corpus")),
                            "--output", str(out), "--chunk-len", "129", "--samples-per-shard", "64",
                            "--val-fraction", "0.05"], cwd=ROOT, check=True, capture_output=True)
            (base / "done").touch()
    return out


def base_args(dataset: Path, out: Path, steps: int, **extra) -> list[str]:
    args = {"model": "tiny", "data.path": str(dataset), "data.seq_len": 64, "train.steps": steps,
            "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.val_every": 0, "log.every": 1,
            "checkpoint.every": 0, "output_dir": str(out), "optim.warmup_steps": 2,
            # a fixed MFU denominator: without it every run first times CPU GEMMs (test_train.py's default run
            # still does)
            "train.peak_tflops": 1.0}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def train_command(args, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "train", *args]
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "train", *args]


def train(args, nproc: int = 1, env_extra=None, check=True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(train_command(args, nproc), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"rc={proc.returncode}\nstdout: {proc.stdout[-1000:]}\nstderr: {stderr_tail(proc.stderr)}")
    return proc


def stderr_tail(stderr: str, size: int = 6000) -> str:
    """The end of a failed run's stderr, and first the stacks faulthandler printed for a rank's native crash (they
    come before torchrun's own report, which would push them out of the end)."""
    crash = stderr.find("Fatal Python error")
    if crash < 0 or crash >= len(stderr) - size:
        return stderr[-size:]
    return f"{stderr[crash:crash + size // 2]}\n[...]\n{stderr[-size // 2:]}"


def logged_steps(out: Path) -> list[int]:
    """The steps metrics.jsonl holds now (a run still writing it: complete lines only)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.split("\n")[:-1] if line]


def train_killed(args, nproc: int, out: Path, after_step: int, checkpoint: int | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `train(args, nproc)` and SIGKILL every process of it from outside, as a lost node loses them: as soon as
    metrics.jsonl (under `out`, written at each logged step) holds `after_step` and, where given, the checkpoint
    of step `checkpoint` is published. Fails the test when the run ends by itself first."""
    logs = out.parent / f"{out.name}.killed.log"
    with open(logs, "w") as log:
        proc = subprocess.Popen(train_command(args, nproc), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=log)
        deadline, late = time.monotonic() + timeout, False
        ckpt = None if checkpoint is None else out / "checkpoints" / f"step_{checkpoint:08d}"
        while proc.poll() is None:
            late = time.monotonic() > deadline
            if late or (after_step in logged_steps(out) and (ckpt is None or ckpt.exists())):
                _kill_tree(proc.pid)
                break
            time.sleep(0.005)
        proc.wait()
    stderr = logs.read_text()
    assert not late, f"the run did not reach step {after_step} within {timeout} s\n{stderr[-3000:]}"
    assert proc.returncode == -signal.SIGKILL, f"the run ended (rc={proc.returncode}) before the kill\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it, all at once (torchrun starts each worker in a session of its
    own, so a process group would miss them)."""
    import psutil  # deepspeed's dependency

    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def newest_checkpoint(out: Path) -> int:
    """The step of the newest checkpoint published under `out`."""
    from train.checkpoint import PREFIX, published

    return int(published(out / "checkpoints")[0].name.removeprefix(PREFIX))


def metrics(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def free_port() -> int:
    """A TCP port nothing listens on now (for a multi-process test's MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def reference_run(dataset, shared_dir):
    """`reference_run(steps, nproc=1, **overrides)`: the output directory of `train(base_args(dataset, <dir>, steps,
    **overrides), nproc)`, run once per session for each distinct set of arguments, by whichever pytest-xdist
    worker asks first (the others wait on its file lock). Tests read it and never write into it."""
    root = shared_dir / "references"
    root.mkdir(exist_ok=True)

    def run(steps: int, nproc: int = 1, **overrides) -> Path:
        key = json.dumps([steps, nproc, sorted((k, str(v)) for k, v in overrides.items())])
        out = root / hashlib.sha1(key.encode()).hexdigest()[:16]
        with FileLock(f"{out}.lock"):
            if not (out / "done").exists():
                shutil.rmtree(out, ignore_errors=True)  # what a failed attempt left
                train(base_args(dataset, out, steps, **overrides), nproc)
                (out / "done").write_text(key)
        return out

    return run


@pytest.fixture
def local_cluster():
    """`local_cluster(hosts, rate=None)`: a LocalCluster (launch/localcluster.py) of network namespaces, torn down
    when the test ends, however it ends. Skips, saying why, where namespaces cannot be made."""
    from launch.localcluster import LocalCluster, namespaces_problem

    problem = namespaces_problem()
    if problem:
        pytest.skip(f"no local cluster: {problem}")
    made = []

    def make(hosts: int, rate: str | None = None) -> LocalCluster:
        made.append(LocalCluster(hosts, rate))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()


def run_ranks(fn, world: int, tmp: Path, *args, timeout: float = 240) -> list:
    """`fn(rank, world, *args)` on `world` spawned processes joined in one gloo group (a file store under `tmp`,
    so no port is shared with other tests): each rank's return value, by rank. A rank's exception fails the test
    with its traceback; a run past `timeout` seconds is killed and fails it."""
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_rank_main, args=(fn, world, str(tmp), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{fn.__name__} on {world} ranks ran past {timeout} s")
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _rank_main(rank: int, fn, world: int, tmp: str, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(fn(rank, world, *args), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ in-process model helpers
def tiny(**changes) -> ModelConfig:
    """The `tiny` preset with `changes`."""
    return load_preset("tiny").replace(**changes)


def tiny_model(cfg: ModelConfig | None = None, seed: int = 0) -> Transformer:
    """A model of `cfg` (default: the `tiny` preset) with `init_weights(seed)`: the same weights in every process."""
    model = Transformer(cfg or tiny())
    model.init_weights(seed=seed)
    return model


def counted_training_flops(model: Transformer, tokens: torch.Tensor) -> int:
    """The FLOPs torch's counter sees in one forward and backward of `model` on `tokens` (cross-entropy against the
    tokens themselves). The math SDPA backend runs as counted matmuls (the CPU flash kernel has no flop formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    return fc.get_total_flops()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance |a - b| / |b|."""
    return float((a - b).detach().norm() / b.detach().norm())


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """torch.testing.assert_close, its message naming `what`."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def fixed_batch(vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of `batch` random sequences of `seq` tokens, the same on every rank and in every test."""
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T, V) batch, computed in fp32."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def full(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor (a collective for DTensors: every rank must call it)."""
    return t.full_tensor().detach().clone() if hasattr(t, "full_tensor") else t.detach().clone()


# The tests that ran longest on 2 cores (20 to 150 s each), longest first. pytest-xdist's worksteal hands each
# worker a contiguous share of the collection and moves tests from the end of the fullest queue, so collecting
# these first starts them early instead of leaving one to finish alone at the end.
SLOWEST_FIRST = (
    "test_gpu_check.py::test_gpu_check_rehearsal",
    "test_fp8.py::test_fp8_recipes_train_like_bf16",
    "test_parallel_layouts.py::test_layout_equals_single_process[ep2_compiled]",
    "test_parallel_layouts.py::test_layout_equals_single_process[tp2_compiled]",
    "test_cpu_adam.py::test_offload_trains_like_one_process_and_resumes",
    "test_train.py::test_default_run_learns_well_below_unigram_entropy",
    "test_megatron_data.py::test_sigkill_and_resume_on_a_blend_is_bit_exact",
    "test_resume_guard.py::test_poisoned_batch_is_rolled_back_and_skipped",
    "test_fp8_layouts.py::test_bf16_gemm_emulation_under_tp_with_torchao_fp8",
    "test_fp8_layouts.py::test_fp8_bf16_moments_resume_under_ep2_is_exact",
    "test_parallel_layouts.py::test_resume_under_a_different_layout",
    "test_launch.py::test_time_limit_signal_checkpoints_requeues_and_resumes",
    "test_multihost.py::test_experts_on_two_hosts_survive_a_killed_worker",
    "test_multihost.py::test_sbatch_script_on_two_hosts_is_preempted_requeued_and_resumed",
    "test_multihost.py::test_a_paused_host_ends_the_job_with_one_line",
    "test_launch.py::test_dry_run_builds_what_real_ranks_hold",
    "test_train.py::test_sigkill_and_resume_is_bit_exact",
    "test_parallel_layouts.py::test_resume_from_context_parallel_in_one_process",
    "test_fp8_layouts.py::test_fp8_layout_equals_single_process",
    "test_fp8_layouts.py::test_fp8_all_gather_equals_gathering_then_casting",
    "test_recipe_runs.py::test_killed_mid_ramp_resumes_bit_exact_under_pipelining",
    "test_parallel_tp.py::test_tp_matches_single_process",
    "test_launch.py::test_two_nodes_on_one_machine_equal_one_node",
    "test_launch.py::test_srun_tasks_train_like_torchrun",
)


def pytest_collection_modifyitems(config, items):
    """The files of SLOWEST_FIRST's tests first, in its order, and in each file its listed tests first; every
    file's tests stay together, so a module-scoped fixture is built once per worker."""
    def rank(item) -> int:
        name = item.nodeid.rpartition("/")[2]
        return next((i for i, slow in enumerate(SLOWEST_FIRST) if name.startswith(slow)), len(SLOWEST_FIRST))

    file_rank = {}
    for item in items:
        file_rank[item.path] = min(file_rank.get(item.path, len(SLOWEST_FIRST)), rank(item))
    items.sort(key=lambda item: (file_rank[item.path], rank(item)))
