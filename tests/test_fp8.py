"""FP8 recipes (parallel/fp8.py): quantization error bounds on known tensors, GEMMs and their gradients
against fp32, the conversion of a model, BF16 optimizer moments, and training against bf16."""

import copy

import pytest
import torch
from torch import nn

from parallel.fp8 import (E4M3, E5M2, GROUP_ALIGN, RECIPES, ROW, TENSOR, Fp8Mm, Fp8Recipe, aligned_token_groups,
                          blockwise_grouped_kernels_missing, check_fp8, convert_to_fp8, fake_quantize,
                          fake_quantize_blocks, fake_quantize_segments, fp8_grouped_gemm, fp8_linear, pow2_scale,
                          quantize_along)
from conftest import base_args, metrics, rel, tiny_model, train
from train.optim import AdamWLowPrecisionMoments

HALF_ULP = {E4M3: 2.0 ** -4, E5M2: 2.0 ** -3}  # relative rounding bound of normal numbers (3 / 2 mantissa bits)


# ------------------------------------------------------------------------------------------ quantization
MANTISSA = {E4M3: 3, E5M2: 2}


def _per_element(scale: torch.Tensor, tile, shape) -> torch.Tensor:
    if tile is TENSOR:
        return scale.expand(shape)
    k = shape[-1]
    return scale.expand(*scale.shape[:-1], k if tile is ROW else tile).flatten(-2)[..., :k]


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("tile", [TENSOR, ROW, 128])
def test_round_trip_within_half_ulp(dtype, tile):
    """Every element within half an ulp of the format at its scale: relative 2^-4 (E4M3) / 2^-3 (E5M2) for
    normal numbers, half the subnormal spacing below; each tile's amax uses the top binade of the format."""
    torch.manual_seed(0)
    x = torch.randn(8, 384) * torch.logspace(-2, 2, 8).unsqueeze(1)  # rows over four decades
    q, scale = quantize_along(x, dtype, tile)
    assert q.dtype == dtype
    assert torch.equal(torch.log2(scale).round(), torch.log2(scale)), "scales are powers of two"
    sc = _per_element(scale, tile, x.shape)
    scaled = x.abs() * sc
    top = scaled.amax() if tile is TENSOR else scaled.unflatten(-1, (-1, 384 if tile is ROW else 128)).amax(-1)
    fmax = torch.finfo(dtype).max
    assert bool((top <= fmax).all()) and bool((top > fmax / 2).all())
    spacing = torch.finfo(dtype).smallest_normal * 2.0 ** -MANTISSA[dtype]  # subnormal step
    bound = torch.maximum(HALF_ULP[dtype] * x.abs(), spacing / 2 / sc)
    err = (fake_quantize(x, dtype, tile) - x).abs()
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert float((err / x.abs()).max()) > HALF_ULP[dtype] / 4, "the bound is not vacuous: FP8 really rounds"


def test_representable_values_round_trip_exactly():
    x = torch.tensor([[1.0, 1.125, -1.875, 0.5, 448.0 / 64, -3.0, 0.0, 2.0 ** -5]])
    for tile in (TENSOR, ROW, 128):
        assert torch.equal(fake_quantize(x, E4M3, tile), x)


def test_outlier_costs_only_its_own_tile():
    """One outlier of 1e4 among values of 1e-2: tensorwise flushes the whole tensor's small values, rowwise its
    row, blockwise only its 1x128 tile; 128x128 weight blocks keep the other blocks exact to half an ulp."""
    torch.manual_seed(0)
    x = torch.randn(4, 256) * 1e-2
    x[0, 5] = 1e4
    errs = {}
    for name, tile in (("tensorwise", TENSOR), ("rowwise", ROW), ("blockwise", 128)):
        y = fake_quantize(x, E4M3, tile)
        errs[name] = (rel(y[1:], x[1:]), rel(y[0, 128:], x[0, 128:]), rel(y[0, 6:128], x[0, 6:128]))
    assert errs["tensorwise"][0] > 0.5 and errs["tensorwise"][1] > 0.5  # 1e-2 * 448/1e4 < E4M3's smallest value
    assert errs["rowwise"][0] < 0.04 and errs["rowwise"][1] > 0.5
    assert errs["blockwise"][0] < 0.04 and errs["blockwise"][1] < 0.04 and errs["blockwise"][2] > 0.5
    w = torch.randn(256, 256) * 1e-2
    w[3, 7] = 1e4
    wq = fake_quantize_blocks(w, E4M3, 128)
    assert rel(wq[128:, 128:], w[128:, 128:]) < 0.04 and rel(wq[128:, :128], w[128:, :128]) < 0.04
    assert rel(wq[:128, 8:128], w[:128, 8:128]) > 0.5


