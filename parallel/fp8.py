"""FP8 training: which GEMMs run in FP8, how their operands are scaled, and the conversion of a model.

Recipes (`precision=fp8_<recipe>`), each for all three GEMMs of a layer (fprop y = x W, dgrad dx = dy W^T,
wgrad dW = x^T dy), every operand scaled along that GEMM's reduction dimension:

  tensorwise  one scale per tensor (per expert for the stacked expert weights); gradients in E5M2
  rowwise     one scale per row of the reduction dimension (per token, per output channel, ...)
  blockwise   DeepSeek-V3: activations and gradients in 1x128 tiles, weights in 128x128 blocks, E4M3

Dense linears with tensorwise/rowwise scaling are torchao's `Float8Linear` (`emulate=True` on CPU). The
rest (every recipe's grouped expert GEMMs, blockwise dense linears) is this file's `Fp8Mm`: on CPU it
quantizes -> dequantizes each operand exactly as the FP8 kernel would see it and runs the same matmul in
the operands' precision (FP8 products are exact in fp32; accumulation is fp32, as DeepSeek's promoted
partial sums). Scales are powers of two (the UE8M0 format of DeepSeek's later kernels), so a last-bit
change in an amax never rescales a whole tile. On a GPU (`emulate=false`) the grouped and blockwise GEMMs
are torchao's prototype FP8 kernels: blockwise grouped and dense for fp8_blockwise, rowwise grouped for
fp8_rowwise and also for fp8_tensorwise's experts (torchao has no tensorwise grouped GEMM; logged at start);
the rowwise one gets token groups padded to 16 rows (`aligned_token_groups`), the blockwise dense linear gets
M, K and N padded to the block. Blockwise needs DeepGEMM on Hopper or newer (`check_fp8`). The suite runs on
CPU: it tests the emulated paths, and this file's glue around torchao's rowwise grouped GEMM and blockwise
linear (signatures, layouts, padding) with the CUDA kernels replaced by the emulation; `bench/fp8_kernels.py`
compares the real kernels with the emulation on a GPU.

Kept in high precision, as in DeepSeek-V3: embedding, output head, router, norms, attention core.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from model.moe import GroupedExperts

log = logging.getLogger(__name__)
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448, 57344
RECIPES = ("tensorwise", "rowwise", "blockwise")
HIGH_PRECISION = ("embed_tokens", "lm_head")  # modules FP8 never touches (the router is not an nn.Linear)
TENSOR, ROW = 0, None  # tile sizes of `quantize_along`: whole tensor, whole row


@dataclass(frozen=True)
class Fp8Recipe:
    granularity: str  # tensorwise | rowwise | blockwise
    emulate: bool  # quantize -> dequantize around high-precision matmuls (any device) instead of FP8 kernels
    block: int = 128
    fsdp_all_gather: bool = False  # FSDP2 all-gathers dense weights already cast to FP8 (torchao; tensorwise)

    def __post_init__(self):
        if self.granularity not in RECIPES:
            raise ValueError(f"FP8 recipe must be one of {RECIPES}, got {self.granularity!r}")
        if self.fsdp_all_gather and self.granularity != "tensorwise":
            raise ValueError(f"FP8 all-gather needs one scale per weight tensor (fp8_tensorwise), "
                             f"not {self.granularity}")

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.granularity == "tensorwise" else E4M3  # torchao's tensorwise; DeepSeek: E4M3

    @property
    def act_tile(self):
        """Tile of activations/gradients along a reduction dimension."""
        return {"tensorwise": TENSOR, "rowwise": ROW, "blockwise": self.block}[self.granularity]


def fp8_supported(device: torch.device) -> bool:
    """Real FP8 GEMMs need an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8(recipe: Fp8Recipe, device: torch.device) -> None:
    """ValueError where `recipe` asks for FP8 kernels this device (or this install) does not have."""
    if recipe.emulate:
        return
    if not fp8_supported(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(f"FP8 kernels need an NVIDIA GPU with compute capability >= 8.9, this process runs on "
                         f"{name}; set precision.fp8_emulate=true to emulate FP8 (slow, for tests)")
    if recipe.granularity == "blockwise":
        problem = blockwise_grouped_kernels_missing(torch.cuda.get_device_capability(device))
        if problem:
            raise ValueError(f"fp8_blockwise runs the expert GEMMs through torchao, which uses DeepGEMM's grouped "
                             f"FP8 kernels and otherwise falls back to emulation without a word: {problem}. Install "
                             f"DeepGEMM, or use fp8_rowwise, or set precision.fp8_emulate=true")


def blockwise_grouped_kernels_missing(capability: tuple[int, int], import_module=importlib.import_module) -> str | None:
    """Why torchao's blockwise grouped GEMM would run emulated on a GPU of this compute capability (its
    KernelPreference.AUTO needs DeepGEMM's M- and K-grouped FP8 GEMMs and Hopper or newer), or None."""
    if capability < (9, 0):
        return f"DeepGEMM needs compute capability >= 9.0, this GPU has {capability[0]}.{capability[1]}"
    try:
        deep_gemm = import_module("deep_gemm")
    except (ImportError, OSError) as e:
        return f"the deep_gemm package does not import ({e})"
    wanted = {"m_grouped_fp8_gemm_nt_contiguous or m_grouped_fp8_fp4_gemm_nt_contiguous":
              ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_fp4_gemm_nt_contiguous"),
              "k_grouped_fp8_gemm_nt_contiguous": ("k_grouped_fp8_gemm_nt_contiguous",)}
    lacking = [name for name, symbols in wanted.items() if not any(hasattr(deep_gemm, s) for s in symbols)]
    return f"this deep_gemm has no {' and no '.join(lacking)}" if lacking else None


# ------------------------------------------------------------------------------------------ quantization
def pow2_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest power of two s with amax * s <= the format's max (fp32; huge for all-zero tiles)."""
    return torch.exp2(torch.floor(torch.log2(FP8_MAX[dtype] / amax.float().clamp_min(1e-30))).clamp(max=126))


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-m, m).to(dtype)


