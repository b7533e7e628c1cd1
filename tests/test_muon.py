"""Muon (train/muon.py): the Newton-Schulz iteration, the update rule and its scale, which parameters it takes,
each routed expert's matrices one by one, and the same update under FSDP, HSDP, TP and EP as on one process."""

import json
import math
import shutil

import pytest
import torch

from conftest import base_args, metrics, run_ranks, tiny, tiny_model, train
from train.config import OptimConfig
from train.muon import Muon, matrix_scale, muon_param_groups, newton_schulz

COEF = (3.4445, -4.7750, 2.0315)


def muon_cfg(**changes) -> OptimConfig:
    return OptimConfig(name="muon", lr=0.01, weight_decay=0.1, **changes)


def full_grads(model, seed: int) -> dict[str, torch.Tensor]:
    """A fixed whole gradient for every parameter, by name (the same in every process)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


def test_newton_schulz_is_the_quintic_on_each_singular_value():
    """G = U diag(s) V^T (3 x 5): the iteration maps each singular value s_i/|s| through p(x) = ax + bx^3 + cx^5
    five times and keeps U and V (a wrong coefficient order or a missing normalisation changes every value)."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    s = torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)
    g = u @ torch.diag(s) @ v[:3]
    x = s / s.norm()
    for _ in range(5):
        x = COEF[0] * x + COEF[1] * x ** 3 + COEF[2] * x ** 5
    torch.testing.assert_close(newton_schulz(g, 5, COEF, torch.float64), u @ torch.diag(x) @ v[:3])
    torch.testing.assert_close(newton_schulz(g.T, 5, COEF, torch.float64), (u @ torch.diag(x) @ v[:3]).T)
    assert 0.6 < float(x.min()) and float(x.max()) < 1.3  # near-orthogonal: singular values near 1


def test_muon_step_is_moonlight_update_with_its_scale():
    """Two steps on q_b_proj (96 x 32): momentum buffer g1 + 0.95 g0 (one buffer), Nesterov direction, weight
    decay lr*wd, update lr * 0.2 * sqrt(96) * NS(direction); sqrt(32) or sqrt(96 * 32) would be off 1.7x, 55x."""
    model = tiny_model()
    cfg = muon_cfg()
    opt = Muon(muon_param_groups(model, cfg), cfg)
    p = model.layers["0"].self_attn.q_b_proj.weight
    w, grads = p.detach().clone(), [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    buf = torch.zeros_like(w)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.95 * buf + g
        w = w * (1 - 0.01 * 0.1) - 0.01 * 0.2 * math.sqrt(96) * newton_schulz(g + 0.95 * buf, 5, COEF)
    torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7)
    assert list(opt.state[p]) == ["momentum_buffer"]
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)
    assert matrix_scale(96, 32) == pytest.approx(0.2 * math.sqrt(96))


def test_groups_route_parameters_by_moonlight_rule():
    """Muon: attention projections, dense MLP, shared experts, expert stacks, routers (Moonlight's code); AdamW:
    embedding, head, norms; muon_router=false sends the routers to AdamW. The expert bias is in no group."""
    model = tiny_model(tiny(num_nextn_predict_layers=1))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = muon_param_groups(model, muon_cfg())
    by_kind = {(g["muon"], g["split"], g["decay"]): {names[id(p)] for p in g["params"]} for g in groups}
    muon, split = by_kind[(True, False, True)], by_kind[(True, True, True)]
    assert "layers.0.self_attn.kv_b_proj.weight" in muon and "layers.0.mlp.down_proj.weight" in muon
    assert "layers.1.mlp.shared_experts.up_proj.weight" in muon and "layers.1.mlp.experts.down_proj" in muon
    assert "layers.1.mlp.gate.weight" in muon
    stacks = {f"layers.{i}.mlp.experts.gate_up_proj" for i in (1, 2, 3)}
    assert split == stacks | {"mtp.0.block.mlp.experts.gate_up_proj"}
    assert "lm_head.weight" in by_kind[(False, False, True)]
    assert {"embed_tokens.weight", "norm.weight"} <= by_kind[(False, False, False)]
    assert sum(len(g["params"]) for g in groups) == len(names)
    routed = {names[id(p)] for g in muon_param_groups(model, muon_cfg(muon_router=False)) if not g["muon"]
              for p in g["params"]}
    assert "layers.2.mlp.gate.weight" in routed


