"""Tensor parallelism (+ sequence parallelism) for the MLA + MoE model, on a 1-D `tp` mesh.

`apply_tp` turns every parameter into a DTensor on the tp mesh (Shard or Replicate), in place, before FSDP2
wraps the model (FSDP then shards the same DTensors again over its data-parallel mesh: 2-D FSDP x TP).

Activation layout. The residual stream between blocks is a DTensor: sharded on the sequence (Shard(1)) with
sequence parallelism, replicated without. Keeping it a DTensor (not a local tensor) matters: the model reads
the sequence length from `h.shape[1]` for RoPE, and a DTensor reports the global shape. Each block:

  norm (sequence-parallel) -> all-gather -> MLA, heads sharded      -> reduce-scatter (o_proj)    -> residual
                                             (MHA/GQA/MQA: query and K/V heads sharded alike, `_qkvo_plan`)
  norm (sequence-parallel) -> all-gather -> dense MLP, Megatron-style -> reduce-scatter (down_proj) -> residual
                                          -> MoE: router + routed experts on all tokens, shared experts
                                             tensor-parallel (all-reduce) -> keep this rank's tokens -> residual

Gradients come out exact because every module that mixes ranks' contributions runs in DTensor land, where
the backward of an all-gather is a reduce-scatter and partial gradients are summed before use. The few places
that compute on local tensors (the routed experts, the router's outputs) compute the *same* full values on
every tp rank, so their gradients are replicated, not partial (see `_moe_plan`).

Limits. Every tp rank runs the routed experts on all tokens of its data-parallel batch (TP does not split
them; expert parallelism does): apply expert parallelism first (parameters that are already DTensors are
left on their mesh), over ranks that do not include tp. Token dropping (capacity_factor) draws `torch.rand`,
so the RNG must be seeded alike on the ranks of a tp group. `Transformer.decode` (generation) is not covered.
On CPU, `apply_tp` registers DTensor sharding rules for the CPU flash-attention kernel (torch ships rules for
the CUDA ones only).
"""

from __future__ import annotations

import functools
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication, register_sharding
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInputOutput, PrepareModuleOutput, RowwiseParallel, SequenceParallel,
    loss_parallel, parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from model.config import ModelConfig
from model.attention import MLA, Attention
from model.layers import MLP
from model.moe import MoE, Routing

__all__ = ["apply_tp", "tp_loss", "check_tp"]


# --------------------------------------------------------------------------------------------- custom styles
def _replicate_params(module: nn.Module, mesh: DeviceMesh) -> None:
    """Every not-yet-distributed parameter of `module` (recursively) -> Replicate DTensor on `mesh`.

    `distribute_tensor` broadcasts from rank 0 (nothing on meta), so ranks agree even if their copies differed.
    """
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                continue
            owner.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [Replicate()]),
                                                        requires_grad=param.requires_grad))


