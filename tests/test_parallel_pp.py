"""Pipeline parallelism (parallel/pipeline.py): the layout helpers, and every schedule against one process.

One 2-process gloo job (tests/conftest.py's run_ranks, once per module) trains the `tiny` preset (4 layers:
one dense, three MoE; balance losses on) for 3 AdamW steps under each schedule on a fixed batch. The tests
compare its per-step losses, final parameters and per-step MoE loads (`tokens_per_expert`) with plain
gradient accumulation over the same microbatches in this process.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.distributed as dist

from conftest import close, cross_entropy, fixed_batch, run_ranks, tiny, tiny_model
from model.transformer import Transformer
from parallel.expert import Lane
from parallel.pipeline import (
    SCHEDULES, check_microbatches, _check_output, build_pipeline, build_stage_modules, split_layers, stage_ids,
)

WORLD = 2
B, T, STEPS, LR = 4, 32, 3, 1e-2
# case: (schedule, stages_per_rank, n_microbatches[, paired: DualPipeV's overlapped actions' forward and backward at
# once, the backward on a second thread])
CASES = {
    "1F1B": ("1F1B", 1, 4),
    "GPipe": ("GPipe", 1, 2),
    "Interleaved1F1B": ("Interleaved1F1B", 2, 4),
    "ZBVZeroBubble": ("ZBVZeroBubble", 2, 4),
    "ZBVZeroBubble-2mb": ("ZBVZeroBubble", 2, 2),  # fewer microbatches than stages
    "DualPipeV": ("DualPipeV", 2, 4),
    "DualPipeV-paired": ("DualPipeV", 2, 4, True),
}


# --------------------------------------------------------------------------------------------- shared setup
def four_layers() -> Transformer:
    """The tiny preset with 4 layers: one dense, three MoE."""
    return tiny_model(tiny(num_hidden_layers=4))


def adamw(params) -> torch.optim.Optimizer:
    # eps=1e-3: with the default 1e-8 the update g/(|g|+eps) turns last-bit differences of near-zero
    # gradients (another thread count sums in another order) into whole-lr steps; with 1e-3 the update is
    # proportional to the gradient, so the parameter check stays sensitive to wrong gradients
    return torch.optim.AdamW(params, lr=LR, eps=1e-3, foreach=False)


def take_loads(parts) -> dict[int, torch.Tensor]:
    """Accumulated tokens_per_expert per MoE layer (by global index), then reset, as the trainer does."""
    loads = {}
    for part in parts:
        for idx, moe in part.moe_layers().items():
            loads[idx] = moe.tokens_per_expert.clone()
            moe.reset_stats()
    return loads


def params_of(parts) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for part in parts for name, p in part.named_parameters()}


def grads_of(parts) -> dict[str, torch.Tensor]:
    """The last step's gradients (the optimizer leaves them in place)."""
    return {name: p.grad.clone() for part in parts for name, p in part.named_parameters()}


# --------------------------------------------------------------------------------------------- reference
def reference_run(n_microbatches: int) -> dict:
    """One process, the whole model, gradient accumulation: loss/n per microbatch, balance losses at 1/n."""
    model = four_layers()
    tokens, labels = fixed_batch(model.cfg.vocab_size, B, T)
    opt = adamw(model.parameters())
    model.set_aux_loss_scale(1.0 / n_microbatches)
    losses, loads = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        step_loss = 0.0
        for x, y in zip(tokens.chunk(n_microbatches), labels.chunk(n_microbatches)):
            loss = cross_entropy(model(x), y)
            (loss / n_microbatches).backward()
            step_loss += loss.item() / n_microbatches
        opt.step()
        losses.append(step_loss)
        loads.append(take_loads([model]))
    return {"losses": losses, "loads": loads, "params": params_of([model]), "grads": grads_of([model])}


# --------------------------------------------------------------------------------------------- pp worker
def run_case(schedule: str, stages_per_rank: int, n_microbatches: int, paired: bool = False) -> dict:
    """This rank's side of one pipeline run: losses (last-stage rank only), loads, parameters of its parts, and the
    threads that accumulated gradients."""
    model = four_layers()
    tokens, labels = fixed_batch(model.cfg.vocab_size, B, T)
    pipeline = build_pipeline(model, None, schedule, n_microbatches, stages_per_rank, cross_entropy,
                              torch.device("cpu"), microbatch_size=B // n_microbatches, seq_len=T,
                              lane=Lane() if paired else None)
    parts = pipeline.parts
    threads = set()
    for p in (p for part in parts for p in part.parameters()):
        p.register_post_accumulate_grad_hook(lambda _: threads.add(threading.current_thread().name))
    # the stage modules carry no pipeline state: their attributes are a fresh model's
    assert all(vars(part).keys() == vars(model).keys() for part in parts)
    del model
    opt = adamw([p for part in parts for p in part.parameters()])
    losses, loads = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = pipeline.step(tokens, labels)
        opt.step()
        losses.append(None if loss is None else loss.item())
        loads.append(take_loads(parts))
    return {"losses": losses, "loads": loads, "params": params_of(parts), "grads": grads_of(parts),
            "threads": sorted(threads)}


