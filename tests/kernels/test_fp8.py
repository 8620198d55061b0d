"""fp8: the scaled GEMMs (matmul, gated_matmul) and the quantization kernels, interpreted
Triton and the torch backend, against float64.

The GEMMs are checked against a float64 product of the *dequantized* operands (fp8 value x
scale): what the kernel is asked to compute, so the tolerance is the kernel's own error, not
fp8's. Products of two fp8 values are exact in fp32, so with an fp32 output the error is
fp32 summation and scaling (1e-5, as for fp32 GEMMs); with a bf16 output it is one bf16
rounding of the result (2**-9 relative; 1e-2 as for bf16 GEMMs). The quantization kernels
must equal the torch reference bit for bit (the same operations in the same order) and obey
the scale rules of fusedpar.kernels.quantize.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusedpar.kernels import gated_matmul, interpreter, matmul, plan_gated_matmul, plan_matmul
from fusedpar.kernels import configs
from fusedpar.kernels import plan as plan_module
from fusedpar.kernels.fp8 import FP8_MAX
from fusedpar.kernels.quantize import (
    EPS, dequantize, quantize_rowwise, quantize_rowwise_reference, quantize_tensorwise, quantize_tensorwise_reference)
from tests.kernels._helpers import Out, assert_close

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
needs_interpreter = pytest.mark.skipif(
    not interpreter.is_interpreting(), reason="needs TRITON_INTERPRET=1 to run Triton on CPU")
KERNELS = [pytest.param("triton", marks=needs_interpreter), "torch"]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PAIRS = {"e4m3": (E4M3, E4M3), "e5m2xe4m3": (E5M2, E4M3)}  # forward; dgrad (gradient x weight)
TOL_OUT = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (M, N, K): TMA-aligned fp8 rows (K, N multiples of 16) but no multiple of a tile; and one
# aligned nowhere (the pointer kernel)
SHAPES = [(200, 144, 96), (77, 40, 70)]


def _hp(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Random values whose rows differ in magnitude by 10**±2, so per-row scales matter."""
    return torch.randn(*shape, generator=gen) * torch.logspace(-2, 2, shape[-2])[:, None]