class Replicated(ParallelStyle):
    """Weights replicated over tp; the module runs on whatever DTensor layout it is given.

    For the MLA down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms: their outputs feed every
    head, so they are not split; their inputs are replicated DTensors, and the gradients arriving from the
    head-sharded projections are partial sums that DTensor adds up. For the MTP eh_proj on sequence-sharded
    input it is a local GEMM whose weight gradient is partial over tokens (summed the same way). For the
    routed experts, which read `_local(weight)` and compute on local tensors (see `_moe_plan`).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _replicate_params(module, device_mesh)
        return module


def _replicate(x: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """x as a Replicate DTensor whose gradient, on the way back, is summed to Replicate at this point.

    Sharded DTensors are all-gathered (backward: reduce-scatter). A replicated DTensor or a plain tensor (same
    values on every rank) is re-wrapped so its backward all-reduces the partial gradients of the tp-sharded
    consumers here, once (Megatron's `f`), instead of letting partial sums leak upstream.
    """
    if isinstance(x, DTensor):
        if any(not p.is_replicate() for p in x.placements):
            return x.redistribute(placements=[Replicate()])
        x = x.to_local()
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False)


class GatheredInput(ParallelStyle):
    """The module's tensor inputs become Replicate DTensors (`_replicate`): the residual stream for MLA and the
    dense MLP, plus RoPE's cos/sin for MLA (plain tensors computed identically on every rank)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def pre(mod, args):
            return tuple(_replicate(a, device_mesh) if isinstance(a, torch.Tensor) else a for a in args)

        module.register_forward_pre_hook(pre)
        return module


class ReplicatedRouter(ParallelStyle):
    """The MoE router with replicated weights, fed the same (all-gathered) tokens on every tp rank.

    The MoE computes on local tensors, but `Router.forward` does `F.linear(x, self.weight)` with a DTensor
    weight. So the input is wrapped as a Replicate DTensor, the router runs in DTensor land (the expert_bias
    buffer, a plain tensor, is treated as replicated via `implicit_replication`), and the `Routing` outputs are
    handed back as local tensors. All of it is replicated: gradients (main loss and the balance loss injected
    by `AuxLossInjector`) are identical on every tp rank, so they are counted once, not tp times.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _replicate_params(module, device_mesh)
        contexts: list = []  # implicit_replication contexts open during this module's forward

        def pre(mod, args):
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
            ctx = implicit_replication()
            ctx.__enter__()
            contexts.append(ctx)
            return (x, *args[1:])

        def post(mod, args, out: Routing):
            contexts.pop().__exit__(None, None, None)
            if out is None:  # forward raised (always_call): only close the context
                return out
            return Routing(*map(local_tensor, (out.scores, out.indices, out.weights)))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post, always_call=True)
        return module


@functools.cache  # once per process: the rules are torch's, process-wide
def _register_cpu_attention_sharding() -> None:
    """Head- and batch-parallel sharding rules for the CPU flash-attention kernels.

    DTensor ships rules for the CUDA SDPA kernels (flash, efficient, cuDNN) but none for the CPU one, so MLA
    with head-sharded DTensors fails on CPU without them. Attention is independent per (batch, head): the
    rule lets q, k, v, out and logsumexp ([B, H, T, ..]) be sharded alike on dim 0 or 1, or all replicated.
    """
    aten = torch.ops.aten

    def layouts(n_out: int, n_in: int, n_other: int) -> list:
        return [([p] * n_out, [p] * n_in + [None] * n_other) for p in (Replicate(), Shard(0), Shard(1))]

    @register_sharding(aten._scaled_dot_product_flash_attention_for_cpu.default)
    def forward_rule(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
        if attn_mask is not None:
            return [([Replicate()] * 2, [Replicate()] * 3 + [None, None])]
        return layouts(2, 3, 2)  # (out, logsumexp) <- (q, k, v), dropout_p, is_causal

    @register_sharding(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    def backward_rule(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                      scale=None):
        if attn_mask is not None:
            return [([Replicate()] * 3, [Replicate()] * 6 + [None, None])]
        return layouts(3, 6, 2)  # (dq, dk, dv) <- (dout, q, k, v, out, logsumexp), dropout_p, is_causal


# --------------------------------------------------------------------------------------------- plans
def _norm_style(seq: Placement) -> ParallelStyle:
    """RMSNorm on the residual stream: sequence-parallel (sharded tokens, replicated weight) or replicated."""
    return SequenceParallel() if isinstance(seq, Shard) else Replicated()


def _mla_plan(attn: nn.Module, seq: Placement) -> dict[str, ParallelStyle]:
    """MLA with heads sharded over tp.

    The input is all-gathered to Replicate; cos/sin become Replicate DTensors so RoPE runs in DTensor land.
    q_b_proj (q_proj) and kv_b_proj output [.., H * head_dim] head-major (the model unflattens the last dim as
    (H, head_dim)), so a column shard is a head shard; their outputs stay DTensors sharded on heads through
    RoPE, SDPA and the head merge, and o_proj is row-parallel (reduce-scatter back to `seq`).
    The down-projections and their norms are replicated (their outputs are shared by all heads).
    """
    plan: dict[str, ParallelStyle] = {
        "": GatheredInput(),
        "kv_a_proj_with_mqa": Replicated(),
        "kv_a_layernorm": Replicated(),
        "kv_b_proj": ColwiseParallel(use_local_output=False),
        "o_proj": RowwiseParallel(input_layouts=Shard(-1), output_layouts=seq, use_local_output=False),
    }
    if attn.cfg.q_lora_rank is None:
        plan["q_proj"] = ColwiseParallel(use_local_output=False)
    else:
        plan.update({"q_a_proj": Replicated(), "q_a_layernorm": Replicated(),
                     "q_b_proj": ColwiseParallel(use_local_output=False)})
    return plan


def _qkvo_plan(seq: Placement) -> dict[str, ParallelStyle]:
    """MHA / GQA / MQA (model.attention.Attention) with query and K/V heads sharded over tp: q_proj, k_proj and
    v_proj are column-parallel (head-major outputs, so rank r holds query heads r*H/tp.. and K/V heads r*K/tp..,
    exactly the K/V heads its query heads read), o_proj row-parallel; inputs gathered as for MLA."""
    return {
        "": GatheredInput(),
        "q_proj": ColwiseParallel(use_local_output=False),
        "k_proj": ColwiseParallel(use_local_output=False),
        "v_proj": ColwiseParallel(use_local_output=False),
        "o_proj": RowwiseParallel(input_layouts=Shard(-1), output_layouts=seq, use_local_output=False),
    }


def _swiglu_plan(output_layout: Placement, local_output: bool) -> dict[str, ParallelStyle]:
    """SwiGLU MLP (Megatron): the input gathered once, gate/up column-parallel (the SiLU*up product runs on
    local columns), down row-parallel: reduce-scatter to `output_layout` (all-reduce for Replicate)."""
    return {
        "": GatheredInput(),
        "gate_proj": ColwiseParallel(),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=output_layout, use_local_output=local_output),
    }


def _moe_plan(moe: MoE, seq: Placement) -> dict[str, ParallelStyle]:
    """DeepSeekMoE: every tp rank routes all tokens of its data-parallel batch and runs the routed experts on
    them (redundantly); the shared experts are tensor-parallel like the dense MLP.

    The module's input is all-gathered over the sequence and handed in as a local tensor whose gradient is
    declared replicated; its output is converted back to `seq` by taking the local chunk (backward:
    all-gather). Inside, the router and routed experts compute identical values and gradients on every rank:
    the experts read `_local(weight)` of replicated weights, whose gradient is therefore replicated, and the
    balance losses (loads, P, their injected gradient) are identical on every rank, so they count once.
    The routed experts are not split by tp: expert parallelism is the way to split them.
    """
    plan: dict[str, ParallelStyle] = {
        "": PrepareModuleInputOutput(input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_input=True,
                                     output_layouts=(Replicate(),), desired_output_layouts=(seq,),
                                     use_local_output=False),
        "gate": ReplicatedRouter(),
        "experts": Replicated(),
    }
    if moe.shared_experts is not None:  # input: the local (replicated) tokens; output all-reduced, local
        shared = _swiglu_plan(Replicate(), local_output=True)
        plan.update({f"shared_experts.{k}" if k else "shared_experts": v for k, v in shared.items()})
    return plan


class HeadShardedAttention:
    """`MLA.attend` under tensor parallelism: the core itself, on q, k, v DTensors sharded by head; QK-clip's
    observer sees this rank's heads as plain tensors (train/qk_clip.py gathers the heads' shares)."""

    def __init__(self, local):
        self.local = local

    def __call__(self, q, k, v, scale: float, observe=None):
        mine = None if observe is None else lambda q, k: observe(local_tensor(q), local_tensor(k))
        return self.local(q, k, v, scale, mine)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly distributed) tensor, sharing its storage."""
    return t.to_local() if isinstance(t, DTensor) else t