def rank_results(rank: int, world: int) -> dict[str, dict]:
    """Every case on this rank's gloo group; a failing case's result is its traceback (its test reports it) and
    the other cases still run."""
    torch.set_num_threads(1)
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = run_case(*case)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory) -> dict[str, list[dict]]:
    """The 2-process job, run once: per case one result dict per rank."""
    ranks = run_ranks(rank_results, WORLD, tmp_path_factory.mktemp("pp"), timeout=300)
    return {name: [r[name] for r in ranks] for name in CASES}


@pytest.fixture(scope="module")
def references() -> dict[int, dict]:
    return {n: reference_run(n) for n in sorted({case[2] for case in CASES.values()})}


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_schedule_gives_the_single_process_losses_weights_grads_and_loads(name, pp_results, references):
    ranks = pp_results[name]
    errors = [r["error"] for r in ranks if "error" in r]
    assert not errors, errors[0]
    ref = references[CASES[name][2]]
    if CASES[name][0] == "DualPipeV":  # paired, every rank runs some backward on the second thread
        paired = CASES[name][3:] == (True,)
        want = ["MainThread", "paired backward"] if paired else ["MainThread"]
        assert [r["threads"] for r in ranks] == [want] * WORLD
    # losses: exactly one rank holds the last stage
    with_loss = [r["losses"] for r in ranks if r["losses"][0] is not None]
    assert len(with_loss) == 1
    close(torch.tensor(with_loss[0], dtype=torch.float64), torch.tensor(ref["losses"], dtype=torch.float64), "losses")
    # parameters and last gradients: the ranks' parts cover the model exactly once, with the model's names
    names = [n for r in ranks for n in r["params"]]
    assert sorted(names) == sorted(ref["params"])
    for r in ranks:
        for n, p in r["params"].items():
            close(p, ref["params"][n], n)
            close(r["grads"][n], ref["grads"][n], f"{n}.grad")
    # MoE loads, per step and layer, accumulated over the microbatches
    for step in range(STEPS):
        loads = {i: v for r in ranks for i, v in r["loads"][step].items()}
        assert sorted(loads) == sorted(ref["loads"][step]) == [1, 2, 3]
        for i, v in loads.items():
            assert torch.equal(v, ref["loads"][step][i]), (step, i, v, ref["loads"][step][i])
            assert v.sum() == B * T * 2  # every token routed to num_experts_per_tok=2 experts


def test_split_layers_is_contiguous_sizes_within_one_end_stages_smaller():
    assert split_layers(27, 4) == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21)), list(range(21, 27))]
    assert [len(s) for s in split_layers(6, 4)] == [1, 2, 2, 1]
    assert [len(s) for s in split_layers(5, 4)] == [1, 2, 1, 1]
    assert [len(s) for s in split_layers(3, 2)] == [2, 1]
    assert [len(s) for s in split_layers(61, 8)] == [7, 8, 8, 8, 8, 8, 7, 7]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    assert split_layers(5, 1) == [[0, 1, 2, 3, 4]]
    for layers, stages in [(27, 4), (60, 16), (7, 3), (100, 7)]:
        split = split_layers(layers, stages)
        assert sum(split, []) == list(range(layers))
        assert max(map(len, split)) - min(map(len, split)) <= 1
    with pytest.raises(ValueError, match="num_hidden_layers=3 cannot fill 4 pipeline stages"):
        split_layers(3, 4)
    with pytest.raises(ValueError, match=">= 1"):
        split_layers(3, 0)


