"""Tensor + sequence parallelism (parallel/tensor.py) against one process, on CPU with gloo.

Two multi-process jobs (tests/conftest.py's run_ranks) train the `tiny` preset cut to 2 layers
(one dense, one MoE; balance losses on) in fp32 for 3 AdamW steps on one fixed batch: the 2-rank job with
tp=2 with and without sequence and loss parallelism (once with an MTP depth, once with uncompressed queries),
plus layout checks on meta and a pipeline-style split into two stage parts; the 4-rank job with tp=4, and
with FSDP2 x TP on a (dp_shard=2, tp=2) mesh where each data-parallel rank trains on half of the batch.
Every run is compared with the same model trained in this process: per-step losses, every gradient of the
first step, every parameter after the last step, and each step's MoE loads (exact: the routing decisions
must not change).

AdamW runs with eps=1e-3: its update g / (|g| + eps) turns the last-bit differences of a reordered fp32
reduction in gradients near eps (1e-8 by default) into full +-lr steps, so with the default eps no two
correct implementations agree to 1e-4 after a few steps. With eps=1e-3 they agree to ~1e-6, while a
balance loss counted twice moves gradients by up to 100% (checked by hand when this test was written).
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from conftest import close, cross_entropy, fixed_batch, full, run_ranks, tiny, tiny_model
from model.config import ModelConfig
from model.transformer import Transformer
from parallel.tensor import apply_tp, check_tp, tp_loss

B, T, STEPS, LR, EPS = 4, 32, 3, 1e-2, 1e-3
# model variants (changes to tiny): with an MTP depth; with uncompressed queries (q_proj, as V2-Lite)
VARIANTS = {"base": {}, "mtp": {"num_nextn_predict_layers": 1}, "q_proj": {"q_lora_rank": None}}
# tp-only cases: name -> (sequence_parallel, loss_parallel, variant); the tp size is the job's world size
TP_CASES = {"sp": (True, True, "base"), "no_sp": (False, True, "base"), "no_sp_no_lp+q_proj": (False, False, "q_proj"),
            "sp+mtp": (True, True, "mtp"), "tp4": (True, True, "base")}
JOBS = {2: ["sp", "no_sp", "no_sp_no_lp+q_proj", "sp+mtp", "layout", "stages"], 4: ["tp4", "fsdp_tp"]}


# --------------------------------------------------------------------------------------------- shared setup
def tiny_cfg(**changes) -> ModelConfig:
    return tiny(num_hidden_layers=2, **changes)


def model_loss(model: Transformer, tokens, labels, ce) -> torch.Tensor:
    """Next-token loss, plus lambda/D times the MTP depths' losses when the model has them."""
    if model.mtp is None:
        return ce(model(tokens), labels)
    logits, mtp_logits = model.forward_with_mtp(tokens)
    extra = sum(ce(x, labels[:, k:]) for k, x in enumerate(mtp_logits, start=1))
    return ce(logits, labels) + model.cfg.mtp_loss_weight / len(mtp_logits) * extra