def _block_plan(block: nn.Module, seq: Placement) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {"input_layernorm": _norm_style(seq), "post_attention_layernorm": _norm_style(seq)}
    attn = _mla_plan(block.self_attn, seq) if isinstance(block.self_attn, MLA) else _qkvo_plan(seq)
    plan.update({f"self_attn.{k}" if k else "self_attn": v for k, v in attn.items()})
    if isinstance(block.mlp, MoE):
        mlp = _moe_plan(block.mlp, seq)
    elif isinstance(block.mlp, MLP):
        mlp = _swiglu_plan(seq, local_output=False)
    else:
        raise ValueError(f"tensor parallelism has no plan for a {type(block.mlp).__name__} feed-forward")
    plan.update({f"mlp.{k}" if k else "mlp": v for k, v in mlp.items()})
    return plan


def _mtp_plan(seq: Placement) -> dict[str, ParallelStyle]:
    """One MTP depth: norms like the residual-stream norms; eh_proj replicated (it maps the concatenated
    [emb; h] tokens back to D, so it runs on the sequence shard with no communication); its block like any."""
    return {"enorm": _norm_style(seq), "hnorm": _norm_style(seq), "norm": _norm_style(seq), "eh_proj": Replicated()}


def _root_plan(seq: Placement, loss_parallel_on: bool) -> list[tuple[str, ParallelStyle]]:
    """Embedding vocab-parallel (row-wise: masked lookup, then reduce-scatter over the sequence); the output
    head column-parallel over the vocabulary: logits stay vocab-sharded DTensors for `tp_loss`, or are gathered.

    Without sequence parallelism the embedding output is still reduce-scattered first and then all-gathered
    (the same traffic as one all-reduce): DTensor cannot turn the partial-sum gradient that reaches a
    replicated embedding output back into the embedding's masked-partial layout, but it can from Shard(1).
    """
    plan: list[tuple[str, ParallelStyle]] = [
        ("embed_tokens", RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False))]
    if not isinstance(seq, Shard):
        plan.append(("embed_tokens", PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=seq,
                                                         use_local_output=False)))
    plan += [("norm", _norm_style(seq)),
             ("lm_head", GatheredInput()),
             ("lm_head", ColwiseParallel(output_layouts=Shard(-1) if loss_parallel_on else Replicate(),
                                         use_local_output=not loss_parallel_on))]
    return plan