def test_stage_ids_place_loop_and_v_styles_and_reject_bad_counts():
    assert SCHEDULES == ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")
    assert [stage_ids("1F1B", r, 4, 1) for r in range(4)] == [[0], [1], [2], [3]]
    assert stage_ids("GPipe", 1, 2, 1) == [1]
    assert [stage_ids("Interleaved1F1B", r, 2, 3) for r in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert [stage_ids("ZBVZeroBubble", r, 4, 2) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert stage_ids("dualpipev", 0, 2, 2) == [0, 3]  # names match case-insensitively
    bad = [("1F1B", 0, 2, 2, "1 stage per rank"), ("GPipe", 0, 2, 2, "1 stage per rank"),
           ("Interleaved1F1B", 0, 2, 1, ">= 2"), ("ZBVZeroBubble", 0, 2, 1, "exactly 2"),
           ("DualPipeV", 0, 2, 3, "exactly 2"), ("1F1B", 2, 2, 1, r"pp_rank=2 must lie in \[0, pp=2\)"),
           ("Looped", 0, 2, 1, "unknown pipeline schedule 'Looped'")]
    for schedule, rank, pp, spr, msg in bad:
        with pytest.raises(ValueError, match=msg):
            stage_ids(schedule, rank, pp, spr)


def test_microbatch_counts_below_the_schedules_minimum_are_rejected():
    check_microbatches("Interleaved1F1B", 1, 2, 4)  # torch's flexible interleaving allows fewer
    check_microbatches("ZBVZeroBubble", 2, 2, 4)
    check_microbatches("GPipe", 1, 4, 4)
    with pytest.raises(ValueError, match="1F1B with 2 stages on pp=2 ranks needs n_microbatches >= 2, got 1"):
        check_microbatches("1F1B", 1, 2, 2)
    with pytest.raises(ValueError, match="DualPipeV with 4 stages on pp=2 ranks needs n_microbatches >= 4, got 3"):
        check_microbatches("DualPipeV", 3, 2, 4)
    with pytest.raises(ValueError, match="n_microbatches must be >= 1"):
        check_microbatches("GPipe", 0, 2, 2)


def test_stage_modules_hold_each_parameter_once_under_the_models_name():
    model = four_layers()
    full = dict(model.named_parameters())
    parts = [build_stage_modules(model, s, 3) for s in range(3)]
    assert [list(p.layers) for p in parts] == [["0"], ["1", "2"], ["3"]]
    assert [p.embed_tokens is not None for p in parts] == [True, False, False]
    assert [p.lm_head is not None and p.norm is not None for p in parts] == [False, False, True]
    names = [n for p in parts for n, _ in p.named_parameters()]
    assert sorted(names) == sorted(full)  # every parameter once, under the whole model's name
    for p in parts:
        for n, w in p.named_parameters():
            assert torch.equal(w, full[n]) and w.data_ptr() != full[n].data_ptr()  # copied, not shared
    assert list(model.layers) == ["0", "1", "2", "3"] and model.lm_head is not None  # source untouched
    assert sorted(parts[1].moe_layers()) == [1, 2] and parts[0].moe_layers() == {}
    h = torch.randn(2, 8, model.cfg.hidden_size)
    assert parts[1](h).shape == h.shape  # a middle stage maps hidden states to hidden states


def test_a_stage_output_of_another_shape_fails_loudly():
    """A stage whose output does not match the declared metadata fails loudly, not by a corrupt receive."""
    part = build_stage_modules(four_layers(), 0, 2)
    declared = torch.empty(1, 8, part.cfg.hidden_size, device="meta")
    part.register_forward_hook(partial(_check_output, declared))
    part(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"output \(2, 8, 64\) torch.float32 differs from the declared \(1, 8, 64\)"):
        part(torch.zeros(2, 8, dtype=torch.long))


def test_last_stage_keeps_mtp_and_an_embedding_copy_tied_or_bad_stages_fail():
    cfg = tiny(num_hidden_layers=2, num_nextn_predict_layers=1)
    with torch.device("meta"):
        mtp, tied = Transformer(cfg), Transformer(replace(cfg, num_nextn_predict_layers=0, tie_word_embeddings=True))
    first, last = build_stage_modules(mtp, 0, 2), build_stage_modules(mtp, 1, 2)
    assert first.mtp is None and not first.output_hidden
    # the last stage keeps MTP and a (tied) copy of the embedding, and leaves the heads to its loss
    assert last.mtp is not None and last.embed_tokens is not None and last.output_hidden
    assert build_stage_modules(mtp, 0, 1).mtp is not None  # one stage: the whole model, MTP included
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        build_stage_modules(tied, 1, 2)
    with pytest.raises(ValueError, match=r"stage=2 must lie in \[0, n_stages=2\)"):
        build_stage_modules(tied, 2, 2)