def test_segment_tiles_restart_at_every_group():
    """Weight-gradient operands are scaled along tokens in tiles of 128 rows counted from each expert's first
    row: equal to quantizing every group's rows on their own."""
    torch.manual_seed(0)
    sizes = [130, 0, 5, 300]
    x = torch.randn(sum(sizes), 16) * torch.rand(sum(sizes), 1) * 10
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    got = fake_quantize_segments(x, E4M3, offs, 128)
    start = 0
    for n in sizes:
        part = x[start:start + n]
        for t in range(0, n, 128):  # tile of up to 128 rows, each column its own scale
            end = min(t + 128, n)
            ref = fake_quantize(part[t:end].t().contiguous(), E4M3, ROW).t()
            assert torch.equal(got[start + t:start + end], ref)
        start += n
    per_group = fake_quantize_segments(x, E4M3, offs, ROW)
    assert torch.equal(per_group[:130], fake_quantize(x[:130].t().contiguous(), E4M3, ROW).t())


def test_pow2_scale_of_zero_tile_is_finite():
    s = pow2_scale(torch.zeros(3), E4M3)
    assert bool(torch.isfinite(s).all()) and torch.equal(fake_quantize(torch.zeros(2, 8), E4M3, ROW), torch.zeros(2, 8))


def test_block_quantizer_compiled_with_dynamic_shapes_equals_eager():
    """Inductor recompiles a function seen with a second shape for symbolic sizes (as per-block compile does
    for linears of several widths). Weights narrower than one block once came out of that kernel wrong by up
    to 1e38 (`parallel.compile=true` with fp8_blockwise: loss nan at step 1); every shape must equal eager."""
    torch.manual_seed(0)
    compiled = torch.compile(lambda w: fake_quantize_blocks(w, E4M3, 128), backend="inductor", dynamic=True)
    for shape in [(1, 64, 192), (1, 192, 64), (1, 200, 72), (2, 130, 30)]:
        w = torch.randn(*shape)
        assert torch.equal(compiled(w), fake_quantize_blocks(w, E4M3, 128)), shape


# ------------------------------------------------------------------------------------------------ GEMMs
def _grouped_problem():
    torch.manual_seed(1)
    x = torch.randn(300, 256, requires_grad=True)
    w = (torch.randn(3, 256, 192) * 0.05).requires_grad_()
    offs = torch.tensor([100, 100, 300], dtype=torch.int32)  # the middle expert gets no tokens
    return x, w, offs


@pytest.mark.parametrize("recipe", RECIPES)
def test_grouped_gemm_and_gradients_match_fp32(recipe):
    """Each GEMM quantizes both operands: the relative error of y, dx and dW lies between one rounding of one
    operand and two (E4M3 ~2.7% rms per operand; tensorwise gradients in E5M2, ~5.4%)."""
    x, w, offs = _grouped_problem()
    ref = torch._grouped_mm(x, w, offs=offs)
    g = torch.randn_like(ref)
    dx, dw = torch.autograd.grad(ref, (x, w), g)
    y = Fp8Mm.apply(x, w, offs, Fp8Recipe(recipe, emulate=True))
    dxq, dwq = torch.autograd.grad(y, (x, w), g)
    grad_hi = 0.08 if recipe == "tensorwise" else 0.05
    assert 0.02 < rel(y, ref) < 0.05
    assert 0.02 < rel(dxq, dx) < grad_hi and 0.02 < rel(dwq, dw) < grad_hi
    assert torch.equal(dwq[1], torch.zeros_like(dwq[1])), "an expert without tokens gets a zero gradient"