def test_expert_stack_orthogonalised_one_matrix_at_a_time():
    """Each expert's slice (and each half of its fused gate|up) by itself: not the stack as one matrix."""
    model = tiny_model()
    cfg = muon_cfg()
    opt = Muon(muon_param_groups(model, cfg), cfg)
    u = torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(3))  # [E, D, 2I]
    got = opt.orthogonalised(u, split=True)
    for e in (0, 5):
        for half in (slice(0, 32), slice(32, 64)):
            want = newton_schulz(u[e, :, half], 5, COEF) * 0.2 * math.sqrt(64)
            torch.testing.assert_close(got[e, :, half], want)
    whole = newton_schulz(u[0], 5, COEF) * 0.2 * math.sqrt(64)
    assert float((got[0] - whole).norm() / whole.norm()) > 0.1


def test_newton_schulz_of_a_shard_is_not_the_shard_of_newton_schulz():
    """Tensor parallelism splits a matrix by rows: orthogonalising each half alone gives another matrix, so the
    shards must be joined first (as train/muon.py does)."""
    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(4))
    whole = newton_schulz(g, 5, COEF)
    naive = torch.cat([newton_schulz(half, 5, COEF) for half in g.chunk(2)])
    assert float((naive - whole).norm() / whole.norm()) > 0.2


def test_bfloat16_newton_schulz_is_close_to_float32():
    """optim.muon_ns_dtype: auto is float32 on a CPU and bfloat16 on an accelerator; bf16 rounds (a 1e-3..5e-2
    relative difference), the result comes back in the gradient's dtype."""
    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(5))
    exact, low = newton_schulz(g, 5, COEF, torch.float32), newton_schulz(g, 5, COEF, torch.bfloat16)
    assert low.dtype == torch.float32
    assert 1e-3 < float((low - exact).norm() / exact.norm()) < 0.05
    model = tiny_model()
    auto, bf16 = (Muon(muon_param_groups(model, muon_cfg()), muon_cfg(muon_ns_dtype=d)) for d in ("auto", "bfloat16"))
    assert auto.ns_dtype_on(torch.device("cpu")) == torch.float32
    assert auto.ns_dtype_on(torch.device("cuda", 0)) == torch.bfloat16
    assert bf16.ns_dtype_on(torch.device("cpu")) == torch.bfloat16


LAYOUTS = {  # by world size: FSDP, TP, EP, CP each alone on 2 ranks; the 2-D placements on 4
    2: {"fsdp2": dict(dp_shard=2), "tp2": dict(tp=2), "ep2": dict(dp_shard=2, ep=2), "cp2": dict(cp=2)},
    4: {"tp2_fsdp2": dict(dp_shard=2, tp=2),  # FSDP's _StridedShard over TP's Shard on the same dimension
        "ep2_efsdp2": dict(dp_shard=4, ep=2),  # experts split over ep, FSDP-sharded over the rest
        "hsdp2x2": dict(dp_replicate=2, dp_shard=2)},  # sharded over 2 ranks, replicated over the other 2
}