# --------------------------------------------------------------------------------------------- entry points
def _parallelize(module: nn.Module, mesh: DeviceMesh, plan) -> None:
    """Apply each style to its submodule ("" is `module` itself); plan: a dict or (name, style) pairs."""
    for name, style in (plan.items() if isinstance(plan, dict) else plan):
        parallelize_module(module.get_submodule(name), mesh, style)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Every width tp splits must divide by tp; one line naming the numbers."""
    sizes = {"num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
             "intermediate_size": cfg.intermediate_size}
    if cfg.attention != "mla":  # K/V heads are split like query heads (MQA's single head cannot be)
        sizes["num_key_value_heads"] = cfg.kv_heads
    if cfg.n_routed_experts > 0 and cfg.n_shared_experts > 0:
        sizes["moe_intermediate_size * n_shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        named = ", ".join(f"model.{k}={v}" for k, v in bad.items())
        raise ValueError(f"tensor parallelism tp={tp} must divide {named}")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True, loss_parallel: bool = True) -> None:
    """Shard `model` (a Transformer, or a pipeline stage of one) over the 1-D `tp_mesh`, in place.

    Call on full, identical weights or on meta, before FSDP. Afterwards every parameter is a DTensor on
    `tp_mesh` (or stays on the mesh it was already distributed over, e.g. experts under expert parallelism).
    With `loss_parallel` the model returns vocab-sharded DTensor logits: compute the loss with `tp_loss`.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs a 1-D tp mesh, got {tp_mesh.ndim}-D {tp_mesh.mesh_dim_names}")
    check_tp(model.cfg, tp_mesh.size())
    if model.cfg.tie_word_embeddings and model.embed_tokens is not None and model.lm_head is not None:
        raise ValueError("tensor parallelism does not support tie_word_embeddings (the embedding is sharded "
                         "row-wise and the output head column-wise as separate parameters)")
    _register_cpu_attention_sharding()
    seq = Shard(1) if sequence_parallel else Replicate()
    present = [(k, v) for k, v in _root_plan(seq, loss_parallel) if getattr(model, k, None) is not None]
    _parallelize(model, tp_mesh, present)  # a pipeline stage may lack the embedding or the head
    for block in model.layers.values():
        _parallelize(block, tp_mesh, _block_plan(block, seq))
    for module in model.mtp or []:
        _parallelize(module, tp_mesh, _mtp_plan(seq))
        _parallelize(module.block, tp_mesh, _block_plan(module.block, seq))
    for attn in [m for m in model.modules() if isinstance(m, (MLA, Attention))]:
        attn.attend = HeadShardedAttention(attn.attend)
    _stage_io(model, tp_mesh, seq)
    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise ValueError(f"apply_tp left parameters without a tensor-parallel plan: {plain}")
    for param in model.parameters():
        if param.requires_grad and param.device_mesh == tp_mesh:
            param.register_post_accumulate_grad_hook(_grad_to_param_layout)