def train(model: Transformer, tokens, labels, ce) -> dict:
    """STEPS AdamW steps: losses, first-step gradients, per-step MoE loads, final parameters."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, foreach=False)
    out = {"losses": [], "loads": []}
    for step in range(STEPS):
        opt.zero_grad()
        loss = model_loss(model, tokens, labels, ce)
        loss.backward()
        if step == 0:
            out["grads"] = {n: full(p.grad) for n, p in model.named_parameters()}
            out["grad_layout_mismatch"] = [n for n, p in model.named_parameters()
                                           if getattr(p.grad, "placements", None) != getattr(p, "placements", None)]
        opt.step()
        out["losses"].append(loss.item())
        out["loads"].append({i: moe.tokens_per_expert.clone() for i, moe in model.moe_layers().items()})
        for moe in model.moe_layers().values():
            moe.reset_stats()
    out["params"] = {n: full(p) for n, p in model.named_parameters()}
    return out


def reference_run(variant: str) -> dict:
    cfg = tiny_cfg(**VARIANTS[variant])
    return train(tiny_model(cfg), *fixed_batch(cfg.vocab_size, B, T), cross_entropy)


# --------------------------------------------------------------------------------------------- worker side
def run_tp(world: int, sequence_parallel: bool, loss_parallel: bool, variant: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    cfg = tiny_cfg(**VARIANTS[variant])
    model = tiny_model(cfg)
    apply_tp(model, mesh, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    tokens, labels = fixed_batch(cfg.vocab_size, B, T)
    with torch.no_grad():
        logits = model(tokens)
    layout = (type(logits).__name__, tuple(getattr(logits, "placements", ())), tuple(_local(logits).shape))
    for moe in model.moe_layers().values():
        moe.reset_stats()  # the probe above routed the batch once
    return {**train(model, tokens, labels, tp_loss), "logits": layout}


def run_fsdp_tp(world: int) -> dict:
    """(dp_shard=2, tp=world/2): TP first, then FSDP2 per block and the root; each dp rank takes half the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp_shard", "tp"))
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    apply_tp(model, mesh["tp"])
    group = mesh["dp_shard"].get_group()

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    for moe in model.moe_layers().values():
        moe.reduce_counts = reduce_sum
    for block in model.layers.values():
        fully_shard(block, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    meshes = {n: p.device_mesh.mesh_dim_names for n, p in model.named_parameters()}
    dp, half = mesh["dp_shard"].get_local_rank(), B // 2
    tokens, labels = fixed_batch(cfg.vocab_size, B, T)
    rows = slice(dp * half, (dp + 1) * half)
    return {**train(model, tokens[rows], labels[rows], tp_loss), "meshes": meshes, "dp": dp}


def run_layout(world: int) -> dict:
    """apply_tp on meta (with an MTP depth): each parameter's placements and local shape; the error for heads."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    with torch.device("meta"):
        model, odd = Transformer(tiny_cfg(**VARIANTS["mtp"])), Transformer(tiny_cfg(num_attention_heads=3))
    apply_tp(model, mesh)
    layout = {n: (type(p).__name__, tuple(getattr(p, "placements", ())), tuple(_local(p).shape),
                  getattr(p, "device_mesh", None) == mesh) for n, p in model.named_parameters()}
    try:
        apply_tp(odd, mesh)
        error = None
    except ValueError as e:
        error = str(e)
    return {"layout": layout, "heads_error": error}


def run_stages(world: int) -> dict:
    """Two stage parts (embedding + layer 0 | layer 1 + head), each tensor-parallel, joined by a plain tensor."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    cfg = tiny_cfg()
    whole = tiny_model(cfg)
    first, second = copy.deepcopy(whole), copy.deepcopy(whole)
    del first.layers["1"], second.layers["0"]
    first.norm = first.lm_head = second.embed_tokens = None
    apply_tp(first, mesh)
    apply_tp(second, mesh)
    tokens, labels = fixed_batch(cfg.vocab_size, B, T)
    sent = first(tokens)
    received = sent.detach().requires_grad_()  # what a pipeline's send/recv does
    loss = tp_loss(second(received), labels)
    loss.backward()
    sent.backward(received.grad)
    grads = {n: full(p.grad) for part in (first, second) for n, p in part.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "sent": (type(sent).__name__, tuple(sent.shape))}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def run_case(name: str, world: int) -> dict:
    if name in TP_CASES:
        return run_tp(world, *TP_CASES[name])
    return {"fsdp_tp": run_fsdp_tp, "layout": run_layout, "stages": run_stages}[name](world)


def rank_results(rank: int, world: int) -> dict[str, dict]:
    """This world size's cases in one gloo group; a failing case's result is its traceback (its test reports it)
    and the other cases still run."""
    torch.set_num_threads(1)
    results = {}
    for name in JOBS[world]:
        try:
            results[name] = run_case(name, world)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    return results


# --------------------------------------------------------------------------------------------- test side
def launch(world: int, out) -> dict[str, list[dict]]:
    ranks = run_ranks(rank_results, world, out)
    return {name: [r[name] for r in ranks] for name in JOBS[world]}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    """Both jobs, one after the other (2 cores): case name -> one result dict per rank."""
    return {**launch(2, tmp_path_factory.mktemp("tp2")), **launch(4, tmp_path_factory.mktemp("tp4"))}


@pytest.fixture(scope="module")
def references() -> dict[int, dict]:
    return {variant: reference_run(variant) for variant in VARIANTS}


def _ok(ranks: list[dict]) -> list[dict]:
    errors = [r["error"] for r in ranks if "error" in r]
    assert not errors, errors[0]
    return ranks


def _same_run(run: dict, ref: dict, losses: list[float]) -> None:
    """Losses, first-step gradients, final parameters and per-step MoE loads equal the reference run."""
    close(torch.tensor(losses, dtype=torch.float64), torch.tensor(ref["losses"], dtype=torch.float64), "losses",
           rtol=1e-5)
    assert sorted(run["grads"]) == sorted(ref["grads"])  # same parameter names
    for n, g in ref["grads"].items():
        close(run["grads"][n], g, f"grad {n}")
    for n, p in ref["params"].items():
        close(run["params"][n], p, f"param {n}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TP_CASES))
def test_tp_matches_single_process(name, results, references):
    ranks = _ok(results[name])
    sequence_parallel, loss_parallel, variant = TP_CASES[name]
    ref = references[variant]
    tp = len(ranks)
    for r in ranks:  # every rank: the same losses and loads (the MoE runs on all tokens on every tp rank)
        _same_run(r, ref, r["losses"])
        for step in range(STEPS):
            assert sorted(r["loads"][step]) == sorted(ref["loads"][step]) == ([1, 2] if variant == "mtp" else [1])
            for i, load in r["loads"][step].items():
                assert torch.equal(load, ref["loads"][step][i]), (step, i, load, ref["loads"][step][i])
        assert r["grad_layout_mismatch"] == []  # every gradient has its parameter's layout
    vocab = tiny_cfg().vocab_size
    if loss_parallel:
        assert ranks[0]["logits"] == ("DTensor", (Shard(2),), (B, T, vocab // tp))
    else:
        assert ranks[0]["logits"] == ("Tensor", (), (B, T, vocab))


@pytest.mark.slow
def test_fsdp_tp_matches_single_process(results, references):
    ranks = _ok(results["fsdp_tp"])
    ref = references["base"]
    assert sorted(r["dp"] for r in ranks) == [0, 0, 1, 1]
    # the step loss is the mean of the two data-parallel halves (equal token counts)
    by_dp = {r["dp"]: r["losses"] for r in ranks}
    losses = [(a + b) / 2 for a, b in zip(by_dp[0], by_dp[1])]
    for r in ranks:
        _same_run(r, ref, losses)
        assert set(r["meshes"].values()) == {("dp_shard", "tp")}  # every parameter 2-D: FSDP over TP
    for step in range(STEPS):  # each dp rank routes its own half; together they are the whole batch
        loads = {r["dp"]: r["loads"][step][1] for r in ranks}
        assert torch.equal(loads[0] + loads[1], ref["loads"][step][1])
        assert loads[0].sum() == loads[1].sum() == B // 2 * T * tiny_cfg().num_experts_per_tok


@pytest.mark.slow
def test_tp_layout_keeps_every_name_with_its_placement_and_local_shape(results):
    rank0, rank1 = _ok(results["layout"])
    layout = rank0["layout"]
    with torch.device("meta"):
        names = [n for n, _ in Transformer(tiny_cfg(**VARIANTS["mtp"])).named_parameters()]
    assert sorted(layout) == sorted(names)  # names unchanged, nothing dropped
    assert all(kind == "DTensor" and on_tp for kind, _, _, on_tp in layout.values())
    cfg = tiny_cfg(**VARIANTS["mtp"])
    h, d, hd = cfg.num_attention_heads, cfg.hidden_size, cfg.qk_head_dim
    expected = {  # name: (placements, local shape) with tp=2
        "embed_tokens.weight": ((Shard(0),), (cfg.vocab_size // 2, d)),
        "lm_head.weight": ((Shard(0),), (cfg.vocab_size // 2, d)),
        "norm.weight": ((Replicate(),), (d,)),
        "layers.0.input_layernorm.weight": ((Replicate(),), (d,)),
        "layers.0.self_attn.q_a_proj.weight": ((Replicate(),), (cfg.q_lora_rank, d)),
        "layers.0.self_attn.q_a_layernorm.weight": ((Replicate(),), (cfg.q_lora_rank,)),
        "layers.0.self_attn.q_b_proj.weight": ((Shard(0),), (h // 2 * hd, cfg.q_lora_rank)),
        "layers.0.self_attn.kv_a_proj_with_mqa.weight": ((Replicate(),), (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)),
        "layers.0.self_attn.kv_b_proj.weight": ((Shard(0),), (h // 2 * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                                            cfg.kv_lora_rank)),
        "layers.0.self_attn.o_proj.weight": ((Shard(1),), (d, h // 2 * cfg.v_head_dim)),
        "layers.0.mlp.gate_proj.weight": ((Shard(0),), (cfg.intermediate_size // 2, d)),
        "layers.0.mlp.down_proj.weight": ((Shard(1),), (d, cfg.intermediate_size // 2)),
        "layers.1.mlp.gate.weight": ((Replicate(),), (cfg.n_routed_experts, d)),
        "layers.1.mlp.experts.gate_up_proj": ((Replicate(),), (cfg.n_routed_experts, d, 2 * cfg.moe_intermediate_size)),
        "layers.1.mlp.shared_experts.up_proj.weight": ((Shard(0),), (cfg.moe_intermediate_size // 2, d)),
        "layers.1.mlp.shared_experts.down_proj.weight": ((Shard(1),), (d, cfg.moe_intermediate_size // 2)),
        "mtp.0.eh_proj.weight": ((Replicate(),), (d, 2 * d)),
        "mtp.0.enorm.weight": ((Replicate(),), (d,)),
        "mtp.0.block.self_attn.q_b_proj.weight": ((Shard(0),), (h // 2 * hd, cfg.q_lora_rank)),
        "mtp.0.block.mlp.experts.down_proj": ((Replicate(),), (cfg.n_routed_experts, cfg.moe_intermediate_size, d)),
    }
    for name, (placements, shape) in expected.items():
        assert layout[name][1:3] == (placements, shape), (name, layout[name])
    assert rank1["layout"] == layout


@pytest.mark.slow
def test_apply_tp_rejects_heads_not_divisible(results):
    for r in _ok(results["layout"]):
        assert r["heads_error"] == "tensor parallelism tp=2 must divide model.num_attention_heads=3"


def test_check_tp_names_every_bad_size():
    with pytest.raises(ValueError, match=r"tp=4 must divide model.num_attention_heads=6, model.intermediate_size=190$"):
        check_tp(tiny_cfg(num_attention_heads=6, intermediate_size=190), 4)
    with pytest.raises(ValueError,
                       match=r"tp=3 must divide .*vocab_size=512.*moe_intermediate_size \* n_shared_experts=32"):
        check_tp(tiny_cfg(num_attention_heads=3, intermediate_size=192), 3)
    check_tp(tiny_cfg(), 4)  # tiny splits 4 ways


@pytest.mark.slow
def test_tp_stage_parts_send_sequence_shards_and_equal_one_process(results, references):
    ref = references["base"]
    for r in _ok(results["stages"]):
        assert r["sent"] == ("Tensor", (B, T // 2, tiny_cfg().hidden_size))  # this rank's sequence shard
        close(torch.tensor(r["loss"]), torch.tensor(ref["losses"][0]), "loss", rtol=1e-5)
        assert sorted(r["grads"]) == sorted(ref["grads"])
        for n, g in ref["grads"].items():
            close(r["grads"][n], g, f"grad {n}")
