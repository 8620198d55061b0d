"""Compiled fp8 kernels on a CUDA device (sm_89+): the scaled GEMMs in the layouts the layers
launch (forward x @ w.T and the dgrad's e5m2 x e4m3 against the weight's K-major copy, both
on TMA on Hopper; a row-major b on the pointer kernel) and the quantization kernels against
their torch references. Skipped without CUDA or fp8 tensor cores; run with
``FUSEDPAR_COMPILED_TRITON=1`` (tests/conftest.py).

Tolerances against float64 of the dequantized operands, fp32 output: Hopper's fp8 tensor
cores accumulate in about 14 bits, so with the default promotion of every 128-product
partial sum into fp32 the error is ~2**-14 of a partial sum (5e-4 allowed); with
``fast_accum`` the whole K sum stays in the tensor cores (2e-2 allowed, the figure to
compare with the measured one in the GPU run's log). bf16 output: 1e-2.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusedpar.kernels import interpreter, matmul, plan_matmul
from fusedpar.kernels.quantize import (
    quantize_rowwise, quantize_rowwise_reference, quantize_tensorwise, quantize_tensorwise_reference)
from tests.kernels._helpers import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton on a GPU"),
    pytest.mark.skipif(interpreter.is_interpreting(),
                       reason="Triton is interpreted: run with FUSEDPAR_COMPILED_TRITON=1 to compile the kernels"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                       reason="fp8 needs sm_89 or later"),
]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SHAPES = [(1000, 1168, 512), (64, 4096, 4096), (257, 144, 96)]


def _deq(q, s):
    return q.double() * s.double()


@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("layout", ["forward", "dgrad", "b_rowmajor"])
def test_compiled_fp8_matmul_matches_float64(layout, fast_accum):
    gen = torch.Generator(device="cuda").manual_seed(0)
    for M, N, K in SHAPES:
        x = torch.randn(M, K, device="cuda", generator=gen) * torch.logspace(-1, 1, M, device="cuda")[:, None]
        w = torch.randn(N, K, device="cuda", generator=gen)
        a_q, a_s = quantize_rowwise(x, E5M2 if layout == "dgrad" else E4M3)
        w_q, w_s = quantize_rowwise(w, E4M3)
        b = w_q.T if layout != "b_rowmajor" else w_q.T.contiguous()  # [K, N]: K-major, or row-major
        b_s = w_s.T
        plan = plan_matmul(a_q, b)
        if torch.cuda.get_device_capability() >= (9, 0):
            assert plan.path == ("pointer" if layout == "b_rowmajor" else "tma"), plan
        bias = torch.randn(N, device="cuda", generator=gen)
        ref = F.gelu(_deq(a_q, a_s) @ _deq(b, b_s) + bias.double())
        for out_dtype, tol in ((torch.float32, 2e-2 if fast_accum else 5e-4), (torch.bfloat16, 2e-2 if fast_accum
                                                                                else 1e-2)):
            out = torch.full((M, N), math.nan, device="cuda", dtype=out_dtype)
            matmul(a_q, b, a_scale=a_s, b_scale=b_s, bias=bias, activation="gelu", out=out, fast_accum=fast_accum,
                   kernel="triton")
            assert_close(out, ref, tol, f"{layout} fast_accum={fast_accum} {(M, N, K)} -> {out_dtype}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_compiled_quantization_equals_the_torch_reference(dtype, x_dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    for shape in ((4096, 4096), (3, 20000), (1000, 70)):
        x = (torch.randn(*shape, device="cuda", generator=gen) * torch.logspace(-3, 3, shape[-1], device="cuda")).to(
            x_dtype)
        col = torch.rand(shape[-1], device="cuda", generator=gen) + 0.5
        for col_scale in (None, col):
            q, s = quantize_rowwise(x, dtype, col_scale=col_scale)
            q_ref, s_ref = quantize_rowwise_reference(x, dtype, col_scale=col_scale)
            bad = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
            assert bad == 0 and torch.equal(s, s_ref), f"rowwise {shape} {x_dtype}->{dtype}: {bad} values differ"
        q, s = quantize_tensorwise(x, dtype)
        q_ref, s_ref = quantize_tensorwise_reference(x, dtype)
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), f"tensorwise {shape}"


@pytest.mark.parametrize("layout", ["forward", "b_rowmajor"])
def test_compiled_fp8_grouped_matmul_matches_float64(layout):
    # the MoE expert GEMMs: tokens sorted by expert (uneven groups, one empty), w [G, K, N] as
    # the layer passes it (the nn.Linear layout's view: K contiguous), or with N contiguous
    from fusedpar.kernels import grouped_matmul

    g = torch.Generator(device="cuda").manual_seed(3)
    counts, K, N = [700, 0, 33, 1290, 1], 1024, 768
    G, S = len(counts), sum(counts)
    ends = torch.tensor(counts, device="cuda").cumsum(0)
    x_q, x_s = quantize_rowwise(torch.randn(S, K, device="cuda", generator=g))
    w_nk = torch.randn(G, N, K, device="cuda", generator=g)
    w_q, w_s = quantize_rowwise(w_nk)
    w = w_q.transpose(1, 2) if layout == "forward" else w_q.transpose(1, 2).contiguous()
    out = torch.full((S, N), float("nan"), device="cuda")
    y = grouped_matmul(x_q, w, ends, x_scale=x_s, w_scale=w_s.squeeze(-1), out=out)
    bounds = [0] + ends.tolist()
    ref = torch.cat([_deq(x_q[a:b], x_s[a:b]) @ _deq(w_q[i], w_s[i]).T for i, (a, b) in
                     enumerate(zip(bounds[:-1], bounds[1:]))])
    assert not torch.isnan(y).any()
    assert_close(y, ref, 5e-4, f"grouped fp8 {layout}")