def _quantized(x: torch.Tensor, dtype: torch.dtype, scaling: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 rows of x, their scale): per row, per tensor, or none (values cast as they are)."""
    if scaling == "row":
        return quantize_rowwise_reference(x, dtype)
    if scaling == "tensor":
        return quantize_tensorwise_reference(x, dtype)
    return (x / x.abs().amax() * 100).to(dtype), None


def _operands(layout: str, M: int, N: int, K: int, pair, scaling: str, gen: torch.Generator):
    """a [M, K] (or [B, m, K]) and b [K, N] in fp8 with their scales, in the given layout."""
    a_dtype, b_dtype = pair
    if layout == "batched":  # rows of a bigger buffer (the batch dim cannot merge), scales likewise
        B, m = 3, M // 3
        big_q, big_s = _quantized(_hp(gen, (B + 2) * (m + 3), K), a_dtype, scaling)
        a = big_q.view(B + 2, m + 3, K)[1:1 + B, 2:2 + m]
        a_s = None if big_s is None else (big_s if scaling == "tensor" else big_s.view(B + 2, m + 3, 1)[1:1 + B, 2:2 + m])
    else:
        a, a_s = _quantized(_hp(gen, M, K), a_dtype, scaling)
        if layout == "a_transposed":  # unit stride along M (a wgrad's dy.T)
            a = a.T.contiguous().T
    w, w_s = _quantized(_hp(gen, N, K), b_dtype, scaling)  # an nn.Linear weight [N, K], scales per output
    b = w.T if layout != "contiguous" else w.T.contiguous()  # K-major (w.T) or row-major [K, N]
    b_s = None if w_s is None else (w_s if scaling == "tensor" else w_s.T)
    return a, a_s, b, b_s


def _dequant(q: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    return q.double() if s is None else q.double() * s.double()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["b_transposed", "contiguous", "a_transposed", "out_slice", "batched"])
@pytest.mark.parametrize("scaling", ["row", "tensor", "none"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_fp8_matmul_matches_float64_of_dequantized_operands(pair, scaling, layout, shape, kernel):
    M, N, K = shape
    gen = torch.Generator().manual_seed(hash((pair, scaling, layout, shape)) % 2**31)
    a, a_s, b, b_s = _operands(layout, M, N, K, PAIRS[pair], scaling, gen)
    bias = torch.randn(N, generator=gen).to(torch.bfloat16)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = Out(layout, (*a.shape[:-1], N), out_dtype)
        y = matmul(a, b, a_scale=a_s, b_scale=b_s, bias=bias, activation="gelu", out=out.view, kernel=kernel)
        ref = F.gelu(_dequant(a, a_s) @ _dequant(b, b_s) + bias.double())
        assert y.data_ptr() == out.view.data_ptr()
        assert_close(y, ref, TOL_OUT[out_dtype], f"{pair} {scaling} {layout} {shape} {kernel} -> {out_dtype}")
        out.assert_outside_untouched()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", ["b_transposed", "contiguous"])
def test_fp8_matmul_accumulates_into_fp32_and_allocates_bf16(layout, kernel):
    M, N, K = SHAPES[0]
    gen = torch.Generator().manual_seed(5)
    a, a_s, b, b_s = _operands(layout, M, N, K, PAIRS["e4m3"], "row", gen)
    main = torch.randn(M, N, generator=gen)
    ref = main.double() + _dequant(a, a_s) @ _dequant(b, b_s)
    matmul(a, b, a_scale=a_s, b_scale=b_s, out=main, accumulate=True, kernel=kernel)
    assert_close(main, ref, 1e-5, f"accumulate {layout} {kernel}")
    y = matmul(a, b, a_scale=a_s, b_scale=b_s, kernel=kernel)  # no out: bf16 by default
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert_close(y, _dequant(a, a_s) @ _dequant(b, b_s), TOL_OUT[torch.bfloat16])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", ["b_transposed", "contiguous"])
@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_fp8_gated_matmul_matches_float64(scaling, layout, kernel):
    M, N, K = SHAPES[0]
    gen = torch.Generator().manual_seed(hash((scaling, layout)) % 2**31)
    a, a_s, bg, bg_s = _operands(layout, M, N, K, PAIRS["e4m3"], scaling, gen)
    _, _, bu, bu_s = _operands(layout, M, N, K, PAIRS["e4m3"], scaling, gen)
    gate = _dequant(a, a_s) @ _dequant(bg, bg_s)
    up = _dequant(a, a_s) @ _dequant(bu, bu_s)
    out = torch.full((M, N), math.nan, dtype=torch.float32)
    y, g, u = gated_matmul(a, bg, bu, a_scale=a_s, b_gate_scale=bg_s, b_up_scale=bu_s, out=out, return_preact=True,
                           kernel=kernel)
    assert y is out and g.dtype == u.dtype == torch.float32
    assert_close(y, F.silu(gate) * up, 1e-5, f"gated {scaling} {layout} {kernel}")
    assert_close(g, gate, 1e-5, "gate")
    assert_close(u, up, 1e-5, "up")
    y16 = gated_matmul(a, bg, bu, a_scale=a_s, b_gate_scale=bg_s, b_up_scale=bu_s, kernel=kernel)
    assert y16.dtype == torch.bfloat16
    assert_close(y16, F.silu(gate) * up, 1e-2, "gated bf16")


@needs_interpreter
def test_fp8_planner_takes_tma_for_k_major_operands_and_the_pointer_kernel_otherwise(monkeypatch):
    M, N, K = SHAPES[0]
    gen = torch.Generator().manual_seed(6)
    a, _, b_kmajor, _ = _operands("b_transposed", M, N, K, PAIRS["e4m3"], "row", gen)
    assert plan_matmul(a, b_kmajor).path == "tma"
    assert plan_gated_matmul(a, b_kmajor, b_kmajor).path == "tma"
    for op in ("matmul", "gated"):  # fp8 tiles: twice the 16-bit tiles' K step, up to 128 (bytes per row)
        for tma in (True, False):
            assert all(c.block_k == 128 for c in configs.candidate_configs(op, E4M3, tma)), (op, tma)
    b_rowmajor = b_kmajor.contiguous()
    plan = plan_matmul(a, b_rowmajor)
    assert plan.path == "pointer" and "fp8 tensor cores need K-contiguous" in plan.reason, plan
    assert plan_matmul(a.T.contiguous().T, b_kmajor).path == "pointer"
    # Ampere has no fp8 tensor cores: refused with the reason, before anything launches
    monkeypatch.setattr(plan_module, "_PLAN_TARGET", ((8, 0), 108))
    with pytest.raises(ValueError, match="fp8 operands need fp8 tensor cores.*sm_80 has no fp8 tensor cores"):
        plan_matmul(a, b_kmajor)
    monkeypatch.setattr(plan_module, "_PLAN_TARGET", ((8, 9), 128))
    assert plan_matmul(a, b_kmajor).path == "pointer"  # Ada: fp8 mma, no TMA


def _ok8():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 32, generator=gen).to(E4M3)
    b = torch.randn(32, 16, generator=gen).to(E4M3)
    return a, b


@pytest.mark.parametrize("make_call, error, match", [
    (lambda a, b: matmul(a, b.bfloat16()), TypeError, r"b must have the dtype of a \(torch.float8_e4m3fn\) or another fp8 dtype, got torch.bfloat16"),
    (lambda a, b: matmul(a.bfloat16(), b.bfloat16(), a_scale=torch.ones(())), TypeError, r"a_scale apply to fp8 operands only, but a has dtype torch.bfloat16"),
    (lambda a, b: matmul(a, b, a_scale=torch.ones(6)), ValueError, r"a_scale must have one element \(per tensor\) or shape \(6, 1\), got shape \(6,\)"),
    (lambda a, b: matmul(a, b, b_scale=torch.ones(16, 1)), ValueError, r"b_scale must have one element \(per tensor\) or shape \(1, 16\), got shape \(16, 1\)"),
    (lambda a, b: matmul(a, b, a_scale=torch.ones((), dtype=torch.float16)), TypeError, r"a_scale must have dtype torch.float32, got torch.float16"),
    (lambda a, b: matmul(a, b, a_scale=1.0), TypeError, r"a_scale must be a torch.Tensor \(float32\), got float"),
    (lambda a, b: matmul(a, b, out_dtype=E4M3), TypeError, r"out_dtype must be one of .*for torch.float8_e4m3fn operands, got torch.float8_e4m3fn"),
    (lambda a, b: matmul(a, b, out=torch.empty(6, 16), out_dtype=torch.bfloat16), TypeError, r"out has dtype torch.float32 but out_dtype=torch.bfloat16"),
    (lambda a, b: matmul(a, b, out=torch.empty(6, 16, dtype=E4M3)), TypeError, r"out must have dtype .*torch.bfloat16.*got torch.float8_e4m3fn"),
    (lambda a, b: matmul(a, b, bias=torch.randn(16).to(E4M3)), TypeError, r"bias of an fp8 GEMM must have a dtype in .*got torch.float8_e4m3fn"),
    (lambda a, b: gated_matmul(a, b, b, b_up_scale=torch.ones(2, 16)), ValueError, r"b_up_scale must have one element \(per tensor\) or shape \(1, 16\)"),
], ids=["b_not_fp8", "scale_without_fp8", "a_scale_shape", "b_scale_shape", "scale_dtype", "scale_not_tensor",
        "out_dtype_fp8", "out_and_out_dtype", "out_fp8", "bias_fp8", "gated_scale_shape"])
def test_fp8_bad_input_raises_naming_the_argument(make_call, error, match):
    with pytest.raises(error, match=match):
        make_call(*_ok8())


# ----------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------

def _same_bits(q: torch.Tensor, ref: torch.Tensor) -> int:
    return int((q.view(torch.uint8) != ref.view(torch.uint8)).sum())


def _assert_scale_rules(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """The rules of quantize.py: the largest |x| of each group lands on FP8_MAX, and
    q * scale reproduces x to the format's half-spacing (relative in the normal range,
    absolute below it)."""
    fmax = FP8_MAX[dtype]
    mant, min_exp = {E4M3: (3, -6), E5M2: (2, -14)}[dtype]
    xf, deq = x.double(), dequantize(q, s, torch.float64)
    amax = xf.abs().amax(-1, keepdim=True) if s.numel() > 1 else xf.abs().amax()
    assert torch.equal(s.double(), (amax.clamp_min(EPS) / fmax).float().double()), f"{what}: scale != amax / FP8_MAX"
    qmax = q.float().abs().amax(-1, keepdim=True) if s.numel() > 1 else q.float().abs().amax()
    assert torch.all((qmax == fmax) | (amax == 0)), f"{what}: a group's largest value is not FP8_MAX"
    bound = xf.abs() * 2.0 ** -(mant + 1) + s.double() * 2.0 ** (min_exp - mant - 1) * 1.0001
    err = (deq - xf).abs()
    assert torch.all(err <= bound), f"{what}: dequantized error {(err / bound).max().item():.3g} x the bound"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_quantize_equals_the_reference_bit_for_bit_and_obeys_the_scale_rules(dtype, x_dtype, kernel):
    gen = torch.Generator().manual_seed(hash((str(dtype), str(x_dtype))) % 2**31)
    cases = {
        "rows": _hp(gen, 37, 70),
        "3-d, zero row": torch.cat([_hp(gen, 4, 40), torch.zeros(1, 40)]).view(5, 1, 40),
        "transposed": _hp(gen, 48, 64).T,  # unit stride along the rows
        "rows over two blocks": _hp(gen, 3, 20000),  # wider than one interpreted block (16384)
        "fp8 subnormals": torch.randn(6, 33, generator=gen) * torch.logspace(-6, 0, 33),
    }
    for name, x in cases.items():
        x = x.to(x_dtype)
        if x_dtype == torch.float16:
            x = x.clamp(-6e4, 6e4)
        col = torch.rand(x.shape[-1], generator=gen) * 4 + 0.25
        for col_scale in (None, col):
            what = f"{name} {x_dtype} -> {dtype} col_scale={col_scale is not None} {kernel}"
            q, s = quantize_rowwise(x, dtype, col_scale=col_scale, kernel=kernel)
            q_ref, s_ref = quantize_rowwise_reference(x, dtype, col_scale=col_scale)
            assert q.shape == x.shape and q.dtype == dtype and q.is_contiguous() and s.shape == (*x.shape[:-1], 1)
            assert _same_bits(q, q_ref) == 0 and torch.equal(s, s_ref), what
            xs = x.float() * col_scale if col_scale is not None else x.float()
            _assert_scale_rules(xs, q, s, dtype, what)
        q, s = quantize_tensorwise(x, dtype, kernel=kernel)
        q_ref, s_ref = quantize_tensorwise_reference(x, dtype)
        assert s.shape == () and _same_bits(q, q_ref) == 0 and torch.equal(s, s_ref), f"tensorwise {name}"
        _assert_scale_rules(x.float(), q, s, dtype, f"tensorwise {name}")


@needs_interpreter
def test_tensorwise_amax_spans_many_programs():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40000, 4, generator=gen)
    x[31234, 2] = 50.0  # in the last program's rows
    q, s = quantize_tensorwise(x, E4M3, kernel="triton")
    assert s.item() == pytest.approx(50.0 / 448.0) and q[31234, 2].float().item() == 448.0
    assert _same_bits(q, quantize_tensorwise_reference(x, E4M3)[0]) == 0


@pytest.mark.parametrize("make_call, error, match", [
    (lambda x: quantize_rowwise(x.int()), TypeError, r"x must have a dtype in .*got torch.int32"),
    (lambda x: quantize_rowwise(x, torch.bfloat16), TypeError, r"dtype must be one of .*got torch.bfloat16"),
    (lambda x: quantize_rowwise(x, col_scale=torch.ones(3)), ValueError, r"col_scale must be float32 on cpu with shape \(8,\) or one element, got \(3,\)"),
    (lambda x: quantize_tensorwise(x[0, 0]), ValueError, r"x must have at least 1 dim"),
    (lambda x: dequantize(x, torch.ones(())), TypeError, r"q must have an fp8 dtype"),
], ids=["x_dtype", "fp8_dtype", "col_scale", "scalar", "dequantize"])
def test_quantize_bad_input_raises_naming_the_argument(make_call, error, match):
    with pytest.raises(error, match=match):
        make_call(torch.randn(4, 8))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN == NaN only when the bits are the same)."""
    return t.contiguous().view({1: torch.uint8, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_quantize_keeps_nan_and_inf_rows_non_finite_bit_equal_to_the_reference(dtype, x_dtype, kernel):
    """A row holding NaN or ±inf dequantizes to NaN across the row (NaN: scale NaN; inf:
    scale inf, the other values 0), the other rows are untouched, and the kernel writes
    the same bits as the reference, NaN included (0x7F, whatever NaN's sign was)."""
    gen = torch.Generator().manual_seed(11)
    for width in (40, 20000):  # one block per row, and rows over two interpreted blocks
        x = torch.randn(7, width, generator=gen)
        bad = {1: math.nan, 2: -math.nan, 3: math.inf, 4: -math.inf}
        for row, v in bad.items():
            x[row, width - 3 if width > 16384 else row] = v  # in the last block
        x[5, :3] = torch.tensor([math.nan, math.inf, -math.inf])
        x = x.to(x_dtype)
        rows_bad = torch.zeros(7, dtype=torch.bool)
        rows_bad[[1, 2, 3, 4, 5]] = True
        for col_scale in (None, torch.rand(width, generator=gen) + 0.5):
            what = f"width {width} {x_dtype} -> {dtype} col_scale={col_scale is not None} {kernel}"
            q, s = quantize_rowwise(x, dtype, col_scale=col_scale, kernel=kernel)
            q_ref, s_ref = quantize_rowwise_reference(x, dtype, col_scale=col_scale)
            assert torch.equal(_bits(q), _bits(q_ref)), f"{what}: q differs from the reference"
            assert torch.equal(_bits(s), _bits(s_ref)), f"{what}: scales differ: {s.flatten()} vs {s_ref.flatten()}"
            deq = dequantize(q, s, torch.float32)
            assert deq[rows_bad].isnan().all(), f"{what}: a non-finite row dequantizes to finite values"
            assert deq[~rows_bad].isfinite().all(), f"{what}: a finite row became non-finite"
            assert s[[1, 2]].isnan().all() and torch.isposinf(s[[3, 4]]).all(), f"{what}: scales {s.flatten()}"
            assert not (q[rows_bad].float().abs() == FP8_MAX[dtype]).any(), f"{what}: NaN or inf clamped to FP8_MAX"
        q, s = quantize_tensorwise(x, dtype, kernel=kernel)
        q_ref, s_ref = quantize_tensorwise_reference(x, dtype)
        assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(_bits(s), _bits(s_ref)), f"tensorwise {width}"
        assert s.isnan() and dequantize(q, s, torch.float32).isnan().all(), f"tensorwise {width}: not NaN"


@pytest.mark.parametrize("kernel", KERNELS)
def test_fp8_matmul_of_a_nan_token_is_nan_in_that_row_as_in_fp32(kernel):
    """fp8 row-wise: a NaN (or inf) token's output row is non-finite, as the fp32 product's
    is, and no other row changes. The torch backend gives NaN across the row; interpreted
    Triton reads an fp8 NaN as ±480 in its fp8 upcast (interpreter.py, 3.), so an inf row
    (scale inf) comes out ±inf there, where a GPU's fp8 MMA gives NaN."""
    gen = torch.Generator().manual_seed(12)
    x, w = torch.randn(6, 64, generator=gen), torch.randn(32, 64, generator=gen)
    x[1, 5], x[4, 9] = math.nan, math.inf
    xq, xs = quantize_rowwise(x, E4M3, kernel=kernel)
    wq, ws = quantize_rowwise(w, E4M3, kernel=kernel)
    y = matmul(xq, wq.t(), a_scale=xs, b_scale=ws.view(1, -1), out_dtype=torch.float32, kernel=kernel)
    y32 = x @ w.t()
    for row in (1, 4):
        assert not y32[row].isfinite().any() and not y[row].isfinite().any(), f"row {row}: fp8 {y[row]}, fp32 {y32[row]}"
        assert y[row].isnan().all() or (kernel == "triton" and row == 4), f"row {row}: fp8 {y[row]} is not NaN"
    finite = [0, 2, 3, 5]
    ref = _dequant(xq[finite], xs[finite]) @ _dequant(wq, ws).T
    assert_close(y[finite], ref, TOL_OUT[torch.float32], f"finite rows {kernel}")
