"""parallel.cpu_offload: DeepSpeedCPUAdam (OffloadAdamW) updates like torch's AdamW, keeps its state layout (a run
resumes with offload on or off), resumes bit-exact, and trains under FSDP2 offload like one process."""

import shutil

import pytest
import torch

from train.config import OptimConfig
from train.optim import build_optimizer, build_scheduler

pytest.importorskip("deepspeed")
from train.cpu_adam import OffloadAdamW, cpu_adam_problem  # noqa: E402

if cpu_adam_problem():
    pytest.skip(f"DeepSpeed's CPU Adam kernel does not build here: {cpu_adam_problem()}", allow_module_level=True)

CFG = OptimConfig(lr=2e-2, betas=(0.85, 0.97), eps=1e-6, weight_decay=0.1, warmup_steps=2)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(11, 7), torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))


def _run(model, opt, steps: int, start: int = 0) -> None:
    sched = build_scheduler(opt, CFG, 10)
    for _ in range(start):
        sched.step()
    for step in range(start, start + steps):
        torch.manual_seed(100 + step)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * (1 + step)
        opt.step()
        sched.step()


def test_updates_equal_torch_adamw_over_5_steps():
    ref, got = _model(0), _model(0)
    _run(ref, build_optimizer(ref, CFG), 5)  # torch's fused AdamW
    opt = build_optimizer(got, CFG, cpu_adam=True)
    assert isinstance(opt, OffloadAdamW)
    _run(got, opt, 5)
    start = dict(_model(0).named_parameters())
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        assert not torch.equal(a, start[name]), name
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
@pytest.mark.parametrize("offload_first", [True, False])
def test_state_dicts_interchange_with_torch_adamw(offload_first):
    """3 steps with one optimizer, its state dict loaded into the other, 2 more: equals 5 steps of torch's AdamW."""
    ref, got = _model(1), _model(1)
    _run(ref, build_optimizer(ref, CFG), 5)
    first = build_optimizer(got, CFG, cpu_adam=offload_first)
    _run(got, first, 3)
    second = build_optimizer(got, CFG, cpu_adam=not offload_first)
    second.load_state_dict(first.state_dict())
    assert second.param_groups[0]["weight_decay"] == pytest.approx(0.1)
    assert set(second.param_groups[0]) == set(first.param_groups[0])
    _run(got, second, 2, start=3)
    for a, b in zip(ref.parameters(), got.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ runs
from test_parallel_layouts import BALANCE, assert_same_run  # noqa: E402
from conftest import base_args, metrics, train, train_killed  # noqa: E402

OFFLOAD = {**BALANCE, "train.micro_batch_size": 1, "parallel.cpu_offload": "true", "checkpoint.every": 2}


def test_offload_trains_like_one_process_and_resumes(dataset, tmp_path):
    """dp=2 with FSDP2's CPU offload and OffloadAdamW equals one process with torch's AdamW; killed after step 3
    and resumed from step 2 it repeats the run bit for bit; resumed with offload off, it continues within rounding."""
    ref, straight, killed = tmp_path / "ref", tmp_path / "straight", tmp_path / "killed"
    train(base_args(dataset, ref, 4, **{**BALANCE, "train.micro_batch_size": 2}))
    train(base_args(dataset, straight, 4, **OFFLOAD), 2)
    assert_same_run(ref, straight, tmp_path, steps=range(1, 5))
    proc = train_killed(base_args(dataset, killed, 4, **OFFLOAD), 2, killed, after_step=3, checkpoint=2)
    assert "DeepSpeedCPUAdam is unavailable" not in proc.stderr
    plain = tmp_path / "plain"
    shutil.copytree(killed, plain)
    train(base_args(dataset, killed, 4, **OFFLOAD), 2)
    assert metrics(killed) == metrics(straight) and metrics(killed, "grad_norm") == metrics(straight, "grad_norm")
    train(base_args(dataset, plain, 4, **{**OFFLOAD, "parallel.cpu_offload": "false"}), 2)
    assert list(metrics(plain)) == [1, 2, 3, 4]
    for step in (3, 4):
        assert metrics(plain)[step] == pytest.approx(metrics(straight)[step], rel=1e-5)


def test_unbuildable_op_warns_once_and_uses_torch_adamw(monkeypatch, caplog):
    import train.cpu_adam
    from train.optim import PartOptimizers

    monkeypatch.setattr(train.cpu_adam, "cpu_adam_problem", lambda: "RuntimeError: no C++ compiler")
    parts = [_model(0), _model(1)]
    with caplog.at_level("WARNING", logger="train"):
        opts = PartOptimizers(parts, CFG, 10, cpu_offload=True)
    assert [type(o) for o in opts.optimizers] == [torch.optim.AdamW] * 2
    warned = [r for r in caplog.records if "DeepSpeedCPUAdam is unavailable" in r.getMessage()]
    assert len(warned) == 1 and "no C++ compiler" in warned[0].getMessage()
    monkeypatch.undo()
    assert all(isinstance(o, OffloadAdamW) for o in PartOptimizers(parts, CFG, 10, cpu_offload=True).optimizers)