def test_rowwise_expert_weights_are_scaled_along_each_gemms_reduction():
    """Rowwise scales run along the reduction dimension: fprop (over K) gives each output column of an expert
    weight [K, N] its own scale, dgrad (over N) each row. One column 1e5x larger than the rest then leaves the
    other columns of y as accurate as without it (E4M3: a few % for two quantized operands), and one large row
    leaves the other columns of dx so. Scaled along the other axis, the large column or row would set every
    scale, and the small weights would fall below E4M3's range (2^-9 to 448, a ratio of 2^17.8) to zero."""
    torch.manual_seed(4)
    x, w = torch.randn(60, 160, requires_grad=True), torch.randn(2, 160, 48) * 0.05
    offs = torch.tensor([25, 60], dtype=torch.int32)
    recipe = Fp8Recipe("rowwise", emulate=True)
    big_col, big_row = w.clone(), w.clone()
    big_col[:, :, 7] *= 1e5
    big_row[:, 11, :] *= 1e5
    y = Fp8Mm.apply(x, big_col, offs, recipe)
    ref = torch._grouped_mm(x, big_col, offs=offs)
    rest = [n for n in range(48) if n != 7]
    assert rel(y[:, rest], ref[:, rest]) < 0.05
    g = torch.randn(60, 48)
    dx = torch.autograd.grad(Fp8Mm.apply(x, big_row, offs, recipe), x, g)[0]
    dx_ref = torch.autograd.grad(torch._grouped_mm(x, big_row, offs=offs), x, g)[0]
    rest = [k for k in range(160) if k != 11]
    assert rel(dx[:, rest], dx_ref[:, rest]) < 0.05


@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_grouped_gemm_equals_one_dense_gemm_per_expert(recipe):
    """The grouped FP8 GEMM is the dense FP8 GEMM of each expert on its own tokens (not so for tensorwise,
    whose activation scale spans all experts' tokens; it is checked against fp32 above)."""
    x, w, offs = _grouped_problem()
    r = Fp8Recipe(recipe, emulate=True)
    y = Fp8Mm.apply(x, w, offs, r)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    start = 0
    for e, end in enumerate(offs.tolist()):
        xe = x[start:end].detach().requires_grad_()
        we = w[e].detach().t().contiguous().requires_grad_()  # nn.Linear layout [N, K]
        ye = fp8_linear(xe, we, r)
        torch.testing.assert_close(y[start:end], ye, rtol=1e-5, atol=1e-6)
        if end > start:
            dxe, dwe = torch.autograd.grad(ye, (xe, we), g[start:end])
            torch.testing.assert_close(dx[start:end], dxe, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dw[e], dwe.t(), rtol=1e-5, atol=1e-6)
        start = end


def _aligned_call_checks(x, w, offs):
    """What an FP8 grouped GEMM kernel requires of its operands: groups of whole 16-row tiles, row-major x
    with a row count that is a multiple of 16 too."""
    assert offs.dtype == torch.int32 and bool((offs % GROUP_ALIGN == 0).all()), offs
    assert x.shape[0] % GROUP_ALIGN == 0 and x.is_contiguous()


