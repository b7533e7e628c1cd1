"""Bytes autograd keeps per token of a micro-batch for the backward pass, term by term from the code of
model/ (each function names the tensors it counts). With tensor parallelism, residual-stream norms run on
1/tp of the tokens (sequence parallel), heads and MLP columns are split by tp; the gathered inputs of the
projections, the MLA down-projection path, the router and the routed experts are whole on every tp rank.
`a` is the activation dtype's bytes; the router, norms' internals and the loss are fp32 in any precision.
"""

from __future__ import annotations

from model.config import ModelConfig

FP32 = 4


def _norm(width: int, a: int, shard: int, selective: bool, stored: int | None = None) -> float:
    """Bytes per token an RMSNorm keeps (model/layers.py): `F.rms_norm` saves its fp32 input (the tensor
    itself in fp32, else an fp32 copy) and the inverse rms, the weight product saves the normalised values.
    Recomputed (selective): only the input, kept by the checkpoint. `stored`: the width of the storage the
    input is a view of (c_KV is a view of the joint KV down-projection). Its output is counted by its user."""
    stored = stored or width
    own = a * stored if selective else (FP32 * (stored if a == FP32 else width) + FP32 + a * width)
    return own / shard


def _router_bytes(m: ModelConfig, a: int) -> float:
    """Router (fp32): the input cast, the scores, and the group-limited selection's maxima/indices/mask."""
    out = (FP32 * m.hidden_size if a != FP32 else 0) + FP32 * m.n_routed_experts + 8 * m.num_experts_per_tok
    if m.topk_method != "greedy" and m.n_group > 1:
        group = 16 * m.n_group if m.topk_method == "noaux_tc" else FP32 * m.n_group
        out += group + 8 * m.topk_group + m.n_group
    return out


def _routed_bytes(m: ModelConfig, a: int, ep: int) -> float:
    """Routed experts per token (K assignments): row index, gathered rows, gate_up output, SiLU output, their
    product, expert output, the scattered [N*K, D] outputs and the gate weights; under expert parallelism
    also the reordered output and its permutation."""
    k, d, i = m.num_experts_per_tok, m.hidden_size, m.moe_intermediate_size
    out = 8 * k + a * k * (3 * d + 4 * i) + a * k
    if ep > 1:
        out += a * k * d + 8 * k
    return out


def layer_activation_bytes(m: ModelConfig, layer: int, a: int, tp: int = 1, ep: int = 1, mode: str = "none") -> float:
    """Bytes autograd keeps per token of a micro-batch for decoder layer `layer` (activation dtype `a` bytes).

    With tensor parallelism, residual-stream norms run on 1/tp of the tokens (sequence parallel), heads and
    MLP columns are split by tp; the gathered inputs of the projections, the MLA down-projection path, the
    router and the routed experts are whole on every tp rank. `mode`: parallel.activation_checkpoint."""
    if mode == "full":
        return a * m.hidden_size / tp  # the block's input; the rest is recomputed
    sel = mode == "selective"
    d = m.hidden_size
    out = _norm(d, a, tp, sel) + a * d  # input norm + its gathered output (the down-projections' input)
    out += _attention_bytes(m, a, tp, sel)
    out += _norm(d, a, tp, sel) + a * d  # post-attention norm + the feed-forward's gathered input
    if not m.is_moe_layer(layer):
        return out + 4 * a * m.intermediate_size / tp  # SwiGLU: gate, SiLU, up, product
    out += _router_bytes(m, a) + _routed_bytes(m, a, ep)
    return out + 4 * a * m.n_shared_experts * m.moe_intermediate_size / tp


def _attention_bytes(m: ModelConfig, a: int, tp: int, sel: bool) -> float:
    """Attention past its gathered input. MLA: the query and latent down-projection paths, then SDPA keeps
    q, k, v (v zero-padded to the q/k width), its output and the log-sum-exp; o_proj its input. MHA/GQA/MQA:
    SDPA keeps q, k, v (GQA's K/V heads repeated for their query heads), its output and the log-sum-exp;
    o_proj its input."""
    h = m.num_attention_heads // tp
    if m.attention != "mla":
        return a * 5 * h * m.attn_head_dim + FP32 * h
    out = 0.0
    if m.q_lora_rank is not None:
        out += _norm(m.q_lora_rank, a, 1, sel) + a * m.q_lora_rank
    out += _norm(m.kv_lora_rank, a, 1, sel, m.kv_lora_rank + m.qk_rope_head_dim) + a * m.kv_lora_rank
    return out + a * 4 * h * m.qk_head_dim + FP32 * h + a * h * m.v_head_dim