def two_steps(model, shard) -> dict[str, torch.Tensor]:
    """Two Muon steps with fixed gradients (each rank given its shard of them); the whole parameters after."""
    cfg = muon_cfg()
    opt = Muon(muon_param_groups(model, cfg), cfg)
    for seed in (7, 8):
        grads = full_grads(tiny_model(), seed)
        for name, p in model.named_parameters():
            p.grad = shard(grads[name], p)
        opt.step()
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def layouts_rank(rank: int, world: int) -> dict:
    from torch.distributed.tensor import DTensor

    from parallel import ParallelDims, parallelize
    from train.muon import shard_of

    def shard(g, p):
        if not isinstance(p, DTensor):
            return g
        return DTensor.from_local(shard_of(g, p), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    out = {}
    for name, sizes in LAYOUTS[world].items():
        dims = ParallelDims.resolve(world, **sizes)
        model = parallelize(tiny_model(), dims.build_mesh("cpu"), dims)
        out[name] = two_steps(model, shard)
    return out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_muon_under_fsdp_tp_ep_equals_one_process(tmp_path, world):
    """Two steps of fixed gradients: the whole parameters after them equal one process's (rtol 1e-5)."""
    want = two_steps(tiny_model(), lambda g, p: g)
    ranks = run_ranks(layouts_rank, world, tmp_path)
    moved = want["layers.1.mlp.experts.gate_up_proj"] - tiny_model().layers["1"].mlp.experts.gate_up_proj.detach()
    assert float(moved.abs().max()) > 1e-3
    for layout in LAYOUTS[world]:
        for name, value in want.items():
            torch.testing.assert_close(ranks[-1][layout][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{layout} {name}: {m}")


def test_muon_with_cpu_offload_trains_like_one_process(dataset, reference_run, tmp_path):
    """dp=2 with FSDP2's CPU offload (Muon steps the host shards, orthogonalising whole matrices) against one
    process on the same global batch: losses, grad norms and final weights (test_parallel_layouts' bounds)."""
    from test_parallel_layouts import assert_same_run, run, single_process

    over = {"optim": "muon", "optim.muon_ns_dtype": "float32"}
    ref = single_process(reference_run, **over, **{"train.micro_batch_size": 2})
    got = tmp_path / "offload"
    run(dataset, got, 2, **over, **{"train.micro_batch_size": 1, "parallel.cpu_offload": "true"})
    assert_same_run(ref, got, tmp_path)


def test_muon_resume_is_bit_exact_and_reshards_to_pp2(dataset, tmp_path):
    """6 steps with a checkpoint at 3 (momentum buffers by parameter name); resumed from step 3 on one process:
    steps 4-6 bit for bit; resumed under pp=2 (each stage's optimizer loads its own parameters' buffers): the same
    losses to float tolerance. AdamW's eps is 1e-3 for the comparison across layouts (see test_parallel_layouts)."""
    over = {"optim": "muon", "optim.eps": 1e-3, "optim.lr": 1e-2, "checkpoint.every": 3, "checkpoint.keep": 3}
    straight = tmp_path / "straight"
    train(base_args(dataset, straight, 6, **over))
    want = metrics(straight)
    for name, nproc, extra in (("same", 1, {}), ("pp2", 2, {"parallel.pp": 2})):
        out = tmp_path / name
        shutil.copytree(straight, out)
        shutil.rmtree(out / "checkpoints" / "step_00000006")
        rows = (out / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= 3))
        train(base_args(dataset, out, 6, **over, **extra), nproc)
        got = metrics(out)
        assert sorted(got) == list(range(1, 7))
        if name == "same":
            assert got == want
        else:
            for s in (4, 5, 6):
                assert got[s] == pytest.approx(want[s], rel=1e-5), f"loss at step {s} under pp=2"
    assert want[6] < want[1] - 0.05  # it trains


@pytest.mark.parametrize("args,fragment", [
    (["optim=muon", "optim.muon_momentm=0.9"], "Could not override 'optim.muon_momentm'"),
    (["optim.name=sgd"], "optim.name must be one of adamw, muon, got 'sgd'"),
])
def test_bad_optimizer_input_is_one_line(tmp_path, args, fragment):
    proc = train([*args, f"output_dir={tmp_path / 'run'}", "train.steps=1"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], (proc.returncode, lines)