def test_aligned_token_groups_pad_every_group_and_change_nothing():
    """Groups of 0, 7, 16 and 27 rows reach the op as 0, 16, 16 and 32 rows; output and both gradients equal
    the unpadded rowwise FP8 GEMM (zero rows add nothing and never set a scale)."""
    torch.manual_seed(2)
    x = torch.randn(50, 32, requires_grad=True)
    w = (torch.randn(4, 32, 48) * 0.1).requires_grad_()
    offs = torch.tensor([0, 7, 23, 50], dtype=torch.int32)
    recipe = Fp8Recipe("rowwise", emulate=True)
    seen = []

    def op(xp, wp, op_offs):
        _aligned_call_checks(xp, wp, op_offs)
        seen.append(op_offs.tolist())
        return Fp8Mm.apply(xp, wp, op_offs, recipe)

    y = aligned_token_groups(op)(x, w, offs)
    ref = Fp8Mm.apply(x, w, offs, recipe)
    assert seen == [[0, 16, 32, 64]]
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (7 stored mantissa bits): 2^(floor(log2 |x|) - 7)."""
    tiny = torch.finfo(torch.bfloat16).tiny
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(tiny))) - 7)


def _one_rounding_apart(got: torch.Tensor, want: torch.Tensor, abs_products: torch.Tensor, k: int) -> torch.Tensor:
    """Elementwise: two bf16 results of one GEMM on the same FP8 operands, each an fp32 sum of K exact products
    (FP8 x FP8 fits fp32) in its own order, then rounded to bf16. Each fp32 sum is within (K + 2) 2^-24
    sum|a b| of the exact one (the +2: the emulation's dequantizing divisions), and each rounding within half a
    bf16 ulp: so they differ by at most one ulp of the larger plus twice the summation bound. True where so."""
    bound = _bf16_ulp(torch.maximum(got.abs(), want.abs())) + 2 * (k + 2) * 2.0 ** -24 * abs_products
    return (got - want).abs() <= bound


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_real_fp8_dense_kernel_equals_the_emulation(recipe):
    """torch._scaled_mm has a CPU kernel, so torchao's real (not emulated) FP8 path for dense linears runs here.
    A dense block (MLA and MLP linears, bf16 autocast) really calls the kernel for all three GEMMs of each
    linear; and on the operands each linear saw in that block (its input and its output gradient), the kernel's
    output, input gradient and weight gradient equal the emulation's within the arithmetic of one bf16
    rounding (`_one_rounding_apart`), element by element. Whole-block outputs are not compared: a one-ulp
    rounding difference upstream can move an element to the next FP8 value downstream, by how much depends on
    the CPU's bf16 GEMM path (AVX2, AVX512-BF16 or AMX), not on the recipe."""
    from torch.profiler import profile

    model = _tiny()
    x = torch.randn(2, 32, model.cfg.hidden_size)
    cos, sin = model._rope(0, 32, x.device)
    blocks = {}
    for emulate in (False, True):
        blocks[emulate] = copy.deepcopy(model.layers["0"])
        convert_to_fp8(blocks[emulate], Fp8Recipe(recipe, emulate=emulate))
    seen, hooks = {}, []
    for name, lin in blocks[False].named_modules():
        if type(lin).__name__ == "Float8Linear":
            hooks.append(lin.register_forward_hook(lambda m, i, o, n=name: seen.update({n: [i[0].detach()]})))
            hooks.append(lin.register_full_backward_hook(lambda m, gi, go, n=name: seen[n].append(go[0].detach())))
    kernels = []
    for emulate in (False, True):
        xi = x.clone().requires_grad_()
        with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            y = blocks[emulate](xi, cos, sin)
            torch.autograd.grad(y.float().square().sum(), [xi, *blocks[emulate].parameters()])
        kernels.append(sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm"))
        for h in hooks if not emulate else ():
            h.remove()
    assert kernels == [3 * 8, 0]  # fprop, dgrad and wgrad of the 5 MLA and 3 MLP linears; none emulated
    assert len(seen) == 8
    for name, (inp, dy) in seen.items():
        results = []
        for emulate in (False, True):
            lin = blocks[emulate].get_submodule(name)
            xi = inp.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = lin(xi)
                dx, dw = torch.autograd.grad(out, [xi, lin.weight], dy)
            results.append((out.float(), dx.float(), dw.float()))
        (y_r, dx_r, dw_r), (y_e, dx_e, dw_e) = results
        a, w, g = inp.float().abs().flatten(0, -2), lin.weight.detach().float().abs(), dy.float().abs().flatten(0, -2)
        # sum|a b| of the quantized operands is at most (1 + 2^-3)^2 < 1.3 times that of the unquantized ones
        checks = {"y": (y_r.flatten(0, -2), y_e.flatten(0, -2), 1.3 * a @ w.t(), w.shape[1]),
                  "dx": (dx_r.flatten(0, -2), dx_e.flatten(0, -2), 1.3 * g @ w, w.shape[0]),
                  "dw": (dw_r, dw_e, 1.3 * g.t() @ a, a.shape[0])}
        for what, (got, want, products, k) in checks.items():
            ok = _one_rounding_apart(got, want, products, k)
            assert bool(ok.all()), f"{name} {what}: {int((~ok).sum())} elements beyond one bf16 rounding"
            assert not torch.equal(got, torch.zeros_like(got)), f"{name} {what} is zero: nothing was compared"


def test_gpu_rowwise_expert_path_calls_torchao_correctly(monkeypatch):
    """The GPU path of fp8_rowwise experts, with torchao's kernel (CUDA only) replaced by a stand-in that
    checks the call against the real function's signature and the kernel's layout rules, then computes the
    emulated rowwise GEMM: the experts' output and gradients equal the emulated recipe's."""
    import inspect

    import torchao.prototype.moe_training.fp8_grouped_mm as ao

    real = inspect.signature(ao._to_fp8_rowwise_then_scaled_grouped_mm)
    emulated = Fp8Recipe("rowwise", emulate=True)

    def stand_in(*args, **kwargs):
        bound = real.bind(*args, **kwargs)
        bound.apply_defaults()
        a, b_t, offs = bound.arguments["A"], bound.arguments["B_t"], bound.arguments["offs"]
        assert bound.arguments["pad_token_groups_for_grouped_mm"] is False
        assert bound.arguments["out_dtype"] == a.dtype
        assert b_t.stride(-2) == 1, "B_t must be column-major per expert"
        assert a.shape[-1] % 16 == 0 and b_t.shape[-2] % 16 == 0 and b_t.shape[-1] % 16 == 0, (a.shape, b_t.shape)
        _aligned_call_checks(a, b_t, offs)
        return Fp8Mm.apply(a, b_t, offs, emulated)

    monkeypatch.setattr(ao, "_to_fp8_rowwise_then_scaled_grouped_mm", stand_in)
    from model.moe import GroupedExperts

    torch.manual_seed(3)
    experts = GroupedExperts(8, 40, 24, std=0.05)  # widths 40 and 24 (48 for gate_up): not multiples of 16
    x = torch.randn(45, 40, requires_grad=True)
    counts = torch.tensor([5, 0, 17, 3, 5, 5, 9, 1])  # rows per expert, none a multiple of 16
    grads = []
    for gemm in (fp8_grouped_gemm(Fp8Recipe("rowwise", emulate=False)), fp8_grouped_gemm(emulated)):
        experts.gemm = gemm
        y = experts(x, counts)
        grads.append((y, *torch.autograd.grad(y.square().sum(), (x, experts.gate_up_proj, experts.down_proj))))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_gpu_blockwise_expert_path_calls_torchao_correctly(monkeypatch):
    """The GPU path of fp8_blockwise experts, with torchao's blockwise grouped GEMM (its module needs Triton)
    replaced by a stand-in with its 0.18 signature that asserts its preconditions (row-major A, per-expert
    column-major B_t, K and N multiples of 128, int32 offsets; it pads token groups itself) and computes the
    emulated recipe: experts of widths 200 and 72 give the emulated recipe's output and gradients."""
    import sys
    import types

    from model.moe import GroupedExperts

    emulated = Fp8Recipe("blockwise", emulate=True)

    def stand_in(A, B_t, offs=None, out_dtype=torch.bfloat16, float8_dtype=E4M3, block_size=128,
                 pad_token_groups_for_grouped_mm=True, kernel_preference=None):
        assert block_size == 128 and out_dtype == A.dtype and pad_token_groups_for_grouped_mm
        assert A.is_contiguous() and B_t.stride(-2) == 1 and offs.dtype == torch.int32
        assert A.shape[-1] % 128 == 0 and B_t.shape[-1] % 128 == 0 and A.shape[-1] == B_t.shape[-2]
        return Fp8Mm.apply(A, B_t, offs, emulated)

    monkeypatch.setitem(sys.modules, "torchao.prototype.moe_training.blockwise_fp8.grouped_mm",
                        types.SimpleNamespace(_to_fp8_blockwise_then_scaled_grouped_mm=stand_in))
    torch.manual_seed(5)
    experts = GroupedExperts(4, 200, 72, std=0.05)  # K and N reach the kernel padded to whole 128 blocks
    x = torch.randn(60, 200, requires_grad=True)
    counts = torch.tensor([13, 0, 40, 7])
    results = []
    for recipe in (Fp8Recipe("blockwise", emulate=False), emulated):
        experts.gemm = fp8_grouped_gemm(recipe)
        y = experts(x, counts)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, experts.gate_up_proj, experts.down_proj))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_gpu_blockwise_linear_pads_every_dimension_to_the_block(monkeypatch):
    """The GPU path of fp8_blockwise dense linears, with torchao's `fp8_blockwise_mm` (Triton and CUDA only: its
    module does not import here) replaced by a stand-in with its 0.18 signature that asserts what its kernels
    assert (M, K and N multiples of 128, contiguous operands) and computes the emulated recipe. M = 70, K = 200,
    N = 150 reach it padded to 128 / 256 / 256, and output and gradients equal the emulated recipe's."""
    import sys
    import types

    emulated = Fp8Recipe("blockwise", emulate=True)
    calls = []

    class StandIn:
        @staticmethod
        def apply(x, weight, block_size, out_dtype=torch.bfloat16, use_triton=False):
            assert block_size == 128 and out_dtype == x.dtype and not use_triton
            assert x.is_contiguous() and weight.is_contiguous()
            assert x.shape[0] % 128 == 0 and x.shape[1] % 128 == 0 and weight.shape[0] % 128 == 0, \
                (x.shape, weight.shape)
            calls.append((tuple(x.shape), tuple(weight.shape)))
            return Fp8Mm.apply(x, weight.t().unsqueeze(0), None, emulated)

    monkeypatch.setitem(sys.modules, "torchao.prototype.blockwise_fp8_training.linear",
                        types.SimpleNamespace(fp8_blockwise_mm=StandIn))
    torch.manual_seed(4)
    x = torch.randn(2, 35, 200, requires_grad=True)
    w = (torch.randn(150, 200) * 0.1).requires_grad_()
    results = []
    for recipe in (Fp8Recipe("blockwise", emulate=False), emulated):
        y = fp8_linear(x, w, recipe)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, w))))
    assert calls == [((128, 256), (256, 256))]
    assert results[0][0].shape == (2, 35, 150)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fp8_all_gather_wraps_dense_weights_for_fsdp():
    model = _tiny()
    convert_to_fp8(model, Fp8Recipe("tensorwise", emulate=True, fsdp_all_gather=True))
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
    assert isinstance(model.layers["1"].mlp.shared_experts.up_proj.weight, WeightWithDynamicFloat8CastTensor)
    assert not isinstance(model.lm_head.weight, WeightWithDynamicFloat8CastTensor)
    with pytest.raises(ValueError, match="fp8_tensorwise"):
        Fp8Recipe("rowwise", emulate=True, fsdp_all_gather=True)