def _attention_output_widths(m: ModelConfig, tp: int) -> float:
    """Per token: the output widths of attention's weight-using ops (projections, latent norms)."""
    h = m.num_attention_heads // tp
    if m.attention != "mla":
        return (h + 2 * m.kv_heads // tp) * m.attn_head_dim + m.hidden_size
    out = m.kv_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim + h * (m.qk_nope_head_dim + m.v_head_dim)
    return out + h * m.qk_head_dim + (2 * m.q_lora_rank if m.q_lora_rank is not None else 0) + m.hidden_size


def head_activation_bytes(m: ModelConfig, a: int, tp: int = 1, mode: str = "none", pipelined: bool = False,
                          fused: bool = False) -> float:
    """Final norm, the output head's gathered input, and what the fp32 cross-entropy keeps: the log-softmax
    (one process per vocabulary), or the shifted logits and their exponentials (vocabulary-parallel under
    tp). A pipeline stage also keeps its output, the logits, until the micro-batch's backward.
    `fused` (train.fused_loss): the fused linear cross-entropy keeps per token only its softmax statistics
    (max, sum of exponentials, loss: fp32; target and masks: 10 bytes), and the stage's output is the head's input."""
    loss = 3 * FP32 + 10 if fused else FP32 * m.vocab_size / tp * (2 if tp > 1 else 1)
    out = _norm(m.hidden_size, a, tp, mode == "selective") + a * m.hidden_size + loss
    return out + ((a * m.hidden_size if fused else a * m.vocab_size / tp) if pipelined else 0)


def loss_workspace_bytes(m: ModelConfig, a: int, tp: int = 1, fused: bool = False) -> float:
    """Per token, the loss's backward temporaries: the cross-entropy's fp32 gradients over this rank's vocabulary
    (and, vocabulary-parallel, their accumulation buffer); fused, one fp32 block of logits about the size of the
    hidden states (DeepSpeed sizes its blocks so), that block's gradient cast to the compute dtype, and the fp32
    accumulator of the hidden-state gradient."""
    if fused:
        return (2 * FP32 + (a if a != FP32 else 0)) * m.hidden_size
    return (3 if tp > 1 else 2) * FP32 * m.vocab_size / tp


def weight_grad_bytes(m: ModelConfig, layer: int | None, a: int, tp: int = 1, fused: bool = False) -> float:
    """Per token: the gradients of every weight-using op's output (each linear, norm scale, grouped GEMM) of
    decoder layer `layer` (None: the final norm and head; `fused`: the head's weight gradient comes out of the
    fused loss's one backward, no logits' gradient), which a split backward keeps from its input-gradient pass to
    its weight-gradient pass (zero-bubble schedules)."""
    d = m.hidden_size
    if layer is None:
        return a * (d / tp + (0 if fused else m.vocab_size / tp))
    out = 2 * d / tp + _attention_output_widths(m, tp)
    if not m.is_moe_layer(layer):
        return a * (out + 2 * m.intermediate_size / tp + d)
    k, i = m.num_experts_per_tok, m.moe_intermediate_size
    out += k * (2 * i + d) + 2 * m.n_shared_experts * i / tp + d
    return a * out + FP32 * m.n_routed_experts


def mtp_activation_bytes(m: ModelConfig, a: int, tp: int = 1, ep: int = 1, mode: str = "none",
                         fused: bool = False) -> float:
    """The multi-token-prediction depths (DeepSeek-V3), on the stage with the head: per depth the two input
    norms, the projection's concatenated input, one decoder layer, and the depth's own norm, head and loss."""
    d = m.hidden_size
    per_depth = 2 * _norm(d, a, tp, mode == "selective") + 2 * a * d
    per_depth += layer_activation_bytes(m, m.num_hidden_layers, a, tp, ep, mode)
    per_depth += head_activation_bytes(m, a, tp, mode, fused=fused)
    return m.num_nextn_predict_layers * per_depth