def _stage_io(model: nn.Module, mesh: DeviceMesh, seq: Placement) -> None:
    """Pipeline stages exchange plain local tensors: a stage without the embedding takes this rank's part of
    the hidden states ([B, T/tp, D] with sequence parallelism, [B, T, D] without) and wraps it as a `seq`
    DTensor (so RoPE sees the global length); a stage without the head returns its local part."""
    if model.embed_tokens is None:
        def wrap(mod, args):
            x = args[0]
            if isinstance(x, DTensor) or not x.is_floating_point():
                return args
            return (DTensor.from_local(x, mesh, [seq], run_check=False), *args[1:])
        model.register_forward_pre_hook(wrap)
    if model.lm_head is None:
        model.register_forward_hook(lambda mod, args, out: local_tensor(out))


def _grad_to_param_layout(param: DTensor) -> None:
    """Give a gradient its parameter's layout as soon as it is accumulated.

    DTensor leaves some gradients partial over tp: replicated weights used on sequence shards (the norms
    under SP, eh_proj) or feeding sharded heads (q_a_proj, kv_a_proj_with_mqa and their norms) get per-rank
    partial sums; the embedding's may come back replicated. Summing (or slicing) here, once per backward,
    means the optimizer, gradient clipping and checkpoints see ordinary Replicate/Shard gradients. FSDP2
    does the same for the parameters it wraps (they are new objects, so this hook does not run twice).
    """
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


# --------------------------------------------------------------------------------------------- loss
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of vocab-sharded DTensor logits [N, V] -> a plain scalar.

    torch's `loss_parallel` computes it without gathering the vocabulary but needs its context around the
    backward too; this keeps the small loss graph and replays its backward inside the context, so callers
    (the trainer, pipeline schedules) can call `.backward()` anywhere.
    """

    @staticmethod
    def forward(ctx, logits: DTensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), loss_parallel():
            leaf = logits.detach().requires_grad_()
            loss = F.cross_entropy(leaf, labels)
        ctx.graph = (leaf, loss)
        return loss.to_local().detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        leaf, loss = ctx.graph
        del ctx.graph
        grad = DTensor.from_local(grad, loss.device_mesh, loss.placements, run_check=False)
        with loss_parallel():
            (dlogits,) = torch.autograd.grad(loss, leaf, grad)
        return dlogits, None


def tp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over all tokens: logits [.., V], labels [..].

    Vocab-sharded DTensor logits (apply_tp with loss_parallel) use torch's loss-parallel kernels (no gather
    of the vocabulary); replicated DTensors and plain tensors use F.cross_entropy. Returns a plain tensor.
    """
    logits, labels = logits.flatten(0, -2).float(), labels.flatten()
    if not isinstance(logits, DTensor):
        return F.cross_entropy(logits, labels)
    if not any(isinstance(p, Shard) for p in logits.placements):
        return F.cross_entropy(logits.full_tensor(), labels)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _VocabParallelCrossEntropy.apply(logits, labels)
    with loss_parallel():
        return F.cross_entropy(logits, labels).to_local()