def test_check_fp8_refuses_cpu_without_emulation():
    with pytest.raises(ValueError, match="compute capability >= 8.9.*fp8_emulate=true"):
        check_fp8(Fp8Recipe("rowwise", emulate=False), torch.device("cpu"))
    check_fp8(Fp8Recipe("rowwise", emulate=True), torch.device("cpu"))


def test_blockwise_refuses_a_gpu_where_torchao_would_emulate_the_expert_gemms():
    """torchao's blockwise grouped GEMM silently emulates without DeepGEMM or below Hopper: say why instead."""
    import types

    full = types.SimpleNamespace(m_grouped_fp8_gemm_nt_contiguous=1, k_grouped_fp8_gemm_nt_contiguous=1)
    no_k = types.SimpleNamespace(m_grouped_fp8_fp4_gemm_nt_contiguous=1)

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    old_gpu = blockwise_grouped_kernels_missing((8, 9), lambda _: full)
    assert "needs compute capability >= 9.0, this GPU has 8.9" in old_gpu
    assert "does not import (No module named 'deep_gemm')" in blockwise_grouped_kernels_missing((9, 0), missing)
    assert blockwise_grouped_kernels_missing((9, 0), lambda _: no_k) == \
        "this deep_gemm has no k_grouped_fp8_gemm_nt_contiguous"
    assert blockwise_grouped_kernels_missing((9, 0), lambda _: full) is None
    assert blockwise_grouped_kernels_missing((10, 0), lambda _: full) is None