def _round_trip(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to FP8 with `scale` (broadcast) and back, in x's dtype."""
    return (_cast(x, scale, dtype).float() / scale).to(x.dtype)


def _tiles(x: torch.Tensor, tile) -> torch.Tensor:
    """x's last dimension cut into tiles of `tile` (`ROW`: one tile) -> [..., n_tiles, t], zero-padded."""
    k = x.shape[-1]
    t = k if tile is ROW else tile
    return F.pad(x, (0, -k % t)).unflatten(-1, (-1, t))


def quantize_along(x: torch.Tensor, dtype: torch.dtype, tile) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 data and fp32 scales of x, scaled along its last dimension: `TENSOR` one scale for all of x,
    `ROW` one per row, an int t one per 1 x t tile (a last partial tile gets its own scale).
    Returns (q with x's shape, scale: a scalar, or [..., n_tiles, 1] per tile)."""
    if tile is TENSOR:
        scale = pow2_scale(x.abs().amax(), dtype)
        return _cast(x, scale, dtype), scale
    tiles = _tiles(x, tile)
    scale = pow2_scale(tiles.abs().amax(-1, keepdim=True), dtype)
    return _cast(tiles, scale, dtype).flatten(-2)[..., :x.shape[-1]], scale


def fake_quantize(x: torch.Tensor, dtype: torch.dtype, tile) -> torch.Tensor:
    """x as an FP8 GEMM sees it: quantized along its last dimension, then dequantized (x's dtype)."""
    if tile is TENSOR:
        return _round_trip(x, pow2_scale(x.abs().amax(), dtype), dtype)
    tiles = _tiles(x, tile)
    scale = pow2_scale(tiles.abs().amax(-1, keepdim=True), dtype)
    return _round_trip(tiles, scale, dtype).flatten(-2)[..., :x.shape[-1]]


def fake_quantize_blocks(w: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
    """w [..., R, C] with one scale per block x block square (partial edge blocks scaled on their own)."""
    *lead, r, c = w.shape
    nr, nc = (r + block - 1) // block, (c + block - 1) // block
    padded = F.pad(w, (0, nc * block - c, 0, nr * block - r))
    # sizes spelled out: Inductor's dynamic-shape kernels for unflatten(-1, (-1, block)) of a padded last dimension
    # shorter than one block gave wrong values (torch 2.13; tests/test_fp8.py, dynamic shapes)
    blocks = padded.reshape(*lead, nr, block, nc, block)
    scale = pow2_scale(blocks.abs().amax(dim=(-3, -1), keepdim=True), dtype)
    return _round_trip(blocks, scale, dtype).reshape(*lead, nr * block, nc * block)[..., :r, :c]


def fake_quantize_segments(x: torch.Tensor, dtype: torch.dtype, offs: torch.Tensor, tile) -> torch.Tensor:
    """x [M, C] scaled along M (its rows: tokens), separately within each row segment offs (group ends):
    per segment and column (`ROW`), or per column in tiles of `tile` rows restarting at every segment
    (blockwise wgrad operands); `TENSOR`: one scale for the whole tensor."""
    if tile is TENSOR:
        return fake_quantize(x, dtype, TENSOR)
    m = x.shape[0]
    rows = torch.arange(m, device=x.device)
    seg = torch.searchsorted(offs.to(torch.int64), rows, right=True)  # segment of each row
    if tile is ROW:
        tile_of_row, n_tiles = seg, offs.numel() + 1
    else:
        starts = torch.cat([offs.new_zeros(1), offs[:-1]]).to(torch.int64)
        sizes = offs.to(torch.int64) - starts
        first_tile = torch.cumsum(torch.cat([sizes.new_zeros(1), (sizes + tile - 1) // tile]), 0)
        seg = seg.clamp(max=offs.numel() - 1)  # rows past the last offset (none in practice) join the last
        tile_of_row = first_tile[seg] + (rows - starts[seg]) // tile
        n_tiles = int(first_tile[-1]) + 1
    index = tile_of_row.unsqueeze(1).expand_as(x)
    amax = x.new_zeros(n_tiles, x.shape[1], dtype=torch.float32).scatter_reduce(
        0, index, x.abs().float(), "amax", include_self=True)
    return _round_trip(x, pow2_scale(amax, dtype).gather(0, index), dtype)


# ------------------------------------------------------------------------------------------- the GEMMs
def _weight_fq(b: torch.Tensor, recipe: Fp8Recipe, along: str) -> torch.Tensor:
    """Stacked weights b [E, K, N] fake-quantized for reduction over K (`along="K"`, fprop) or N (dgrad)."""
    if recipe.granularity == "blockwise":
        return fake_quantize_blocks(b, E4M3, recipe.block)  # the same squares serve both GEMMs
    if recipe.granularity == "tensorwise":  # one scale per expert matrix
        return _round_trip(b, pow2_scale(b.abs().amax(dim=(-2, -1), keepdim=True), E4M3), E4M3)
    if along == "K":
        return fake_quantize(b.transpose(-2, -1), E4M3, ROW).transpose(-2, -1)
    return fake_quantize(b, E4M3, ROW)


def _mm(x: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
    return x @ b[0] if offs is None else torch._grouped_mm(x, b, offs=offs)


class Fp8Mm(torch.autograd.Function):
    """Emulated FP8 y = x @ b (offs None: dense, b [1, K, N]) or grouped y_g = x_g @ b_g (b [E, K, N], rows of
    x sorted by group, offs = int32 group ends). Each GEMM's operands are fake-quantized along its
    reduction dimension: fprop over K, dgrad over N, wgrad over the rows of each group."""

    @staticmethod
    def forward(ctx, x, b, offs, recipe: Fp8Recipe):
        bq = _weight_fq(b, recipe, along="K")
        xq = fake_quantize(x, E4M3, recipe.act_tile)
        ctx.save_for_backward(x, b, offs, bq if recipe.granularity == "blockwise" else None)
        ctx.recipe = recipe
        return _mm(xq, bq, offs)

    @staticmethod
    def backward(ctx, dy):
        x, b, offs, bq = ctx.saved_tensors
        recipe, gd = ctx.recipe, ctx.recipe.grad_dtype
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            bq_n = bq if bq is not None else _weight_fq(b, recipe, along="N")
            dx = _mm(fake_quantize(dy, gd, recipe.act_tile), bq_n.transpose(-2, -1), offs)
        if ctx.needs_input_grad[1]:
            if offs is None:  # one token group: tiles down the columns, without data-dependent sizes (compiles whole)
                xq_t, dyq = fake_quantize(x.t(), E4M3, recipe.act_tile), fake_quantize(dy.t(), gd, recipe.act_tile).t()
                dw = (xq_t @ dyq).unsqueeze(0)
            else:
                xq = fake_quantize_segments(x, E4M3, offs, recipe.act_tile)
                dyq = fake_quantize_segments(dy, gd, offs, recipe.act_tile)
                dw = torch._grouped_mm(xq.t(), dyq, offs=offs)
        return dx, dw, None, None


def fp8_grouped_gemm(recipe: Fp8Recipe) -> Callable:
    """The `op(x, w, offs)` for `model.moe.grouped_mm` that runs the expert GEMMs in FP8."""
    if recipe.emulate:
        return lambda x, w, offs: Fp8Mm.apply(x, w, offs, recipe)
    if recipe.granularity == "blockwise":
        from torchao.prototype.moe_training.blockwise_fp8.grouped_mm import _to_fp8_blockwise_then_scaled_grouped_mm

        def blockwise(x, w, offs):  # torchao pads the token groups to the block itself
            return _to_fp8_blockwise_then_scaled_grouped_mm(x, _col_major(w), offs, out_dtype=x.dtype,
                                                            block_size=recipe.block)
        blockwise.width_align = recipe.block  # its kernels need K and N in whole blocks (model.moe.grouped_mm pads)
        return blockwise
    from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm
    # torchao's rowwise grouped GEMM does not pad token groups itself (its flag for it must be False)
    rowwise = aligned_token_groups(lambda x, w, offs: _to_fp8_rowwise_then_scaled_grouped_mm(
        x, _col_major(w), offs, out_dtype=x.dtype, pad_token_groups_for_grouped_mm=False))
    rowwise.width_align = 16  # its kernel needs K and N in multiples of 16 (model.moe.grouped_mm pads)
    return rowwise


def _col_major(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(-2, -1).contiguous().transpose(-2, -1)


GROUP_ALIGN = 16  # rows; FP8 grouped GEMMs need every token group to start 16-byte aligned (below)


def aligned_token_groups(op: Callable, align: int = GROUP_ALIGN) -> Callable:
    """`op(x, w, offs)` run with every token group padded by zero rows to a multiple of `align` rows, and the
    result gathered back to x's rows. In the weight-gradient GEMM dW_g = dY_g^T X_g the token dimension is the
    contiguous one of the FP8 operands, so each group must start on a 16-byte (16 FP8 elements) boundary:
    unaligned groups make the CUDA kernel fail (a device-side assert). No host sync: the padded buffer has
    room for the worst case. Zero rows add nothing to any product and are never a tile's amax."""
    def run(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ends = offs.to(torch.int64)
        sizes = torch.diff(ends, prepend=ends.new_zeros(1))
        padded_sizes = (sizes + align - 1) // align * align
        padded_ends = torch.cumsum(padded_sizes, 0)
        rows = torch.arange(x.shape[0], device=x.device)
        group = torch.searchsorted(ends, rows, right=True).clamp(max=ends.numel() - 1)
        dest = rows + ((padded_ends - padded_sizes) - (ends - sizes))[group]
        bound = -(-(x.shape[0] + ends.numel() * (align - 1)) // align) * align  # a row stride of 16 bytes too
        padded = x.new_zeros(bound, x.shape[1]).index_copy(0, dest, x)
        return op(padded, w, padded_ends.to(torch.int32)).index_select(0, dest)
    return run


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """y = x @ weight^T (weight [N, K]) in FP8 by `recipe`: our emulation, or torchao's blockwise kernel.
    Tensor-parallel weights (DTensors) run on the local shards; tiles never straddle shards, so the result
    equals one process whenever the local reduction width is a multiple of the block."""
    if isinstance(weight, DTensor):
        return _sharded_linear(x, weight, recipe)
    if not recipe.emulate:
        return _blockwise_kernel_linear(x.flatten(0, -2), weight, recipe.block).unflatten(0, x.shape[:-1])
    y = Fp8Mm.apply(x.flatten(0, -2), weight.t().unsqueeze(0), None, recipe)
    return y.unflatten(0, x.shape[:-1])


def _blockwise_kernel_linear(x: torch.Tensor, weight: torch.Tensor, block: int) -> torch.Tensor:
    """torchao's blockwise FP8 linear on x [M, K], weight [N, K], with M, K and N zero-padded to multiples of the
    block: its kernels assert them (DeepSeek-V2's kv_a_proj_with_mqa has N = 576, V2-Lite's dense MLP
    N = 10944, an MTP depth sees B x (T - k) tokens). Zero padding is exact: a partial tile is scaled by its
    own amax, as in the emulation, and padded rows and columns add nothing."""
    from torchao.prototype.blockwise_fp8_training.linear import fp8_blockwise_mm

    (m, k), n = x.shape, weight.shape[0]
    pad_m, pad_k, pad_n = -m % block, -k % block, -n % block
    if pad_m or pad_k:
        x = F.pad(x, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        weight = F.pad(weight, (0, pad_k, 0, pad_n))
    y = fp8_blockwise_mm.apply(x.contiguous(), weight.contiguous(), block, x.dtype)
    return y[:m, :n] if pad_m or pad_n else y


def _sharded_linear(x, weight: DTensor, recipe: Fp8Recipe) -> DTensor:
    """Column-parallel (weight Shard(0), x replicated), row-parallel (Shard(1), x sharded on its last dim:
    partial sums) or replicated (x's layout kept) linear on local shards. Local gradients that are partial
    sums are declared so: x's under column parallelism, the weight's when x is split over tokens."""
    (wp,) = weight.placements
    x_placements = x.placements if isinstance(x, DTensor) else (Replicate(),)
    x_sharded = not all(p.is_replicate() for p in x_placements)
    w_local = weight.to_local(grad_placements=[Partial()] if wp.is_replicate() and x_sharded else None)
    if isinstance(x, DTensor):
        x = x.to_local(grad_placements=[Partial()] if wp.is_shard(0) else None)
    y = fp8_linear(x, w_local, recipe)
    if wp.is_replicate():
        placements = x_placements
    elif wp.is_shard(0):
        placements = (Shard(y.ndim - 1),)
    else:
        placements = (Partial(),)
    return DTensor.from_local(y, weight.device_mesh, placements, run_check=False)


# ------------------------------------------------------------------------------------------ conversion
def _fp8_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, mod) for name, mod in model.named_modules()
            if type(mod) is nn.Linear and name.rsplit(".", 1)[-1] not in HIGH_PRECISION]


def convert_to_fp8(model: nn.Module, recipe: Fp8Recipe) -> dict[str, int]:
    """Run the model's dense linears (all but embedding and head) and its expert GEMMs in FP8. Parameter
    names and shapes are unchanged, so checkpoints move freely between precisions. Returns the counts of
    converted linears and expert stacks."""
    linears = _fp8_linears(model)
    if recipe.granularity == "blockwise":
        for name, mod in linears:
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, BlockwiseFp8Linear(mod, recipe))
    else:
        _torchao_linears(model, recipe, {name for name, _ in linears})
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    for mod in experts:
        mod.gemm = fp8_grouped_gemm(recipe)
    experts_scaling = "rowwise" if recipe.granularity == "tensorwise" and not recipe.emulate else recipe.granularity
    log.info("FP8 %s%s: %d linears, %d expert stacks (%s)", recipe.granularity, " (emulated)" * recipe.emulate,
             len(linears), len(experts), experts_scaling)
    return {"linears": len(linears), "expert_stacks": len(experts)}


class BlockwiseFp8Linear(nn.Linear):
    """A bias-free linear whose GEMMs run in FP8 with blockwise scales (`fp8_linear`). It takes the place of a
    model's nn.Linear and holds that linear's weight Parameter, so names, shapes and tensor-parallel plans stay."""

    def __init__(self, linear: nn.Linear, recipe: Fp8Recipe):
        if linear.bias is not None:
            raise ValueError("FP8 blockwise linears have no bias (DeepSeek's linears have none)")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        self.recipe = recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return fp8_linear(x.to(dtype), self.weight.to(dtype), self.recipe)
        return fp8_linear(x, self.weight, self.recipe)


def _torchao_linears(model: nn.Module, recipe: Fp8Recipe, names: set[str]) -> None:
    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    torchao_log.setLevel(logging.ERROR)  # its CUDA extension libraries fail to load on a CPU-only torch: noise
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    finally:
        torchao_log.setLevel(level)

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe.granularity), emulate=recipe.emulate,
                                 enable_fsdp_float8_all_gather=recipe.fsdp_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda _mod, fqn: fqn in names)


def after_optimizer_step(parts: list[nn.Module], recipe: Fp8Recipe | None) -> None:
    """With FP8 all-gather: every weight's FP8 scale for the next step's all-gather, one all-reduce for all
    (torchao), instead of one per weight inside the all-gather."""
    if recipe is not None and recipe.fsdp_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
        for part in parts:
            precompute_float8_dynamic_scale_for_fsdp(part)
