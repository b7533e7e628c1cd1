"""Typed config building, layout validation, optimizer groups and learning-rate schedules."""

import math

import pytest
import torch

from model import Transformer, load_preset
from parallel import LayoutError, ParallelDims
from train.config import compose_config
from train.config import ConfigError, OptimConfig
from train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_compose_defaults_to_tiny_on_builtin_data():
    cfg = compose_config([])
    assert cfg.model == load_preset("tiny")
    assert cfg.data.path is None and cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.1


def test_overrides_reach_typed_fields():
    cfg = compose_config(["model=small", "train.steps=7", "optim.lr=1e-3", "precision=bf16", "output_dir=/tmp/x"])
    got = (cfg.model.hidden_size, cfg.train.steps, cfg.optim.lr, cfg.precision.param_dtype)
    assert got == (512, 7, 1e-3, "bfloat16")
    assert cfg.output_dir == "/tmp/x"


DUALPIPEV = ["parallel.pp=2", "parallel.pp_schedule=DualPipeV"]


@pytest.mark.parametrize("overrides,fragment", [
    (["+train.foo=1"], "unknown config key(s) ['train.foo']"),
    (["train.steps=abc"], "train.steps must be int"),
    (["train.steps=0"], "train.steps must be > 0, got 0"),
    (["data.seq_len=9000"], "data.seq_len=9000 exceeds model.max_position_embeddings=4096"),
    (["model=missing_preset"], "Could not find 'model/missing_preset'"),
    (["+model.not_a_field=3"], "unknown model config keys: ['not_a_field']"),
    (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
    (["precision.bf16_gemm_emulate=true"], "precision.bf16_gemm_emulate needs precision.param_dtype=bfloat16"),
    (["precision=bf16", "precision.bf16_gemm_emulate=true", "parallel.compile=true"], "set parallel.compile=false"),
    (["parallel.pp=2", "parallel.ep=2", "parallel.pp_overlap_fb=true"],
     "parallel.pp_overlap_fb=true: it runs DualPipeV's overlapped actions: needs parallel.pp > 1 and "
     "pp_schedule=DualPipeV, got pp=2 and 1F1B"),
    ([*DUALPIPEV, "parallel.pp_overlap_fb=true"], "needs parallel.ep > 1 and ep_overlap"),
    ([*DUALPIPEV, "parallel.ep=2", "parallel.tp=2", "parallel.pp_overlap_fb=true"], "needs parallel.tp=1 and cp=1, "
     "got tp=2 and cp=1"),
    ([*DUALPIPEV, "parallel.ep=2", "parallel.compile=true", "parallel.pp_overlap_fb=true"],
     "needs parallel.compile=false"),
])
def test_bad_config_is_one_line_error(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides)
    assert fragment in str(e.value)


def test_dualpipev_pairs_forward_and_backward_only_where_asked_and_applicable():
    """parallel.pp_overlap_fb: off by default; set, on where it applies (a planner's candidates under a config that
    sets it are other layouts than the one validated)."""
    from train.config import pp_overlap_fb_on
    on = [*DUALPIPEV, "parallel.ep=2", "parallel.pp_overlap_fb=true"]
    assert pp_overlap_fb_on(compose_config(on)) and not pp_overlap_fb_on(compose_config([*DUALPIPEV, "parallel.ep=2"]))
    for key, value in (("pp_schedule", "ZBVZeroBubble"), ("ep_overlap", False), ("cp", 2), ("compile", True)):
        cfg = compose_config(on)
        setattr(cfg.parallel, key, value)  # a candidate layout, past the config's validation
        assert not pp_overlap_fb_on(cfg), key


@pytest.mark.parametrize("schedule,stages", [("1F1B", 1), ("Interleaved1F1B", 2), ("ZBVZeroBubble", 2),
                                             ("DualPipeV", 2)])
def test_schedules_pick_their_stage_count(schedule, stages):
    """parallel.pp_stages_per_rank unset: what the schedule needs; recorded resolved (config.yaml shows it)."""
    cfg = compose_config([f"parallel.pp_schedule={schedule}", "parallel.pp=2"])
    assert cfg.parallel.pp_stages_per_rank == stages
    cfg = compose_config([f"parallel.pp_schedule={schedule}", "parallel.pp_stages_per_rank=3"])
    assert cfg.parallel.pp_stages_per_rank == 3


@pytest.mark.parametrize("kw,fragment", [
    (dict(world_size=4, tp=3), "not divisible by dp_replicate*cp*tp*pp = 1*1*3*1 = 3"),
    (dict(world_size=8, cp=2, dp_shard=2), "pp*dp_replicate*dp_shard*cp*tp = 1*1*2*2*1 = 4 != world size 8"),
    (dict(world_size=4, cp=2, tp=2), "cp=2 with tp=2: context parallelism does not combine with tensor"),
    (dict(world_size=4, dp_shard=2), "= 2 != world size 4"),
    (dict(world_size=4, ep=3), "ep=3 must divide dp_shard=4"),
])
def test_layout_errors_name_the_numbers(kw, fragment):
    with pytest.raises(LayoutError) as e:
        ParallelDims.resolve(**kw)
    assert fragment in str(e.value)


def test_layout_checked_against_model():
    dims = ParallelDims.resolve(world_size=8, tp=8)
    with pytest.raises(LayoutError, match="num_attention_heads=4 is not divisible by tp=8"):
        dims.validate_model(load_preset("tiny"))
    assert ParallelDims.resolve(world_size=8, dp_replicate=2).dp_shard == 4


def test_context_parallel_checked_against_model():
    import dataclasses
    with pytest.raises(LayoutError, match="num_attention_heads=4 is not divisible by cp=8"):
        ParallelDims.resolve(world_size=8, cp=8).validate_model(load_preset("tiny"))
    mtp = dataclasses.replace(load_preset("tiny"), num_nextn_predict_layers=1)
    ParallelDims.resolve(world_size=2, cp=2).validate_model(mtp)  # MTP reads into the next part: allowed
    with pytest.raises(ConfigError, match="gives each rank 2 positions of a sequence .* fewer than "
                                          r"model.num_nextn_predict_layers=2 \+ 1"):
        compose_config(["data.seq_len=16", "parallel.cp=8", "model.num_nextn_predict_layers=2"])
    compose_config(["data.seq_len=24", "parallel.cp=8", "model.num_nextn_predict_layers=2"])
    dims = ParallelDims.resolve(world_size=8, cp=2, ep=2)
    assert (dims.dp_shard, dims.dp) == (4, 4)  # cp ranks read the same sequences: not data-parallel
    with pytest.raises(ConfigError, match="splits data.seq_len=60 over parallel.cp=8: it must divide"):
        compose_config(["data.seq_len=60", "parallel.cp=8"])


def test_device_limited_routing_needs_groups_aligned_with_ep_ranks():
    import dataclasses
    cfg = dataclasses.replace(load_preset("tiny"), n_routed_experts=12, n_group=4)
    with pytest.raises(LayoutError, match="n_group=4 and ep=6: one must divide the other"):
        ParallelDims.resolve(world_size=6, ep=6).validate_model(cfg)
    ParallelDims.resolve(world_size=2, ep=2).validate_model(cfg)  # 2 groups per rank: fine
    for n_group, ep, ok in [(4, 2, True), (2, 4, True), (4, 8, True), (3, 2, False)]:  # 24 experts
        cfg = dataclasses.replace(load_preset("tiny"), n_routed_experts=24, n_group=n_group, topk_group=1)
        dims = ParallelDims.resolve(world_size=ep, ep=ep)
        if ok:
            dims.validate_model(cfg)
        else:
            with pytest.raises(LayoutError, match=f"n_group={n_group} and ep={ep}"):
                dims.validate_model(cfg)


def test_weight_decay_skips_norms_and_embedding():
    model = Transformer(load_preset("tiny"))
    groups = param_groups(model, OptimConfig())
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "layers.1.mlp.experts.gate_up_proj" in names and "lm_head.weight" in names
    assert "embed_tokens.weight" not in names and "norm.weight" not in names
    assert groups[1]["weight_decay"] == 0.0
    n_all = sum(1 for _ in model.parameters())
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_all


def test_deepseek_step_schedule_decays_at_60_and_90_percent():
    cfg = OptimConfig(schedule="deepseek_step", warmup_steps=10, step_decay_at=(0.6, 0.9), step_decay_factor=0.316)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == 1.0
    assert lr_factor(59, 100, cfg) == 1.0
    assert lr_factor(60, 100, cfg) == pytest.approx(0.316)
    assert lr_factor(89, 100, cfg) == pytest.approx(0.316)
    assert lr_factor(90, 100, cfg) == pytest.approx(0.316 ** 2)


def test_cosine_schedule_endpoints_and_scheduler_wiring():
    cfg = OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1, lr=1.0)
    assert lr_factor(4, 104, cfg) == pytest.approx(1.0)
    assert lr_factor(54, 104, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(104, 104, cfg) == pytest.approx(0.1)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, 104)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 100)))


@pytest.mark.parametrize("name", ["tiny", "small", "deepseek_v2_lite", "deepseek_v2", "deepseek_v3"])
def test_hydra_preset_equals_load_preset(name):
    assert compose_config([f"model={name}"]).model == load_preset(name)


def test_any_model_field_overridable_on_any_preset():
    cfg = compose_config(["model=deepseek_v2_lite", "model.capacity_factor=1.25", "model.seq_aux_loss_alpha=1e-4"])
    assert (cfg.model.capacity_factor, cfg.model.seq_aux_loss_alpha, cfg.model.hidden_size) == (1.25, 1e-4, 2048)