# ------------------------------------------------------------------------------------------------ model
def _tiny():
    torch.manual_seed(0)
    return tiny_model()


def _loss_and_grads(model, tokens):
    loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("recipe", RECIPES)
def test_converted_model_keeps_names_and_high_precision_parts(recipe):
    ref, model = _tiny(), _tiny()
    counts = convert_to_fp8(model, Fp8Recipe(recipe, emulate=True))
    # tiny: 4 layers x 5 MLA projections, 3 dense-MLP linears, 3 MoE layers x 3 shared-expert linears
    assert counts == {"linears": 4 * 5 + 3 + 3 * 3, "expert_stacks": 3}
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    if recipe != "blockwise":
        from torchao.float8.float8_linear import Float8Linear
        assert type(model.layers["0"].self_attn.o_proj) is Float8Linear
    tokens = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0))
    (l_ref, g_ref), (l_fp8, g_fp8) = _loss_and_grads(ref, tokens), _loss_and_grads(model, tokens)
    # fp32 compute around the emulated FP8 GEMMs, so no bf16 unit is involved: every CPU computes the same up to
    # fp32 summation order. FP8's rounding (E4M3: at most 2^-4 relative per operand element) moves the mean loss
    # of 128 tokens by 1e-5 to 2.2e-4 (tensorwise / rowwise, blockwise); 1e-3 is 4.5x the larger
    assert l_fp8 != l_ref and abs(l_fp8 / l_ref - 1) < 1e-3
    cos = float(torch.nn.functional.cosine_similarity(g_fp8, g_ref, dim=0))  # measured 0.996-0.997
    assert 0.99 < cos < 1.0


@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_blocks_run_the_same_fp8_step(recipe):
    """`parallel.compile=true` with FP8 (torchao's float8 linears are meant to be compiled, which fuses their
    casts): per-block torch.compile traces torchao's Float8Linear and our Fp8Mm and gives eager FP8's loss and
    gradients. fp32 compute, so that a bf16 rounding difference of a compiled op cannot flip FP8 roundings.
    Blockwise (our quantizers) also through Inductor's kernels, as `parallel.compile=true` runs it: before
    their fix its loss was nan. (Inductor costs ~55 s a recipe here; torchao's recipes are traced only.)"""
    from parallel.recompute import apply_compile

    tokens = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0))
    eager, compiled = _tiny(), _tiny()
    for model in (eager, compiled):
        convert_to_fp8(model, Fp8Recipe(recipe, emulate=True))
    apply_compile(compiled, backend="inductor" if recipe == "blockwise" else "aot_eager")
    (l_eager, g_eager), (l_compiled, g_compiled) = _loss_and_grads(eager, tokens), _loss_and_grads(compiled, tokens)
    assert l_compiled == pytest.approx(l_eager, rel=1e-6)
    assert rel(g_compiled, g_eager) < 1e-5


# ------------------------------------------------------------------------------------------------ optim
def test_bf16_moments_adamw_equals_adamw_within_bf16_rounding():
    """fp32 moments: exactly torch's AdamW; bf16 moments: state in bf16 (half the bytes), weights within bf16
    rounding of AdamW's after 5 steps."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(5)]
    results = {}
    for name, make in {"torch": lambda p: torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                                            weight_decay=0.1),
                       "fp32": lambda p: AdamWLowPrecisionMoments([p], 1e-2, (0.9, 0.95), 1e-8, 0.1, torch.float32),
                       "bf16": lambda p: AdamWLowPrecisionMoments([p], 1e-2, (0.9, 0.95), 1e-8, 0.1,
                                                                  torch.bfloat16)}.items():
        p = nn.Parameter(w0.clone())
        opt = make(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results[name] = (p.detach(), opt.state[p])
    torch.testing.assert_close(results["fp32"][0], results["torch"][0], rtol=1e-6, atol=1e-7)
    assert results["bf16"][1]["exp_avg"].dtype == torch.bfloat16
    assert results["bf16"][1]["exp_avg_sq"].dtype == torch.bfloat16
    # each bf16 moment is within 2^-8 relative of fp32's, so an update moves by at most ~2^-8 x 1.5 of its size
    # (the square root halves the second moment's error); 5 steps: < 0.02 x 5 step sizes, on any CPU
    step_size = (results["torch"][0] - w0).abs().mean()
    diff = (results["bf16"][0] - results["torch"][0]).abs().max()
    assert 0 < diff < 0.02 * step_size * 5


def test_bf16_moments_stay_bf16_through_a_state_dict_round_trip():
    """torch's Optimizer.load_state_dict casts state to the parameter's dtype; the moments must come back bf16
    and bitwise equal, so a resumed run continues exactly (tests/test_fp8_layouts.py checks a whole resume)."""
    p = nn.Parameter(torch.randn(16, 8))
    opt = AdamWLowPrecisionMoments([p], 1e-2, (0.9, 0.95), 1e-8, 0.1, torch.bfloat16)
    p.grad = torch.randn(16, 8)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    fresh = AdamWLowPrecisionMoments([nn.Parameter(p.detach().clone())], 1e-2, (0.9, 0.95), 1e-8, 0.1, torch.bfloat16)
    fresh.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        loaded, original = next(iter(fresh.state.values()))[key], opt.state[p][key]
        assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, original), key


# ------------------------------------------------------------------------------------------------ train
def test_fp8_on_cpu_without_emulation_is_a_config_error(dataset, tmp_path):
    proc = train(base_args(dataset, tmp_path / "x", 1) + ["precision=fp8_blockwise"], check=False)
    assert proc.returncode == 2
    assert "compute capability >= 8.9" in proc.stderr and "fp8_emulate=true" in proc.stderr
    assert not (tmp_path / "x").exists(), "a config error writes nothing to output_dir"


def test_fp8_recipes_train_like_bf16(dataset, tmp_path):
    """The tiny model, 40 steps: each FP8 recipe's validation loss within 1% of bf16's (and each differs,
    so FP8 really ran); bf16 AdamW moments as well."""
    steps = 40
    common = {"train.val_every": steps, "data.val_batches": 2, "optim.lr": 3e-3}
    val = {}
    for precision in ("bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_blockwise"):
        out = tmp_path / precision
        extra = {"precision.fp8_emulate": "true"} if precision.startswith("fp8") else {}
        if precision == "fp8_blockwise":
            extra["precision.moment_dtype"] = "bfloat16"
        train(base_args(dataset, out, steps, precision=precision, **common, **extra))
        val[precision] = metrics(out, "val_loss")[steps]
    # Both sides compute in bf16 on the same CPU, so its bf16 GEMM path (AVX2, AVX512-BF16, AMX) is the same on
    # both. The bound is not arithmetic: FP8 and bf16 round differently from step 1, and after 40 steps that is
    # seed-like noise; 1% sits above the spread measured over 3 seeds (every recipe within 0.77% of bf16,
    # bench/RESULTS.md)
    first = metrics(tmp_path / "bf16")[1]
    assert val["bf16"] < first - 0.5, "the runs must learn for the comparison to mean anything"
    for precision in ("fp8_tensorwise", "fp8_rowwise", "fp8_blockwise"):
        assert val[precision] != val["bf16"]
        assert abs(val[precision] / val["bf16"] - 1) < 0.01, (precision, val)
